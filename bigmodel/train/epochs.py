"""The epoch loop shared by the supervised recipes (the tabular MLP, the encoder's classifier and masked-LM).

A recipe sets up its model, optimizer and data, and hands the loop an `EpochTask`: the batches of an epoch
(a function of seed and epoch alone, so a resumed run re-creates them), the training loss of a batch and the
validation scores. The loop does the rest the same way for every family: learning-rate schedule, gradient
clipping, evaluation every `eval_every` steps, best.safetensors on a better val score, the resumable
last.safetensors (both atomic; `--resume` continues bitwise), metrics.jsonl, early stopping after
`patience` evaluations without improvement, and stopping resumably at `until_step`. With train.privacy the
step is DP-SGD (train/privacy.py): Poisson batches of row numbers instead of the task's, the optimizer
clips and noises per example, and the epsilon spent is logged and kept in every checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigmodel import console, registry
from bigmodel.checkpoint import read_manifest
from bigmodel.config import Config
from bigmodel.errors import RunFailed
from bigmodel.manifests import AdapterRecord, CheckpointManifest
from bigmodel.train import privacy
from bigmodel.train.log import MetricsLog
from bigmodel.train.optim import lr_at, set_lr
from bigmodel.train.state import checkpoint_manifest, save_model, save_training_state, start_or_resume, stop_step
from bigmodel.train.tracking import MlflowRun


@dataclass
class EpochTask:
    examples: int  # training examples, for the log
    unit: str  # what an example is ("rows", "texts")
    steps_per_epoch: int
    # epoch -> its steps_per_epoch batches, from (seed, epoch) alone; a batch is anything `loss` takes that
    # has a len(), and must accept an array of row numbers (a private run's Poisson batches)
    batches: Callable[[int], Sequence[Any]]
    loss: Callable[[Any, int], torch.Tensor]  # (batch, step) -> the training loss
    evaluate: Callable[[], dict[str, float]]  # val scores: "loss", and "accuracy" where monitored


def run(
    config: Config,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    task: EpochTask,
    out_dir: Path,
    resume: bool,
    init_manifest: CheckpointManifest,
    lineage: dict[str, str],
    until_step: int | None = None,
    allow_changes: bool = False,
    after_step: Callable[[nn.Module], None] | None = None,
    adapter: AdapterRecord | None = None,
) -> dict[str, Any]:
    """Train to the end of the schedule (or until_step); after_step is called after each optimizer step;
    adapter: the LoRA record of an adapted model (its checkpoints hold the adapters only)."""
    tc = config.train
    steps_per_epoch = task.steps_per_epoch
    total_steps = tc.max_steps or (tc.epochs or 1) * steps_per_epoch
    eval_every = tc.eval_every or steps_per_epoch
    metrics_path, last_path = out_dir / "metrics.jsonl", out_dir / "last.safetensors"
    unused_sampler = torch.Generator()  # batches come from per-epoch orders instead
    private = privacy.start(config, model, optimizer, task.examples, total_steps, task.unit.removesuffix("s"))
    if private is not None:
        optimizer = private.optimizer  # it steps the recipe's optimizer (whose state the checkpoints hold)
    # (before the previous run's files are replaced: a tracking store that cannot be reached stops here)
    tracking = MlflowRun(config, out_dir, resuming=resume) if tc.mlflow is not False else None
    loop, stopped_early = start_or_resume(
        out_dir, resume, model, optimizer, unused_sampler, tc.patience, config=config, allow_changes=allow_changes
    )
    if private is not None and resume:
        private.resume_from(last_path)
    if stopped_early:
        total_steps = loop.step  # that run had stopped early: there is nothing left to do

    def manifest(metrics: dict[str, float]) -> CheckpointManifest:
        return checkpoint_manifest(
            init_manifest, config, loop, metrics, lineage, adapter, privacy=private.record() if private else None
        )

    def batches(epoch: int) -> Sequence[Any]:
        if private is None:
            return task.batches(epoch)
        return private.epoch_batches(config.seed, epoch, steps_per_epoch)

    best_metrics: dict[str, float] = {}
    start = time.perf_counter()
    device = next(model.parameters()).device
    console.info(
        f"train on {device}: {registry.count_parameters(model):,} parameters"
        + (
            f" ({adapter.trainable_parameters:,} trainable: LoRA rank {adapter.rank} on {', '.join(adapter.targets)})"
            if adapter
            else ""
        )
        + f", {task.examples} "
        f"{task.unit}, {total_steps} steps ({steps_per_epoch}/epoch), eval every {eval_every}"
        + (f", from step {loop.step}" if loop.step else "")
    )
    if private is not None:
        console.info(f"train: {private.describe(total_steps)}")
    last_step = stop_step(total_steps, until_step, loop.step)
    log = MetricsLog(metrics_path, tc.tensorboard, loop.step, tracking=tracking)
    spent: dict[str, float] = {}  # a private run's epsilon at the last evaluation, shown with the progress
    with console.Progress("train", last_step) as progress:
        while loop.step < last_step:
            epoch, done = divmod(loop.step, steps_per_epoch)
            for batch in batches(epoch)[done:]:
                model.train()
                lr = lr_at(loop.step, total_steps, tc)
                set_lr(optimizer, lr)
                # (an empty batch: a private run's Poisson draw can be; its step is the noise alone)
                loss = task.loss(batch, loop.step) if len(batch) else torch.tensor(0.0)
                if not torch.isfinite(loss):
                    raise RunFailed(
                        f"train: loss became {loss.item()} at step {loop.step + 1}; lower train.lr or "
                        "set train.grad_clip (the last good checkpoints were kept)"
                    )
                optimizer.zero_grad(set_to_none=True)
                if len(batch):
                    loss.backward()
                elif private is not None:
                    private.no_examples()
                if tc.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                if after_step is not None:
                    after_step(model)
                loop.step += 1
                progress.update(loop.step, loss=loss.item(), lr=lr, **spent)

                stop = False
                if loop.step % eval_every == 0 or loop.step == total_steps:
                    val = task.evaluate()
                    spent = private.log_fields() if private else {}
                    log.write(
                        {
                            "step": loop.step,
                            "epoch": loop.step / steps_per_epoch,
                            "lr": lr,
                            "train_loss": loss.item(),
                            **{f"val_{k}": v for k, v in val.items()},
                            **spent,
                            "elapsed_s": round(time.perf_counter() - start, 3),
                        }
                    )
                    if loop.scored(val["loss"] if tc.monitor == "loss" else -val["accuracy"]):
                        best_metrics = val
                        save_model(out_dir / "best.safetensors", model, manifest(val))
                    stop = loop.out_of_patience(tc.patience)
                    loop.mark(total_steps, stopped_early=stop)
                    save_training_state(last_path, model, optimizer, unused_sampler, loop, manifest(val))
                elif loop.step == last_step or (tc.save_every and loop.step % tc.save_every == 0):
                    # stopping between evaluations, or train.save_every: keep the state to resume from
                    loop.mark(total_steps)
                    save_training_state(
                        last_path, model, optimizer, unused_sampler, loop, manifest({"train_loss": loss.item()})
                    )
                if stop or loop.step >= last_step:
                    last_step = loop.step
                    break

    log.close(finished=loop.finished)
    if not best_metrics and (out_dir / "best.safetensors").is_file():  # resumed after the best was found
        best_metrics = read_manifest(out_dir / "best.safetensors").metrics
    summary = ", ".join(f"{k} {v:.4g}" for k, v in best_metrics.items())
    console.info(
        f"train: step {loop.step} of {total_steps}, "
        + (
            f"best at step {loop.best_step}{loop.best_note(eval_every)}: {summary}"
            if loop.best_step is not None
            else f"no evaluation yet (the first is at step {eval_every})"
        )
        + (private.spent_note() if private else "")
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
        "best_metrics": best_metrics,
    }
