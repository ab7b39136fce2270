"""train: a checkpoint + prepared data -> trained checkpoints (`best` and `last`) and metrics.jsonl."""

from __future__ import annotations

import contextlib
from typing import Any

from bigmodel.config import Config
from bigmodel.console import is_main_process
from bigmodel.distributed import launched_by_torchrun
from bigmodel.errors import UserError
from bigmodel.families import family


def run(config: Config, resume: bool = False, until_step: int | None = None) -> dict[str, Any]:
    from bigmodel.train.state import run_lock

    model_family = family(config.model.family)
    if launched_by_torchrun() and not model_family.distributed:
        raise UserError(f"distributed training (torchrun, --nproc) is not available for the "
                        f"{model_family.name} family; train it in one process")
    recipe = model_family.module("recipe")
    out_dir = config.stage_dir("train")
    # One training job per run directory; within a distributed job rank 0 holds the lock for all.
    with run_lock(out_dir) if is_main_process() else contextlib.nullcontext():
        return recipe.train(config, resume, out_dir, until_step=until_step)
