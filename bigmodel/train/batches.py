"""What a language-model training step reads: random windows of a token stream (pre-training), or whole
fine-tuning examples with a loss mask (data.format sft). Both give each step's global batch as inputs x
and targets y (B, T); a target of IGNORE is not scored (the prompt, padding).

Windows: the loss is the mean over the micro-batch (every target counts). Examples: the loss is the sum
over the step's trained targets divided by their number in the whole step, so every trained token
weighs the same however the step is split into micro-batches and processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bigmodel import distributed
from bigmodel.datasets import Examples
from bigmodel.errors import UserError
from bigmodel.scoring import IGNORE, pad


def sample_windows(tokens: np.ndarray, generator: torch.Generator, batch: int, block: int) -> torch.Tensor:
    """batch random windows of block + 1 tokens (B, T+1): inputs are [:, :-1], targets [:, 1:]."""
    starts = torch.randint(len(tokens) - block - 1, (batch,), generator=generator).numpy()
    return torch.from_numpy(np.stack([tokens[s : s + block + 1] for s in starts]).astype(np.int64))


def fixed_windows(
    tokens: np.ndarray, n_batches: int, batch: int, block: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to n_batches of evenly spaced windows: the same val batches at every evaluation. When that many
    windows would overlap, the split is tiled instead: every token is scored once, which is the whole
    split's loss (an estimate no more windows could improve) at less cost than overlapping windows."""
    tiles = (len(tokens) - 1) // block
    if n_batches * batch >= tiles:
        starts = np.arange(tiles, dtype=np.int64) * block
    else:
        starts = np.linspace(0, len(tokens) - block - 1, n_batches * batch).astype(np.int64)
    windows = torch.from_numpy(np.stack([tokens[s : s + block + 1] for s in starts]).astype(np.int64))
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch)]


def masked_loss_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


class TokenWindows:
    """Pre-training: batch_size x grad_accum_steps random windows per step, from the sampler generator."""

    def __init__(
        self, train: np.ndarray, val: np.ndarray, block: int, batch: int, accum: int, eval_batches: int
    ) -> None:
        for split, tokens in (("train", train), ("val", val)):
            if len(tokens) <= block + 1:
                raise UserError(
                    f"the {split} split has {len(tokens)} tokens, fewer than model.block_size + 2 "
                    f"({block + 2}); use more text or a smaller block_size"
                )
        self.train, self.block, self.batch, self.accum = train, block, batch, accum
        self.tokens_per_step = batch * block * accum
        self.steps_per_epoch = max(1, len(train) // self.tokens_per_step)
        self.val_batches = fixed_windows(val, eval_batches, batch, block)
        self.size = f"{len(train):,} train tokens"

    def step(self, step: int, sampler: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The step's global batch: x, y (B, T) and the number of tokens it trains on."""
        windows = torch.cat([sample_windows(self.train, sampler, self.batch, self.block) for _ in range(self.accum)])
        return windows[:, :-1], windows[:, 1:], self.tokens_per_step

    def objective(
        self, logits: torch.Tensor, y: torch.Tensor, n_micro: int, step_targets: int, world: distributed.World
    ) -> torch.Tensor:
        """This micro-batch's share of the step loss (summed over micro-batches, averaged over ranks)."""
        del step_targets, world
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1)) / n_micro

    def val_loss(
        self, model: torch.nn.Module, autocast: object, device: torch.device, world: distributed.World
    ) -> float:
        """Mean loss per token over the fixed val batches (the last may be smaller); ranks score every
        world.size-th batch. Every rank runs the same number of forwards (FSDP gathers parameters in each
        one), re-scoring batch 0 uncounted if short."""
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for first in range(0, len(self.val_batches), world.size):
                index = first + world.rank
                x, y = self.val_batches[index if index < len(self.val_batches) else 0]
                with autocast:  # type: ignore[attr-defined]
                    logits, _ = model(x.to(device))
                if index < len(self.val_batches):
                    total += masked_loss_sum(logits, y.to(device)).item()
                    count += y.numel()
        return world.sum(total) / world.sum(float(count))


@dataclass
class ExampleBatches:
    """Fine-tuning: whole examples, batch_size x grad_accum_steps per step, padded to the step's longest.
    Example order is a seeded permutation per epoch, a function of the step alone (so resume is exact)."""

    train: Examples
    val: Examples
    batch: int
    accum: int
    eval_batches: int
    pad_id: int
    seed: int

    def __post_init__(self) -> None:
        self.rows_per_step = self.batch * self.accum
        self.steps_per_epoch = max(1, len(self.train) // self.rows_per_step)
        lengths = np.diff(self.train.starts)
        self.tokens_per_step = int(lengths.mean() * self.rows_per_step)  # on average, for the log
        self.size = f"{len(self.train):,} train examples ({int(lengths.sum()):,} tokens)"
        self._epoch, self._order = -1, np.arange(0)
        n_val = min(len(self.val), self.eval_batches * self.batch)
        rows = [self.val.example(i) for i in range(n_val)]
        self.val_batches = [pad(rows[i : i + self.batch], self.pad_id) for i in range(0, n_val, self.batch)]

    def step(self, step: int, sampler: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        del sampler
        first = step * self.rows_per_step
        return self.rows([self._index(r) for r in range(first, first + self.rows_per_step)])

    def rows(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
        """These training examples padded to the longest: x, y (B, T) and their tokens (B may be 0)."""
        examples = [self.train.example(int(i)) for i in indices]
        if not examples:
            empty = torch.zeros((0, 1), dtype=torch.long)
            return empty, empty, 0
        x, y = pad(examples, self.pad_id)
        return x, y, sum(len(ids) for ids, _ in examples)

    def _index(self, row: int) -> int:
        epoch, position = divmod(row, len(self.train))
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.train))
        return int(self._order[position])

    def objective(
        self, logits: torch.Tensor, y: torch.Tensor, n_micro: int, step_targets: int, world: distributed.World
    ) -> torch.Tensor:
        del n_micro
        # Ranks' gradients are averaged (DDP), so each rank's share is scaled up by the world size.
        return masked_loss_sum(logits, y) * (world.size / max(step_targets, 1))

    @staticmethod
    def per_example_objective(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch's mean of each example's mean loss per trained token: what DP-SGD trains on, so each
        example's gradient (Opacus's per-example gradients of a mean) is that of its own loss."""
        losses = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=IGNORE, reduction="none")  # (B, T)
        return (losses.sum(1) / (y != IGNORE).sum(1).clamp(min=1)).mean()

    def val_loss(
        self, model: torch.nn.Module, autocast: object, device: torch.device, world: distributed.World
    ) -> float:
        """Mean loss per trained token over the fixed val examples (the first eval_batches x batch_size)."""
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for index in range(world.rank, len(self.val_batches), world.size):
                x, y = self.val_batches[index]
                with autocast:  # type: ignore[attr-defined]
                    logits, _ = model(x.to(device))
                total += masked_loss_sum(logits, y.to(device)).item()
                count += int((y != IGNORE).sum())
        return world.sum(total) / max(world.sum(float(count)), 1.0)
