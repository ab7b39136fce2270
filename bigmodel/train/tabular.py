"""Training recipe for the tabular MLP. Reads top to bottom: setup, data, loop, save.

Every `eval_every` steps the model is scored on the val split; the best score so far is saved as
best.safetensors, the full training state as last.safetensors (both atomically; `--resume` continues
from it bitwise), and a record is appended to metrics.jsonl. Early stopping ends the run after
`patience` evaluations without improvement.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigmodel import console, registry
from bigmodel.arch import TabularArch
from bigmodel.config import Config, TabularDataConfig
from bigmodel.datasets import DATA_FILE, load_split
from bigmodel.io import sha256_file
from bigmodel.models.mlp import MLP
from bigmodel.runtime import setup_torch
from bigmodel.train import epochs
from bigmodel.train.augment import augment_batch
from bigmodel.train.epochs import EpochTask
from bigmodel.train.optim import build_optimizer
from bigmodel.train.state import check_matches_config


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
    start_from: train from this checkpoint instead of init (compress fine-tunes this way);
    after_step: called after every optimizer step (compress keeps pruned weights at zero with it);
    loss_hook(output, inputs, targets): the training loss instead of the task's own (distillation).
    Validation always scores the task's own loss."""
    # ---- setup
    device = setup_torch(config)
    tc = config.train
    init_path = start_from or config.stage_dir("init") / "model.safetensors"
    model, init_manifest = registry.load_model(init_path)
    assert isinstance(model, MLP)  # the family table sends only tabular models here
    if start_from is None:
        check_matches_config(config, init_manifest)
    model.to(device)
    optimizer = build_optimizer(model, tc)
    assert isinstance(config.data, TabularDataConfig)  # the family table sends only tabular data here
    loss_fn = _loss_fn(config.data.task)

    # ---- data
    train_x, train_y = (torch.from_numpy(a).to(device) for a in load_split(config, "train"))
    val_x, val_y = (torch.from_numpy(a).to(device) for a in load_split(config, "val"))
    arch = init_manifest.architecture
    assert isinstance(arch, TabularArch)  # the family table sends only tabular models here
    n_outputs = arch.n_outputs
    augmented_rows: dict[str, int] = {}  # rows each augmentation touched in this process
    drawn = [0]  # training rows drawn in this process

    def batches(epoch: int) -> list[torch.Tensor]:
        shuffle = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        return list(torch.randperm(len(train_x), generator=shuffle).to(device).split(tc.batch_size))

    def loss(batch: torch.Tensor, step: int) -> torch.Tensor:
        if loss_hook is not None:  # compress's fine-tuning and distillation: no augmentation
            return loss_hook(model(train_x[batch]), train_x[batch], train_y[batch])
        x, target = train_x[batch], train_y[batch]
        drawn[0] += len(batch)
        if tc.augment:
            x, target = augment_batch(x, target, tc.augment, model, n_outputs, config.seed, step, augmented_rows)
        return loss_fn(model(x), target, model)

    task = EpochTask(
        examples=len(train_x),
        unit="rows",
        steps_per_epoch=math.ceil(len(train_x) / tc.batch_size),
        batches=batches,
        loss=loss,
        evaluate=lambda: evaluate(model, val_x, val_y, loss_fn),
    )
    lineage = {"init": sha256_file(init_path), "data": sha256_file(config.stage_dir("prepare") / DATA_FILE)}

    # ---- loop
    outputs = epochs.run(
        config,
        model,
        optimizer,
        task,
        out_dir,
        resume,
        init_manifest,
        lineage,
        until_step=until_step,
        allow_changes=allow_changes,
        after_step=after_step,
    )
    if augmented_rows:
        console.info(
            "train: augmented "
            + ", ".join(f"{kind} {rows:,} rows" for kind, rows in augmented_rows.items())
            + f" of {drawn[0]:,} training rows drawn"
        )
    return {**outputs, "augmented_rows": augmented_rows}


def _loss_fn(task: str) -> Any:
    if task == "classification":
        return lambda out, y, model: F.cross_entropy(out, y)
    # Regression trains on the standardised target, the scale the network predicts.
    return lambda out, y, model: F.mse_loss(out.squeeze(-1), (y - model.target_mean) / model.target_std)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Any) -> dict[str, float]:
    model.eval()
    out = model(x)
    metrics = {"loss": loss_fn(out, y, model).item()}
    if model.task == "classification":
        metrics["accuracy"] = (out.argmax(-1) == y).float().mean().item()
    return metrics
