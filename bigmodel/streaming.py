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

from bigmodel import memory

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


class Converted:
    """Where streamed weights are converted (bf16 -> fp32): into freed copies of earlier weights of the
    same shape when there are some (the previous layer's: the shapes repeat from layer to layer), else into
    new memory. New memory costs: each large block is its own memory map (memory.map_large_allocations),
    whose pages the kernel faults in and zeroes as the conversion first writes them -- ~1 s of a 2.8 s
    pass over a 1B model here. Keeps at most memory.KEPT_COPIES bytes of freed copies, the oldest dropped
    first (layers of different widths cannot pile up), none larger than KEPT_MAX (a vocabulary-sized
    table is not kept while the layers run). Only copies it made are reused: a weight already in the
    asked dtype is the file's own tensor."""

    KEPT_MAX = 256 * 2**20

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self._free: list[torch.Tensor] = []  # freed copies, oldest first
        self._made: dict[int, torch.Tensor] = {}  # the live copies made here, by id

    def __call__(self, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`tensor` (read for the meta tensor `like`) as it is used: floats in this dtype."""
        if tuple(tensor.shape) != tuple(like.shape):
            raise ValueError(f"streamed weight of shape {tuple(tensor.shape)} where {tuple(like.shape)} belongs")
        if not tensor.is_floating_point() or tensor.dtype == self.dtype:
            return tensor
        kept = next((i for i, free in enumerate(self._free) if free.shape == tensor.shape), None)
        copy = self._free.pop(kept).copy_(tensor) if kept is not None else tensor.to(self.dtype)
        self._made[id(copy)] = copy
        return copy

    def release(self, tensor: torch.Tensor) -> None:
        """`tensor` is no longer used: kept for a later weight of its shape if this made it."""
        if self._made.pop(id(tensor), None) is not tensor or tensor.nbytes > self.KEPT_MAX:
            return
        self._free.append(tensor)
        while sum(free.nbytes for free in self._free) > memory.KEPT_COPIES:
            self._free.pop(0)


class _Slot:
    """A module's own weights: loaded from `fetch` into it, and put back to the meta originals."""

    def __init__(self, module: nn.Module, aliases: dict[int, list[str]]) -> None:
        self.module = module
        self.params = {attr: p for attr, p in module._parameters.items() if p is not None}
        self.buffers = {attr: b for attr, b in module._buffers.items() if b is not None and b.is_meta}
        self.aliases = aliases
        self.loaded: list[torch.Tensor] = []

    def load(self, fetch: Fetch, convert: Converted) -> None:
        for attr, param in self.params.items():
            self.loaded.append(convert(fetch(self.aliases[id(param)]), param))
            self.module._parameters[attr] = nn.Parameter(self.loaded[-1], requires_grad=False)
        for attr, buffer in self.buffers.items():
            self.loaded.append(convert(fetch(self.aliases[id(buffer)]), buffer))
            self.module._buffers[attr] = self.loaded[-1]

    def drop(self, convert: Converted) -> None:
        for tensor in self.loaded:
            convert.release(tensor)
        self.loaded.clear()
        self.module._parameters.update(self.params)  # the meta originals: nothing of it stays in memory
        self.module._buffers.update(self.buffers)


def _slots(modules: Iterable[nn.Module], aliases: dict[int, list[str]]) -> list[_Slot]:
    slots = [_Slot(module, aliases) for module in modules]
    return [slot for slot in slots if slot.params or slot.buffers]


@contextlib.contextmanager
def streamed(model: nn.Module, fetch: Fetch, dtype: torch.dtype = torch.float32) -> Iterator[nn.Module]:
    """`model` (parameters on the meta device) with each module's weights loaded from `fetch` just before
    the module runs and dropped after, while in the block."""
    handles, convert = [], Converted(dtype)
    for slot in _slots(model.modules(), aliases_of(model)):
        handles.append(slot.module.register_forward_pre_hook(lambda m, a, slot=slot: slot.load(fetch, convert)))
        handles.append(slot.module.register_forward_hook(lambda m, a, o, slot=slot: slot.drop(convert)))
    try:
        with torch.no_grad():
            yield model
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def materialized(
    root: nn.Module, parts: Iterable[nn.Module], fetch: Fetch, convert: Converted | None = None
) -> Iterator[None]:
    """The weights of `parts` (submodules of `root`, whole) loaded from `fetch` while in the block: what a
    layer-by-layer pass holds, one layer at a time (give every layer's call the same `convert`: each layer
    then reuses the previous one's copies; default: fp32, nothing reused)."""
    convert = convert or Converted()
    slots = _slots((module for part in parts for module in part.modules()), aliases_of(root))
    try:
        for slot in slots:
            slot.load(fetch, convert)
        with torch.no_grad():
            yield
    finally:
        for slot in slots:
            slot.drop(convert)


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
