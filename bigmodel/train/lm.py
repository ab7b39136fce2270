"""Training recipe for the GPT. Reads top to bottom: setup, data, (resume), loop, save.

- Batches are random windows of block_size + 1 tokens from the memmapped train shard, drawn by a
  seeded generator whose state is checkpointed, so a resumed run draws exactly the batches the
  uninterrupted run would have.
- AdamW (weight decay on matrices only), linear warmup + cosine decay to min_lr, gradient accumulation,
  gradient clipping, optional bf16 autocast and torch.compile.
- Every eval_every steps: loss on a fixed set of val windows (the same every time); the best is saved
  as best.safetensors. Every save_every steps: last.safetensors with the full training state.
- A NaN/Inf loss stops the run (exit 1) before the optimizer touches the weights.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bigmodel import console, registry
from bigmodel.checkpoint import model_tensors, save_checkpoint
from bigmodel.config import Config
from bigmodel.datasets import load_tokens, prepared_files
from bigmodel.errors import RunFailed, UserError
from bigmodel.io import append_jsonl, sha256_file
from bigmodel.runtime import setup_torch
from bigmodel.train.optim import build_optimizer, lr_at, set_lr
from bigmodel.train.state import (
    check_matches_config,
    checkpoint_manifest,
    save_training_state,
    start_or_resume,
)


def train(
    config: Config, resume: bool, out_dir: Path, start_from: Path | None = None,
    after_step: Callable[[torch.nn.Module], None] | None = None,
    loss_hook: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """start_from: train from this checkpoint instead of init (compress fine-tunes this way);
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
    sampler = torch.Generator().manual_seed(config.seed)
    block, batch = model.block_size, tc.batch_size

    # ---- data
    train_tokens = load_tokens(config, "train")
    val_tokens = load_tokens(config, "val")
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) <= block + 1:
            raise UserError(f"the {split} split has {len(tokens)} tokens, fewer than model.block_size + 2 "
                            f"({block + 2}); use more text or a smaller block_size")
    tokens_per_step = batch * block * tc.grad_accum_steps
    steps_per_epoch = max(1, len(train_tokens) // tokens_per_step)
    total_steps = tc.max_steps or (tc.epochs or 1) * steps_per_epoch
    eval_every = tc.eval_every or steps_per_epoch
    save_every = tc.save_every or eval_every
    val_batches = fixed_batches(val_tokens, tc.eval_batches, batch, block, device)

    # ---- resume
    metrics_path = out_dir / "metrics.jsonl"
    last_path = out_dir / "last.safetensors"
    loop, stopped_early = start_or_resume(out_dir, resume, model, optimizer, sampler, tc.patience)
    if stopped_early:
        total_steps = loop.step  # that run had stopped early: there is nothing left to do

    lineage = {"init": sha256_file(init_path), "data": sha256_file(prepared_files(config)[1])}

    def manifest(metrics: dict[str, float]) -> dict[str, Any]:
        return checkpoint_manifest(init_manifest, config, loop, metrics, lineage)

    step_model = torch.compile(model) if tc.compile else model  # checkpoints always use `model`
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if tc.precision == "bf16"
                else contextlib.nullcontext())

    # ---- loop
    console.info(
        f"train: {registry.count_parameters(model):,} parameters, {len(train_tokens):,} train tokens, "
        f"{total_steps} steps x {tokens_per_step:,} tokens, eval every {eval_every}"
        + (f", from step {loop.step}" if loop.step else "")
    )
    start, start_step, last_loss = time.perf_counter(), loop.step, float("nan")
    window_start, window_step = start, loop.step  # tokens/s is reported per log window
    with console.Progress("train", total_steps) as progress:
        while loop.step < total_steps:
            model.train()
            lr = lr_at(loop.step, total_steps, tc)
            set_lr(optimizer, lr)
            step_loss = 0.0
            for _ in range(tc.grad_accum_steps):
                x, y = sample_batch(train_tokens, sampler, batch, block, device)
                with autocast:
                    logits, _ = step_model(x)
                    if loss_hook is not None:
                        loss = loss_hook(logits, x, y)
                    else:
                        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
                (loss / tc.grad_accum_steps).backward()
                step_loss += loss.item() / tc.grad_accum_steps
            if not math.isfinite(step_loss):
                raise RunFailed(
                    f"train: loss became {step_loss} at step {loop.step + 1}; lower train.lr or set "
                    f"train.grad_clip (the last good checkpoint, step {_saved_step(last_path)}, is intact)"
                )
            if tc.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            if after_step is not None:
                after_step(model)
            optimizer.zero_grad(set_to_none=True)
            loop.step += 1
            loop.tokens_seen += tokens_per_step
            last_loss = step_loss

            now = time.perf_counter()
            tokens_per_s = (loop.step - window_step) * tokens_per_step / max(now - window_start, 1e-9)
            progress.update(loop.step, loss=step_loss, lr=lr, tok_s=round(tokens_per_s))
            if loop.step % tc.log_every == 0:
                append_jsonl(metrics_path, {"step": loop.step, "train_loss": step_loss, "lr": lr,
                                            "tokens": loop.tokens_seen, "tokens_per_s": round(tokens_per_s, 1)})
                window_start, window_step = now, loop.step
            stop = False
            if loop.step % eval_every == 0 or loop.step == total_steps:
                val_loss = evaluate(model, val_batches, autocast)
                append_jsonl(metrics_path, {"step": loop.step, "val_loss": val_loss, "train_loss": step_loss,
                                            "lr": lr, "tokens": loop.tokens_seen})
                if val_loss < loop.best_score:
                    loop.best_score, loop.best_step, loop.evals_since_best = val_loss, loop.step, 0
                    save_checkpoint(out_dir / "best.safetensors", model_tensors(model),
                                    manifest({"val_loss": val_loss}))
                else:
                    loop.evals_since_best += 1
                if tc.patience is not None and loop.evals_since_best >= tc.patience:
                    console.info(f"train: early stop at step {loop.step} (no val improvement in "
                                 f"{tc.patience} evaluations)")
                    stop = True
            if loop.step % save_every == 0 or loop.step == total_steps or stop:
                save_training_state(last_path, model, optimizer, sampler, loop,
                                    manifest({"train_loss": step_loss}))
            if stop:
                break

    elapsed = time.perf_counter() - start
    tokens_per_s = (loop.step - start_step) * tokens_per_step / max(elapsed, 1e-9)
    console.info(f"train: step {loop.step}, best val loss {loop.best_score:.4f} at step {loop.best_step}, "
                 f"{tokens_per_s:,.0f} tokens/s")
    return {
        "best": str(out_dir / "best.safetensors"),
        "last": str(last_path),
        "metrics_log": str(metrics_path),
        "steps": loop.step,
        "best_step": loop.best_step,
        "best_val_loss": loop.best_score,
        "train_loss": last_loss,
        "tokens_per_s": tokens_per_s,
    }


def sample_batch(
    tokens: np.ndarray, generator: torch.Generator, batch: int, block: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """batch random windows: inputs (B, T) and the same windows shifted by one as targets (B, T)."""
    starts = torch.randint(len(tokens) - block - 1, (batch,), generator=generator).numpy()
    windows = torch.from_numpy(np.stack([tokens[s : s + block + 1] for s in starts]).astype(np.int64))
    return windows[:, :-1].to(device), windows[:, 1:].to(device)


def fixed_batches(
    tokens: np.ndarray, n_batches: int, batch: int, block: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n_batches of evenly spaced windows: the same val batches at every evaluation."""
    starts = np.linspace(0, len(tokens) - block - 1, n_batches * batch).astype(np.int64)
    windows = torch.from_numpy(np.stack([tokens[s : s + block + 1] for s in starts]).astype(np.int64))
    return [(w[:, :-1].to(device), w[:, 1:].to(device)) for w in windows.split(batch)]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], autocast: Any) -> float:
    model.eval()
    losses = []
    for x, y in batches:
        with autocast:
            logits, _ = model(x)
        losses.append(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1)).item())
    return float(np.mean(losses))


def _saved_step(path: Path) -> str:
    from bigmodel.checkpoint import read_manifest

    return str(read_manifest(path).get("step")) if path.is_file() else "none yet"
