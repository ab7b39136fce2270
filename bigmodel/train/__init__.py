"""train: a checkpoint + prepared data -> trained checkpoints (`best` and `last`) and metrics.jsonl."""

from __future__ import annotations

from typing import Any

from bigmodel.config import Config


def run(config: Config, resume: bool = False) -> dict[str, Any]:
    if config.model.family == "gpt":
        from bigmodel.train import lm

        return lm.run(config, resume=resume)
    from bigmodel.train import tabular

    return tabular.run(config, resume=resume)
