"""The CLI contract under bad input (issue 16): one line on stderr naming the problem and the fix, exit 2,
no traceback; --json prints exactly one object whatever happens; nothing a user gave is silently ignored."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bigmodel.config import load_config
from bigmodel.errors import UserError
from tests.conftest import CONFIGS, cli, tiny_digits, write_config

DIGITS = {"data": {"path": str(CONFIGS / "data" / "digits.csv.gz"), "target": "label"}}


def refused(result: object, *fragments: str) -> str:
    """The result is a user error: exit 2, one stderr line without a traceback, naming every fragment."""
    assert result.code == 2, (result.code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ---- config: tagged unions, finite numbers, who gave the bad value


@pytest.mark.parametrize("section, typo, expected", [
    ({"train": {"augment": [{"kind": "mixup", "alphaa": 0.2}]}}, "train.augment.0.alphaa", "alpha"),
    ({"train": {"augment": [{"kind": "noise", "stdd": 0.1}]}}, "train.augment.0.stdd", "std"),
    ({"train": {"augment": [{"kind": "feature_dropout", "pp": 0.1}]}}, "train.augment.0.pp", "p"),
    ({"compress": {"steps": [{"method": "quantize", "modee": "dynamic"}]}}, "compress.steps.0.modee", "mode"),
    ({"compress": {"steps": [{"method": "prune", "sparsityy": 0.5}]}}, "compress.steps.0.sparsityy", "sparsity"),
    ({"compress": {"steps": [{"method": "distill", "stepss": 5}]}}, "compress.steps.0.stepss", "steps"),
    ({"model": {"family": "mlp", "hidden_sizez": [8]}}, "model.hidden_sizez", "hidden_sizes"),
    ({"model": {"family": "gpt", "n_layerr": 1}, "data": {"format": "text", "path": "x.txt"}},
     "model.n_layerr", "n_layer"),
    ({"data": {"format": "text", "path": "x.txt", "jsonl_feld": "t"}}, "data.jsonl_feld", "jsonl_field"),
    ({"data": {"format": "sft", "path": "x.jsonl", "train_onn": "all"}, "init": {"from": "m.gguf"}},
     "data.train_onn", "train_on"),
])
def test_every_tagged_section_suggests_the_key_meant(tmp_path: Path, section: dict, typo: str, expected: str) -> None:
    raw = {**DIGITS, **section}
    if "data" in section:
        raw["data"] = section["data"]
    with pytest.raises(UserError) as caught:
        load_config(write_config(tmp_path / "c.yaml", raw))
    message = str(caught.value)
    assert f"{typo}: unknown key (did you mean '{expected}'?); allowed here: " in message
    allowed = message.split(f"{typo}: unknown key")[1].split("allowed here: ")[1].split(";")[0]
    assert expected in allowed.split(", ")


def test_infinite_and_nan_numbers_are_refused_everywhere(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", DIGITS)
    for override in ("train.lr=.inf", "train.grad_clip=.nan", "eval.fail_under.accuracy=-.inf"):
        line = refused(cli("config", "show", "-c", config, "--set", override), f"--set {override}", "finite")
        assert str(config) not in line  # the --set gave the value, not the file


def test_problems_are_blamed_on_their_source(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", {**DIGITS, "extends": "missing_base.yaml"})
    refused(cli("config", "show", "-c", config), f"{config}: extends 'missing_base.yaml'", "file not found")
    config = write_config(tmp_path / "d.yaml", {**DIGITS, "train": {"lr": 0.01}})
    line = refused(cli("config", "show", "-c", config, "--set", "train.min_lr=0.5"), "--set train.min_lr=0.5")
    assert "must not exceed train.lr" in line and str(config) not in line


def test_empty_run_dir_is_refused_not_taken_as_here(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", DIGITS)
    refused(cli("prepare", "-c", config, "--run-dir", ""), "--run-dir is empty")
    refused(cli("prepare", "-c", config, "--set", "run_dir=''"), "run_dir: is empty")
    assert not list(Path.cwd().glob("prepare"))


def test_derived_configs_are_validated(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "c.yaml", DIGITS))
    assert config.derive("test", train={"lr": 0.5}).train.lr == 0.5
    with pytest.raises(UserError, match="test: .*train.min_lr"):
        config.derive("test", train={"lr": 1e-5, "min_lr": 1e-4})


def test_distillation_lr_never_rises_above_its_own_lr(digits_run: Path, tmp_path: Path) -> None:
    config = tiny_digits(tmp_path, lr=0.01, min_lr=1e-4)
    shutil.copytree(digits_run.parent / "run", tmp_path / "run")
    result = cli("compress", "-c", config, "-q", "--set",
                 "compress.steps=[{method: distill, student: {hidden_sizes: [8]}, steps: 20, lr: 1.0e-5}]")
    assert result.code == 0, result.stderr
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "compress" / "step1" / "metrics.jsonl")
           .read_text().splitlines() if "lr" in json.loads(line)]
    assert lrs and max(lrs) <= 1e-5 and min(lrs) < 1e-5


# ---- usage errors and --json


def test_usage_errors_are_one_line_and_one_json_object() -> None:
    result = cli("train", "--json")
    refused(result, "missing option '-c'", "bigmodel train --help")
    payload = json.loads(result.stdout)  # exactly one object
    assert payload["ok"] is False and payload["exit_code"] == 2 and not payload["error"].startswith("error")
    result = cli("eval", "-c", "x.yaml", "--bogus", "--json")
    refused(result, "no such option: --bogus")
    assert json.loads(result.stdout)["command"] == "eval"
    refused(cli("trian"), "no such command 'trian'", "train")


def test_json_error_field_does_not_repeat_the_prefix(tmp_path: Path) -> None:
    result = cli("prepare", "-c", tmp_path / "missing.yaml", "--json")
    refused(result, "config file not found")
    assert json.loads(result.stdout)["error"].startswith("config file not found")


# ---- file system


def test_unusable_run_dirs_are_user_errors(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", DIGITS)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    refused(cli("prepare", "-c", config, "--run-dir", blocker), str(blocker), "another --run-dir")
    stage_file = tmp_path / "run2"
    stage_file.mkdir()
    (stage_file / "prepare").write_text("x")
    refused(cli("prepare", "-c", config, "--run-dir", stage_file), str(stage_file / "prepare"))
    if Path("/sys").is_dir() and not os.access("/sys", os.W_OK):
        refused(cli("prepare", "-c", config, "--run-dir", "/sys/bigmodel-run"), "/sys/bigmodel-run")


# ---- text data


def text_config(tmp_path: Path, text: bytes, **data: object) -> Path:
    source = tmp_path / "corpus.txt"
    source.write_bytes(text)
    return write_config(tmp_path / "t.yaml", {"run_dir": "run", "data": {"format": "text", "path": str(source),
                                                                            **data}})


def test_text_that_is_not_utf8_names_the_file_the_byte_and_the_key(tmp_path: Path) -> None:
    latin = "caf\u00e9 au lait, cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 50
    refused(cli("prepare", "-c", text_config(tmp_path, latin)), "corpus.txt", "not utf-8", "offset 3",
            "data.encoding")
    assert cli("prepare", "-c", text_config(tmp_path, latin, encoding="latin-1"), "-q").code == 0
    refused(cli("prepare", "-c", text_config(tmp_path, b"\x00\x01\xff\xfe" * 100)), "binary file")
    refused(cli("config", "show", "-c", text_config(tmp_path, b"x", encoding="utf-9")), "unknown text encoding")


def test_degenerate_corpora_are_refused_with_what_is_wrong(tmp_path: Path) -> None:
    refused(cli("prepare", "-c", text_config(tmp_path, b"")), "no text", "empty")
    refused(cli("prepare", "-c", text_config(tmp_path, b"a" * 5000 + b"\n")), "1 distinct character", "'a'")
