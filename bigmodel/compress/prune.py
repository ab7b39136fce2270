"""Magnitude pruning of a checkpoint (Han et al. 2015), optionally fine-tuned by the training loop.

- unstructured: zero the smallest-magnitude entries of every weight matrix (Linear layers; embeddings
  and norms are left alone), with one threshold over all matrices (`global`) or one per matrix
  (`layer`). During fine-tuning a mask re-zeroes them after every optimizer step.
- structured: remove whole MLP neurons (gpt: rows of c_fc and columns of c_proj in each block), attention
  heads (gpt: the same number in every layer) or hidden units (mlp: rows of one Linear and columns of
  the next), ranked by the product of their
  incoming and outgoing weight norms. The rebuilt model is genuinely smaller, so its ONNX file is too.
  Weights an earlier unstructured step set to zero stay zero through this step's fine-tuning.
- gradual: `rounds` prune-then-fine-tune rounds whose sparsity follows the cubic schedule of Zhu &
  Gupta 2017, s_r = s * (1 - (1 - r / rounds)^3).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigmodel import console, registry, roles
from bigmodel.arch import DecoderArch
from bigmodel.checkpoint import model_tensors, save_checkpoint
from bigmodel.compress import Artifact
from bigmodel.config import Config, PruneStep
from bigmodel.errors import UserError
from bigmodel.families import family
from bigmodel.io import sha256_file
from bigmodel.manifests import CheckpointManifest, PruningRecord
from bigmodel.models.gpt import GPT

Masks = dict[str, torch.Tensor]  # parameter name -> bool tensor, True where the weight is kept


def label(step: PruneStep, number: int) -> str:
    return f"{number}: prune {step.kind} {step.sparsity:g}"


def apply(step: PruneStep, config: Config, current: Artifact, folder: Path, number: int) -> Artifact:
    """The compress step: prune (and fine-tune) the current checkpoint, export it through the gate."""
    from bigmodel.export import export_checkpoint

    work_dir = folder / f"step{number}"
    checkpoint, report = run(step, config, current.checkpoint, work_dir)
    return Artifact(checkpoint, Path(export_checkpoint(config, checkpoint, work_dir, ["onnx"])["model"]), report)


def run(step: PruneStep, config: Config, checkpoint: Path, work_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Prune (and fine-tune) `checkpoint`; returns the new checkpoint and a per-layer sparsity report."""
    model, manifest = registry.load_model(checkpoint)
    if step.kind == "structured" and isinstance(manifest.architecture, DecoderArch) and manifest.architecture.n_experts:
        raise UserError(
            "compress prune structured: a mixture of experts has no one MLP per layer to narrow (nor are its "
            "heads pruned); use kind: unstructured, or quantize"
        )
    rounds = step.rounds if step.schedule == "gradual" else 1
    masks: Masks = {}
    for r in range(1, rounds + 1):
        target = step.sparsity * (1 - (1 - r / rounds) ** 3)
        if step.kind == "structured" and step.structure == "heads":
            model, manifest = prune_heads(model, manifest, target)
            masks = {name: w != 0 for name, w in prunable(model).items()}
        elif step.kind == "structured":
            model, manifest = prune_structured(model, manifest, target)
            masks = {name: w != 0 for name, w in prunable(model).items()}  # earlier steps' zeros stay zero
        else:
            masks = magnitude_masks(model, target, step.scope)
            apply_masks(model, masks)
        console.info(f"compress: prune round {r}/{rounds}: {step.kind} to sparsity {target:.3f}")
        if step.finetune_steps:
            steps = max(1, step.finetune_steps // rounds)
            model = finetune(config, step, model, manifest, masks, steps, work_dir / f"round{r}")
    report = sparsity_report(model)
    manifest = manifest.renewed(
        lineage={**manifest.lineage, "pruned_from": sha256_file(checkpoint)},
        resume=None,
        pruning=PruningRecord(kind=step.kind, sparsity=step.sparsity, per_layer=report),
    )
    out = work_dir / "model.safetensors"
    save_checkpoint(out, model_tensors(model), manifest)
    return out, report


# ---------------------------------------------------------------------------------- unstructured


def prunable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weight matrices pruning may touch: every Linear weight except the tied output head."""
    tied = getattr(model, "tied_weights", {})
    return {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and f"{name}.weight" not in tied
    }


def magnitude_masks(model: nn.Module, sparsity: float, scope: str) -> Masks:
    weights = prunable(model)
    if sparsity <= 0:
        return {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    if scope == "global":
        everything = torch.cat([w.detach().abs().flatten() for w in weights.values()])
        threshold = _kth_smallest(everything, sparsity)
        return {name: w.detach().abs() > threshold for name, w in weights.items()}
    return {name: w.detach().abs() > _kth_smallest(w.detach().abs().flatten(), sparsity) for name, w in weights.items()}


def _kth_smallest(values: torch.Tensor, fraction: float) -> torch.Tensor:
    k = max(1, int(math.floor(fraction * values.numel())))
    return values.kthvalue(k).values


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask)


def sparsity_report(model: nn.Module) -> dict[str, float]:
    return {name: round(float((w == 0).float().mean()), 4) for name, w in prunable(model).items()}


# ------------------------------------------------------------------------------------ structured


@torch.no_grad()
def prune_structured(
    model: nn.Module, manifest: CheckpointManifest, fraction: float
) -> tuple[nn.Module, CheckpointManifest]:
    """Remove `fraction` of the hidden neurons of every MLP (of the original width, rounded up kept)."""
    arch = manifest.architecture
    modules = dict(model.named_modules())
    assert isinstance(model, roles.StructurallyPrunable)  # every family's model is (tests/test_contract.py)
    groups = model.neuron_groups()  # each family's model knows its own layers
    original = arch.original_widths or [modules[makers[0]].out_features for makers, _ in groups]
    state = dict(model.state_dict())
    widths = []
    for (makers, reader), width in zip(groups, original):
        keep = max(1, math.ceil(width * (1 - fraction)))
        # A neuron's score: the norm of its incoming weights times the norm of its outgoing weights.
        incoming = torch.stack([modules[name].weight.norm(dim=1) for name in makers]).prod(dim=0)
        score = incoming * modules[reader].weight.norm(dim=0)
        kept = score.topk(min(keep, modules[makers[0]].out_features)).indices.sort().values
        for name in makers:
            state[f"{name}.weight"] = state[f"{name}.weight"][kept]
            if f"{name}.bias" in state:
                state[f"{name}.bias"] = state[f"{name}.bias"][kept]
        state[f"{reader}.weight"] = state[f"{reader}.weight"][:, kept]
        widths.append(len(kept))
    arch = arch.model_copy(update={arch.hidden_widths_field: tuple(widths), "original_widths": tuple(original)})
    smaller = registry.build_model(arch)
    smaller.load_state_dict(state)  # strict: every tensor of the smaller model is accounted for
    return smaller, manifest.renewed(architecture=arch)


@torch.no_grad()
def prune_heads(
    model: nn.Module, manifest: CheckpointManifest, fraction: float
) -> tuple[nn.Module, CheckpointManifest]:
    """Remove `fraction` of the attention heads (of the original count) from every layer.

    A head's score is the norm of its query/key/value rows in c_attn times the norm of its columns in
    c_proj. Every layer keeps the same number of heads, so every layer's KV cache in the exported graph
    has one shape (the architecture holds one n_head); the head size does not change.
    """
    arch = manifest.architecture
    assert isinstance(arch, DecoderArch)  # the config allows head pruning for decoders only
    if arch.n_kv_head != arch.n_head:
        raise UserError(
            f"compress: head pruning of a grouped-query attention model ({arch.n_head} query heads "
            f"over {arch.n_kv_head} key/value heads) is not supported; prune 'mlp' instead"
        )
    hs = arch.head_size
    original = arch.original_heads or arch.n_head
    keep = max(1, math.ceil(original * (1 - fraction)))
    kept: list[torch.Tensor] = []
    assert isinstance(model, GPT)
    for block in model.layers():
        attn = block.attn
        rows = attn.c_attn.weight.view(3, attn.n_head, hs, -1)  # (q/k/v, head, hs, n_embd)
        cols = attn.c_proj.weight.view(-1, attn.n_head, hs)  # (n_embd, head, hs)
        score = rows.pow(2).sum(dim=(0, 2, 3)).sqrt() * cols.pow(2).sum(dim=(0, 2)).sqrt()
        kept.append(score.topk(min(keep, attn.n_head)).indices.sort().values)
    n_kept = len(kept[0])
    arch = arch.model_copy(update={"n_head": n_kept, "n_kv_head": n_kept, "original_heads": original})
    smaller = registry.build_model(arch)
    state = dict(model.state_dict())
    for i, (block, heads) in enumerate(zip(model.layers(), kept)):
        attn, prefix = block.attn, f"transformer.h.{i}.attn"
        state[f"{prefix}.c_attn.weight"] = attn.c_attn.weight.view(3, attn.n_head, hs, -1)[:, heads].reshape(
            3 * len(heads) * hs, -1
        )
        if attn.c_attn.bias is not None:
            state[f"{prefix}.c_attn.bias"] = attn.c_attn.bias.view(3, attn.n_head, hs)[:, heads].reshape(-1)
        state[f"{prefix}.c_proj.weight"] = attn.c_proj.weight.view(-1, attn.n_head, hs)[:, heads].reshape(
            attn.c_proj.weight.size(0), -1
        )
    smaller.load_state_dict(state)  # strict: every tensor of the smaller model is accounted for
    return smaller, manifest.renewed(architecture=arch)


# ------------------------------------------------------------------------------------- fine-tune


def finetune(
    config: Config,
    step: PruneStep,
    model: nn.Module,
    manifest: CheckpointManifest,
    masks: Masks,
    steps: int,
    work_dir: Path,
) -> nn.Module:
    """A short run of the family's own training recipe from the pruned weights, masks held."""
    start = work_dir / "start.safetensors"
    save_checkpoint(start, model_tensors(model), manifest)
    tc = config.train
    lr = step.finetune_lr or (tc.min_lr if tc.min_lr > 0 else tc.lr / 10)
    settings = {
        "max_steps": steps,
        "lr": lr,
        "min_lr": lr,
        "schedule": "constant",
        "warmup_steps": 0,
        "eval_every": steps,
        "save_every": steps,
        "patience": None,
        "compile": False,
    }
    learner = family(config.model.family)
    tuned_config = config.derive(
        "compress prune step (fine-tune)",
        train={  # the keys its recipe reads
            key: value for key, value in settings.items() if key in learner.train_keys
        },
    )
    recipe = learner.module("recipe")
    result = recipe.train(
        tuned_config, False, work_dir, start_from=start, after_step=(lambda m: apply_masks(m, masks)) if masks else None
    )
    tuned, _ = registry.load_model(Path(result["last"]))
    return tuned
