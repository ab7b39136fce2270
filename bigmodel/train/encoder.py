"""Training recipe for the encoder family's classifier (fine-tuning or from scratch). Reads top to bottom:
setup, data, loop, save.

Batches are drawn from a per-epoch permutation of the training texts (seeded by seed and epoch, so a
resumed run re-creates it) and right-padded to their longest text. Every `eval_every` steps the model is
scored on the val split (loss and accuracy); the best is saved as best.safetensors, the full training
state as last.safetensors, a record appended to metrics.jsonl; early stopping after `patience` evaluations
without improvement.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bigmodel import console, registry
from bigmodel.checkpoint import read_manifest
from bigmodel.config import Config
from bigmodel.datasets import DATA_FILE, TextSplit, load_texts
from bigmodel.errors import RunFailed, UserError
from bigmodel.io import sha256_file
from bigmodel.runtime import setup_torch
from bigmodel.train.log import MetricsLog
from bigmodel.train.optim import build_optimizer, lr_at, set_lr
from bigmodel.train.state import (
    check_matches_config,
    checkpoint_manifest,
    save_model,
    save_training_state,
    start_or_resume,
    stop_step,
)


def train(config: Config, resume: bool, out_dir: Path, until_step: int | None = None,
          allow_changes: bool = False) -> dict[str, Any]:
    # ---- setup
    device = setup_torch(config)
    tc = config.train
    if config.task != "classification":
        raise UserError(f"train: the encoder's {config.task} task cannot be trained yet; model.task: classification "
                        "with data.format text_classification can")
    init_path = config.stage_dir("init") / "model.safetensors"
    model, init_manifest = registry.load_model(init_path)
    check_matches_config(config, init_manifest)
    model.to(device)
    optimizer = build_optimizer(model, tc)
    pad_id = init_manifest["architecture"]["pad_id"]

    # ---- data
    train_set, val_set = load_texts(config, "train"), load_texts(config, "val")
    steps_per_epoch = math.ceil(len(train_set) / tc.batch_size)
    total_steps = tc.max_steps or (tc.epochs or 1) * steps_per_epoch
    eval_every = tc.eval_every or steps_per_epoch

    # ---- resume
    metrics_path, last_path = out_dir / "metrics.jsonl", out_dir / "last.safetensors"
    unused_sampler = torch.Generator()  # batches come from per-epoch permutations instead
    loop, stopped_early = start_or_resume(out_dir, resume, model, optimizer, unused_sampler, tc.patience,
                                          config=config, allow_changes=allow_changes)
    if stopped_early:
        total_steps = loop.step
    lineage = {"init": sha256_file(init_path), "data": sha256_file(config.stage_dir("prepare") / DATA_FILE)}

    def manifest(metrics: dict[str, float]) -> dict[str, Any]:
        return checkpoint_manifest(init_manifest, config, loop, metrics, lineage)

    # ---- loop
    best_metrics: dict[str, float] = {}
    start = time.perf_counter()
    console.info(f"train on {device}: {registry.count_parameters(model):,} parameters, {len(train_set)} texts, "
                 f"{total_steps} steps ({steps_per_epoch}/epoch), eval every {eval_every}"
                 + (f", from step {loop.step}" if loop.step else ""))
    last_step = stop_step(total_steps, until_step, loop.step)
    log = MetricsLog(metrics_path, tc.tensorboard, loop.step)
    with console.Progress("train", last_step) as progress:
        while loop.step < last_step:
            epoch, done = divmod(loop.step, steps_per_epoch)
            order = np.random.default_rng([config.seed, epoch]).permutation(len(train_set))
            for rows in np.array_split(order, steps_per_epoch)[done:]:
                model.train()
                lr = lr_at(loop.step, total_steps, tc)
                set_lr(optimizer, lr)
                batch = _tensors(train_set.batch(rows, pad_id), device)
                loss = F.cross_entropy(model(**batch), torch.from_numpy(train_set.y[rows]).to(device))
                if not torch.isfinite(loss):
                    raise RunFailed(f"train: loss became {loss.item()} at step {loop.step + 1}; lower train.lr or "
                                    "set train.grad_clip (the last good checkpoints were kept)")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                loop.step += 1
                progress.update(loop.step, loss=loss.item(), lr=lr)

                stop = False
                if loop.step % eval_every == 0 or loop.step == total_steps:
                    val = evaluate(model, val_set, pad_id, device)
                    log.write({"step": loop.step, "epoch": loop.step / steps_per_epoch, "lr": lr,
                               "train_loss": loss.item(), **{f"val_{k}": v for k, v in val.items()},
                               "elapsed_s": round(time.perf_counter() - start, 3)})
                    score = val["loss"] if tc.monitor == "loss" else -val["accuracy"]
                    if score < loop.best_score:
                        loop.best_score, loop.best_step, loop.evals_since_best = score, loop.step, 0
                        best_metrics = val
                        save_model(out_dir / "best.safetensors", model, manifest(val))
                    else:
                        loop.evals_since_best += 1
                    if tc.patience is not None and loop.evals_since_best >= tc.patience:
                        console.info(f"train: early stop at step {loop.step} (no val improvement in "
                                     f"{tc.patience} evaluations)")
                        stop = True
                    loop.mark(total_steps, stopped_early=stop)
                    save_training_state(last_path, model, optimizer, unused_sampler, loop, manifest(val))
                elif loop.step == last_step:
                    loop.mark(total_steps)
                    save_training_state(last_path, model, optimizer, unused_sampler, loop,
                                        manifest({"train_loss": loss.item()}))
                if stop or loop.step >= last_step:
                    last_step = loop.step
                    break

    log.close()
    if not best_metrics and (out_dir / "best.safetensors").is_file():
        best_metrics = read_manifest(out_dir / "best.safetensors").get("metrics", {})
    summary = ", ".join(f"{k} {v:.4g}" for k, v in best_metrics.items())
    console.info(f"train: step {loop.step} of {total_steps}, " + (
        f"best at step {loop.best_step}: {summary}" if loop.best_step is not None
        else f"no evaluation yet (the first is at step {eval_every})")
        + ("" if loop.finished else "; continue with --resume"))
    return {"best": str(out_dir / "best.safetensors"), "last": str(last_path), "metrics_log": str(metrics_path),
            "steps": loop.step, "total_steps": total_steps, "finished": loop.finished, "best_step": loop.best_step,
            "best_metrics": best_metrics}


def _tensors(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array).to(device) for name, array in batch.items()}


@torch.no_grad()
def probabilities(model: nn.Module, texts: TextSplit, pad_id: int, device: torch.device,
                  batch_size: int = 64) -> np.ndarray:
    """(N, L) class probabilities of every text, in batches padded to their own longest text."""
    model.eval()
    rows = np.arange(len(texts))
    parts = [torch.softmax(model(**_tensors(texts.batch(chunk, pad_id), device)), -1).cpu().numpy()
             for chunk in np.array_split(rows, max(1, math.ceil(len(rows) / batch_size)))]
    return np.concatenate(parts)


def evaluate(model: nn.Module, texts: TextSplit, pad_id: int, device: torch.device) -> dict[str, float]:
    probs = probabilities(model, texts, pad_id, device)
    picked = probs[np.arange(len(texts)), texts.y]
    return {"loss": float(-np.log(np.clip(picked, 1e-12, 1.0)).mean()),
            "accuracy": float((probs.argmax(-1) == texts.y).mean())}
