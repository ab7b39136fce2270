"""Optimizer and learning-rate schedule, shared by every family's training recipe."""

from __future__ import annotations

import math

import torch
from torch import nn

from bigmodel.config import TrainConfig


def build_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay only on matrices (>= 2-D): decaying biases, norms and buffers-like vectors hurts
    (as in GPT-2/nanoGPT and most modern recipes)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": tc.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if tc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, nesterov=tc.nesterov)
    if tc.optimizer == "adam":
        # Adam's weight_decay is L2 added to the gradient (the coupled form), unlike AdamW.
        return torch.optim.Adam(groups, lr=tc.lr, betas=tc.betas)
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas)


def lr_at(step: int, total_steps: int, tc: TrainConfig) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then constant, cosine or linear decay."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.schedule == "constant":
        return tc.lr
    span = max(1, total_steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    if tc.schedule == "cosine":
        return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)
    return tc.lr - progress * (tc.lr - tc.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
