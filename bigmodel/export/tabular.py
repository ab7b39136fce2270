"""Export the tabular MLP: raw features in, probabilities (or values) out, dynamic batch axis.

Standardisation is inside the graph (the model's buffers), the label and feature names are in the
file's metadata. The parity gate runs ONNX Runtime on held-out rows, in one batch and row by row, and
fails the export when the largest absolute difference from PyTorch exceeds export.atol.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel import console, registry
from bigmodel.arch import TabularArch
from bigmodel.config import Config
from bigmodel.datasets import load_split
from bigmodel.export.onnx_file import export_dynamo, publish_or_reject, stamp_and_check
from bigmodel.infer.session import open_session
from bigmodel.io import sha256_file, write_json
from bigmodel.manifests import TabularMetadata
from bigmodel.models.mlp import MLP


class Deployed(torch.nn.Module):
    """What the graph computes: the model's `predict` (softmax, or back to the target's units)."""

    def __init__(self, model: MLP) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.predict(features)


def export_checkpoint(config: Config, ckpt: Path, out_dir: Path) -> dict[str, Any]:
    """Export `ckpt` to out_dir/model.onnx through the checker and the parity gate."""
    xc = config.export
    model, manifest = registry.load_model(ckpt)
    assert isinstance(model, MLP)  # (stage_checkpoint checked the family)
    deployed = Deployed(model.eval()).eval()
    arch = manifest.architecture
    assert isinstance(arch, TabularArch)  # (stage_checkpoint checked the family)
    task = arch.task
    output_name = "probabilities" if task == "classification" else "prediction"

    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / "model.onnx"
    rows = _parity_rows(config, xc.parity_rows)
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        tmp = Path(work) / "model.onnx"
        example = torch.from_numpy(rows[: max(2, min(len(rows), 8))])
        export_dynamo(
            deployed,
            (example,),
            tmp,
            ["features"],
            [output_name],
            {"features": {0: torch.export.Dim("batch")}},
            xc.opset,
        )
        stamp_and_check(
            tmp,
            TabularMetadata(
                task=task,
                target=manifest.data.target,
                features=manifest.data.features,
                labels=manifest.data.labels,
                architecture=arch,
                lineage={"checkpoint": sha256_file(ckpt)},
            ),
        )
        parity = check_parity(deployed, tmp, rows, xc.atol, config.threads)
        report = {"checkpoint": str(ckpt), "model": str(final), "opset": xc.opset, **parity}
        write_json(out_dir / "parity.json", report)
        console.info(
            f"export: parity on {parity['rows']} held-out rows: max abs diff "
            f"{parity['max_abs_diff']:.3g} (atol {xc.atol}) -> {'ok' if parity['passed'] else 'FAILED'}"
        )
        publish_or_reject(
            tmp,
            final,
            parity["passed"],
            f"export parity failed: max abs diff {parity['max_abs_diff']:.3g} > atol {xc.atol} at "
            f"row {parity['worst_row']}, output {parity['worst_output']}",
        )
    console.info(f"export: {final} ({final.stat().st_size:,} bytes)")
    return {
        "model": str(final),
        "parity_report": str(out_dir / "parity.json"),
        "max_abs_diff": parity["max_abs_diff"],
        "passed": True,
    }


def _parity_rows(config: Config, limit: int) -> np.ndarray:
    x, _ = load_split(config, "test")
    if len(x) < limit:  # top up from val so small data sets still get a meaningful check
        x = np.concatenate([x, load_split(config, "val")[0]])
    return np.ascontiguousarray(x[:limit])


def check_parity(
    deployed: torch.nn.Module, path: Path, rows: np.ndarray, atol: float, threads: int | None
) -> dict[str, Any]:
    """Compare ORT with PyTorch on `rows`, as one batch and as single rows (the dynamic axis)."""
    session = open_session(path, ["CPUExecutionProvider"], threads)
    with torch.no_grad():
        expected = deployed(torch.from_numpy(rows)).numpy()
    batched = session.run(None, {"features": rows})[0]
    single = np.concatenate([session.run(None, {"features": rows[i : i + 1]})[0] for i in range(min(8, len(rows)))])
    diff = np.abs(batched.astype(np.float64) - expected)
    diff_single = np.abs(single.astype(np.float64) - expected[: len(single)])
    worst = np.unravel_index(int(diff.argmax()), diff.shape)
    max_diff = float(max(diff.max(), diff_single.max()))
    return {
        "rows": int(len(rows)),
        "max_abs_diff": max_diff,
        "mean_abs_diff": float(diff.mean()),
        "worst_row": int(worst[0]),
        "worst_output": int(worst[1]) if len(worst) > 1 else 0,
        "atol": atol,
        "passed": bool(max_diff <= atol),
    }


def calibration_feeds(config: Config, model: Path, batches: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Static quantisation's calibration data: batches of training rows."""
    x, _ = load_split(config, "train")
    return [{"features": x[rng.integers(0, len(x), size=config.train.batch_size)]} for _ in range(batches)]


def latency_feeds(session: Any, meta: TabularMetadata) -> dict[str, np.ndarray]:
    """What compress times: one row."""
    return {"features": np.zeros((1, len(meta.features)), np.float32)}
