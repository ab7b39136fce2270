"""Models by architecture: build, initialise and load any family's network (see families.py).

A checkpoint's manifest carries its typed `architecture`; `build_model(architecture)` rebuilds the exact
network, so later stages never need the config that created it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from bigmodel import arch as arches
from bigmodel import roles
from bigmodel.arch import AnyArch
from bigmodel.checkpoint import check_shapes, load_checkpoint
from bigmodel.errors import UserError
from bigmodel.families import family
from bigmodel.manifests import AdapterRecord, CheckpointManifest


def architecture(model_cfg: Any, data_manifest: dict[str, Any]) -> AnyArch:
    model: roles.Model = family(model_cfg.family).module("model")
    arch: AnyArch = model.architecture(model_cfg, data_manifest)
    return arch


def build_model(arch: AnyArch | dict[str, Any]) -> nn.Module:
    """The network of an architecture (a typed one, or its stored dict form)."""
    typed = arches.parse(arch, "architecture")
    model: roles.Model = family(typed.family).module("model")
    network: nn.Module = model.build(typed)
    return network


def init_weights(model: nn.Module, family_name: str, scheme: str | None, std: float) -> str:
    """Initialise in place; returns the scheme used (the family default when `scheme` is None)."""
    chosen = scheme or family(family_name).default_init
    family(family_name).module("model").init_weights(model, chosen, std)
    return chosen


def stage_checkpoint(config: Any, ref: str, stage: str) -> Path:
    """The checkpoint a stage was told to use (eval/export/compress `checkpoint`), refused in one line when
    it holds another family's model than the config describes. eval also takes ONNX models (checked when
    opened); export and compress start from PyTorch weights."""
    from bigmodel.checkpoint import read_manifest

    path: Path = config.checkpoint_path(ref)
    if path.suffix == ".onnx":
        if stage == "eval":
            return path
        raise UserError(
            f"{stage}.checkpoint {path}: {stage} starts from a checkpoint (.safetensors), not an ONNX "
            "model; give best, last, init or a .safetensors file"
        )
    found = read_manifest(path).family
    expected = config.model.family
    if found != expected:
        raise UserError(
            f"{path} holds a '{found}' model, but the config describes a '{expected}' model "
            f"(model.family); give a {expected} checkpoint, or the config that {path.name} was trained with"
        )
    return path


def load_model(path: Path, merge: bool = True) -> tuple[nn.Module, CheckpointManifest]:
    """Rebuild the model a checkpoint describes and load its weights, verifying every shape. A LoRA
    adapter checkpoint is loaded onto its base (checked by sha256) and, with `merge`, folded into it."""
    manifest, tensors = load_checkpoint(path, prefix="model.")
    if manifest.adapter is not None:
        return _load_adapted(path, manifest.adapter, tensors, merge), manifest
    model = build_model(manifest.architecture)
    weights = {k.removeprefix("model."): v for k, v in tensors.items()}
    tied = getattr(model, "tied_weights", {})
    expected = {k: v for k, v in model.state_dict().items() if k not in tied}
    check_shapes(path, expected, weights)
    model.load_state_dict(weights, strict=False)  # tied aliases are filled through their source
    return model, manifest


def check_adapter_base(path: Path, own_init: Path) -> None:
    """Refuse a LoRA adapter checkpoint from another run whose base is not this run's init checkpoint
    (by sha256): scored on its own base it would quietly give the other run's numbers."""
    from bigmodel.checkpoint import read_manifest
    from bigmodel.io import sha256_file

    adapter = read_manifest(path).adapter
    if adapter is None or not own_init.is_file() or Path(adapter.base.path).resolve() == own_init.resolve():
        return
    base = adapter.base
    own = sha256_file(own_init)
    if own != base.sha256:
        raise UserError(
            f"{path} is a LoRA adapter of {base.path}, not of this run's {own_init} (sha256 "
            f"{base.sha256[:12]} vs {own[:12]}); an adapter fits only its own "
            "base: evaluate it in its own run (--run-dir), or train one on this base"
        )


def checkpoint_size(path: Path) -> tuple[AnyArch, int, int]:
    """(architecture, parameters, bytes per stored weight) of a checkpoint, from its manifest alone (the
    model built on the meta device): what the memory guards of stages that load it start from."""
    import torch

    from bigmodel.checkpoint import read_manifest
    from bigmodel.memory import DTYPE_BYTES

    manifest = read_manifest(path)
    with torch.device("meta"):
        parameters = count_parameters(build_model(manifest.architecture))
    return manifest.architecture, parameters, DTYPE_BYTES.get(manifest.stored_dtype, 4)


def load_frozen_base(path: Path) -> tuple[nn.Module, CheckpointManifest]:
    """A checkpoint's model to train LoRA adapters on under bf16 autocast, its matrices kept in the dtype
    the checkpoint stores (bf16 for a bf16 import: no fp32 copy of frozen weights, half the memory of
    `load_model` and no second copy while loading), read tensor by tensor into a model built on the meta
    device; vectors (norms, biases) become fp32. Under bf16 autocast this computes exactly what the fp32
    copy did -- autocast rounds an fp32 weight to bf16 for every matrix product, and these are those bf16
    values -- and an embedding's output is cast to fp32 so the residual stream stays fp32 as before."""
    import torch

    from bigmodel.checkpoint import read_manifest
    from bigmodel.weights import SafetensorsFile

    manifest = read_manifest(path)
    if manifest.adapter is not None:  # adapters on an adapted model: its merge is a new fp32 model anyway
        return load_model(path)
    with torch.device("meta"):
        model = build_model(manifest.architecture)
    tied = getattr(model, "tied_weights", {})
    stored = SafetensorsFile(path)
    with torch.device("meta"):
        found = {
            name.removeprefix("model."): torch.empty(entry.shape)
            for name, entry in stored.entries.items()
            if name.startswith("model.")
        }
    check_shapes(path, {k: v for k, v in model.state_dict().items() if k not in tied}, found)
    for name in found:
        tensor = stored.read(f"model.{name}")
        model.load_state_dict({name: tensor if tensor.dim() >= 2 else tensor.float()}, strict=False, assign=True)
    for alias, source in tied.items():  # assigning replaced the parameter the alias shared
        owner, _, attribute = alias.rpartition(".")
        setattr(model.get_submodule(owner), attribute, model.get_parameter(source))
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.weight.dtype != torch.float32:
            module.register_forward_hook(lambda module, inputs, output: output.float())
    return model, manifest


def open_weights(path: Path) -> tuple[Any, CheckpointManifest]:
    """A checkpoint's tensors to read one at a time (a `streaming.Readable`, names 'model.<parameter>'), and
    its manifest. A LoRA adapter checkpoint is merged into its base in memory first (adapters are trained
    on models small enough for that; a streamed merge is future work)."""
    from bigmodel import streaming
    from bigmodel.checkpoint import read_manifest
    from bigmodel.weights import SafetensorsFile

    manifest = read_manifest(path)
    if manifest.adapter is not None:
        model, manifest = load_model(path)
        return streaming.StateDict(model, "model."), manifest
    return SafetensorsFile(path), manifest


def _load_adapted(path: Path, record: AdapterRecord, tensors: dict[str, Any], merge: bool) -> nn.Module:
    from bigmodel import lora
    from bigmodel.io import sha256_file

    base = Path(record.base.path)
    if not base.is_file():
        raise UserError(
            f"{path} is a LoRA adapter of {base}, which is missing; re-create it with 'bigmodel init' "
            "(the same config) or put it back"
        )
    found = sha256_file(base)
    if found != record.base.sha256:
        raise UserError(
            f"{path} is a LoRA adapter trained on base weights with sha256 {record.base.sha256[:12]}, "
            f"but {base} now has {found[:12]}; an adapter fits only its own base: re-run 'bigmodel train'"
        )
    model, _ = load_model(base)
    lora.apply(model, lora.settings_of(record), seed=0, trains_also=tuple(record.trains_also))
    weights = {k.removeprefix("model."): v for k, v in tensors.items()}
    check_shapes(path, {k: v.detach() for k, v in lora.adapter_tensors(model).items()}, weights)
    model.load_state_dict(weights, strict=False)
    return lora.merge(model) if merge else model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
