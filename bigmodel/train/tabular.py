"""Training recipe for the tabular MLP. Reads top to bottom: setup, data, loop, save.

Every `eval_every` steps the model is scored on the val split; the best score so far is saved as
best.safetensors, the full training state as last.safetensors (both atomically; `--resume` continues
from it bitwise), and a record is appended to metrics.jsonl. Early stopping ends the run after
`patience` evaluations without improvement.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigmodel import console, registry
from bigmodel.checkpoint import read_manifest
from bigmodel.config import Config
from bigmodel.datasets import DATA_FILE, load_split
from bigmodel.errors import RunFailed
from bigmodel.io import sha256_file
from bigmodel.runtime import setup_torch
from bigmodel.train.augment import augment_batch
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


def train(
    config: Config, resume: bool, out_dir: Path, start_from: Path | None = None,
    after_step: Callable[[torch.nn.Module], None] | None = None,
    loss_hook: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    until_step: int | None = None, allow_changes: bool = False,
) -> dict[str, Any]:
    """until_step: stop (resumably) after this step without changing the schedule (chunked jobs);
    start_from: train from this checkpoint instead of init (compress fine-tunes this way);
    after_step: called after every optimizer step (compress keeps pruned weights at zero with it);
    loss_hook(output, inputs, targets): the training loss instead of the task's own (distillation).
    Validation always scores the task's own loss."""
    # ---- setup
    device = setup_torch(config)
    tc = config.train
    init_path = start_from or config.stage_dir("init") / "model.safetensors"
    model, init_manifest = registry.load_model(init_path)
    if start_from is None:
        check_matches_config(config, init_manifest)
    model.to(device)
    optimizer = build_optimizer(model, tc)
    loss_fn = _loss_fn(config.data.task)

    # ---- data
    train_x, train_y = (torch.from_numpy(a).to(device) for a in load_split(config, "train"))
    val_x, val_y = (torch.from_numpy(a).to(device) for a in load_split(config, "val"))
    steps_per_epoch = math.ceil(len(train_x) / tc.batch_size)
    total_steps = tc.max_steps or (tc.epochs or 1) * steps_per_epoch
    eval_every = tc.eval_every or steps_per_epoch

    # ---- resume
    metrics_path = out_dir / "metrics.jsonl"
    last_path = out_dir / "last.safetensors"
    unused_sampler = torch.Generator()  # tabular batches come from per-epoch permutations instead
    loop, stopped_early = start_or_resume(out_dir, resume, model, optimizer, unused_sampler, tc.patience,
                                          config=config, allow_changes=allow_changes)
    if stopped_early:
        total_steps = loop.step  # that run had stopped early: there is nothing left to do
    lineage = {"init": sha256_file(init_path), "data": sha256_file(config.stage_dir("prepare") / DATA_FILE)}

    def manifest(metrics: dict[str, float]) -> dict[str, Any]:
        return checkpoint_manifest(init_manifest, config, loop, metrics, lineage)

    # ---- loop
    best_metrics: dict[str, float] = {}
    start = time.perf_counter()
    console.info(
        f"train on {device}: {registry.count_parameters(model):,} parameters, {len(train_x)} rows, "
        f"{total_steps} steps ({steps_per_epoch}/epoch), eval every {eval_every}"
        + (f", from step {loop.step}" if loop.step else "")
    )
    last_step = stop_step(total_steps, until_step, loop.step)
    log = MetricsLog(metrics_path, tc.tensorboard, loop.step)
    n_outputs = init_manifest["architecture"]["n_outputs"]
    augmented_rows: dict[str, int] = {}  # rows each augmentation touched in this process
    batch_rows = 0
    with console.Progress("train", last_step) as progress:
        while loop.step < last_step:
            # Each epoch's order comes from (seed, epoch) alone, so a resumed run re-creates it.
            epoch, done = divmod(loop.step, steps_per_epoch)
            shuffle = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
            order = torch.randperm(len(train_x), generator=shuffle).to(device)
            for batch in order.split(tc.batch_size)[done:]:
                model.train()
                lr = lr_at(loop.step, total_steps, tc)
                set_lr(optimizer, lr)
                if loss_hook is not None:  # compress's fine-tuning and distillation: no augmentation
                    out = model(train_x[batch])
                    loss = loss_hook(out, train_x[batch], train_y[batch])
                else:
                    x, target = train_x[batch], train_y[batch]
                    batch_rows += len(batch)
                    if tc.augment:
                        x, target = augment_batch(x, target, tc.augment, model, n_outputs, config.seed,
                                                  loop.step, augmented_rows)
                    out = model(x)
                    loss = loss_fn(out, target, model)
                if not torch.isfinite(loss):
                    raise RunFailed(
                        f"train: loss became {loss.item()} at step {loop.step + 1}; lower train.lr or set "
                        "train.grad_clip (the last good checkpoints were kept)"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                if after_step is not None:
                    after_step(model)
                loop.step += 1
                progress.update(loop.step, loss=loss.item(), lr=lr)

                stop = False
                if loop.step % eval_every == 0 or loop.step == total_steps:
                    val = evaluate(model, val_x, val_y, loss_fn)
                    log.write({
                        "step": loop.step, "epoch": loop.step / steps_per_epoch, "lr": lr,
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
                elif loop.step == last_step:  # stopping between evaluations: keep the state to resume from
                    loop.mark(total_steps)
                    save_training_state(last_path, model, optimizer, unused_sampler, loop,
                                        manifest({"train_loss": loss.item()}))
                if stop or loop.step >= last_step:
                    last_step = loop.step
                    break

    log.close()
    if not best_metrics and (out_dir / "best.safetensors").is_file():  # resumed after the best was found
        best_metrics = read_manifest(out_dir / "best.safetensors").get("metrics", {})
    summary = ", ".join(f"{k} {v:.4g}" for k, v in best_metrics.items())
    console.info(f"train: step {loop.step} of {total_steps}, " + (
        f"best at step {loop.best_step}: {summary}" if loop.best_step is not None
        else f"no evaluation yet (the first is at step {eval_every})")
        + ("" if loop.finished else "; continue with --resume"))
    if augmented_rows:
        console.info("train: augmented " + ", ".join(f"{kind} {rows:,} rows" for kind, rows in augmented_rows.items())
                     + f" of {batch_rows:,} training rows drawn")
    return {
        "best": str(out_dir / "best.safetensors"),
        "last": str(last_path),
        "metrics_log": str(metrics_path),
        "steps": loop.step,
        "total_steps": total_steps,
        "finished": loop.finished,
        "best_step": loop.best_step,
        "best_metrics": best_metrics,
        "augmented_rows": augmented_rows,
    }


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
