"""The contract of an exported decoder graph, shared by export, infer, quantize and compress's measure.

Graph: input_ids (B, T) int64, past_keys / past_values (L, B, nkv, P, hs) float32 (float16 for an
fp16 export: metadata dtype), left_padding (B,) int64 -> logits (B, T, V), present_keys / present_values
(L, B, nkv, P+T, hs), in the same float type. nkv is the number of
key/value heads (n_head unless the model uses grouped-query attention). Batch, T and P are dynamic and P
may be 0, so one file serves the prompt (empty past) and every decode step. left_padding lets sequences
of different lengths share a batch: row b's first left_padding[b] positions (of past and input_ids
together) are padding, which no query attends to, and its positions count from its first real token.
Files exported before left_padding existed lack that input; `feeds` leaves it out for them.

Metadata (`bigmodel.*` keys, JSON values) makes the file self-contained: the tokenizer, its special
tokens and chat template, and the architecture. No PyTorch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

KIND = "gpt"
INPUTS = ("input_ids", "past_keys", "past_values", "left_padding")
OUTPUTS = ("logits", "present_keys", "present_values")


DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclass(frozen=True)
class CacheLayout:
    """The stacked KV cache's fixed dimensions and float type."""

    n_layer: int
    n_kv_head: int
    head_size: int
    dtype: str = "fp32"

    def empty(self, batch: int, past: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Zero keys and values for `batch` sequences and `past` positions (0: no past yet)."""
        shape = (self.n_layer, batch, self.n_kv_head, past, self.head_size)
        return np.zeros(shape, DTYPES[self.dtype]), np.zeros(shape, DTYPES[self.dtype])

    @classmethod
    def of(cls, arch: Any, dtype: str = "fp32") -> CacheLayout:
        return cls(arch.n_layer, arch.n_kv_head, arch.head_size, dtype)

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> CacheLayout:
        # Files exported before grouped-query attention have no n_kv_head: they cache n_head heads.
        return cls(int(meta["n_layer"]), int(meta.get("n_kv_head") or meta["n_head"]), int(meta["head_size"]),
                   meta.get("dtype", "fp32"))


def feeds(ids: np.ndarray, keys: np.ndarray, values: np.ndarray, left_padding: np.ndarray | None = None,
          inputs: tuple[str, ...] = INPUTS) -> dict[str, np.ndarray]:
    """A run's inputs by name; no padding unless given; only the names `inputs` lists (a graph's own)."""
    if left_padding is None:
        left_padding = np.zeros(len(ids), np.int64)
    return {name: value for name, value in zip(INPUTS, (ids, keys, values, left_padding)) if name in inputs}


def input_names(session: Any) -> tuple[str, ...]:
    return tuple(node.name for node in session.get_inputs())


def metadata(arch: Any, data: dict[str, Any], dtype: str = "fp32") -> dict[str, Any]:
    """What infer needs from the file: the tokenizer (with its special tokens and chat template), shapes
    and the float type."""
    return {
        "kind": KIND,
        "dtype": dtype,
        "tokenizer": data["tokenizer"],
        "special_tokens": data.get("special_tokens") or {},
        "chat_template": data.get("chat_template"),
        "block_size": arch.block_size,
        "vocab_size": arch.vocab_size,
        "n_layer": arch.n_layer,
        "n_head": arch.n_head,
        "n_kv_head": arch.n_kv_head,
        "head_size": arch.head_size,
        "architecture": arch.to_dict(),
    }
