"""train: a checkpoint + prepared data -> trained checkpoints (`best` and `last`) and metrics.jsonl."""

from __future__ import annotations

from typing import Any

from bigmodel.config import Config


def run(config: Config, resume: bool = False) -> dict[str, Any]:
    from bigmodel.train.state import run_lock

    if config.model.family == "gpt":
        from bigmodel.train import lm as recipe
    else:
        from bigmodel.train import tabular as recipe
    out_dir = config.stage_dir("train")
    with run_lock(out_dir):  # one training process per run directory
        return recipe.train(config, resume, out_dir)
