"""Run a model whose weights stay on disk: each module's own weights are loaded just before it runs and
dropped after, so a forward pass holds one module's weights (in fp32 if asked) at a time.

This is how a parity gate compares a 7B model with transformers on a 24 GB machine: both
implementations are built on the meta device (no memory), and the same hooks stream their weights
from the files, so the whole-model logits are computed exactly as before, in fp32 arithmetic, at the
cost of reading the weights once. Any module works -- bigmodel's models and transformers' alike --
since the hooks only replace a module's own parameters around its own forward.

`fetch(names)` gets every name a parameter is known by (a tied weight has two) and returns the tensor
of the first it finds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

Fetch = Callable[[list[str]], torch.Tensor]


def aliases_of(model: nn.Module) -> dict[int, list[str]]:
    """Every name each parameter (and each meta buffer) of `model` is known by: a tied weight has two."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    for name, buffer in model.named_buffers(remove_duplicate=False):
        if buffer.is_meta:
            aliases.setdefault(id(buffer), []).append(name)
    return aliases


class _Slot:
    """A module's own weights: loaded from `fetch` into it, and put back to the meta originals."""

    def __init__(self, module: nn.Module, aliases: dict[int, list[str]]) -> None:
        self.module = module
        self.params = {attr: p for attr, p in module._parameters.items() if p is not None}
        self.buffers = {attr: b for attr, b in module._buffers.items() if b is not None and b.is_meta}
        self.aliases = aliases

    def load(self, fetch: Fetch, dtype: torch.dtype) -> None:
        for attr, param in self.params.items():
            tensor = _as(fetch(self.aliases[id(param)]), param, dtype)
            self.module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        for attr, buffer in self.buffers.items():
            self.module._buffers[attr] = _as(fetch(self.aliases[id(buffer)]), buffer, dtype)

    def drop(self) -> None:
        self.module._parameters.update(self.params)  # the meta originals: nothing of it stays in memory
        self.module._buffers.update(self.buffers)


def _slots(modules: Iterable[nn.Module], aliases: dict[int, list[str]]) -> list[_Slot]:
    slots = [_Slot(module, aliases) for module in modules]
    return [slot for slot in slots if slot.params or slot.buffers]


@contextlib.contextmanager
def streamed(model: nn.Module, fetch: Fetch, dtype: torch.dtype = torch.float32) -> Iterator[nn.Module]:
    """`model` (parameters on the meta device) with each module's weights loaded from `fetch` just before
    the module runs and dropped after, while in the block."""
    handles = []
    for slot in _slots(model.modules(), aliases_of(model)):
        handles.append(slot.module.register_forward_pre_hook(lambda m, a, slot=slot: slot.load(fetch, dtype)))
        handles.append(slot.module.register_forward_hook(lambda m, a, o, slot=slot: slot.drop()))
    try:
        with torch.no_grad():
            yield model
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def materialized(
    root: nn.Module, parts: Iterable[nn.Module], fetch: Fetch, dtype: torch.dtype = torch.float32
) -> Iterator[None]:
    """The weights of `parts` (submodules of `root`, whole) loaded from `fetch` while in the block: what a
    layer-by-layer pass holds, one layer at a time."""
    slots = _slots((module for part in parts for module in part.modules()), aliases_of(root))
    try:
        for slot in slots:
            slot.load(fetch, dtype)
        with torch.no_grad():
            yield
    finally:
        for slot in slots:
            slot.drop()


def _as(tensor: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(like.shape):
        raise ValueError(f"streamed weight of shape {tuple(tensor.shape)} where {tuple(like.shape)} belongs")
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def layer_list(model: nn.Module, n_layer: int) -> nn.ModuleList:
    """The model's stack of transformer layers: its first ModuleList of n_layer modules (bigmodel's
    transformer.h, transformers' model.layers / transformer.h / encoder.layer)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layer:
            return module
    raise ValueError(f"no stack of {n_layer} layers in {type(model).__name__}")


@contextlib.contextmanager
def layer_outputs(layers: nn.ModuleList) -> Iterator[list[torch.Tensor]]:
    """Collects each layer's output hidden states (fp32) while the block runs a forward pass."""
    found: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        found.append((output[0] if isinstance(output, tuple) else output).detach().float())

    handles = [layer.register_forward_hook(keep) for layer in layers]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


class Readable(Protocol):
    """Tensors by name: a safetensors file, a folder's shards, a model's state dict."""

    def names(self) -> list[str]: ...

    def read(self, name: str) -> torch.Tensor: ...


def fetch_from(reader: Readable, prefix: str = "") -> Fetch:
    """A Fetch reading `prefix + name` from `reader` (bigmodel's checkpoints store the model under 'model.')."""
    have = set(reader.names())

    def fetch(names: list[str]) -> torch.Tensor:
        for name in names:
            if prefix + name in have:
                return reader.read(prefix + name)
        raise KeyError(f"no tensor {prefix}{names[0]}")

    return fetch


class StateDict:
    """An in-memory model's tensors as a Readable (names prefixed as a checkpoint stores them: 'model.')."""

    def __init__(self, model: nn.Module, prefix: str = "") -> None:
        self.state = {prefix + name: tensor for name, tensor in model.state_dict().items()}

    def names(self) -> list[str]:
        return list(self.state)

    def read(self, name: str) -> torch.Tensor:
        return self.state[name]
