"""Evaluate an encoder (checkpoint or exported .onnx) on the val or test split, by its task:

- classification: accuracy, precision, recall and F1 (macro and per class), confusion matrix -- the same
  metric code and report as the tabular classifier's;
- mlm: cross-entropy, accuracy and perplexity on masked tokens (one fixed seeded masking);
- embedding: retrieval of each text's partner among all the split's partners: recall@1, recall@5, mean
  reciprocal rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel import console, metrics, registry
from bigmodel.arch import EncoderArch
from bigmodel.config import Config
from bigmodel.datasets import load_texts
from bigmodel.eval import check_gate
from bigmodel.io import sha256_file, write_json
from bigmodel.manifests import DataInfo, EncoderMetadata
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
    console.info(
        f"eval ({ec.split}, {scores['rows']} texts): " + ", ".join(f"{k} {v:.4f}" for k, v in headline.items())
    )
    return check_gate(scores, ec.fail_under, ec.fail_above, {"metrics_file": str(out), "split": ec.split, **headline})


def scores_for(config: Config, path: Path) -> tuple[dict[str, Any], str, int | None]:
    """Metrics of a checkpoint or an exported .onnx model on eval.split, without writing anything."""
    from bigmodel.scoring import mlm_scores, probabilities, retrieval_scores

    if path.suffix != ".onnx":
        registry.check_adapter_base(path, config.stage_dir("init") / "model.safetensors")
    encode, arch, data, step = _onnx_encoder(config, path) if path.suffix == ".onnx" else _torch_encoder(path)
    split = config.eval.split or "test"
    texts = load_texts(config, split)
    task, pad_id = arch.task, arch.pad_id
    if task == "classification":
        assert texts.y is not None  # a classifier's splits have labels
        scores = metrics.classification(texts.y, probabilities(encode, texts, pad_id), data.labels or [])
    elif task == "mlm":
        scores = {
            **mlm_scores(encode, texts, pad_id, data.special_ids or {}, arch.vocab_size, config.seed),
            "rows": len(texts),
        }
    else:
        scores = retrieval_scores(encode, texts, load_texts(config, split, "b_"), pad_id)
        scores = {"recall_at_1": scores.pop("accuracy"), **scores, "rows": len(texts)}
    return scores, task, step


def _torch_encoder(path: Path) -> tuple[Any, EncoderArch, DataInfo, int | None]:
    from bigmodel.scoring import torch_encoder

    model, manifest = registry.load_model(path)
    assert isinstance(manifest.architecture, EncoderArch)  # (stage_checkpoint checked the family)
    return torch_encoder(model, torch.device("cpu")), manifest.architecture, manifest.data, manifest.step


def _onnx_encoder(config: Config, path: Path) -> tuple[Any, EncoderArch, DataInfo, None]:
    """An exported encoder run by ONNX Runtime; a classifier's probabilities turned back into logits."""
    from bigmodel.infer.session import open_model

    session, meta = open_model(path, config.infer.providers, config.infer.threads or config.threads, EncoderMetadata)
    classifier = meta.task == "classification"

    def encode(batch: dict[str, np.ndarray]) -> np.ndarray:
        out = session.run(None, batch)[0]
        return np.log(np.clip(out, 1e-30, None)) if classifier else out

    return encode, meta.architecture, DataInfo(labels=meta.labels, special_ids=meta.special_ids), None
