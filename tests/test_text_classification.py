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
    return write_config(
        tmp / "c.yaml",
        {
            "seed": 0,
            "threads": 1,
            "run_dir": str(tmp / "run"),
            "data": {"format": "text_classification", **data},
            "model": {"block_size": 16, **model},
        },
    )


def prepared(tmp: Path) -> tuple[dict, dict]:
    manifest = json.loads((tmp / "run" / "prepare" / "manifest.json").read_text())
    return manifest, load_file(str(tmp / "run" / "prepare" / "data.safetensors"))


def test_prepare_splits_by_label_and_wraps_every_text_in_cls_sep(tmp_path: Path) -> None:
    config = config_for(tmp_path, {"path": str(labelled_csv(tmp_path / "d.csv"))}, block_size=8)
    result = cli("prepare", "-c", config, "--json", "-q")
    assert result.code == 0, result.stderr
    manifest, arrays = prepared(tmp_path)
    assert manifest["labels"] == ["code", "fruit", "weather"] and manifest["splits"] == {
        "train": 48,
        "val": 6,
        "test": 6,
    }
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
    config = write_config(
        tmp_path / "c.yaml",
        {
            "seed": 0,
            "threads": 1,
            "run_dir": str(tmp_path / "run"),
            "init": {"from": str(folder)},
            "data": {"format": "text_classification", "path": str(labelled_csv(tmp_path / "d.csv"))},
            "model": {"block_size": 64},
        },
    )
    assert cli("prepare", "-c", config, "-q").code == 0
    manifest, arrays = prepared(tmp_path)
    assert manifest["tokenizer"]["source"] == str(folder)
    first_test = json.loads((tmp_path / "run" / "prepare" / "test.jsonl").read_text().splitlines()[0])
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    reference.no_padding()  # the file pads every text to 64, as sentence-transformers' do: no [PAD] is stored
    reference.enable_truncation(64)  # as long as the model's context: the text is cut, [CLS] and [SEP] kept
    want = reference.encode(first_test["text"]).ids
    assert arrays["test_ids"][: arrays["test_offsets"][1]].tolist() == want and want[-1] == 3  # [SEP]
    assert 0 not in arrays["train_ids"] and manifest["tokens"]["train"] < 64 * manifest["splits"]["train"]


@pytest.mark.parametrize(
    "rows, data, words",
    [
        ([["text", "label"], ["good", "a"], ["", "b"], ["fine", "a"]], {}, ("record 2", "empty 'text'")),
        ([["words", "label"], ["good", "a"], ["bad", "b"]], {}, ("no column 'text'", "words, label")),
        ([["text", "label"], ["good", "a"], ["bad", "a"]], {}, ("at least two classes",)),
        (
            [["text", "label"]] + [[" ".join(["word"] * 40), "ab"[i % 2]] for i in range(20)],
            {"too_long": "error"},
            ("longer than model.block_size", "data.too_long: truncate"),
        ),
    ],
)
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
    assert manifest.architecture.task == "classification" and manifest.architecture.n_outputs == 3
    assert manifest.data.labels == ["code", "fruit", "weather"] and manifest.init_scheme == "bert"

    folder = make_bert(tmp_path / "bert", "none")
    imported = write_config(
        tmp_path / "b" / "c.yaml",
        {
            "seed": 0,
            "threads": 1,
            "run_dir": str(tmp_path / "b" / "run"),
            "init": {"from": str(folder)},
            "data": {"format": "text_classification", "path": str(tmp_path / "d.csv")},
            "model": {"block_size": 32},
        },
    )
    result = cli("pipeline", "-c", imported, "--to", "init", "--json", "-q")
    assert result.code == 0, result.stderr
    model, manifest = registry.load_model(tmp_path / "b" / "run" / "init" / "model.safetensors")
    record = manifest.import_
    assert record.parity["passed"] and record.parity["max_abs_diff"] < 1e-4
    assert any("new task head" in note for note in record.notes)
    assert manifest.architecture.block_size == 32 and model.head.out.weight.shape == (3, 32)


def test_a_classifier_trains_and_evaluates_with_precision_recall_and_a_confusion_matrix(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.yaml",
        {
            "seed": 0,
            "threads": 1,
            "run_dir": str(tmp_path / "run"),
            "data": {"format": "text_classification", "path": str(labelled_csv(tmp_path / "d.csv", rows_per_class=40))},
            "model": {"n_layer": 2, "n_embd": 64, "n_head": 4, "block_size": 32, "dropout": 0.0},
            "train": {"lr": 1e-3, "batch_size": 16, "max_steps": 60, "eval_every": 20, "warmup_steps": 5},
        },
    )
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
    from bigmodel.scoring import probabilities, torch_encoder

    out = tmp_path / "p.jsonl"
    inferred = cli("infer", "-c", config, "--output", str(out), "--json", "-q")  # its default input: the test split
    assert inferred.code == 0, inferred.stderr
    model, manifest = registry.load_model(tmp_path / "run" / "train" / "best.safetensors")
    want = probabilities(
        torch_encoder(model, torch.device("cpu")), load_texts(load_config(config), "test"), manifest.architecture.pad_id
    )
    got = np.array(
        [
            [row["probabilities"][label] for label in manifest.data.labels]
            for row in map(json.loads, out.read_text().splitlines())
        ]
    )
    assert np.abs(got - want).max() < 1e-4
    # serve's /v1/predict answers what infer wrote for the same texts; a bad request is a 400 naming its field
    from tests.test_serve import http, server

    records = [json.loads(line) for line in (tmp_path / "run" / "prepare" / "test.jsonl").read_text().splitlines()]
    inferred_rows = [json.loads(line) for line in out.read_text().splitlines()]
    with server("-c", config) as base:
        status, answer = http(base, "/v1/predict", {"texts": [r["text"] for r in records[:3]]})
        bad_status, bad = http(base, "/v1/predict", {"texts": ["fine", ""]})
        wrong_route, _ = http(base, "/v1/embeddings", {"input": "a classifier has no embeddings route"})
    assert status == 200, answer
    assert [p["prediction"] for p in answer["predictions"]] == [row["prediction"] for row in inferred_rows[:3]]
    for served, written in zip(answer["predictions"], inferred_rows):
        assert all(abs(served["probabilities"][k] - v) < 1e-5 for k, v in written["probabilities"].items())
    assert bad_status == 400 and bad["error"]["param"] == "texts" and wrong_route == 404
    # eval of the ONNX model (ONNX Runtime) gives the checkpoint's scores
    onnx = cli(
        "eval",
        "-c",
        config,
        "--set",
        f"eval.checkpoint={tmp_path / 'run' / 'export' / 'model.onnx'}",
        "--set",
        f"eval.output={tmp_path / 'onnx.json'}",
        "-q",
    )
    assert onnx.code == 0, onnx.stderr
    from_onnx = json.loads((tmp_path / "onnx.json").read_text())["metrics"]
    assert (
        from_onnx["confusion_matrix"] == scores["confusion_matrix"] and abs(from_onnx["loss"] - scores["loss"]) < 1e-5
    )
    # the report page is the tabular classifier's: confusion matrix and per-class precision/recall
    reported = cli("report", "-c", config, "--json", "-q")
    assert reported.code == 0, reported.stderr
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert "confusion_matrix.png" in page and "per_class.png" in page and "weather" in page
    # int8 through compress: scored by the same eval, timed on one text
    compressed = cli("compress", "-c", config, "--set", "compress.steps=[{method: quantize, bits: 8}]", "--json", "-q")
    assert compressed.code == 0, compressed.stderr
    fp32_row, int8_row = json.loads(compressed.stdout)["steps"]
    assert int8_row["metrics"]["accuracy"] >= 0.9 and int8_row["weight_bytes"] < 0.5 * fp32_row["weight_bytes"]
    assert fp32_row["metrics"]["accuracy"] == scores["accuracy"] and int8_row["latency_ms"] > 0


def test_an_imported_embedding_model_serves_openai_embeddings_equal_to_infer(tmp_path: Path) -> None:
    """init.from a BertModel with model.task embedding, exported, served: the official openai client gets
    unit vectors, the same as `bigmodel infer` writes for the same texts; a bad input is a 400 naming it."""
    import openai

    from tests.hf_models import make_bert
    from tests.test_serve import http, server

    folder = make_bert(tmp_path / "bert", "none")
    config = write_config(
        tmp_path / "c.yaml",
        {
            "seed": 0,
            "threads": 1,
            "run_dir": str(tmp_path / "run"),
            "init": {"from": str(folder)},
            "data": {
                "format": "text_classification",
                "path": str(labelled_csv(tmp_path / "d.csv", pair=True)),
                "text_pair": "other",
            },
            "model": {"task": "embedding", "block_size": 64},
            "export": {"checkpoint": "init"},
            "eval": {"checkpoint": "init"},
        },
    )
    assert cli("pipeline", "-c", config, "--to", "init", "-q").code == 0
    evaluated = cli("eval", "-c", config, "--json", "-q")  # retrieval of each text's partner, held-out pairs
    assert evaluated.code == 0, evaluated.stderr
    scores = json.loads((tmp_path / "run" / "eval" / "metrics.init.json").read_text())["metrics"]
    assert scores["pairs"] == 6 and 0 <= scores["recall_at_1"] <= scores["recall_at_5"] <= 1
    assert scores["recall_at_1"] <= scores["mrr"] <= 1
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
        # Too long for the 64-token context: refused, as a long prompt is, unless the request asks to cut it.
        long_status, refused = http(base, "/v1/embeddings", {"input": ["short", "word " * 100]})
        cut_status, cut = http(base, "/v1/embeddings", {"input": ["short", "word " * 100], "truncate": True})
        card = client.models.retrieve("run")
    assert got.shape == want.shape == (2, 32) and np.abs(got - want).max() < 1e-6
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert status == 400 and answer["error"]["param"] == "input"
    assert long_status == 400 and refused["error"]["message"].startswith(
        "input[1]: longer than the model's context of 64"
    )
    assert cut_status == 200 and cut["truncated"] == [1] and len(cut["data"]) == 2
    assert card.id == "run" and card.task == "embedding"
    # infer cuts too (a file is not a conversation), and says so
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": "word " * 100}) + "\n")
    warned = cli("infer", "-c", config, "--input", str(tmp_path / "long.jsonl"), "--output", str(tmp_path / "l.npy"))
    assert (
        warned.code == 0
        and "1 of 1 texts (the first: record 1) were longer than the model's context of 64" in warned.stderr
    )


def test_masking_follows_berts_80_10_10_rule_and_never_picks_specials() -> None:
    from bigmodel.scoring import masked

    specials = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 1000, (256, 128))
    ids[:, 0], ids[:, -1], ids[:8, 100:] = 2, 3, 0  # [CLS], [SEP], padding
    inputs, targets = masked(ids, specials, 1000, np.random.default_rng(1))
    chosen = targets != -100
    assert not chosen[ids < 5].any() and (targets[chosen] == ids[chosen]).all()
    assert abs(chosen.sum() / (ids >= 5).sum() - 0.15) < 0.01
    as_mask = (inputs[chosen] == 4).mean()
    kept = (inputs[chosen] == ids[chosen]).mean()  # 10% kept, and a random token is rarely the same one
    assert abs(as_mask - 0.8) < 0.025 and abs(kept - 0.1) < 0.025  # ~4,900 picked: std 0.006
    assert (inputs[~chosen] == ids[~chosen]).all()
    again, _ = masked(ids, specials, 1000, np.random.default_rng(1))
    assert (again == inputs).all()  # seeded: a resumed run masks the same way
    one = np.array([[2, 7, 3]])  # a one-token text still gets its prediction
    assert (masked(one, specials, 1000, np.random.default_rng(0))[1] != -100).sum() == 1


def test_masked_lm_pretraining_on_a_corpus_learns_and_resumes_bitwise(tmp_path: Path) -> None:
    """A .txt corpus -> windows of block_size tokens (split in order, nothing lost) -> MLM training whose
    masked-token loss falls; stopping at step 60 (between evaluations) and resuming gives the uninterrupted run's weights."""
    from safetensors.numpy import load_file as load_weights

    rng = np.random.default_rng(0)
    words = " ".join(TOPICS.values()).split()
    paragraphs = [" ".join(rng.choice(words[9 * (i % 3) : 9 * (i % 3) + 9], size=30)) for i in range(120)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(paragraphs) + "\n")
    runs = {}
    for name in ("straight", "resumed"):
        (tmp_path / name).mkdir()
        runs[name] = write_config(
            tmp_path / name / "c.yaml",
            {
                "seed": 0,
                "threads": 1,
                "run_dir": str(tmp_path / name / "run"),
                "data": {"format": "text_classification", "path": str(corpus), "vocab_size": 100},
                "model": {"n_layer": 2, "n_embd": 64, "n_head": 2, "block_size": 24, "dropout": 0.0},
                "train": {"lr": 3e-3, "batch_size": 32, "max_steps": 200, "eval_every": 50, "warmup_steps": 10},
            },
        )
    assert cli("pipeline", "-c", runs["straight"], "--to", "eval", "-q").code == 0
    manifest, arrays = prepared(tmp_path / "straight")
    assert manifest["task"] == "mlm" and manifest["labels"] == [] and sum(manifest["truncated"].values()) == 0
    lengths = np.diff(arrays["train_offsets"])
    assert (lengths[:-1] == 24).all() and manifest["splits"]["val"] >= 1 and manifest["splits"]["test"] >= 1
    log = [
        json.loads(line)
        for line in (tmp_path / "straight" / "run" / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    # The pieces' unigram entropy is 3.77 nats (the most frequent is 5.2% of them): measured, val loss 3.84 at
    # step 50 -> 3.42 at 200 (the model uses the context), masked-token accuracy 0.067 -> 0.107.
    assert log[-1]["val_loss"] < min(3.6, log[0]["val_loss"] - 0.2) and log[-1]["val_accuracy"] > 0.08
    scores = json.loads((tmp_path / "straight" / "run" / "eval" / "metrics.json").read_text())["metrics"]
    assert scores["masked_tokens"] > 0 and np.isclose(scores["perplexity"], np.exp(scores["loss"]))
    planned = cli("plan", "-c", runs["straight"], "--json").json()  # parameters as built, FLOPs of an encoder
    built = cli("init", "-c", runs["straight"], "--json", "-q").json()
    assert planned["model"]["parameters"] == built["parameters"]
    assert planned["compute"]["tokens"] == 200 * 32 * 24 and planned["inference_memory"]["kv_cache_fp32"] == 0

    assert cli("pipeline", "-c", runs["resumed"], "--to", "init", "-q").code == 0
    assert cli("train", "-c", runs["resumed"], "--until-step", "60", "-q").code == 0
    assert cli("train", "-c", runs["resumed"], "--resume", "-q").code == 0
    straight = load_weights(str(tmp_path / "straight" / "run" / "train" / "last.safetensors"))
    resumed = load_weights(str(tmp_path / "resumed" / "run" / "train" / "last.safetensors"))
    assert straight.keys() == resumed.keys() and all((straight[k] == resumed[k]).all() for k in straight)


def test_a_corpus_is_for_masked_lm_only(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("some words\n\nmore words\n")
    result = cli("prepare", "-c", config_for(tmp_path, {"path": str(tmp_path / "c.txt")}, task="classification"), "-q")
    assert result.code == 2 and "it trains model.task mlm" in result.stderr, result.stderr


def test_the_wordpiece_vocabulary_is_the_same_every_time() -> None:
    """HF's WordPieceTrainer gives a different vocabulary from run to run on this corpus (ties broken by
    hash-map order); bigmodel's training gives one, with BERT's `##` continuing pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    from bigmodel.prepare.text_classification import train_wordpiece_vocab

    rng = np.random.default_rng(0)
    words = " ".join(TOPICS.values()).split()
    texts = [" ".join(rng.choice(words, size=20)) for _ in range(200)]
    vocabs = [train_wordpiece_vocab(texts, 100) for _ in range(3)]
    assert vocabs[0] == vocabs[1] == vocabs[2] and len(vocabs[0]) == 100
    assert any(token.startswith("##") for token in vocabs[0]) and list(vocabs[0])[:2] == ["[PAD]", "[UNK]"]
    tok = Tokenizer(models.WordPiece(vocabs[0], unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    assert tok.decode(tok.encode("Thunder over the orchard").ids) == "thunder over the orchard"  # unseen words: pieces


def test_lora_fine_tuning_of_an_imported_encoder_matches_peft(tmp_path: Path) -> None:
    """train.lora on an imported BERT classifier: the checkpoint holds the adapters and the new head only,
    and the merged model's logits equal peft's LoRA (same A, B, rank, alpha on query/value) on
    transformers' BertForSequenceClassification with the same head (1e-4)."""
    import peft
    import torch
    import transformers

    from bigmodel import registry
    from bigmodel.config import load_config
    from bigmodel.datasets import load_texts
    from bigmodel.scoring import torch_encoder
    from tests.hf_models import make_bert

    folder = make_bert(tmp_path / "bert", "none")
    config = write_config(
        tmp_path / "c.yaml",
        {
            "seed": 0,
            "threads": 1,
            "run_dir": str(tmp_path / "run"),
            "init": {"from": str(folder)},
            "data": {"format": "text_classification", "path": str(labelled_csv(tmp_path / "d.csv"))},
            "model": {"block_size": 32},
            "train": {
                "lr": 1e-2,
                "batch_size": 8,
                "max_steps": 12,
                "eval_every": 6,
                "lora": {"rank": 4, "alpha": 8, "targets": ["q", "v"]},
            },
        },
    )
    result = cli("pipeline", "-c", config, "--to", "train", "--json", "-q")
    assert result.code == 0, result.stderr
    saved = load_file(str(tmp_path / "run" / "train" / "best.safetensors"))
    assert saved and all(".lora_" in name or name.startswith("model.head.") for name in saved)
    assert any(".lora_B.q" in name and np.abs(tensor).max() > 0 for name, tensor in saved.items())  # it trained

    model, _ = registry.load_model(tmp_path / "run" / "train" / "best.safetensors")  # merged into the base
    texts = load_texts(load_config(config), "test")
    batch = texts.batch(np.arange(len(texts)), 0)
    ours = torch_encoder(model, torch.device("cpu"))(batch)

    reference = transformers.BertForSequenceClassification.from_pretrained(str(folder), num_labels=3).eval()
    with torch.no_grad():
        reference.bert.pooler.dense.weight.copy_(torch.from_numpy(saved["model.head.pooler.weight"]))
        reference.bert.pooler.dense.bias.copy_(torch.from_numpy(saved["model.head.pooler.bias"]))
        reference.classifier.weight.copy_(torch.from_numpy(saved["model.head.out.weight"]))
        reference.classifier.bias.copy_(torch.from_numpy(saved["model.head.out.bias"]))
    adapted = peft.get_peft_model(
        reference, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
    ).eval()
    with torch.no_grad():
        for name, module in adapted.named_modules():
            if name.endswith(("attention.self.query", "attention.self.value")):
                layer, which = int(name.split(".layer.")[1].split(".")[0]), name.rsplit(".", 1)[1][0]
                ours_key = f"model.h.{layer}.attn.c_attn.lora_{{}}.{which}"
                module.lora_A["default"].weight.copy_(torch.from_numpy(saved[ours_key.format("A")]))
                module.lora_B["default"].weight.copy_(torch.from_numpy(saved[ours_key.format("B")]))
        want = adapted(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    assert np.abs(ours - want).max() < 1e-4


def test_a_sentence_transformers_folder_is_classified_by_its_mean_token_state(tmp_path: Path) -> None:
    """A folder with sentence-transformers' 1_Pooling/config.json (mean tokens) gets a classifier on the
    masked mean of its states (= transformers' states averaged, 1e-4); model.pooling: cls picks BERT's pooler."""
    import torch
    import transformers

    from bigmodel import registry
    from bigmodel.config import load_config
    from bigmodel.datasets import load_texts
    from tests.hf_models import make_bert

    folder = make_bert(tmp_path / "bert", "none")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True})
    )
    runs = {}
    for pooling in ("mean", "cls"):
        (tmp_path / pooling).mkdir()
        runs[pooling] = write_config(
            tmp_path / pooling / "c.yaml",
            {
                "seed": 0,
                "threads": 1,
                "run_dir": str(tmp_path / pooling / "run"),
                "init": {"from": str(folder)},
                "data": {"format": "text_classification", "path": str(labelled_csv(tmp_path / "d.csv"))},
                "model": {"block_size": 32, **({"pooling": "cls"} if pooling == "cls" else {})},
            },
        )
        assert cli("pipeline", "-c", runs[pooling], "--to", "init", "-q").code == 0
    model, manifest = registry.load_model(tmp_path / "mean" / "run" / "init" / "model.safetensors")
    assert manifest.architecture.pooling == "mean" and model.head.pooler is None
    texts = load_texts(load_config(runs["mean"]), "test")
    batch = {k: torch.from_numpy(v) for k, v in texts.batch(np.arange(len(texts)), 0).items()}
    with torch.no_grad():
        states = transformers.AutoModel.from_pretrained(str(folder)).eval()(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        want = model.head.out((states * mask).sum(1) / mask.sum(1))
        got = model.eval()(**batch)
    assert (got - want).abs().max() < 1e-4
    cls_model, cls_manifest = registry.load_model(tmp_path / "cls" / "run" / "init" / "model.safetensors")
    assert cls_manifest.architecture.pooling == "cls" and cls_model.head.pooler is not None


def test_an_embedding_model_learns_from_pairs_with_in_batch_negatives(tmp_path: Path) -> None:
    """model.task embedding trains on (text, partner) pairs: on held-out pairs the partner is found far more
    often than by the untrained model (measured: MRR 0.79, recall@1 0.61 of 18 pairs after 100 steps)."""
    rng = np.random.default_rng(0)
    words = " ".join(TOPICS.values()).split()
    with (tmp_path / "pairs.csv").open("w", newline="") as handle:  # a partner: 4 of its text's words, shuffled
        writer = csv.writer(handle)
        writer.writerow(["text", "other"])
        for _ in range(180):
            text = rng.choice(words, size=8, replace=False)
            writer.writerow([" ".join(text), " ".join(rng.permutation(text)[:4])])
    config = write_config(
        tmp_path / "c.yaml",
        {
            "seed": 0,
            "threads": 1,
            "run_dir": str(tmp_path / "run"),
            "data": {
                "format": "text_classification",
                "text_pair": "other",
                "path": str(tmp_path / "pairs.csv"),
                "vocab_size": 100,
            },
            "model": {"task": "embedding", "n_layer": 2, "n_embd": 64, "n_head": 2, "block_size": 32, "dropout": 0.0},
            "train": {"lr": 1e-3, "batch_size": 16, "max_steps": 100, "eval_every": 50, "warmup_steps": 5},
        },
    )
    result = cli("pipeline", "-c", config, "--to", "eval", "--json", "-q")
    assert result.code == 0, result.stderr
    trained = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["metrics"]
    assert cli("eval", "-c", config, "--set", "eval.checkpoint=init", "-q").code == 0
    before = json.loads((tmp_path / "run" / "eval" / "metrics.init.json").read_text())["metrics"]
    assert trained["pairs"] == before["pairs"] == 18
    assert trained["mrr"] > 0.6 and trained["mrr"] > before["mrr"] + 0.3 and trained["loss"] < before["loss"], (
        before,
        trained,
    )


def test_a_classifier_is_pruned_fine_tuned_and_distilled_by_its_own_recipe(tmp_path: Path) -> None:
    """compress's prune (with fine-tuning, masks held) and distill steps run the encoder's own training
    recipe, as they do a GPT's and an MLP's; options a step would ignore are refused."""
    config = write_config(
        tmp_path / "c.yaml",
        {
            "seed": 0,
            "threads": 1,
            "run_dir": str(tmp_path / "run"),
            "data": {"format": "text_classification", "path": str(labelled_csv(tmp_path / "d.csv"))},
            "model": {"n_layer": 2, "n_embd": 32, "n_head": 4, "block_size": 32, "dropout": 0.0},
            "train": {"lr": 1e-3, "batch_size": 16, "max_steps": 10, "eval_every": 5},
        },
    )
    assert cli("pipeline", "-c", config, "--to", "train", "-q").code == 0
    steps = (
        "[{method: prune, sparsity: 0.5, finetune_steps: 2}, {method: prune, kind: structured, sparsity: 0.25, "
        "finetune_steps: 2}, {method: distill, steps: 3, student: {n_layer: 1}}]"
    )
    result = cli("compress", "-c", config, "--set", f"compress.steps={steps}", "--json", "-q")
    assert result.code == 0, result.stderr
    fp32, unstructured, structured, distilled = result.json()["steps"]
    assert unstructured["nonzeros"] < 0.75 * fp32["nonzeros"]  # half the matrices' weights are zero, and stay so
    assert structured["parameters"] < unstructured["parameters"]  # neurons removed: a smaller model
    assert distilled["parameters"] < structured["parameters"]  # one layer instead of two
    ignored = cli("compress", "-c", config, "--set", "compress.steps=[{method: prune, structure: heads}]")
    assert ignored.code == 2 and "structure is an option of kind 'structured' pruning" in ignored.stderr
    embedding = cli(
        "compress",
        "-c",
        config,
        "--set",
        "model.task=embedding",
        "--set",
        "compress.steps=[{method: distill, student: {n_layer: 1}}]",
    )
    assert embedding.code == 2 and "embedding has neither (an encoder distils as a classifier)" in embedding.stderr
