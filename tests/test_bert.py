"""The encoder family: BERT's model and its import, checked against transformers' own BERT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.hf_models import make_bert

TASKS = {"none": "embedding", "mlm": "mlm", "classifier": "classification"}
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs, judge my vow."]


def _imported(folder: Path, task: str, labels: int = 3) -> tuple[torch.nn.Module, object]:
    from bigmodel import pretrained
    from bigmodel.pretrained import build

    source = pretrained.describe(folder)
    arch = source.arch.model_validate(
        {**source.arch.to_dict(), "task": task, "n_outputs": labels if task == "classification" else 0}
    )
    return build.build(source, arch), source


def _batch(source: object) -> dict[str, torch.Tensor]:
    """The two texts as one right-padded batch, as transformers' tokenizer would give it."""
    from bigmodel import tokenizer as tokenizers

    tok = tokenizers.from_json(source.tokenizer_json)  # type: ignore[attr-defined]
    rows = [tok.encode(text) for text in TEXTS]
    width = max(map(len, rows))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@pytest.mark.parametrize("head", ["none", "mlm", "classifier"])
def test_import_equals_transformers_for_each_task(head: str, tmp_path: Path) -> None:
    """The encoder's hidden states within 1e-4 of BertModel's (the import gate), and the task's own output
    (MLM logits, class logits, mean-pooled embeddings) against transformers' task model on a padded batch."""
    import transformers

    from bigmodel import streaming
    from bigmodel.pretrained import build

    folder = make_bert(tmp_path / "bert", head)
    model, source = _imported(folder, TASKS[head])
    assert source.arch.task == "embedding" and source.model_type == "bert"  # type: ignore[attr-defined]
    parity = build.check_parity(
        streaming.fetch_from(streaming.StateDict(model)), model.arch, source, _tokenizer(source), 1e-4
    )
    assert parity["passed"] and parity["max_abs_diff"] < 1e-4, parity
    batch = _batch(source)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        ours = model(**batch)
        if head == "none":
            hidden = transformers.BertModel.from_pretrained(str(folder)).eval()(**batch).last_hidden_state
            weights = batch["attention_mask"][..., None].float()
            theirs = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
        elif head == "mlm":
            theirs = transformers.BertForMaskedLM.from_pretrained(str(folder)).eval()(**batch).logits
            ours, theirs = ours[real], theirs[real]
        else:
            theirs = transformers.BertForSequenceClassification.from_pretrained(str(folder)).eval()(**batch).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-4


def _tokenizer(source: object) -> object:
    from bigmodel import tokenizer as tokenizers

    return tokenizers.from_json(source.tokenizer_json)  # type: ignore[attr-defined]


def test_padding_does_not_change_a_sequences_numbers(tmp_path: Path) -> None:
    """Mask correctness: a sequence alone and the same sequence padded inside a longer batch give the same
    logits, hidden states and embedding."""
    model, source = _imported(make_bert(tmp_path / "bert", "classifier"), "classification")
    batch = _batch(source)
    short = int(batch["attention_mask"][0].sum())
    alone = {key: value[:1, :short] for key, value in batch.items()}
    assert short < batch["input_ids"].shape[1]  # the first text really is padded in the batch
    with torch.no_grad():
        assert torch.allclose(model(**alone)[0], model(**batch)[0], atol=1e-5)
        assert torch.allclose(model.encode(**alone)[0], model.encode(**batch)[0, :short], atol=1e-5)


def test_a_missing_task_head_starts_fresh_and_an_unused_one_is_left_out(tmp_path: Path) -> None:
    """A classifier over a plain BertModel gets a new, seeded head (said in the notes); an MLM folder
    imported for classification leaves its MLM head out, by name."""
    model, source = _imported(make_bert(tmp_path / "plain", "none"), "classification")
    again, _ = _imported(make_bert(tmp_path / "plain", "none"), "classification")
    assert any("new task head" in note and "head.out.weight" in note for note in source.notes)
    assert torch.equal(model.head.out.weight, again.head.out.weight)  # seeded: the same both times
    _, mlm_source = _imported(make_bert(tmp_path / "mlm", "mlm"), "classification")
    assert any("cls.predictions.transform.dense.weight left out" in note for note in mlm_source.notes)


def test_tied_mlm_decoder_is_the_word_embedding(tmp_path: Path) -> None:
    model, _ = _imported(make_bert(tmp_path / "bert", "mlm"), "mlm")
    assert model.head.decoder.weight is model.embeddings.wte.weight
    assert np.isfinite(model.head.decoder.bias.detach().numpy()).all()


def test_a_bert_folder_is_not_imported_into_a_decoder_config(tmp_path: Path) -> None:
    from tests.conftest import cli, write_config

    folder = make_bert(tmp_path / "bert", "none")
    (tmp_path / "corpus.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 50)
    config = write_config(
        tmp_path / "c.yaml",
        {
            "seed": 0,
            "threads": 1,
            "run_dir": str(tmp_path / "run"),
            "data": {"format": "text", "path": str(tmp_path / "corpus.txt")},
            "init": {"from": str(folder)},
        },
    )
    assert cli("prepare", "-c", config, "-q").code == 0
    result = cli("init", "-c", config, "-q")
    assert result.code == 2 and "holds a 'bert' model, but model.family is 'gpt'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "init" / "model.safetensors").exists()
