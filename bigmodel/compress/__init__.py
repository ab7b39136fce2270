"""compress: an ordered list of compression steps, each measured with the same eval code.

Steps: `prune` (magnitude pruning of the checkpoint, unstructured or structured, optionally fine-tuned),
`distill` (a smaller student trained on the checkpoint's soft targets) and `quantize` (int8 through
onnxruntime.quantization, on the exported graph, or int4 written from the checkpoint; always last). Each
is a module with one signature (`Step`: the current artifact in, the next out) and the stage is a loop.
The checkpoint and every step's result are exported through the gated export and scored by the eval code
exactly as the original, and `compress/report.json` plus a printed table compare parameters, non-zeros,
file and weight bytes, the main metric and latency before and after each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bigmodel import console, registry
from bigmodel.compress.measure import measure, too_close
from bigmodel.config import Config
from bigmodel.datasets import prepared_files
from bigmodel.errors import UserError
from bigmodel.io import write_json
from bigmodel.runtime import setup_torch


@dataclass(frozen=True)
class Artifact:
    """What a step starts from and hands on: the checkpoint and the ONNX file made from it (a quantised
    file's checkpoint is the one it was quantised from), and what the step reports beside its row."""

    checkpoint: Path
    model: Path
    sparsity: dict[str, float] | None = None  # prune: per-layer sparsity


class Step(Protocol):
    """One compression method (prune.py, distill.py, quantize.py): the current artifact and the step's
    settings in, the next artifact out (written under `folder`, the compress stage's; `number` is the
    step's place in the list), as Olive's passes are."""

    def label(self, step: Any, number: int) -> str: ...
    def apply(self, step: Any, config: Config, current: Artifact, folder: Path, number: int) -> Artifact: ...


def run(config: Config) -> dict[str, Any]:
    from bigmodel.compress import distill, prune, quantize
    from bigmodel.export import export_checkpoint

    cc = config.compress
    if not cc.steps:
        raise UserError("compress.steps is empty: add a step, e.g. --set 'compress.steps=[{method: quantize}]'")
    for number, step in enumerate(cc.steps, start=1):
        if step.needs_data:  # check before any work: calibration batches come from the prepared data
            missing = [p for p in prepared_files(config) if not p.exists()]
            if missing:
                raise UserError(
                    f"compress step {number} ({step.method}) needs the prepared training data (calibration "
                    f"or fine-tuning batches), but {missing[0]} is missing; run 'bigmodel prepare' first"
                )
    setup_torch(config)
    if config.export.dtype != "fp32":  # the quantizers and pruning start from fp32 weights
        config = config.derive("compress", export={"dtype": "fp32"})
    out_dir = config.stage_dir("compress")
    checkpoint = registry.stage_checkpoint(config, cc.checkpoint, "compress")
    current = Artifact(checkpoint, Path(export_checkpoint(config, checkpoint, out_dir / "fp32", ["onnx"])["model"]))
    rows = [measure(config, "fp32 (export)", current.model)]
    methods: dict[str, Step] = {"prune": prune, "distill": distill, "quantize": quantize}  # type: ignore[dict-item]
    sparsity: dict[str, dict[str, float]] = {}
    for number, step in enumerate(cc.steps, start=1):
        method = methods[step.method]
        label = method.label(step, number)
        console.info(f"compress: step {label}")
        current = method.apply(step, config, current, out_dir, number)
        if current.sparsity is not None:
            sparsity[label] = current.sparsity
        rows.append(measure(config, label, current.model))

    report = {
        "checkpoint": str(current.checkpoint),
        "steps": rows,
        "baseline": rows[0]["name"],
        "result": str(current.model),
        "sparsity_per_layer": sparsity,
    }
    write_json(out_dir / "report.json", report)
    _print_table(rows)
    return {
        "model": str(current.model),
        "checkpoint": str(current.checkpoint),
        "report": str(out_dir / "report.json"),
        "steps": rows,
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    """The report as a table whose columns are as wide as their contents, what the metric was measured
    on, and a warning when a step's difference from the baseline is within the measurement's noise."""
    metric = rows[0]["metric"]
    header = ["step", "params", "non-zero", "file", "weights", metric, "latency ms"]
    body = [
        [
            row["name"],
            f"{row['parameters']:,}",
            f"{row['nonzeros']:,}",
            _size(row["file_bytes"]),
            _size(row["weight_bytes"]),
            f"{row['metrics'][metric]:.4f}",
            f"{row['latency_ms']:.3f}",
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    for line in [header, *body]:
        console.info(
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(line, widths))
            )
        )
    measured = rows[0]["measured_on"]
    if measured["count"] is not None:
        console.info(f"compress: {metric} measured on {measured['count']:,} {measured['unit']}")
    notes = too_close(rows)
    if notes:
        console.warn(
            f"compress: {'; '.join(notes)}: measure on more data (eval.text_file, a larger val split) "
            "before choosing between them"
        )


def _size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:,.1f} {unit}"
    return f"{n_bytes} B"
