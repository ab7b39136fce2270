"""Evaluate a tabular checkpoint on the val or test split and apply the fail_under gate."""

from __future__ import annotations

from typing import Any

import torch

from bigmodel import console, metrics, registry
from bigmodel.config import Config
from bigmodel.datasets import load_split
from bigmodel.eval import check_gate
from bigmodel.io import sha256_file, write_json
from bigmodel.runtime import setup_torch


def run(config: Config) -> dict[str, Any]:
    setup_torch(config)
    ec = config.eval
    path = config.checkpoint_path(ec.checkpoint)
    model, manifest = registry.load_model(path)
    x, y = load_split(config, ec.split)
    with torch.no_grad():
        predicted = model.eval().predict(torch.from_numpy(x)).numpy()
    task = manifest["architecture"]["task"]
    if task == "classification":
        scores = metrics.classification(y, predicted, manifest["data"]["labels"])
    else:
        scores = metrics.regression(y, predicted)

    report = {
        "split": ec.split,
        "checkpoint": str(path),
        "checkpoint_sha256": sha256_file(path),
        "step": manifest.get("step"),
        "metrics": scores,
    }
    out = config.stage_dir("eval") / "metrics.json"
    write_json(out, report)
    headline = {k: scores[k] for k in metrics.HEADLINE[task]}
    console.info(f"eval ({ec.split}, {scores['rows']} rows): "
                 + ", ".join(f"{k} {v:.4f}" for k, v in headline.items()))
    check_gate(scores, ec.fail_under, ec.fail_above)
    return {"metrics_file": str(out), "split": ec.split, **headline}
