"""Tabular augmentation of training batches: feature noise, feature dropout and mixup.

Applied by the tabular recipe to training batches only (evaluation never sees it), in the order the
config lists them, each to a random subset of rows (probability p per row). Every draw comes from a
generator seeded by (run seed, step): a run is bitwise reproducible, and a resumed run augments
exactly as the uninterrupted one would, with no RNG state to save.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bigmodel.models.mlp import MLP


def augment_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    transforms: list[Any],
    model: MLP,
    n_classes: int,
    seed: int,
    step: int,
    touched: dict[str, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, F) raw features, y (B,) labels or targets -> augmented x and the training target: y itself,
    or (B, C) soft labels once mixup has mixed (rows sum to 1). `touched` counts rows per transform."""
    rng = np.random.default_rng([seed, step])
    target = y
    for transform in transforms:
        rows = torch.from_numpy(rng.random(len(x)) < transform.p).to(x.device)  # (B,) which rows
        touched[transform.kind] = touched.get(transform.kind, 0) + int(rows.sum())
        if transform.kind == "noise":
            noise = torch.from_numpy(rng.standard_normal(tuple(x.shape), dtype=np.float32)).to(x.device)
            x = x + rows[:, None] * noise * transform.std * model.feature_std
        elif transform.kind == "feature_dropout":
            dropped = torch.from_numpy(rng.random(tuple(x.shape)) < transform.rate).to(x.device) & rows[:, None]
            x = torch.where(dropped, model.feature_mean.expand_as(x), x)
        else:  # mixup
            weight = torch.from_numpy(rng.beta(transform.alpha, transform.alpha, len(x)).astype(np.float32))
            weight = torch.where(rows, weight.to(x.device), torch.ones_like(weight, device=x.device))  # (B,)
            partner = torch.from_numpy(rng.permutation(len(x))).to(x.device)
            if target.dim() == 1:
                target = F.one_hot(target, n_classes).float()
            x = weight[:, None] * x + (1 - weight[:, None]) * x[partner]
            target = weight[:, None] * target + (1 - weight[:, None]) * target[partner]
    return x, target
