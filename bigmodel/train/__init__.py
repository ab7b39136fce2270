"""train: a checkpoint + prepared data -> trained checkpoints (`best` and `last`) and metrics.jsonl."""

from __future__ import annotations

from typing import Any

from bigmodel.config import Config


def run(config: Config) -> dict[str, Any]:
    from bigmodel.train import tabular

    return tabular.run(config)
