"""data.format text_classification: labelled texts -> WordPiece ids per split, for the encoder family."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import cli, write_config

TOPICS = {
    "fruit": "apples pears plums cherries ripe orchard harvest sweet juice",
    "weather": "rain clouds storm wind sunny forecast thunder cold front",
    "code": "function variable loop compiler python bug return value stack",
}


def labelled_csv(path: Path, rows_per_class: int = 20, pair: bool = False) -> Path:
    rng = np.random.default_rng(0)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "other", "label"] if pair else ["text", "label"])
        for label, words in TOPICS.items():
            vocab = words.split()
            for _ in range(rows_per_class):
                text = " ".join(rng.choice(vocab, size=int(rng.integers(3, 12))))
                writer.writerow([text, " ".join(rng.choice(vocab, size=4)), label] if pair else [text, label])
    return path


def config_for(tmp: Path, data: dict, **model: object) -> Path:
    return write_config(tmp / "c.yaml", {"seed": 0, "threads": 1, "run_dir": str(tmp / "run"),
                                         "data": {"format": "text_classification", **data},
                                         "model": {"block_size": 16, **model}})


def prepared(tmp: Path) -> tuple[dict, dict]:
    manifest = json.loads((tmp / "run" / "prepare" / "manifest.json").read_text())
    return manifest, load_file(str(tmp / "run" / "prepare" / "data.safetensors"))


def test_prepare_splits_by_label_and_wraps_every_text_in_cls_sep(tmp_path: Path) -> None:
    config = config_for(tmp_path, {"path": str(labelled_csv(tmp_path / "d.csv"))}, block_size=8)
    result = cli("prepare", "-c", config, "--json", "-q")
    assert result.code == 0, result.stderr
    manifest, arrays = prepared(tmp_path)
    assert manifest["labels"] == ["code", "fruit", "weather"] and manifest["splits"] == {"train": 48, "val": 6, "test": 6}
    assert manifest["class_counts"]["test"] == [2, 2, 2]  # stratified
    cls_id, sep_id = manifest["special_ids"]["[CLS]"], manifest["special_ids"]["[SEP]"]
    for split in ("train", "val", "test"):
        ids, offsets = arrays[f"{split}_ids"], arrays[f"{split}_offsets"]
        assert len(offsets) == manifest["splits"][split] + 1 and offsets[-1] == len(ids)
        starts, ends = offsets[:-1], offsets[1:] - 1
        assert (ids[starts] == cls_id).all() and (ids[ends] == sep_id).all()
        assert (np.diff(offsets) <= 8).all()
    assert 0 < sum(manifest["truncated"].values()) < 60  # the longer texts were cut, counted
    assert (tmp_path / "run" / "prepare" / "test.jsonl").read_text().count("\n") == 6


def test_sentence_pairs_get_token_type_one_for_the_second_text(tmp_path: Path) -> None:
    data = {"path": str(labelled_csv(tmp_path / "d.csv", pair=True)), "text_pair": "other"}
    assert cli("prepare", "-c", config_for(tmp_path, data, block_size=32), "-q").code == 0
    _, arrays = prepared(tmp_path)
    assert set(np.unique(arrays["train_types"])) == {0, 1} and len(arrays["train_types"]) == len(arrays["train_ids"])


def test_the_imported_models_tokenizer_is_used(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    from tests.hf_models import make_bert

    folder = make_bert(tmp_path / "bert", "none")
    config = write_config(tmp_path / "c.yaml", {
        "seed": 0, "threads": 1, "run_dir": str(tmp_path / "run"), "init": {"from": str(folder)},
        "data": {"format": "text_classification", "path": str(labelled_csv(tmp_path / "d.csv"))},
        "model": {"block_size": 64}})
    assert cli("prepare", "-c", config, "-q").code == 0
    manifest, arrays = prepared(tmp_path)
    assert manifest["tokenizer"]["source"] == str(folder)
    first_test = json.loads((tmp_path / "run" / "prepare" / "test.jsonl").read_text().splitlines()[0])
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    reference.enable_truncation(64)  # as long as the model's context: the text is cut, [CLS] and [SEP] kept
    want = reference.encode(first_test["text"]).ids
    assert arrays["test_ids"][: arrays["test_offsets"][1]].tolist() == want and want[-1] == 3  # [SEP]


@pytest.mark.parametrize("rows, data, words", [
    ([["text", "label"], ["good", "a"], ["", "b"], ["fine", "a"]], {}, ("record 2", "empty 'text'")),
    ([["words", "label"], ["good", "a"], ["bad", "b"]], {}, ("no column 'text'", "words, label")),
    ([["text", "label"], ["good", "a"], ["bad", "a"]], {}, ("at least two classes",)),
    ([["text", "label"]] + [[" ".join(["word"] * 40), "ab"[i % 2]] for i in range(20)], {"too_long": "error"},
     ("longer than model.block_size", "data.too_long: truncate")),
])
def test_bad_text_data_is_one_line(rows: list, data: dict, words: tuple, tmp_path: Path) -> None:
    with (tmp_path / "d.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    result = cli("prepare", "-c", config_for(tmp_path, {"path": str(tmp_path / "d.csv"), **data}), "-q")
    assert result.code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(word in result.stderr for word in words), result.stderr
    assert not (tmp_path / "run" / "prepare" / "manifest.json").exists()


def test_init_builds_a_classifier_from_scratch_or_imports_one_checked_against_transformers(tmp_path: Path) -> None:
    """From scratch: an encoder with the data's vocabulary and labels. init.from a BertModel folder: the
    encoder within 1e-4 of transformers, and a new seeded classifier head for the data's 3 labels."""
    from bigmodel import registry
    from tests.hf_models import make_bert

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    scratch = config_for(tmp_path / "a", {"path": str(labelled_csv(tmp_path / "d.csv"))}, n_layer=1, n_embd=32)
    result = cli("pipeline", "-c", scratch, "--to", "init", "--json", "-q")
    assert result.code == 0, result.stderr
    model, manifest = registry.load_model(tmp_path / "a" / "run" / "init" / "model.safetensors")
    assert manifest["architecture"]["task"] == "classification" and manifest["architecture"]["n_outputs"] == 3
    assert manifest["data"]["labels"] == ["code", "fruit", "weather"] and manifest["init_scheme"] == "bert"

    folder = make_bert(tmp_path / "bert", "none")
    imported = write_config(tmp_path / "b" / "c.yaml", {
        "seed": 0, "threads": 1, "run_dir": str(tmp_path / "b" / "run"), "init": {"from": str(folder)},
        "data": {"format": "text_classification", "path": str(tmp_path / "d.csv")}, "model": {"block_size": 32}})
    result = cli("pipeline", "-c", imported, "--to", "init", "--json", "-q")
    assert result.code == 0, result.stderr
    model, manifest = registry.load_model(tmp_path / "b" / "run" / "init" / "model.safetensors")
    record = manifest["import"]
    assert record["parity"]["passed"] and record["parity"]["max_abs_diff"] < 1e-4
    assert any("new task head" in note for note in record["notes"])
    assert manifest["architecture"]["block_size"] == 32 and model.head.out.weight.shape == (3, 32)


def test_a_classifier_trains_and_evaluates_with_precision_recall_and_a_confusion_matrix(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", {
        "seed": 0, "threads": 1, "run_dir": str(tmp_path / "run"),
        "data": {"format": "text_classification", "path": str(labelled_csv(tmp_path / "d.csv", rows_per_class=40))},
        "model": {"n_layer": 2, "n_embd": 64, "n_head": 4, "block_size": 32, "dropout": 0.0},
        "train": {"lr": 1e-3, "batch_size": 16, "max_steps": 60, "eval_every": 20, "warmup_steps": 5}})
    result = cli("pipeline", "-c", config, "--to", "eval", "--json", "-q")
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    scores = report["metrics"]
    assert scores["accuracy"] >= 0.9 and scores["f1_macro"] >= 0.9  # three topics with disjoint words
    assert set(scores["per_class"]) == {"code", "fruit", "weather"} and len(scores["confusion_matrix"]) == 3
    exported = cli("export", "-c", config, "--json", "-q")
    assert exported.code == 0, exported.stderr
    parity = json.loads((tmp_path / "run" / "export" / "parity.json").read_text())
    assert parity["passed"] and parity["max_abs_diff"] < 1e-4 and parity["texts"] == 12  # padded and alone
    # infer on the test split's raw texts (ONNX Runtime, its own tokenization) = eval's PyTorch numbers
    import torch

    from bigmodel import registry
    from bigmodel.config import load_config
    from bigmodel.datasets import load_texts
    from bigmodel.train.encoder import probabilities

    out = tmp_path / "p.jsonl"
    inferred = cli("infer", "-c", config, "--input", str(tmp_path / "run" / "prepare" / "test.jsonl"), "--output", str(out),
                   "--json", "-q")
    assert inferred.code == 0, inferred.stderr
    model, manifest = registry.load_model(tmp_path / "run" / "train" / "best.safetensors")
    want = probabilities(model, load_texts(load_config(config), "test"), manifest["architecture"]["pad_id"], torch.device("cpu"))
    got = np.array([[row["probabilities"][label] for label in manifest["data"]["labels"]]
                    for row in map(json.loads, out.read_text().splitlines())])
    assert np.abs(got - want).max() < 1e-4


def test_an_imported_embedding_model_serves_openai_embeddings_equal_to_infer(tmp_path: Path) -> None:
    """init.from a BertModel with model.task embedding, exported, served: the official openai client gets
    unit vectors, the same as `bigmodel infer` writes for the same texts; a bad input is a 400 naming it."""
    import openai

    from tests.hf_models import make_bert
    from tests.test_serve import http, server

    folder = make_bert(tmp_path / "bert", "none")
    config = write_config(tmp_path / "c.yaml", {
        "seed": 0, "threads": 1, "run_dir": str(tmp_path / "run"), "init": {"from": str(folder)},
        "data": {"format": "text_classification", "path": str(labelled_csv(tmp_path / "d.csv"))},
        "model": {"task": "embedding", "block_size": 64}, "export": {"checkpoint": "init"}})
    assert cli("pipeline", "-c", config, "--to", "init", "-q").code == 0
    assert cli("export", "-c", config, "-q").code == 0
    texts = ["ripe apples and pears", "a storm with thunder"]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "e.npy"
    assert cli("infer", "-c", config, "--input", str(tmp_path / "t.jsonl"), "--output", str(out), "-q").code == 0
    want = np.load(out)
    with server("-c", config) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        got = np.array([item.embedding for item in client.embeddings.create(model="run", input=texts).data])
        status, answer = http(base, "/v1/embeddings", {"input": []})
    assert got.shape == want.shape == (2, 32) and np.abs(got - want).max() < 1e-6
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert status == 400 and answer["error"]["param"] == "input"
