"""`bigmodel train --nproc N`: check the inputs once, then run the same command on N local processes."""

from __future__ import annotations

from pathlib import Path

from bigmodel import console, distributed
from bigmodel.config import load_config
from bigmodel.errors import UserError
from bigmodel.families import family
from bigmodel.io import require_file


def threads_per_process(threads: int | None, nproc: int, overrides: list[str]) -> list[str]:
    """Processes x threads must not exceed the cores: oversubscribed, every process waits on the others
    (2 processes x 2 threads on 2 cores measured 16x slower than x 1). A config's `threads` is for one
    process, so it is lowered to fit; a `--set threads=N` on this command line is the user's word and kept."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    fitting = max(1, cores // nproc)
    if any(o.partition("=")[0].strip() == "threads" for o in overrides):
        chosen, why = threads, "as --set"
    elif threads is not None and threads <= fitting:
        chosen, why = threads, "the config's"
    else:
        chosen, why = fitting, f"{cores} cores / {nproc} processes"
    console.info(f"train: {nproc} processes x {chosen} thread{'s' if chosen != 1 else ''} ({why})")
    return [] if chosen == threads else [f"threads={chosen}"]


def train_on_processes(
    nproc: int,
    config_path: Path,
    overrides: list[str],
    run_dir: str | None,
    *,
    resume: bool,
    until_step: int | None,
    json_out: bool,
    quiet: bool,
    debug: bool,
    restart: bool = False,
    allow_changes: bool = False,
) -> int:
    """Input mistakes are reported here, once, before any worker starts; returns the job's exit code."""
    from bigmodel.stages import STAGES

    config = load_config(config_path, overrides, run_dir)
    if not family(config.model.family).distributed:
        raise UserError(
            f"--nproc: distributed training is not available for the {config.model.family} family; "
            "train it in one process"
        )
    for path in STAGES["train"].inputs(config):
        require_file(path, "training input", "run the stage that writes it first")
    if not resume:
        from bigmodel.train import refuse_unfinished

        refuse_unfinished(config.stage_dir("train"), restart)
    child_args = ["train", "-c", str(config_path)]
    for override in [*overrides, *threads_per_process(config.threads, nproc, overrides)]:
        child_args += ["--set", override]
    for flag, value in (
        ("--resume", resume),
        ("--restart", restart),
        ("--allow-changes", allow_changes),
        ("--json", json_out),
        ("--quiet", quiet),
        ("--debug", debug),
    ):
        child_args += [flag] if value else []
    child_args += ["--until-step", str(until_step)] if until_step is not None else []
    child_args += ["--run-dir", str(run_dir)] if run_dir is not None else []
    return distributed.launch(nproc, child_args)
