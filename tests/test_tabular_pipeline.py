"""The tabular pipeline end to end on real data, and the guarantees each stage makes."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open

from bigmodel import registry
from bigmodel.export.tabular import Deployed, check_parity
from tests.conftest import CONFIGS, cli, cli_subprocess, tiny_digits, write_config


def run_dir(config: Path) -> Path:
    return config.parent / "run"


def test_pipeline_makes_every_artifact(digits_run: Path) -> None:
    run = run_dir(digits_run)
    for artifact in (
        "prepare/manifest.json",
        "init/model.safetensors",
        "train/best.safetensors",
        "train/last.safetensors",
        "train/metrics.jsonl",
        "eval/metrics.json",
        "export/model.onnx",
        "export/parity.json",
        "infer/predictions.csv",
    ):
        assert (run / artifact).is_file(), artifact
    evals = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [20 * k for k in range(1, 5)]  # 1259 rows / 64 per batch = 20 steps an epoch
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert json.loads((run / "eval" / "metrics.json").read_text())["metrics"]["accuracy"] > 0.9


def test_onnx_predictions_equal_pytorch_on_the_test_split(digits_run: Path) -> None:
    run = run_dir(digits_run)
    model, _ = registry.load_model(run / "train" / "best.safetensors")
    with safe_open(str(run / "prepare" / "data.safetensors"), "np") as data:
        x = data.get_tensor("test_x")
    with torch.no_grad():
        expected = model.eval().predict(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(run / "export" / "model.onnx"))
    got = session.run(None, {"features": x})[0]
    assert np.abs(got - expected).max() < 1e-5
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_infer_output_agrees_with_eval(digits_run: Path) -> None:
    run = run_dir(digits_run)
    with open(run / "infer" / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    accuracy = np.mean([row["prediction"] == row["label"] for row in rows])
    evaluated = json.loads((run / "eval" / "metrics.json").read_text())["metrics"]
    assert len(rows) == evaluated["rows"]
    assert accuracy == pytest.approx(evaluated["accuracy"])
    assert sum(float(v) for k, v in rows[0].items() if k.startswith("prob_")) == pytest.approx(1.0, abs=1e-4)


def test_rerun_skips_up_to_date_stages_and_reruns_what_changed(fresh_run: Path) -> None:
    again = cli("pipeline", "-c", fresh_run)
    assert again.code == 0 and again.stderr.count("up to date, skipped") == 6
    changed = cli("pipeline", "-c", fresh_run, "--set", "train.lr=0.02", "--to", "eval")
    skipped = [line.split()[1] for line in changed.stderr.splitlines() if "skipped" in line]
    assert skipped == ["prepare", "init"]


def test_training_is_bitwise_reproducible(fresh_run: Path) -> None:
    best = run_dir(fresh_run) / "train" / "last.safetensors"
    before = dict(safe_open(str(best), "pt").metadata())
    first = dict(_tensors(best))
    assert cli("train", "-c", fresh_run, "-q").code == 0
    second = _tensors(best)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (
        json.loads(before["bigmodel"])["metrics"]
        == json.loads(safe_open(str(best), "pt").metadata()["bigmodel"])["metrics"]
    )


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def test_early_stopping_ends_before_the_planned_steps(tmp_path: Path) -> None:
    config = tiny_digits(tmp_path, epochs=50, eval_every=5, patience=2, lr=0.5, optimizer="sgd")
    result = cli("pipeline", "-c", config, "--to", "train", "--json", "-q")
    assert result.code == 0, result.stderr
    steps = result.json()["stages"]["train"]["steps"]
    assert steps < 50 * 20


def test_diverging_loss_stops_with_exit_1(tmp_path: Path) -> None:
    config = tiny_digits(tmp_path, lr=1e12, optimizer="sgd", momentum=0.0, epochs=3)
    result = cli("pipeline", "-c", config, "--to", "train")
    assert result.code == 1 and "loss became" in result.stderr


def test_train_refuses_an_init_checkpoint_of_another_architecture(fresh_run: Path) -> None:
    result = cli("train", "-c", fresh_run, "--set", "model.hidden_sizes=[16]")
    assert result.code == 2 and "does not match the config" in result.stderr


def test_corrupted_model_is_caught_by_the_parity_gate(digits_run: Path) -> None:
    run = run_dir(digits_run)
    model, _ = registry.load_model(run / "train" / "best.safetensors")
    with torch.no_grad():
        model.net[0].weight[0, 10] += 0.5  # one perturbed weight
    with safe_open(str(run / "prepare" / "data.safetensors"), "np") as data:
        rows = data.get_tensor("test_x")[:256]
    report = check_parity(Deployed(model.eval()), run / "export" / "model.onnx", rows, 1e-4, 1)
    assert not report["passed"] and report["max_abs_diff"] > 1e-4


def test_failed_gate_publishes_nothing(fresh_run: Path) -> None:
    result = cli("export", "-c", fresh_run, "--set", "export.atol=1e-30")
    assert result.code == 1 and "export parity failed" in result.stderr
    export = run_dir(fresh_run) / "export"
    assert not (export / "model.onnx").exists()
    assert (export / "model.rejected.onnx").is_file()
    assert json.loads((export / "parity.json").read_text())["passed"] is False


def test_regression_pipeline_on_diabetes(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "reg.yaml",
        {
            "extends": str(CONFIGS / "diabetes.yaml"),
            "run_dir": "run",
            "threads": 1,
            "train": {"epochs": 40},
        },
    )
    result = cli("pipeline", "-c", config, "--json", "-q", "--set", "eval.fail_under={}")
    assert result.code == 0, result.stderr
    stages = result.json()["stages"]
    assert stages["eval"]["r2"] > 0.2
    with open(tmp_path / "run" / "infer" / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    errors = [float(r["prediction"]) - float(r["progression"]) for r in rows]
    assert float(np.mean(np.square(errors))) == pytest.approx(stages["eval"]["mse"], rel=1e-4)


# ---- infer: bad inputs, stdin/stdout, and no PyTorch on the deployed path


def model_of(config: Path) -> Path:
    return run_dir(config) / "export" / "model.onnx"


def test_infer_rejects_missing_extra_and_non_numeric_columns(digits_run: Path, tmp_path: Path) -> None:
    header = [f"pixel{i}" for i in range(64)]
    good = ["0"] * 64
    cases = {
        "missing feature column(s) pixel63": (header[:-1], good[:-1]),
        "unknown column(s) extra": (header + ["extra"], good + ["1"]),
        "non-numeric value 'dark' at row 2, column 'pixel5'": (header, good[:5] + ["dark"] + good[6:]),
    }
    for expected, (cols, cells) in cases.items():
        path = tmp_path / "rows.csv"
        path.write_text(",".join(cols) + "\n" + ",".join(cells) + "\n")
        result = cli("infer", "--model", model_of(digits_run), "--input", path)
        assert result.code == 2 and expected in result.stderr, result.stderr


def test_infer_rejects_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    bogus = tmp_path / "model.onnx"
    bogus.write_text("not a model")
    result = cli("infer", "--model", bogus, "--input", "-")
    assert result.code == 2 and "not a loadable ONNX model" in result.stderr


def test_infer_reads_stdin_jsonl_and_never_imports_torch(digits_run: Path, tmp_path: Path) -> None:
    rows = "\n".join(json.dumps({f"pixel{i}": (i * k) % 17 for i in range(64)}) for k in range(3))
    script = (
        "import sys, runpy\n"
        "sys.argv = ['bigmodel', 'infer', '--model', sys.argv[1], '--input', '-', '--output', sys.argv[2]]\n"
        "try:\n    runpy.run_module('bigmodel', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch', code)\n"
    )
    out = tmp_path / "p.jsonl"
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", script, str(model_of(digits_run)), str(out)],
        input=rows,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip() == "no torch 0", proc.stderr
    predictions = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(predictions) == 3 and set(predictions[0]) == {"prediction", "probabilities"}


def test_infer_writes_csv_to_stdout_in_a_real_process(digits_run: Path) -> None:
    test_csv = (run_dir(digits_run) / "prepare" / "test.csv").read_text()
    head = "\n".join(test_csv.splitlines()[:4]) + "\n"
    result = cli_subprocess("infer", "-m", model_of(digits_run), "-i", "-", "-o", "-", "-q", stdin=head)
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("label,prediction,prob_0") and len(lines) == 4
    assert os.path.islink("/dev/stdout") or not os.path.isfile("/dev/stdout")
