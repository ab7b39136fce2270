"""Model registry: family name -> how to describe, build, initialise and load that family.

A checkpoint's manifest carries its `architecture` dict; `build_model(architecture)` rebuilds the exact
network, so later stages never need the config that created it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from bigmodel.checkpoint import check_shapes, load_checkpoint
from bigmodel.errors import UserError
from bigmodel.models import gpt, mlp

FAMILIES = {"mlp": mlp, "gpt": gpt}
DEFAULT_INIT = {"mlp": "kaiming_uniform", "gpt": "gpt2"}


def _family(name: str) -> Any:
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def architecture(model_cfg: Any, data_manifest: dict[str, Any]) -> dict[str, Any]:
    return _family(model_cfg.family).architecture(model_cfg, data_manifest)


def build_model(arch: dict[str, Any]) -> nn.Module:
    return _family(arch.get("family", "?")).build(arch)


def init_weights(model: nn.Module, family: str, scheme: str | None, std: float) -> str:
    """Initialise in place; returns the scheme used (the family default when `scheme` is None)."""
    chosen = scheme or DEFAULT_INIT[family]
    _family(family).init_weights(model, chosen, std)
    return chosen


def load_model(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights, verifying every shape."""
    manifest, tensors = load_checkpoint(path, prefix="model.")
    if "architecture" not in manifest:
        raise UserError(f"{path}: checkpoint manifest has no architecture; re-create the checkpoint")
    model = build_model(manifest["architecture"])
    weights = {k.removeprefix("model."): v for k, v in tensors.items()}
    tied = getattr(model, "tied_weights", {})
    expected = {k: v for k, v in model.state_dict().items() if k not in tied}
    check_shapes(path, expected, weights)
    model.load_state_dict(weights, strict=False)  # tied aliases are filled through their source
    return model, manifest


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
