"""eval: a checkpoint + held-out data -> metrics.json; fail_under / fail_above turn it into a CI gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bigmodel.config import Config
from bigmodel.errors import GateFailed
from bigmodel.families import family


def run(config: Config) -> dict[str, Any]:
    return family(config.model.family).module("evaluator").run(config)


def check_gate(
    scores: dict[str, Any], fail_under: dict[str, float], fail_above: dict[str, float], outputs: dict[str, Any]
) -> dict[str, Any]:
    """`outputs`, or exit 1 (GateFailed, carrying them) when a metric crosses its threshold (names were
    checked with the config)."""
    failures = [f"{name} {scores[name]:.4f} < {limit}" for name, limit in fail_under.items() if scores[name] < limit]
    failures += [f"{name} {scores[name]:.4f} > {limit}" for name, limit in fail_above.items() if scores[name] > limit]
    if failures:
        raise GateFailed(f"eval gate failed: {'; '.join(failures)}", outputs)
    return outputs


def scores_for(config: Config, path: Path) -> tuple[dict[str, Any], str, int | None]:
    """(metrics, task, step) of any artifact — checkpoint or ONNX model — with the eval code."""
    return family(config.model.family).module("evaluator").scores_for(config, path)
