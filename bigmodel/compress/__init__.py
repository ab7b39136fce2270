"""compress: an ordered list of compression steps, each measured with the same eval code.

Steps: `prune` (magnitude pruning of the checkpoint, unstructured or structured, optionally fine-tuned),
`distill` (a smaller student trained on the checkpoint's soft targets) and `quantize` (int8 through onnxruntime.quantization, on the exported graph; always last). The
checkpoint and every step's result are exported through the gated export and scored by the eval code
exactly as the original, and `compress/report.json` plus a printed table compare parameters,
non-zeros, file and weight bytes, the main metric and latency before and after each step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bigmodel import console, registry
from bigmodel.compress.measure import measure, too_close
from bigmodel.config import Config
from bigmodel.datasets import prepared_files
from bigmodel.errors import UserError
from bigmodel.io import write_json
from bigmodel.runtime import setup_torch


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
    current = Path(export_checkpoint(config, checkpoint, out_dir / "fp32", "onnx")["model"])
    rows = [measure(config, "fp32 (export)", current)]
    sparsity: dict[str, dict[str, float]] = {}
    for number, step in enumerate(cc.steps, start=1):
        if step.method == "prune":
            label = f"{number}: prune {step.kind} {step.sparsity:g}"
            console.info(f"compress: step {label}")
            checkpoint, sparsity[label] = prune.run(step, config, checkpoint, out_dir / f"step{number}")
            current = Path(export_checkpoint(config, checkpoint, out_dir / f"step{number}", "onnx")["model"])
        elif step.method == "distill":
            label = f"{number}: distill a={step.alpha:g} T={step.temperature:g}"
            console.info(f"compress: step {label}")
            checkpoint = distill.run(step, config, checkpoint, out_dir / f"step{number}")
            current = Path(export_checkpoint(config, checkpoint, out_dir / f"step{number}", "onnx")["model"])
        else:
            label = f"{number}: quantize " + (step.mode if step.bits == 8 else f"int4 block {step.block_size}"
                                                + (f" head {step.head}" if step.head != "int8" else "")
                                                + (" +emb" if step.embeddings else ""))
            console.info(f"compress: step {label}")
            target = out_dir / f"model.int{step.bits}.onnx"
            if quantize.streams(step, config, checkpoint):  # written from the checkpoint, as export int4 is
                current = quantize.run_streamed(step, config, checkpoint, target)
            else:
                current = quantize.run(step, config, current, target)
        rows.append(measure(config, label, current))

    report = {"checkpoint": str(checkpoint), "steps": rows, "baseline": rows[0]["name"], "result": str(current),
              "sparsity_per_layer": sparsity}
    write_json(out_dir / "report.json", report)
    _print_table(rows)
    return {"model": str(current), "checkpoint": str(checkpoint), "report": str(out_dir / "report.json"),
            "steps": rows}


def _print_table(rows: list[dict[str, Any]]) -> None:
    """The report as a table whose columns are as wide as their contents, what the metric was measured
    on, and a warning when a step's difference from the baseline is within the measurement's noise."""
    metric = rows[0]["metric"]
    header = ["step", "params", "non-zero", "file", "weights", metric, "latency ms"]
    body = [[row["name"], f"{row['parameters']:,}", f"{row['nonzeros']:,}", _size(row["file_bytes"]),
             _size(row["weight_bytes"]), f"{row['metrics'][metric]:.4f}", f"{row['latency_ms']:.3f}"] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    for line in [header, *body]:
        console.info("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(line, widths))))
    measured = rows[0]["measured_on"]
    if measured["count"] is not None:
        console.info(f"compress: {metric} measured on {measured['count']:,} {measured['unit']}")
    notes = too_close(rows)
    if notes:
        console.warn(f"compress: {'; '.join(notes)}: measure on more data (eval.text_file, a larger val split) "
                     "before choosing between them")


def _size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:,.1f} {unit}"
    return f"{n_bytes} B"
