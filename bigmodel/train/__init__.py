"""train: a checkpoint + prepared data -> trained checkpoints (`best` and `last`) and metrics.jsonl."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from bigmodel.config import Config
from bigmodel.console import is_main_process
from bigmodel.distributed import launched_by_torchrun
from bigmodel.errors import Interrupted, UserError
from bigmodel.families import family


def run(
    config: Config,
    resume: bool = False,
    until_step: int | None = None,
    restart: bool = False,
    allow_changes: bool = False,
) -> dict[str, Any]:
    """Train, or continue (`resume`) the run in <run_dir>/train. An unfinished run there is never thrown
    away silently: without --resume or --restart it is refused; a new run replaces every artifact of the
    old one before it starts (a finished one is replaced, and said so)."""
    from bigmodel.train.state import run_lock

    model_family = family(config.model.family)
    if launched_by_torchrun() and not model_family.distributed:
        raise UserError(
            f"distributed training (torchrun, --nproc) is not available for the "
            f"{model_family.name} family; train it in one process"
        )
    if launched_by_torchrun() and config.train.privacy is not None:
        raise UserError(
            "train.privacy under torchrun is not supported (the noise and the account are per process); "
            "train privately in one process"
        )
    recipe = model_family.module("recipe")
    out_dir = config.stage_dir("train")
    # One training job per run directory; within a distributed job rank 0 holds the lock for all.
    if resume and restart:
        raise UserError("--resume and --restart contradict each other; give one")
    with run_lock(out_dir) if is_main_process() else contextlib.nullcontext():
        if not resume and is_main_process():  # the recipe clears the old run once its inputs are checked
            refuse_unfinished(out_dir, restart)
        try:
            return recipe.train(config, resume, out_dir, until_step=until_step, allow_changes=allow_changes)
        except KeyboardInterrupt:
            raise _interrupted(out_dir) from None


def _interrupted(out_dir: Path) -> Interrupted:
    from bigmodel.train.state import previous_run

    previous = previous_run(out_dir)
    if previous is None or previous.finished:  # nothing of this run saved yet (an older, finished run may be)
        return Interrupted("train stopped before its first checkpoint (nothing to resume; run it again)")
    return Interrupted(
        f"train stopped; its last checkpoint is step {previous.step} ({out_dir / 'last.safetensors'})", resumable=True
    )


def refuse_unfinished(out_dir: Path, restart: bool) -> None:
    """An unfinished run in out_dir is replaced only with --restart (a finished one is replaced)."""
    from bigmodel.train.state import previous_run

    previous = previous_run(out_dir)
    if previous is not None and not previous.finished and not restart:
        of_total = f" of {previous.total_steps}" if previous.total_steps else ""
        raise UserError(
            f"{out_dir} holds an unfinished run (step {previous.step}{of_total}); continue it with "
            "--resume, or discard it and start over with --restart"
        )
