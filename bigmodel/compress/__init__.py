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
from bigmodel.compress.measure import measure
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
    metric = rows[0]["metric"]
    header = f"{'step':<30}{'params':>10}{'non-zero':>10}{'file KB':>10}{'weights KB':>12}{metric:>12}{'latency ms':>12}"
    console.info(header)
    for row in rows:
        console.info(
            f"{row['name']:<30}{row['parameters']:>10,}{row['nonzeros']:>10,}{row['file_bytes'] / 1024:>10.1f}"
            f"{row['weight_bytes'] / 1024:>12.1f}{row['metrics'][metric]:>12.4f}{row['latency_ms']:>12.3f}"
        )
