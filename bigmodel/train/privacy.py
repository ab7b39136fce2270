"""Differentially private training (train.privacy): DP-SGD (Abadi et al. 2016, "Deep Learning with
Differential Privacy") through Opacus, for every recipe that trains on examples.

What makes a step private, and who does it:
- Poisson sampling (this module): each example joins a step's batch with probability q = batch_size /
  examples, independently, drawn from (seed, step) alone so a resumed run draws the same batches. A batch
  may be empty; the step is then noise alone (the accounting assumes exactly this sampling).
- Per-example gradients: Opacus's GradSampleModule hooks the trainable layers (nn.Linear, nn.Embedding,
  LayerNorm ...; the LoRA adapters' LoRADown / LoRAUp get grad samplers here: a frozen base needs none).
- Clipping each example's gradient to max_grad_norm, Gaussian noise of std sigma x max_grad_norm, and the
  division by the expected batch: Opacus's DPOptimizer, around the recipe's own optimizer.
- The privacy account: Opacus's RDP or PRV accountant, stepped by the optimizer; its history is kept in
  every checkpoint's manifest (PrivacyRecord) and restored on resume.

The noise comes from torch's global generator, whose state every resumable checkpoint holds: the same
config and seed give the same run, and a resumed run continues bitwise.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bigmodel.checkpoint import read_manifest
from bigmodel.config import Config, PrivacyConfig
from bigmodel.errors import UserError
from bigmodel.lora import LoRADown, LoRAUp
from bigmodel.manifests import PrivacyRecord

SAMPLING_STREAM = 0xD9  # keeps the Poisson draws apart from every other stream seeded by (seed, ...)
# RDP orders: Opacus's defaults (1.1 ... 63) and on to 256, where short or lightly sampled runs find their
# tightest bound (Opacus warns when the best order is its largest).
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 257))


def start(
    config: Config, model: nn.Module, optimizer: torch.optim.Optimizer, examples: int, total_steps: int, unit: str
) -> DPSGD | None:
    """train.privacy's DP-SGD around a recipe's model (its trainable part) and optimizer, or None."""
    if config.train.privacy is None:
        return None
    return DPSGD(model, optimizer, config.train.privacy, examples, config.train.batch_size, total_steps, unit)


def _opacus() -> Any:
    try:
        import opacus
    except ImportError:
        raise UserError("train.privacy needs Opacus: pip install opacus (or bigmodel[privacy])") from None
    return opacus


class DPSGD:
    """One private training run's parts: the DP optimizer the loop steps, its Poisson batches and the
    account of what it has spent."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        settings: PrivacyConfig,
        examples: int,
        batch_size: int,
        total_steps: int,
        unit: str,
    ) -> None:
        opacus = _opacus()
        from opacus.accountants import create_accountant

        _register_lora_grad_samplers()
        if batch_size >= examples:
            raise UserError(
                f"train.privacy: train.batch_size {batch_size} is not below the {examples} training {unit}s; "
                "privacy comes from each step seeing a sample of them: lower batch_size"
            )
        self.settings, self.examples, self.batch_size, self.unit = settings, examples, batch_size, unit
        self.sample_rate = batch_size / examples
        self.delta = settings.delta if settings.delta is not None else 1.0 / (10 * examples)
        self.noise_multiplier = self._noise(total_steps)
        # The first hooked layer's input needs no gradient (data, or a frozen layer's output): torch warns that
        # its backward hook sees only output gradients, which are all Opacus reads.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        try:
            self.hooks = opacus.GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        except NotImplementedError as error:  # a layer that mixes examples (BatchNorm ...), by name
            raise UserError(f"train.privacy: Opacus cannot train this model privately: {error}") from None
        self.optimizer = opacus.optimizers.DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            expected_batch_size=batch_size,
        )
        self.accountant = create_accountant(mechanism=settings.accountant)
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))

    def _noise(self, total_steps: int) -> float:
        """train.privacy.noise_multiplier, or the least noise that spends target_epsilon over the schedule."""
        settings = self.settings
        if settings.target_epsilon is None:
            assert settings.noise_multiplier is not None  # (the config sets exactly one of them)
            return settings.noise_multiplier
        from opacus.accountants.utils import get_noise_multiplier

        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
                return float(
                    get_noise_multiplier(
                        target_epsilon=settings.target_epsilon,
                        target_delta=self.delta,
                        sample_rate=self.sample_rate,
                        steps=total_steps,
                        accountant=settings.accountant,
                        **self._epsilon_options(),
                    )
                )
        except ValueError:  # Opacus: "The privacy budget is too low."
            raise UserError(
                f"train.privacy.target_epsilon {settings.target_epsilon} cannot be met in {total_steps} steps "
                f"at sample rate {self.sample_rate:.4g}: raise it, or train fewer steps / smaller batches"
            ) from None

    # ---- sampling
    def batch(self, seed: int, step: int) -> np.ndarray:
        """Step `step`'s examples (row numbers, ascending): each with probability sample_rate."""
        draws = np.random.default_rng([seed, SAMPLING_STREAM, step]).random(self.examples)
        return np.flatnonzero(draws < self.sample_rate)

    def epoch_batches(self, seed: int, epoch: int, steps_per_epoch: int) -> list[np.ndarray]:
        first = epoch * steps_per_epoch
        return [self.batch(seed, step) for step in range(first, first + steps_per_epoch)]

    def no_examples(self) -> None:
        """An empty Poisson draw: the step's gradient is the noise alone (no forward, no backward)."""
        for param in self.optimizer.params:
            param.grad_sample = param.new_zeros((0, *param.shape))

    # ---- the account
    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self.accountant.history)

    def epsilon(self) -> float | None:
        """The epsilon spent so far at delta; None where no noise is added (no guarantee at all)."""
        return self._spent(self.accountant.history)

    def _spent(self, history: list[tuple[float, float, int]]) -> float | None:
        if not history:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in history):
            return None
        accountant = self.accountant.__class__()
        accountant.history = list(history)
        with warnings.catch_warnings():  # (PRV's own RDP bracketing warns of its order range)
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(accountant.get_epsilon(delta=self.delta, **self._epsilon_options()))

    def _epsilon_options(self) -> dict[str, Any]:
        return {"alphas": RDP_ORDERS} if self.settings.accountant == "rdp" else {}

    def record(self) -> PrivacyRecord:
        return PrivacyRecord(
            epsilon=self.epsilon(),
            delta=self.delta,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.settings.max_grad_norm,
            sample_rate=self.sample_rate,
            steps=self.steps,
            accountant=self.settings.accountant,
            unit=self.unit,
            history=[(float(s), float(q), int(n)) for s, q, n in self.accountant.history],
        )

    def resume_from(self, path: Path) -> None:
        """Continue the account of the checkpoint a run resumes from."""
        record = read_manifest(path).privacy
        if record is None:
            raise UserError(
                f"--resume: {path} was trained without train.privacy; its steps were not private, so no "
                "(epsilon, delta) can be given for the run; start over with --restart"
            )
        self.accountant.history = [tuple(entry) for entry in record.history]

    def describe(self, total_steps: int) -> str:
        planned = self._spent([(self.noise_multiplier, self.sample_rate, total_steps)])
        at_end = f"epsilon {planned:.3g}" if planned is not None else "no guarantee (no noise)"
        return (
            f"DP-SGD (Opacus): noise multiplier {self.noise_multiplier:.4g}, clip {self.settings.max_grad_norm:g}, "
            f"Poisson sample rate {self.sample_rate:.4g}, delta {self.delta:.3g}: {at_end} after {total_steps} "
            f"steps ({self.settings.accountant}); the guarantee is per training {self.unit}"
        )

    def spent_note(self) -> str:
        """For train's last line: what the run has spent."""
        spent = self.epsilon()
        if spent is None:
            return "; no noise: no privacy guarantee"
        return f"; ({spent:.3g}, {self.delta:.2g})-differentially private per training {self.unit}"

    def log_fields(self) -> dict[str, float]:
        """metrics.jsonl's fields at an evaluation: the epsilon spent (none without noise)."""
        spent = self.epsilon()
        return {"epsilon": spent} if spent is not None else {}


# ----------------------------------------------------------------------------------- LoRA grad samplers


def _register_lora_grad_samplers() -> None:
    """Per-example gradients of the adapters, from the activations and output gradients Opacus captures
    (B = examples, `...` = positions): A's of x (..., in) -> x A^T, B's of u (..., r) -> scale u B^T."""
    from opacus.grad_sample import register_grad_sampler

    @register_grad_sampler(LoRADown)
    def down_grad_sample(
        layer: LoRADown, activations: list[torch.Tensor], backprops: torch.Tensor
    ) -> dict[nn.Parameter, torch.Tensor]:
        h = activations[0]  # (B, ..., in)
        grads = backprops.split([a.shape[0] for a in layer.values()], dim=-1)  # (B, ..., r) each
        return {
            a: torch.einsum("b...r,b...i->bri", g, h)
            for a, g in zip(layer.values(), grads, strict=True)
            if a.requires_grad
        }

    @register_grad_sampler(LoRAUp)
    def up_grad_sample(
        layer: LoRAUp, activations: list[torch.Tensor], backprops: torch.Tensor
    ) -> dict[nn.Parameter, torch.Tensor]:
        pieces = activations[0].split([b.shape[1] for b in layer.values()], dim=-1)  # (B, ..., r) each
        grads = backprops.split([b.shape[0] for b in layer.values()], dim=-1)  # (B, ..., rows) each
        return {
            b: torch.einsum("b...o,b...r->bor", g, u) * layer.scale
            for b, g, u in zip(layer.values(), grads, pieces, strict=True)
            if b.requires_grad
        }
