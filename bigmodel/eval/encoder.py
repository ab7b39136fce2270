"""Evaluate an encoder classifier on the val or test split: accuracy, precision, recall and F1 (macro and
per class), confusion matrix -- the same metric code and report as the tabular classifier's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bigmodel import console, metrics, registry
from bigmodel.config import Config
from bigmodel.datasets import load_texts
from bigmodel.errors import UserError
from bigmodel.eval import check_gate
from bigmodel.io import sha256_file, write_json
from bigmodel.runtime import setup_torch


def run(config: Config) -> dict[str, Any]:
    setup_torch(config)
    ec = config.eval
    path = registry.stage_checkpoint(config, ec.checkpoint, "eval")
    scores, task, step = scores_for(config, path)
    report = {"split": ec.split, "checkpoint": str(path), "checkpoint_sha256": sha256_file(path), "step": step,
              "metrics": scores}
    out = config.eval_output()
    write_json(out, report)
    headline = {k: scores[k] for k in metrics.HEADLINE[task]}
    console.info(f"eval ({ec.split}, {scores['rows']} texts): " + ", ".join(f"{k} {v:.4f}" for k, v in headline.items()))
    return check_gate(scores, ec.fail_under, ec.fail_above, {"metrics_file": str(out), "split": ec.split, **headline})


def scores_for(config: Config, path: Path) -> tuple[dict[str, Any], str, int | None]:
    """Metrics of a checkpoint on eval.split, without writing anything."""
    from bigmodel.train.encoder import probabilities

    if path.suffix == ".onnx":
        raise UserError(f"eval: {path.name}: ONNX encoders cannot be evaluated yet; give a checkpoint")
    model, manifest = registry.load_model(path)
    texts = load_texts(config, config.eval.split or "test")
    probs = probabilities(model, texts, manifest["architecture"]["pad_id"], torch.device("cpu"))
    return metrics.classification(texts.y, probs, manifest["data"]["labels"]), "classification", manifest.get("step")
