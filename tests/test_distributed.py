"""Distributed training: real torchrun, 2 CPU processes, the gloo backend, DDP and FSDP2.

The single-process run is the reference: the same config at any world size trains on the same global
batches, so losses must agree to float rounding, and checkpoints must resume across world sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from bigmodel.distributed import World
from bigmodel.errors import UserError
from bigmodel.train.lm import rank_share
from tests.conftest import Result, cli, cli_subprocess
from tests.test_lm import lm_config

# A step of 18 windows: 3 micro-batches of 6 in one process, 9 rows per rank (3 micro-batches of 3) in two.
TRAIN = {
    "batch_size": 6,
    "grad_accum_steps": 3,
    "max_steps": 20,
    "eval_every": 10,
    "log_every": 1,
    "grad_clip": 1.0,
    "save_every": 5,
}


def torchrun(config: Path, *args: str, nproc: int = 2) -> Result:
    """`torchrun --standalone --nproc_per_node=N -m bigmodel train ...`, as a user would type it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "bigmodel",
            "train",
            "-c",
            str(config),
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=config.parent,
        env=env,
        timeout=300,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def losses(config: Path) -> list[dict]:
    """metrics.jsonl without its timing field (the one thing allowed to differ between runs)."""
    records = [
        json.loads(line) for line in (config.parent / "run" / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    return [{k: v for k, v in record.items() if k != "tokens_per_s"} for record in records]


def wte_shape(path: Path) -> tuple[int, ...]:
    with safe_open(str(path), "pt") as handle:
        return tuple(handle.get_slice("model.transformer.wte.weight").get_shape())


def assert_same_run(got: list[dict], want: list[dict], tolerance: float) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert len(got) == 22  # 20 train-loss records + 2 evaluations
    for mine, theirs in zip(got, want):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], abs=tolerance), mine["step"]
        if "val_loss" in theirs:
            assert mine["val_loss"] == pytest.approx(theirs["val_loss"], abs=tolerance), mine["step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """Prepared data, an initial checkpoint and the single-process run every test compares with."""
    tmp = tmp_path_factory.mktemp("dist")
    config = lm_config(tmp, **TRAIN)
    for stage in ("prepare", "init", "train", "eval"):
        result = cli(stage, "-c", config, "-q")
        assert result.code == 0, result.stderr
    return config, losses(config)


def eval_loss(config: Path) -> float:
    return json.loads((config.parent / "run" / "eval" / "metrics.json").read_text())["metrics"]["loss"]


def test_ddp_matches_one_process_at_the_same_global_batch(reference: tuple[Path, list[dict]]) -> None:
    config, single = reference
    result = torchrun(config, "--set", "train.distributed=ddp")
    assert result.code == 0, result.stderr
    assert_same_run(losses(config), single, 1e-5)


def test_fsdp_matches_one_process_and_its_checkpoint_serves_eval(reference: tuple[Path, list[dict]]) -> None:
    config, single = reference
    result = torchrun(config, "--set", "train.distributed=fsdp", "--set", "train.activation_checkpointing=true")
    assert result.code == 0, result.stderr
    assert_same_run(losses(config), single, 1e-4)
    # The checkpoint is consolidated: the single-process format, usable by eval as it is.
    run = config.parent / "run"
    assert wte_shape(run / "train" / "last.safetensors") == wte_shape(run / "init" / "model.safetensors")
    single_eval = eval_loss(config)
    evaluated = cli("eval", "-c", config, "-q")
    assert evaluated.code == 0, evaluated.stderr
    assert eval_loss(config) == pytest.approx(single_eval, abs=1e-4)


@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_checkpoints_resume_under_another_world_size(reference: tuple[Path, list[dict]], mode: str) -> None:
    config, single = reference
    tolerance = 1e-5 if mode == "ddp" else 1e-4
    # Two processes stop at step 10; one process finishes the run.
    first = torchrun(config, "--set", f"train.distributed={mode}", "--until-step", "10", "-q")
    assert first.code == 0, first.stderr
    second = cli("train", "-c", config, "--resume", "-q")
    assert second.code == 0, second.stderr
    assert_same_run(losses(config), single, tolerance)
    # One process stops at step 5; two processes finish it.
    first = cli("train", "-c", config, "--until-step", "5", "-q")
    assert first.code == 0, first.stderr
    second = torchrun(config, "--set", f"train.distributed={mode}", "--resume", "-q")
    assert second.code == 0, second.stderr
    assert_same_run(losses(config), single, tolerance)


def test_only_rank_zero_speaks_and_writes(reference: tuple[Path, list[dict]]) -> None:
    config, _ = reference
    result = torchrun(config, "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 20  # exactly one JSON object on stdout
    summaries = [line for line in result.stderr.splitlines() if line.startswith("train: step 20")]
    assert len(summaries) == 1
    assert "rank 1" not in result.stderr
    assert len(losses(config)) == 22  # one writer: no duplicated records


@pytest.mark.slow
def test_ten_two_process_runs_all_exit_zero(reference: tuple[Path, list[dict]], tmp_path: Path) -> None:
    config, _ = reference
    codes = [torchrun(config, "--set", "train.max_steps=2", "-q").code for _ in range(10)]
    assert codes == [0] * 10


def test_nproc_launches_torchrun_and_reports_input_errors_once(reference: tuple[Path, list[dict]]) -> None:
    config, single = reference
    launched = cli_subprocess("train", "-c", config, "--nproc", "2", "--json", cwd=config.parent)
    assert launched.code == 0, launched.stderr
    assert json.loads(launched.stdout)["steps"] == 20
    assert_same_run(losses(config), single, 1e-5)

    bad = cli_subprocess("train", "-c", config, "--nproc", "2", "--set", "train.batch_size=7", cwd=config.parent)
    assert bad.code == 2
    assert bad.stderr.strip().splitlines() == [
        "train: 2 processes x 1 thread (the config's)",
        "error: the global batch (train.batch_size x train.grad_accum_steps = 21) must split evenly over "
        "2 processes; change batch_size or grad_accum_steps, or the process count",
    ]
    assert (
        json.loads(launched.stdout)["steps"] == 20 and (config.parent / "run" / "train" / "best.safetensors").exists()
    )
    moved = config.parent / "run" / "init"
    shutil.move(moved, config.parent / "init.away")
    try:
        missing = cli("train", "-c", config, "--nproc", "2")
    finally:
        shutil.move(config.parent / "init.away", moved)
    assert missing.code == 2
    assert "training input not found" in missing.stderr and "Traceback" not in missing.stderr


def test_rank_share_splits_the_global_batch_evenly() -> None:
    assert rank_share(18, 6, World()) == (slice(0, 18), 6)
    assert rank_share(18, 6, World(rank=1, size=2)) == (slice(9, 18), 3)
    assert rank_share(64, 8, World(rank=3, size=4)) == (slice(48, 64), 8)
    with pytest.raises(UserError, match="must split evenly over 4 processes"):
        rank_share(18, 6, World(rank=0, size=4))


def test_until_step_then_resume_is_bitwise_the_uninterrupted_run(reference: tuple[Path, list[dict]]) -> None:
    config, single = reference
    first = cli("train", "-c", config, "--until-step", "7", "-q")
    assert first.code == 0, first.stderr
    assert losses(config)[-1]["step"] == 7
    second = cli("train", "-c", config, "--resume", "-q")
    assert second.code == 0, second.stderr
    assert losses(config) == single
