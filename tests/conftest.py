"""Shared fixtures: real data from configs/data, a tiny fast config, and a CLI runner.

Everything runs real torch, onnx and onnxruntime on small models; nothing is mocked.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bigmodel.cli import app

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        return json.loads(self.stdout)


def cli(*args: str) -> Result:
    """Run the real CLI in-process (fast); stdout and stderr are kept apart."""
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return Result(result.exit_code, result.stdout, result.stderr)


def cli_subprocess(*args: str, stdin: str | None = None, cwd: Path | None = None) -> Result:
    """Run `python -m bigmodel` in a fresh process (for import-time and stdio behaviour)."""
    proc = subprocess.run(
        [sys.executable, "-m", "bigmodel", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def tiny_digits(tmp: Path, **train: object) -> Path:
    """digits with a small MLP and a short run: the whole pipeline in a few seconds."""
    config = {
        "seed": 0,
        "threads": 1,
        "run_dir": "run",
        "data": {"path": str(CONFIGS / "data" / "digits.csv.gz"), "target": "label"},
        "model": {"hidden_sizes": [32]},
        "train": {"lr": 0.01, "batch_size": 64, "epochs": 4, **train},
        "eval": {"split": "test"},
    }
    return write_config(tmp / "tiny.yaml", config)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete tiny digits pipeline, shared by the tests that only read its artifacts."""
    tmp = tmp_path_factory.mktemp("digits")
    config = tiny_digits(tmp)
    result = cli("pipeline", "-c", config, "--quiet")
    assert result.code == 0, result.stderr
    return config


@pytest.fixture
def fresh_run(tmp_path: Path, digits_run: Path) -> Path:
    """A private copy of the shared run, for tests that modify artifacts."""
    shutil.copytree(digits_run.parent / "run", tmp_path / "run")
    shutil.copy(digits_run, tmp_path / "tiny.yaml")
    return tmp_path / "tiny.yaml"
