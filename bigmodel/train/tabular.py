"""Training recipe for the tabular MLP. Reads top to bottom: setup, data, loop, save.

Every `eval_every` steps the model is scored on the val split; the best score so far is saved as
best.safetensors, the current weights as last.safetensors (both atomically), and a record is appended to
metrics.jsonl. Early stopping ends the run after `patience` evaluations without improvement.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigmodel import console, registry
from bigmodel.checkpoint import model_tensors, save_checkpoint
from bigmodel.config import Config
from bigmodel.datasets import DATA_FILE, data_manifest, load_split
from bigmodel.errors import RunFailed, UserError
from bigmodel.io import append_jsonl, sha256_file
from bigmodel.runtime import setup_torch
from bigmodel.train.optim import build_optimizer, lr_at, set_lr


def run(config: Config) -> dict[str, Any]:
    # ---- setup
    device = setup_torch(config)
    tc = config.train
    init_path = config.stage_dir("init") / "model.safetensors"
    model, init_manifest = registry.load_model(init_path)
    _check_matches_config(config, init_manifest)
    model.to(device)
    optimizer = build_optimizer(model, tc)
    loss_fn = _loss_fn(config.data.task)

    # ---- data
    train_x, train_y = (torch.from_numpy(a).to(device) for a in load_split(config, "train"))
    val_x, val_y = (torch.from_numpy(a).to(device) for a in load_split(config, "val"))
    steps_per_epoch = math.ceil(len(train_x) / tc.batch_size)
    total_steps = tc.max_steps or (tc.epochs or 1) * steps_per_epoch
    eval_every = tc.eval_every or steps_per_epoch
    shuffle = torch.Generator().manual_seed(config.seed)

    out_dir = config.stage_dir("train")
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)  # a fresh run starts a fresh log
    lineage = {"init": sha256_file(init_path), "data": sha256_file(config.stage_dir("prepare") / DATA_FILE)}

    def save(name: str, step: int, metrics: dict[str, float]) -> None:
        manifest = {
            **{k: init_manifest[k] for k in ("family", "architecture", "data")},
            "config": config.model_dump(mode="json"),
            "step": step,
            "metrics": metrics,
            "lineage": lineage,
        }
        save_checkpoint(out_dir / f"{name}.safetensors", model_tensors(model), manifest)

    # ---- loop
    best_score, best_metrics, evals_since_best = math.inf, {}, 0
    step, start = 0, time.perf_counter()
    console.info(
        f"train: {registry.count_parameters(model):,} parameters, {len(train_x)} rows, "
        f"{total_steps} steps ({steps_per_epoch}/epoch), eval every {eval_every}"
    )
    with console.Progress("train", total_steps) as progress:
        while step < total_steps:
            order = torch.randperm(len(train_x), generator=shuffle).to(device)
            for batch in order.split(tc.batch_size):
                model.train()
                lr = lr_at(step, total_steps, tc)
                set_lr(optimizer, lr)
                loss = loss_fn(model(train_x[batch]), train_y[batch], model)
                if not torch.isfinite(loss):
                    raise RunFailed(
                        f"train: loss became {loss.item()} at step {step}; lower train.lr or set "
                        "train.grad_clip (the last good checkpoints were kept)"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                step += 1
                progress.update(step, loss=loss.item(), lr=lr)

                if step % eval_every == 0 or step == total_steps:
                    val = evaluate(model, val_x, val_y, loss_fn)
                    record = {"step": step, "epoch": step / steps_per_epoch, "lr": lr,
                              "train_loss": loss.item(), **{f"val_{k}": v for k, v in val.items()},
                              "elapsed_s": round(time.perf_counter() - start, 3)}
                    append_jsonl(metrics_path, record)
                    score = val["loss"] if tc.monitor == "loss" else -val["accuracy"]
                    save("last", step, val)
                    if score < best_score:
                        best_score, best_metrics, evals_since_best = score, {**val, "step": step}, 0
                        save("best", step, val)
                    else:
                        evals_since_best += 1
                    if tc.patience is not None and evals_since_best >= tc.patience:
                        console.info(f"train: early stop at step {step} (no val improvement in "
                                     f"{tc.patience} evaluations)")
                        total_steps = step
                if step >= total_steps:
                    break

    summary = ", ".join(f"{k} {v:.4g}" for k, v in best_metrics.items() if k != "step")
    console.info(f"train: best at step {best_metrics.get('step')}: {summary}")
    return {
        "best": str(out_dir / "best.safetensors"),
        "last": str(out_dir / "last.safetensors"),
        "metrics_log": str(metrics_path),
        "steps": step,
        "best_step": best_metrics.get("step"),
        "best_metrics": {k: v for k, v in best_metrics.items() if k != "step"},
    }


def _check_matches_config(config: Config, init_manifest: dict[str, Any]) -> None:
    expected = registry.architecture(config.model, data_manifest(config))
    found = init_manifest.get("architecture")
    if found != expected:
        diff = ", ".join(
            f"{k} {found.get(k)!r} vs config {expected.get(k)!r}"
            for k in expected
            if not found or found.get(k) != expected.get(k)
        )
        raise UserError(
            f"the init checkpoint does not match the config ({diff}); re-run 'bigmodel init'"
        )


def _loss_fn(task: str) -> Any:
    if task == "classification":
        return lambda out, y, model: F.cross_entropy(out, y)
    # Regression trains on the standardised target, the scale the network predicts.
    return lambda out, y, model: F.mse_loss(
        out.squeeze(-1), (y - model.target_mean) / model.target_std
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Any) -> dict[str, float]:
    model.eval()
    out = model(x)
    metrics = {"loss": loss_fn(out, y, model).item()}
    if model.task == "classification":
        metrics["accuracy"] = (out.argmax(-1) == y).float().mean().item()
    return metrics
