"""The CLI contract: exit codes, one-line errors, --json on stdout, config commands, inspect."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import CONFIGS, cli, cli_subprocess, write_config


def one_line_error(result, code: int = 2) -> str:
    assert result.code == code, (result.code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_missing_config_file_is_exit_2_with_one_line(tmp_path: Path) -> None:
    line = one_line_error(cli("train", "-c", tmp_path / "nope.yaml"))
    assert "config file not found" in line


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = cli("train", "-c", tmp_path / "nope.yaml", "--debug")
    assert result.code == 2 and "Traceback" in result.stderr


def test_mistyped_key_via_set_is_exit_2(digits_run: Path) -> None:
    line = one_line_error(cli("train", "-c", digits_run, "--set", "train.epoch=3"))
    assert "train.epoch: unknown key (did you mean 'epochs'?)" in line


def test_json_prints_exactly_one_object_on_stdout(fresh_run: Path) -> None:
    result = cli("eval", "-c", fresh_run, "--json")
    assert result.code == 0, result.stderr
    payload = json.loads(result.stdout)  # fails if anything else was printed
    assert payload["ok"] is True and 0.0 <= payload["accuracy"] <= 1.0
    assert "eval (test" in result.stderr


def test_json_error_object_on_failure(tmp_path: Path) -> None:
    result = cli("prepare", "-c", tmp_path / "nope.yaml", "--json")
    assert result.code == 2
    payload = json.loads(result.stdout)
    assert payload["ok"] is False and payload["exit_code"] == 2


def test_fail_under_gate_exits_1_and_unknown_metric_exits_2(fresh_run: Path) -> None:
    failed = cli("eval", "-c", fresh_run, "--fail-under", "accuracy=1.01")
    assert failed.code == 1 and "eval gate failed: accuracy" in failed.stderr
    assert cli("eval", "-c", fresh_run, "--fail-under", "accuracy=0.5").code == 0
    line = one_line_error(cli("eval", "-c", fresh_run, "--fail-under", "acuracy=0.5"))
    assert "eval gate 'acuracy': not a classification metric (did you mean 'accuracy'?)" in line


def test_failed_gate_still_reports_its_metrics_in_json(fresh_run: Path) -> None:
    """A CI job reading --json sees by how much the gate failed, from eval and from pipeline."""
    failed = cli("eval", "-c", fresh_run, "--fail-under", "accuracy=1.01", "--json")
    payload = json.loads(failed.stdout)
    assert failed.code == 1 and payload["ok"] is False and payload["exit_code"] == 1
    assert payload["error"].startswith("eval gate failed: accuracy")
    assert 0.0 <= payload["accuracy"] < 1.01 and payload["metrics_file"].endswith("metrics.json")
    piped = cli(
        "pipeline",
        "-c",
        fresh_run,
        "--from",
        "eval",
        "--to",
        "eval",
        "--set",
        "eval.fail_under={accuracy: 1.01}",
        "--json",
    )
    stages = json.loads(piped.stdout)["stages"]
    assert piped.code == 1 and stages["eval"]["accuracy"] == payload["accuracy"]


def test_compress_without_steps_says_how_to_add_one(digits_run: Path) -> None:
    assert "compress.steps is empty: add a step" in one_line_error(cli("compress", "-c", digits_run))


def test_config_show_validate_and_schema(tmp_path: Path) -> None:
    config = CONFIGS / "digits.yaml"
    shown = cli("config", "show", "-c", config, "--set", "train.lr=0.5")
    assert shown.code == 0 and "lr: 0.5" in shown.stdout
    assert cli("config", "validate", "-c", config).code == 0
    bad = write_config(tmp_path / "bad.yaml", {"data": {"path": "x.csv", "target": "y"}})
    assert "data.path: file not found" in one_line_error(cli("config", "validate", "-c", bad))
    schema = json.loads(cli("config", "schema").stdout)
    assert "train" in schema["properties"]


def test_stage_help_lists_the_config_keys() -> None:
    result = cli("train", "--help")
    assert result.code == 0 and "train.lr" in result.stdout and "Peak learning rate" in result.stdout


def test_inspect_checkpoint_and_onnx(digits_run: Path) -> None:
    run = digits_run.parent / "run"
    ckpt = cli("inspect", run / "train" / "best.safetensors", "--json").json()
    assert ckpt["family"] == "mlp" and ckpt["parameters"] == 64 * 32 + 32 + 32 * 10 + 10
    assert set(ckpt["lineage"]) == {"init", "data"}
    onnx_info = cli("inspect", run / "export" / "model.onnx", "--json").json()
    assert onnx_info["inputs"][0]["shape"] == ["batch", 64]
    assert onnx_info["metadata"]["labels"] == [str(i) for i in range(10)]
    assert "not found" in one_line_error(cli("inspect", run / "nothing.onnx"))


def test_console_script_entry_and_version() -> None:
    result = cli_subprocess("--version")
    assert result.code == 0 and result.stdout.startswith("bigmodel ")
