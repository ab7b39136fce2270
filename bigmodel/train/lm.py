"""Training recipe for the GPT. Reads top to bottom: setup, data, (resume), loop, save.

- Batches (train/batches.py) are random windows of block_size + 1 tokens from the memmapped train
  shard, drawn by a seeded generator whose state is checkpointed, or, for fine-tuning data, whole
  examples in a seeded per-epoch order with the prompt masked out of the loss; either way a resumed
  run draws exactly the batches the uninterrupted run would have.
- train.lora freezes the model and trains low-rank adapters (bigmodel/lora.py); its checkpoints hold
  the adapters and optimizer state only, and name the init checkpoint they adapt by sha256.
- AdamW (weight decay on matrices only), linear warmup + cosine decay to min_lr, gradient accumulation,
  gradient clipping, optional bf16 autocast and torch.compile.
- Every eval_every steps: loss on a fixed set of val windows (the same every time); the best is saved
  as best.safetensors. Every save_every steps: last.safetensors with the full training state.
- A NaN/Inf loss stops the run (exit 1) before the optimizer touches the weights.
- Under torchrun (see bigmodel/distributed.py) each rank trains on its own slice of the same global
  batch with DDP or FSDP2; rank 0 logs and writes the (consolidated) checkpoints.
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

from bigmodel import accounting, console, distributed, lora, memory, registry
from bigmodel.arch import DecoderArch
from bigmodel.checkpoint import read_manifest
from bigmodel.config import Config, TrainConfig
from bigmodel.datasets import data_manifest, load_examples, load_tokens, prepared_files
from bigmodel.errors import RunFailed, UserError
from bigmodel.io import sha256_file
from bigmodel.manifests import CheckpointManifest
from bigmodel.models.gpt import GPT
from bigmodel.registry import count_parameters
from bigmodel.runtime import compile_deterministic, native_bf16, peak_rss_bytes, setup_torch, training_precision
from bigmodel.scoring import IGNORE
from bigmodel.train import privacy
from bigmodel.train.batches import ExampleBatches, TokenWindows
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
from bigmodel.train.tracking import MlflowRun


def train(
    config: Config,
    resume: bool,
    out_dir: Path,
    start_from: Path | None = None,
    after_step: Callable[[torch.nn.Module], None] | None = None,
    loss_hook: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    until_step: int | None = None,
    allow_changes: bool = False,
) -> dict[str, Any]:
    """until_step: stop (resumably) after this step without changing the schedule (chunked jobs);
    allow_changes: resume even though training settings changed (recorded in the checkpoints);
    start_from: train from this checkpoint instead of init (compress fine-tunes this way);
    after_step: called after every optimizer step (compress keeps pruned weights at zero with it);
    loss_hook(output, inputs, targets): the training loss instead of the task's own (distillation).
    Validation always scores the task's own loss."""
    # ---- setup
    called = time.perf_counter()
    tc = config.train
    world, device = distributed.start(tc, setup_torch(config))
    init_path = start_from or config.stage_dir("init") / "model.safetensors"
    # (private training runs in fp32: the config refuses bf16, and auto resolves to fp32)
    precision = training_precision(tc.precision, device) if tc.privacy is None else "fp32"
    if device.type == "cpu" and world.size == 1:  # (accelerators and several processes: plan's per-device figures)
        memory.guard(training_peak(config, init_path, precision), config.memory_limit)
    model, init_manifest = load_model(init_path, world, tc, device, precision)
    assert isinstance(model, GPT)  # the decoder's recipe (families.py)
    if start_from is None:
        check_matches_config(config, init_manifest)
    adapter = None
    if tc.lora is not None:  # freeze the model; only the adapters train (and are saved)
        trainable = lora.apply(model, tc.lora, config.seed)
        adapter = lora.manifest_record(tc.lora, trainable, init_path, sha256_file(init_path), arch=model.arch)
    model.activation_checkpointing = tc.activation_checkpointing
    optimizer = build_optimizer(model, tc)
    parallel_model = distributed.wrap_ddp(model, device) if world.mode == "ddp" else model
    sampler = torch.Generator().manual_seed(config.seed)  # the same on every rank: same global batches
    batch = tc.batch_size
    my_rows, micro_batch = rank_share(batch * tc.grad_accum_steps, batch, world)

    # ---- data
    data = training_data(config, model.block_size)
    steps_per_epoch = data.steps_per_epoch
    total_steps = tc.max_steps or (tc.epochs or 1) * steps_per_epoch
    eval_every = tc.eval_every or steps_per_epoch
    # a short run's loss curve gets a point every step, a long one's about 50 points
    log_every = tc.log_every or min(50, max(1, math.ceil(total_steps / 50)))
    save_every = tc.save_every or eval_every
    # (the config refuses privacy on token windows: a private run's data are examples)
    private = privacy.start(config, model, optimizer, len(data.train), total_steps, "example")
    if private is not None:
        optimizer = private.optimizer  # it steps the recipe's optimizer (whose state the checkpoints hold)

    # ---- resume
    metrics_path = out_dir / "metrics.jsonl"
    last_path = out_dir / "last.safetensors"
    # (before the previous run's files are replaced: a tracking store that cannot be reached stops here)
    tracking = MlflowRun(config, out_dir, resuming=resume) if tc.mlflow is not False and world.is_main else None
    loop, stopped_early = start_or_resume(
        out_dir, resume, model, optimizer, sampler, tc.patience, world, config, allow_changes
    )
    if private is not None and resume:
        private.resume_from(last_path)
    if stopped_early:
        total_steps = loop.step  # that run had stopped early: there is nothing left to do
    last_step = stop_step(total_steps, until_step, loop.step)
    log = MetricsLog(metrics_path, tc.tensorboard, loop.step, writes=world.is_main, tracking=tracking)

    lineage = (
        {"init": sha256_file(init_path), "data": sha256_file(prepared_files(config)[1])} if world.is_main else {}
    )  # only rank 0 writes manifests

    if precision == "bf16" and not native_bf16(device):
        console.warn(
            f"train: this {device.type} has no native bf16 (AVX512-BF16, AMX or a bf16 GPU): bf16 "
            "autocast is emulated and several times slower than fp32; set train.precision: auto or fp32"
        )

    def manifest(metrics: dict[str, float]) -> CheckpointManifest:
        # with what train.precision resolved to on this device ('auto' records which it became)
        privacy = private.record() if private is not None else None
        return checkpoint_manifest(init_manifest, config, loop, metrics, lineage, adapter, precision, privacy)

    # The step runs through DDP (and torch.compile) when asked; checkpoints and evaluation use `model`.
    step_model = compile_deterministic(parallel_model) if tc.compile else parallel_model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    # ---- loop
    console.info(
        f"train on {device}, {precision}"
        + ((" (auto)" if precision == "bf16" else " (auto: no native bf16 here)") if tc.precision == "auto" else "")
        + f": {count_parameters(model):,} parameters"
        + (
            f" ({adapter.trainable_parameters:,} trainable: LoRA rank {tc.lora.rank} on "
            f"{', '.join(adapter.targets)}; frozen base {frozen_dtype(model)})"
            if adapter and tc.lora
            else ""
        )
        + f", {data.size}, {total_steps} steps x {data.tokens_per_step:,} tokens, eval every {eval_every}"
        + (f", from step {loop.step}" if loop.step else "")
        + (f", {world.size} processes ({world.mode}, {micro_batch} rows per micro-batch)" if world.size > 1 else "")
    )
    if private is not None:
        console.info(f"train: {private.describe(total_steps)}")
    start, last_loss, tokens_trained = time.perf_counter(), float("nan"), 0
    eval_seconds = checkpoint_seconds = 0.0  # where the loop's time goes besides the steps
    window_start, window_tokens = start, 0  # tokens/s is reported per log window
    spent: dict[str, float] = {}  # a private run's epsilon at the last evaluation, shown with the progress
    with console.Progress("train", last_step) as progress:
        while loop.step < last_step:
            model.train()
            lr = lr_at(loop.step, total_steps, tc)
            set_lr(optimizer, lr)
            if private is None:
                # Every rank draws the whole step's rows and keeps its own of them.
                x_all, y_all, step_tokens = data.step(loop.step, sampler)
                micro_batches = list(zip(x_all[my_rows].split(micro_batch), y_all[my_rows].split(micro_batch)))
            else:  # a Poisson draw, one backward (Opacus counts each as a step); empty: the noise alone
                assert isinstance(data, ExampleBatches)  # (the config refuses privacy on token windows)
                x_all, y_all, step_tokens = data.rows(private.batch(config.seed, loop.step))
                micro_batches = [(x_all, y_all)] if len(x_all) else []
                if not micro_batches:
                    private.no_examples()
            step_targets = int((y_all != IGNORE).sum())
            step_loss = 0.0
            for i, (x, y) in enumerate(micro_batches):
                x, y = x.to(device), y.to(device)
                with distributed.gradient_sync(parallel_model, world, sync=i == len(micro_batches) - 1):
                    with autocast:
                        logits, _ = step_model(x)
                        if loss_hook is not None:
                            loss = loss_hook(logits, x, y) / len(micro_batches)
                        elif private is not None:
                            loss = ExampleBatches.per_example_objective(logits, y)
                        else:
                            loss = data.objective(logits, y, len(micro_batches), step_targets, world)
                    loss.backward()
                step_loss += loss.item()
            step_loss = world.mean(step_loss)  # every rank sees the global loss (and stops together on NaN)
            if not math.isfinite(step_loss):
                raise RunFailed(
                    f"train: loss became {step_loss} at step {loop.step + 1}; lower train.lr or set "
                    f"train.grad_clip (the last good checkpoint, step {_saved_step(last_path)}, is intact)"
                )
            if tc.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tc.grad_clip)
            optimizer.step()
            if after_step is not None:
                after_step(model)
            optimizer.zero_grad(set_to_none=True)
            loop.step += 1
            loop.tokens_seen += step_tokens
            tokens_trained += step_tokens
            window_tokens += step_tokens
            last_loss = step_loss

            now = time.perf_counter()
            tokens_per_s = window_tokens / max(now - window_start, 1e-9)
            progress.update(loop.step, loss=step_loss, lr=lr, tok_s=round(tokens_per_s), **spent)
            if loop.step % log_every == 0:
                log.write(
                    {
                        "step": loop.step,
                        "train_loss": step_loss,
                        "lr": lr,
                        "tokens": loop.tokens_seen,
                        "tokens_per_s": round(tokens_per_s, 1),
                    }
                )
                window_start, window_tokens = now, 0
            stop = False
            if loop.step % eval_every == 0 or loop.step == total_steps:
                val_loss = data.val_loss(model, autocast, device, world)
                spent = private.log_fields() if private is not None else {}
                eval_seconds += time.perf_counter() - now
                log.write(
                    {
                        "step": loop.step,
                        "val_loss": val_loss,
                        "train_loss": step_loss,
                        "lr": lr,
                        "tokens": loop.tokens_seen,
                        **spent,
                    }
                )
                if loop.scored(val_loss):
                    saving = time.perf_counter()
                    save_model(out_dir / "best.safetensors", model, manifest({"val_loss": val_loss}), world)
                    checkpoint_seconds += time.perf_counter() - saving
                stop = loop.out_of_patience(tc.patience)
            if loop.step % save_every == 0 or loop.step in (total_steps, last_step) or stop:
                saving = time.perf_counter()
                loop.mark(total_steps, stopped_early=stop)
                save_training_state(
                    last_path, model, optimizer, sampler, loop, manifest({"train_loss": step_loss}), world
                )
                checkpoint_seconds += time.perf_counter() - saving
            if stop:
                break

    log.close(finished=loop.finished)
    elapsed = time.perf_counter() - start
    tokens_per_s = tokens_trained / max(elapsed, 1e-9)
    best = (
        f"best val loss {loop.best_score:.4f} at step {loop.best_step}{loop.best_note(eval_every)}"
        if loop.best_step is not None
        else f"no evaluation yet (the first is at step {eval_every})"
    )
    seconds = {
        "setup": round(start - called, 4),
        "loop": round(elapsed, 4),
        "evaluation": round(eval_seconds, 4),
        "checkpoints": round(checkpoint_seconds, 4),
    }
    console.info(
        f"train: step {loop.step} of {total_steps}, {best}, {tokens_per_s:,.0f} tokens/s, "
        f"peak RSS {(peak_rss_bytes() or 0) / 2**20:,.0f} MiB; {seconds['setup']:.1f} s setup, "
        f"{elapsed:.1f} s loop of which {eval_seconds:.1f} s evaluation and {checkpoint_seconds:.1f} s "
        "checkpoints"
        + (private.spent_note() if private is not None else "")
        + ("" if loop.finished else "; continue with --resume")
    )
    return {
        "best": str(out_dir / "best.safetensors"),
        "last": str(last_path),
        "metrics_log": str(metrics_path),
        "steps": loop.step,
        "total_steps": total_steps,
        "finished": loop.finished,
        "best_step": loop.best_step,
        "best_val_loss": loop.best_score,
        "train_loss": last_loss,
        "tokens_per_s": tokens_per_s,
        "precision": precision,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_rss_bytes": peak_rss_bytes(),
        "seconds": seconds,  # setup (model, data, resume) before the loop; the loop, and its evals and saves
    }


def load_model(
    path: Path,
    world: distributed.World,
    tc: TrainConfig,
    device: torch.device,
    precision: str,
) -> tuple[torch.nn.Module, CheckpointManifest]:
    """The model to train, on `device`: FSDP builds it sharded from the meta device and streams the
    weights into the shards; LoRA under bf16 autocast keeps the frozen matrices in the checkpoint's dtype
    (registry.load_frozen_base); otherwise the whole model is loaded in fp32."""
    if world.mode == "fsdp":
        manifest = read_manifest(path)
        assert isinstance(manifest.architecture, DecoderArch)  # (FSDP trains decoders only)
        model = distributed.build_sharded(manifest.architecture, tc, device)
        distributed.load_weights(model, path)
        return model, manifest
    if tc.lora is not None and precision == "bf16":
        model, manifest = registry.load_frozen_base(path)
    else:
        model, manifest = registry.load_model(path)
    return model.to(device), manifest


def training_peak(config: Config, path: Path, precision: str) -> memory.Estimate:
    """What training the checkpoint at `path` will hold at its peak in this one process (before loading
    it): accounting.training_memory's step, or loading the model when that is larger."""
    tc = config.train
    arch, n_params, stored = registry.checkpoint_size(path)
    assert isinstance(arch, DecoderArch)  # (stage_checkpoint and check_matches_config checked it)
    streamed = tc.lora is not None and precision == "bf16"  # registry.load_frozen_base: matrices as stored
    frozen = stored if streamed else 4
    adapter = None if tc.lora is None else accounting.lora_parameters(arch, tc.lora.projections(), tc.lora.rank)
    step = accounting.training_memory(
        arch,
        n_params,
        batch=tc.batch_size,
        precision=precision,
        optimizer=tc.optimizer,
        momentum=tc.momentum,
        activation_checkpointing=tc.activation_checkpointing,
        adapter=adapter,
        fused_dropout=False,
        frozen_bytes=frozen,
        per_example=accounting.poisson_ceiling(tc.batch_size) if tc.privacy is not None else 0,
    )
    loading = n_params * (stored if streamed else 4 + stored)  # a full load: the fp32 model + the file's tensors
    return memory.train_peak(step, loading, tc.lora is not None)


def frozen_dtype(model: torch.nn.Module) -> str:
    """The dtype of the frozen matrices (what a LoRA run keeps of the base)."""
    found = {p.dtype for p in model.parameters() if not p.requires_grad and p.dim() >= 2}
    return ", ".join(sorted(str(dtype).removeprefix("torch.") for dtype in found)) or "none"


def rank_share(global_rows: int, batch: int, world: distributed.World) -> tuple[slice, int]:
    """This rank's contiguous rows of a step's global batch, and the micro-batch size that splits them
    evenly without exceeding train.batch_size (one process: all rows, in batch_size micro-batches)."""
    if global_rows % world.size:
        raise UserError(
            f"the global batch (train.batch_size x train.grad_accum_steps = {global_rows}) must split evenly "
            f"over {world.size} processes; change batch_size or grad_accum_steps, or the process count"
        )
    mine = global_rows // world.size
    micro = max(d for d in range(1, min(batch, mine) + 1) if mine % d == 0)
    return slice(world.rank * mine, (world.rank + 1) * mine), micro


def training_data(config: Config, block: int) -> TokenWindows | ExampleBatches:
    """What the steps read: windows of the token shards, or whole fine-tuning examples."""
    tc = config.train
    if config.data.format == "sft":
        manifest = data_manifest(config)
        special = manifest.get("special_tokens") or {}
        pad = special.get("pad")
        pad_id = int(pad) if pad is not None else int((special.get("eos") or [0])[0])
        train, val = load_examples(config, "train"), load_examples(config, "val")
        longest = int(np.diff(train.starts).max())
        if longest > block:
            raise UserError(
                f"a training example has {longest} tokens, more than model.block_size {block}; "
                "re-run 'bigmodel prepare' (it truncates to the context)"
            )
        return ExampleBatches(train, val, tc.batch_size, tc.grad_accum_steps, tc.eval_batches, pad_id, config.seed)
    return TokenWindows(
        load_tokens(config, "train"),
        load_tokens(config, "val"),
        block,
        tc.batch_size,
        tc.grad_accum_steps,
        tc.eval_batches,
    )


def _saved_step(path: Path) -> str:
    return str(read_manifest(path).step) if path.is_file() else "none yet"
