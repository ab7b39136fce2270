"""Evaluate a tabular checkpoint on the val or test split and apply the fail_under gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel import console, metrics, registry
from bigmodel.arch import TabularArch
from bigmodel.config import Config
from bigmodel.datasets import load_split
from bigmodel.eval import check_gate
from bigmodel.io import sha256_file, write_json
from bigmodel.manifests import TabularMetadata
from bigmodel.models.mlp import MLP
from bigmodel.runtime import setup_torch


def run(config: Config) -> dict[str, Any]:
    setup_torch(config)
    ec = config.eval
    path = registry.stage_checkpoint(config, ec.checkpoint, "eval")
    scores, task, step = scores_for(config, path)

    report = {
        "split": ec.split,
        "checkpoint": str(path),
        "checkpoint_sha256": sha256_file(path),
        "step": step,
        "metrics": scores,
    }
    out = config.eval_output()
    write_json(out, report)
    headline = {k: scores[k] for k in metrics.HEADLINE[task]}
    console.info(f"eval ({ec.split}, {scores['rows']} rows): " + ", ".join(f"{k} {v:.4f}" for k, v in headline.items()))
    outputs = {"metrics_file": str(out), "split": ec.split, **headline}
    return check_gate(scores, ec.fail_under, ec.fail_above, outputs)


def scores_for(config: Config, path: Path) -> tuple[dict[str, Any], str, int | None]:
    """Metrics of a checkpoint or an .onnx model on eval.split, without writing anything."""
    x, y = load_split(config, config.eval.split or "test")
    if path.suffix == ".onnx":  # an exported (fp32 or int8) model, run by ONNX Runtime
        predicted, task, labels, step = _onnx_predict(path, x, config)
    else:
        model, manifest = registry.load_model(path)
        assert isinstance(model, MLP)  # (stage_checkpoint checked the family)
        with torch.no_grad():
            predicted = model.eval().predict(torch.from_numpy(x)).numpy()
        assert isinstance(manifest.architecture, TabularArch)  # (stage_checkpoint checked the family)
        task, labels, step = manifest.architecture.task, manifest.data.labels or [], manifest.step
    # The same metric code for every artifact, so compressed models are measured like the original.
    scores = (
        metrics.classification(y, predicted, labels) if task == "classification" else metrics.regression(y, predicted)
    )
    return scores, task, step


def _onnx_predict(path: Path, x: np.ndarray, config: Config) -> tuple[np.ndarray, str, list[str], None]:
    from bigmodel.infer.session import open_model

    session, meta = open_model(path, config.infer.providers, config.infer.threads or config.threads, TabularMetadata)
    return session.run(None, {"features": x})[0], meta.task, meta.labels or [], None
