"""Models by architecture: build, initialise and load any family's network (see families.py).

A checkpoint's manifest carries its typed `architecture`; `build_model(architecture)` rebuilds the exact
network, so later stages never need the config that created it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from bigmodel import arch as arches
from bigmodel.arch import AnyArch
from bigmodel.checkpoint import check_shapes, load_checkpoint
from bigmodel.families import family


def architecture(model_cfg: Any, data_manifest: dict[str, Any]) -> AnyArch:
    return family(model_cfg.family).module("model").architecture(model_cfg, data_manifest)


def build_model(arch: AnyArch | dict[str, Any]) -> nn.Module:
    """The network of an architecture (a typed one, or its stored dict form)."""
    typed = arches.parse(arch, "architecture")
    return family(typed.family).module("model").build(typed)


def init_weights(model: nn.Module, family_name: str, scheme: str | None, std: float) -> str:
    """Initialise in place; returns the scheme used (the family default when `scheme` is None)."""
    chosen = scheme or family(family_name).default_init
    family(family_name).module("model").init_weights(model, chosen, std)
    return chosen


def manifest_arch(manifest: dict[str, Any], origin: Path | str) -> AnyArch:
    """The typed architecture a checkpoint manifest records (validated; old manifests upgraded)."""
    return arches.parse(manifest.get("architecture"), f"checkpoint {origin}")


def load_model(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights, verifying every shape."""
    manifest, tensors = load_checkpoint(path, prefix="model.")
    model = build_model(manifest_arch(manifest, path))
    weights = {k.removeprefix("model."): v for k, v in tensors.items()}
    tied = getattr(model, "tied_weights", {})
    expected = {k: v for k, v in model.state_dict().items() if k not in tied}
    check_shapes(path, expected, weights)
    model.load_state_dict(weights, strict=False)  # tied aliases are filled through their source
    return model, manifest


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
