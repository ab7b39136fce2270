"""`bigmodel train --nproc N`: check the inputs once, then run the same command on N local processes."""

from __future__ import annotations

from pathlib import Path

from bigmodel import distributed
from bigmodel.config import load_config
from bigmodel.errors import UserError
from bigmodel.families import family
from bigmodel.io import require_file


def train_on_processes(
    nproc: int, config_path: Path, overrides: list[str], run_dir: str | None, *, resume: bool,
    until_step: int | None, json_out: bool, quiet: bool, debug: bool, restart: bool = False,
    allow_changes: bool = False,
) -> int:
    """Input mistakes are reported here, once, before any worker starts; returns the job's exit code."""
    from bigmodel.stages import STAGES

    config = load_config(config_path, overrides, run_dir)
    if not family(config.model.family).distributed:
        raise UserError(f"--nproc: distributed training is not available for the {config.model.family} family; "
                        "train it in one process")
    for path in STAGES["train"].inputs(config):
        require_file(path, "training input", "run the stage that writes it first")
    if not resume:
        from bigmodel.train import refuse_unfinished

        refuse_unfinished(config.stage_dir("train"), restart)
    child_args = ["train", "-c", str(config_path)]
    for override in overrides:
        child_args += ["--set", override]
    for flag, value in (("--resume", resume), ("--restart", restart), ("--allow-changes", allow_changes),
                        ("--json", json_out), ("--quiet", quiet), ("--debug", debug)):
        child_args += [flag] if value else []
    child_args += ["--until-step", str(until_step)] if until_step is not None else []
    child_args += ["--run-dir", str(run_dir)] if run_dir is not None else []
    return distributed.launch(nproc, child_args)
