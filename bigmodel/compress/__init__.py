"""compress: an ordered list of compression steps, each measured with the same eval code.

Today's step is `quantize` (int8 through onnxruntime.quantization). The chain: the checkpoint is
exported through the gated export (`compress/fp32/model.onnx`), every step's result is scored by the
eval code exactly as the original, and `compress/report.json` plus a printed table compare parameters,
non-zeros, file and weight bytes, the main metric and latency before and after each step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bigmodel import console
from bigmodel.compress.measure import measure
from bigmodel.config import Config
from bigmodel.datasets import prepared_files
from bigmodel.errors import UserError
from bigmodel.io import write_json
from bigmodel.runtime import setup_torch


def run(config: Config) -> dict[str, Any]:
    from bigmodel.compress import quantize
    from bigmodel.export import export_checkpoint

    cc = config.compress
    if not cc.steps:
        raise UserError("compress.steps is empty: add a step, e.g. --set 'compress.steps=[{method: quantize}]'")
    for number, step in enumerate(cc.steps, start=1):
        if step.needs_data:  # check before any work: calibration batches come from the prepared data
            missing = [p for p in prepared_files(config) if not p.exists()]
            if missing:
                raise UserError(
                    f"compress step {number} ({step.method} {step.mode}) calibrates on the prepared training "
                    f"data, but {missing[0]} is missing; run 'bigmodel prepare' first, or use mode 'dynamic'"
                )
    setup_torch(config)
    out_dir = config.stage_dir("compress")
    checkpoint = config.checkpoint_path(cc.checkpoint)
    exported = export_checkpoint(config, checkpoint, out_dir / "fp32")
    current = Path(exported["model"])
    rows = [measure(config, "fp32 (export)", current)]
    for number, step in enumerate(cc.steps, start=1):
        console.info(f"compress: step {number}: {step.method} ({step.mode})")
        current = quantize.run(step, config, current, out_dir / "model.int8.onnx")
        rows.append(measure(config, f"{number}: {step.method} {step.mode}", current))

    report = {"checkpoint": str(checkpoint), "steps": rows, "baseline": rows[0]["name"], "result": str(current)}
    write_json(out_dir / "report.json", report)
    _print_table(rows)
    return {"model": str(current), "report": str(out_dir / "report.json"), "steps": rows}


def _print_table(rows: list[dict[str, Any]]) -> None:
    metric = rows[0]["metric"]
    header = f"{'step':<22}{'params':>10}{'non-zero':>10}{'file KB':>10}{'weights KB':>12}{metric:>12}{'latency ms':>12}"
    console.info(header)
    for row in rows:
        console.info(
            f"{row['name']:<22}{row['parameters']:>10,}{row['nonzeros']:>10,}{row['file_bytes'] / 1024:>10.1f}"
            f"{row['weight_bytes'] / 1024:>12.1f}{row['metrics'][metric]:>12.4f}{row['latency_ms']:>12.3f}"
        )
