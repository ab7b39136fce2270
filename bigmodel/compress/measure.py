"""One row of the compression report: size, sparsity, the main metric (eval's code) and latency."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel.config import Config
from bigmodel.eval import scores_for
from bigmodel.families import family_of_onnx_kind
from bigmodel.infer.session import open_model

MAIN_METRIC = {
    "classification": "accuracy",
    "regression": "mse",
    "lm": "loss",
    "mlm": "loss",
    "embedding": "recall_at_1",
}


def measure(config: Config, name: str, model_path: Path) -> dict[str, Any]:
    from bigmodel import memory

    # (ONNX Runtime holds the file while eval scores it: refused here, in one line, when it cannot)
    memory.guard(
        memory.Estimate(
            f"compress (measuring {name})",
            {
                "runtime": memory.TORCH_RUNTIME + memory.ORT_RUNTIME,
                "model": int(memory.SESSION_OVER_FILE * memory.onnx_file_bytes(model_path)),
            },
            [
                (
                    "--set export.dtype=int4 and measure that file with 'bigmodel eval' (compress measures an fp32 "
                    "baseline first)"
                )
            ],
        ),
        config.memory_limit,
    )
    scores, task, _ = scores_for(config, model_path)
    parameters, nonzeros, weight_bytes = _weights(model_path)
    data_file = model_path.with_name(f"{model_path.name}.data")
    file_bytes = model_path.stat().st_size + (data_file.stat().st_size if data_file.exists() else 0)
    headline = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
    metric = MAIN_METRIC[task]
    count, unit = measured_on(scores)
    return {
        "name": name,
        "artifact": str(model_path),
        "parameters": parameters,
        "nonzeros": nonzeros,
        "file_bytes": file_bytes,
        "weight_bytes": weight_bytes,
        "metric": metric,
        "metrics": headline,
        "measured_on": {"count": count, "unit": unit},
        "stderr": standard_error(scores, metric, count),
        "latency_ms": latency_ms(config, model_path),
    }


def measured_on(scores: dict[str, Any]) -> tuple[int | None, str]:
    """How much data the metric was measured on: tokens (language models), else rows."""
    if "tokens" in scores:
        return int(scores["tokens"]), "tokens"
    if "rows" in scores:
        return int(scores["rows"]), "rows"
    if "confusion_matrix" in scores:
        return int(np.sum(scores["confusion_matrix"])), "rows"
    return None, "rows"


def standard_error(scores: dict[str, Any], metric: str, count: int | None) -> float | None:
    """The metric's standard error where it is known: a loss's (from eval), a rate's (binomial)."""
    if metric == "loss":
        return scores.get("loss_stderr")
    if metric in ("accuracy", "recall_at_1") and count:
        rate = float(scores[metric])
        return float(np.sqrt(rate * (1 - rate) / count))
    return None


def too_close(rows: list[dict[str, Any]]) -> list[str]:
    """Steps whose main metric differs from the baseline's by less than twice the standard error of the
    difference: on this much data the two cannot be told apart."""
    baseline, metric = rows[0], rows[0]["metric"]
    notes = []
    for row in rows[1:]:
        errors = [r["stderr"] for r in (baseline, row)]
        if None in errors:
            continue
        noise = 2 * float(np.hypot(*errors))
        difference = row["metrics"][metric] - baseline["metrics"][metric]
        if abs(difference) < noise:
            notes.append(
                f"{row['name']} differs from {baseline['name']} by {difference:+.4g} in {metric}, less "
                f"than the noise (+-{noise:.2g}) of {row['measured_on']['count']:,} "
                f"{row['measured_on']['unit']}"
            )
    return notes


def _weights(path: Path) -> tuple[int, int, int]:
    """Parameters, non-zeros and bytes of the weight tensors (initializers of 2+ elements), read one at a
    time (a big model's file is never loaded whole)."""
    from bigmodel.export.weightless import Initializers

    initializers = Initializers(path)
    parameters = nonzeros = nbytes = 0
    for name in initializers.tensors:
        array = initializers.read(name)
        if array.size < 2:
            continue  # scalars: shapes, zero points, constants
        parameters += array.size
        nonzeros += int(np.count_nonzero(array))
        nbytes += array.nbytes
    return parameters, nonzeros, nbytes


def latency_ms(config: Config, path: Path, calls: int = 200) -> float:
    """Median ONNX Runtime latency of what the model is for (the family's exporter says: one row, one decode
    step at batch 1 with a 16-token past, one text of 64 tokens)."""
    session, meta = open_model(path, ["CPUExecutionProvider"], config.infer.threads or config.threads)
    feeds = family_of_onnx_kind(meta.kind, path).module("exporter").latency_feeds(session, meta)
    for _ in range(10):
        session.run(None, feeds)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 4)
