"""Data augmentation: tabular transforms on training batches, BPE-dropout copies in text prepare."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from bigmodel import tokenizer as tokenizers
from bigmodel.arch import TabularArch
from bigmodel.config import FeatureDropoutAugment, MixupAugment, NoiseAugment
from bigmodel.models.mlp import MLP
from bigmodel.train.augment import augment_batch
from tests.conftest import CONFIGS, cli, tiny_digits, write_config
from tests.test_lm import corpus

ALL = [NoiseAugment(std=0.5), FeatureDropoutAugment(rate=0.3, p=0.5), MixupAugment(alpha=0.4)]


def model_with_statistics() -> MLP:
    model = MLP(
        TabularArch(task="classification", activation="relu", n_inputs=6, n_outputs=3, hidden_sizes=[8], dropout=0.0)
    )
    model.feature_mean.copy_(torch.arange(6.0))
    model.feature_std.copy_(torch.full((6,), 2.0))
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(32, 6, generator=generator) * 2 + torch.arange(6.0), torch.randint(3, (32,), generator=generator)


@pytest.mark.parametrize("transform", ALL, ids=lambda t: t.kind)
def test_each_transform_keeps_shapes_labels_and_its_seed(transform: object) -> None:
    model, (x, y) = model_with_statistics(), batch()
    touched: dict[str, int] = {}
    out_x, target = augment_batch(x, y, [transform], model, 3, seed=7, step=3, touched=touched)
    assert out_x.shape == x.shape and out_x.dtype == x.dtype
    assert not torch.equal(out_x, x) and 0 < touched[transform.kind] <= 32
    if transform.kind == "mixup":
        assert target.shape == (32, 3)
        assert torch.allclose(target.sum(dim=1), torch.ones(32))  # soft labels are distributions
        assert bool((target >= 0).all())
    else:
        assert torch.equal(target, y)  # labels untouched
    if transform.kind == "feature_dropout":
        changed = out_x != x
        assert torch.equal(out_x[changed], model.feature_mean.expand_as(x)[changed])  # dropped = train mean
    again, again_target = augment_batch(x, y, [transform], model, 3, seed=7, step=3, touched={})
    assert torch.equal(again, out_x) and torch.equal(again_target, target)  # same seed and step: same batch
    other, _ = augment_batch(x, y, [transform], model, 3, seed=7, step=4, touched={})
    assert not torch.equal(other, out_x)  # the next step draws afresh


def test_noise_is_scaled_by_each_features_training_std() -> None:
    model, (x, y) = model_with_statistics(), batch()
    x = x.repeat(200, 1)
    out, _ = augment_batch(x, y.repeat(200), [NoiseAugment(std=0.5)], model, 3, seed=0, step=0, touched={})
    measured = (out - x).std(dim=0)
    assert torch.allclose(measured, 0.5 * model.feature_std, rtol=0.05)


def test_mixup_with_p_leaves_unchosen_rows_alone() -> None:
    model, (x, y) = model_with_statistics(), batch()
    out, target = augment_batch(x, y, [MixupAugment(alpha=0.4, p=0.3)], model, 3, seed=1, step=0, touched={})
    unchanged = (out == x).all(dim=1)
    assert 0 < int(unchanged.sum()) < 32
    assert torch.equal(target[unchanged], torch.nn.functional.one_hot(y, 3).float()[unchanged])


def augmented_digits(tmp: Path, **train: object) -> Path:
    return tiny_digits(tmp, augment=[{"kind": "noise", "std": 0.5}, {"kind": "mixup", "alpha": 0.4}], **train)


def test_training_with_augmentation_is_reproducible_and_resumes_exactly(tmp_path: Path) -> None:
    config = augmented_digits(tmp_path, epochs=6, eval_every=5)
    for stage in ("prepare", "init"):
        assert cli(stage, "-c", config, "-q").code == 0
    run = tmp_path / "run" / "train"

    def trained() -> tuple[str, list[dict]]:
        digest = hashlib.sha256()
        with safe_open(str(run / "last.safetensors"), "pt") as handle:
            for name in sorted(k for k in handle.keys() if k.startswith("model.")):
                digest.update(handle.get_tensor(name).numpy().tobytes())
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return digest.hexdigest(), [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]

    first = cli("train", "-c", config, "--json", "-q")
    assert first.code == 0 and set(first.json()["augmented_rows"]) == {"noise", "mixup"}
    reference = trained()
    assert cli("train", "-c", config, "-q").code == 0
    assert trained() == reference  # bitwise reproducible
    assert cli("train", "-c", config, "-q", "--until-step", "13").code == 0
    assert cli("train", "-c", config, "-q", "--resume").code == 0
    assert trained() == reference  # resumed mid-epoch, between evaluations: still bitwise the same


def test_validation_and_test_data_are_never_augmented(tmp_path: Path) -> None:
    config = augmented_digits(tmp_path, epochs=2)
    for stage in ("prepare", "init", "train"):
        assert cli(stage, "-c", config, "-q").code == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    best = min(records, key=lambda r: r["val_loss"])
    # eval scores the clean val split; train's val score of the same checkpoint must be that exact number.
    evaluated = cli("eval", "-c", config, "--set", "eval.split=val", "--json", "-q").json()
    assert evaluated["loss"] == pytest.approx(best["val_loss"], rel=1e-5)


def test_mixup_needs_classes_and_text_is_augmented_by_prepare(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "reg.yaml",
        {
            "data": {"path": "x.csv", "target": "y", "task": "regression"},
            "train": {"augment": [{"kind": "mixup"}]},
        },
    )
    result = cli("config", "validate", "-c", config)
    assert result.code == 2 and "mixup mixes class labels; for regression use noise" in result.stderr
    text = write_config(
        tmp_path / "text.yaml", {"data": {"format": "text", "path": "x.txt"}, "train": {"augment": [{"kind": "noise"}]}}
    )
    result = cli("config", "validate", "-c", text)
    assert result.code == 2 and "text is augmented by prepare" in result.stderr
    typo = write_config(
        tmp_path / "typo.yaml", {"data": {"path": "x.csv", "target": "y"}, "train": {"augment": [{"kind": "nosie"}]}}
    )
    result = cli("config", "validate", "-c", typo)
    assert result.code == 2 and "train.augment.0.kind: unknown value 'nosie'" in result.stderr


# ---- text: BPE-dropout


def test_bpe_dropout_segments_differently_but_reproducibly() -> None:
    text = (Path(tokenizers.__file__).read_text() * 2)[:6000] + " naïve café — 日本語 🙂"
    tok = tokenizers.train_bpe(iter([text]), vocab_size=400)
    assert tok.encode_with_dropout(text, 0.0, np.random.default_rng(0)) == tok.encode(text)  # HF's own result
    first = tok.encode_with_dropout(text, 0.2, np.random.default_rng(5))
    assert first == tok.encode_with_dropout(text, 0.2, np.random.default_rng(5))
    assert first != tok.encode(text) and len(first) > len(tok.encode(text))  # fewer merges: more tokens
    assert tok.decode(first) == text  # the same text, segmented otherwise


def text_config(tmp: Path, **data: object) -> Path:
    return write_config(
        tmp / "text.yaml",
        {
            "seed": 3,
            "run_dir": "run",
            "data": {
                "format": "text",
                "path": str(corpus(tmp)),
                "tokenizer": {"kind": "bpe", "vocab_size": 300},
                **data,
            },
        },
    )


def test_prepare_adds_dropout_copies_to_train_only(tmp_path: Path) -> None:
    plain = text_config(tmp_path)
    assert cli("prepare", "-c", plain, "-q").code == 0
    prepared = tmp_path / "run" / "prepare"
    train_plain, val_plain = (prepared / "train.bin").read_bytes(), (prepared / "val.bin").read_bytes()

    augmented = text_config(tmp_path, augment=[{"kind": "bpe_dropout", "dropout": 0.1, "copies": 2}])
    result = cli("prepare", "-c", augmented, "--json")
    assert result.code == 0, result.stderr
    assert "bpe_dropout added 2 re-segmented copies" in result.stderr
    train = (prepared / "train.bin").read_bytes()
    assert (prepared / "val.bin").read_bytes() == val_plain  # val is never augmented
    assert train.startswith(train_plain) and len(train) > 3 * len(train_plain)  # + two longer copies
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["augment"]["train_tokens_added"] * 2 == len(train) - len(train_plain)  # uint16 tokens
    assert cli("prepare", "-c", augmented, "-q").code == 0
    assert (prepared / "train.bin").read_bytes() == train  # seeded: byte-identical again


def test_char_level_refuses_bpe_dropout(tmp_path: Path) -> None:
    config = text_config(tmp_path, tokenizer={"kind": "char"}, augment=[{"kind": "bpe_dropout"}])
    result = cli("prepare", "-c", config)
    assert result.code == 2
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("error: ")
        and lines[0].endswith(
            "text.yaml: data: data.augment bpe_dropout needs a BPE tokenizer (data.tokenizer.kind: bpe): "
            "a character-level tokenizer has no merges to drop"
        )
    )


def test_transforms_apply_in_the_listed_order() -> None:
    model, (x, y) = model_with_statistics(), batch()
    noise_then_drop, _ = augment_batch(x, y, [NoiseAugment(), FeatureDropoutAugment(rate=0.5)], model, 3, 0, 0, {})
    drop_then_noise, _ = augment_batch(x, y, [FeatureDropoutAugment(rate=0.5), NoiseAugment()], model, 3, 0, 0, {})
    assert not torch.equal(noise_then_drop, drop_then_noise)


def test_regression_trains_with_feature_noise(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "reg.yaml",
        {
            "extends": str(CONFIGS / "diabetes.yaml"),
            "run_dir": "run",
            "threads": 1,
            "train": {"epochs": 5, "patience": None, "augment": [{"kind": "noise", "std": 0.2, "p": 0.5}]},
            "eval": {"fail_under": {}},
        },
    )
    for stage in ("prepare", "init"):
        assert cli(stage, "-c", config, "-q").code == 0
    trained = cli("train", "-c", config, "--json")
    assert trained.code == 0, trained.stderr
    touched = trained.json()["augmented_rows"]["noise"]
    assert 0.4 * 5 * 270 < touched < 0.6 * 5 * 310  # about half of the ~290 training rows, 5 epochs
    assert "train: augmented noise" in trained.stderr
