"""The contract of an exported decoder graph, shared by export, infer, quantize and compress's measure.

Graph: input_ids (B, T) int64, past_keys.{i} / past_values.{i} (B, nkv, P, hs) for each layer i (float32;
float16 for an fp16 export: metadata dtype), attention_mask (B, P+T) int64 -> logits (B, T, V),
present_keys.{i} / present_values.{i} (B, nkv, P+T, hs), in the same float type. nkv is the number of
key/value heads (n_head unless the model uses grouped-query attention). Batch, T and P are dynamic and P
may be 0, so one file serves the prompt (empty past) and every decode step. attention_mask lets
sequences of different lengths share a batch: 0 marks padding (of past and input_ids together), which
no query attends to, and each row's positions count its real tokens only. bigmodel pads on the left
(callers hand `feeds` a count of padding per row); onnxruntime-genai, whose runtime loads these graphs
(export/genai.py), pads on the right, and Hugging Face's names are the same.

Graphs exported with export.attention ort (metadata attention: group_query) take the same inputs and give
the same outputs, but each layer attends with ONNX Runtime's GroupQueryAttention, which pads on the
right: a row's real tokens come first (the mask is ones, then zeros), its length is the mask's sum, and
a step writes its keys and values at each row's end -- in place where one buffer per layer is bound as
both past and present (`SharedCache`: what onnxruntime-genai does; the buffers hold as many positions
as will be decoded). Run with plain arrays instead, a present is a new array of P+T positions as before.

One cache tensor per layer: each layer's Attention node reads its own input and writes its own output,
and a step copies nothing else (a stacked (L, B, nkv, P, hs) cache costs a slice per layer going in and a
copy of the whole cache coming out, every token). Files exported before this (November 2026) take the
stack as `past_keys` / `past_values` and return `present_keys` / `present_values`; files exported
before December 2026 take `left_padding` (B,), the count of padding positions in front of each row,
instead of the mask, and files from before that lack both. `feeds` and `outputs` speak every layout, so callers only ever hold
a `KVCache`.

Metadata (manifests.DecoderMetadata) makes the file self-contained: the tokenizer, its special tokens
and chat template, and the architecture. No PyTorch here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from bigmodel.arch import DecoderArch
from bigmodel.manifests import DataInfo, DecoderMetadata

KIND = "gpt"
DTYPES = {"fp32": np.float32, "fp16": np.float16}
STACKED = "past_keys"  # the single cache input of files from before per-layer caches


@functools.cache
def input_names(n_layer: int) -> tuple[str, ...]:
    """The graph's inputs in order (cached: feeds names every decode step's cache with them)."""
    return (
        "input_ids",
        *(f"past_keys.{i}" for i in range(n_layer)),
        *(f"past_values.{i}" for i in range(n_layer)),
        "attention_mask",
    )


def output_names(n_layer: int) -> tuple[str, ...]:
    return ("logits", *(f"present_keys.{i}" for i in range(n_layer)), *(f"present_values.{i}" for i in range(n_layer)))


@dataclass(frozen=True)
class KVCache:
    """Per layer, the keys and values (B, nkv, P, hs) of the tokens seen so far."""

    keys: tuple[np.ndarray, ...]
    values: tuple[np.ndarray, ...]

    @property
    def length(self) -> int:
        """P: the positions cached (padding included)."""
        return int(self.keys[0].shape[2])

    def rows(self, keep: Sequence[int]) -> KVCache:
        """Only these batch rows."""
        return KVCache(tuple(k[keep] for k in self.keys), tuple(v[keep] for v in self.values))

    def trimmed(self, positions: int, right: bool = False) -> KVCache:
        """Without the first (the last: `right`) `positions` positions (padding in every row)."""
        kept = slice(0, self.length - positions) if right else slice(positions, None)
        return KVCache(tuple(k[:, :, kept] for k in self.keys), tuple(v[:, :, kept] for v in self.values))

    def padded(self, width: int, right: bool = False) -> KVCache:
        """Zeros in front (at the end: `right`) up to `width` positions."""
        missing = width - self.length
        if missing == 0:
            return self

        def pad(t: np.ndarray) -> np.ndarray:
            zeros = np.zeros((t.shape[0], t.shape[1], missing, t.shape[3]), t.dtype)
            return np.concatenate([t, zeros] if right else [zeros, t], axis=2)

        return KVCache(tuple(map(pad, self.keys)), tuple(map(pad, self.values)))

    def joined(self, other: KVCache) -> KVCache:
        """This cache's rows, then `other`'s (the same number of positions)."""
        return KVCache(
            tuple(np.concatenate(pair) for pair in zip(self.keys, other.keys)),
            tuple(np.concatenate(pair) for pair in zip(self.values, other.values)),
        )


@dataclass(frozen=True)
class CacheLayout:
    """The KV cache's fixed dimensions and float type."""

    n_layer: int
    n_kv_head: int
    head_size: int
    dtype: str = "fp32"

    def empty(self, batch: int, past: int = 0) -> KVCache:
        """Zero keys and values for `batch` sequences and `past` positions (0: no past yet)."""
        zeros = np.zeros((batch, self.n_kv_head, past, self.head_size), DTYPES[self.dtype])
        return KVCache((zeros,) * self.n_layer, (zeros,) * self.n_layer)

    @classmethod
    def of(cls, arch: Any, dtype: str = "fp32") -> CacheLayout:
        return cls(arch.n_layer, arch.n_kv_head, arch.head_size, dtype)

    @classmethod
    def from_metadata(cls, meta: DecoderMetadata) -> CacheLayout:
        return cls(meta.n_layer, meta.kv_heads, meta.head_size, meta.dtype)


def feeds(
    ids: np.ndarray,
    cache: KVCache,
    padding: np.ndarray | None = None,
    inputs: Sequence[str] | None = None,
    right: bool = False,
) -> dict[str, np.ndarray]:
    """A run's inputs by name, for a graph with these `inputs` (default: today's layout): `padding` (B,)
    positions of each row (past and ids together) are padding, in front or, `right`, at the end (a
    GroupQueryAttention graph); no padding unless given."""
    n_layer = len(cache.keys)
    inputs = input_names(n_layer) if inputs is None else inputs
    if padding is None:
        padding = np.zeros(len(ids), np.int64)
    named: dict[str, np.ndarray] = {"input_ids": ids, "left_padding": padding}
    if "attention_mask" in inputs:
        named["attention_mask"] = attention_mask(cache.length + ids.shape[1], padding, right)
    if STACKED in inputs:
        named.update(past_keys=np.stack(cache.keys), past_values=np.stack(cache.values))
    else:
        named.update(zip(input_names(n_layer)[1:-1], (*cache.keys, *cache.values)))
    return {name: value for name, value in named.items() if name in inputs}


def attention_mask(width: int, padding: np.ndarray, right: bool = False) -> np.ndarray:
    """(B, width) int64: 1 at real positions, 0 at each row's `padding` in front (at the end: `right`)."""
    positions = np.arange(width)[None, :]
    real = positions < width - padding[:, None] if right else positions >= padding[:, None]
    return real.astype(np.int64)


def outputs(results: Sequence[np.ndarray]) -> tuple[np.ndarray, KVCache]:
    """A run's outputs (in graph order) as logits and the new cache."""
    logits, *caches = results
    if caches[0].ndim == 5:  # a stacked file: (L, B, nkv, P+T, hs) each
        return logits, KVCache(tuple(caches[0]), tuple(caches[1]))
    n_layer = len(caches) // 2
    return logits, KVCache(tuple(caches[:n_layer]), tuple(caches[n_layer:]))


def session_inputs(session: Any) -> tuple[str, ...]:
    return tuple(node.name for node in session.get_inputs())


def metadata(
    arch: DecoderArch,
    data: DataInfo,
    dtype: Literal["fp32", "fp16"],
    weights: str,
    lineage: dict[str, str],
    attention: Literal["onnx", "group_query"] = "onnx",
) -> DecoderMetadata:
    """What infer needs from the file: the tokenizer (with its special tokens and chat template), shapes,
    the float type and the weights' format."""
    return DecoderMetadata(
        dtype=dtype,
        tokenizer=data.tokenizer or "",
        special_tokens=data.special_tokens or {},
        chat_template=data.chat_template,
        block_size=arch.block_size,
        vocab_size=arch.vocab_size,
        n_layer=arch.n_layer,
        n_head=arch.n_head,
        n_kv_head=arch.n_kv_head,
        head_size=arch.head_size,
        architecture=arch,
        weights=weights,
        lineage=lineage,
        attention=attention,
    )
