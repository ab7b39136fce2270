"""A GPT-style decoder-only language model, as in nanoGPT / GPT-2.

Token + learned position embeddings, pre-LayerNorm blocks (Radford et al. 2019), causal self-attention
through `scaled_dot_product_attention`, a 4x GELU MLP, dropout, and an output head tied to the token
embedding (Press & Wolf 2017).

The forward takes an optional KV cache (`past`: per layer, keys and values of the tokens already seen)
and returns the updated one (`present`), so one graph serves both the prompt and every decode step.
Shapes: B batch, T new tokens, P past tokens, C n_embd, nh heads, hs = C / nh, V vocab.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (B, nh, P, hs) keys, values


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's own cannot drop only the bias)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        self.n_head = arch["n_head"]
        self.head_size = head_size(arch)
        self.width = self.n_head * self.head_size  # n_embd, unless heads were pruned
        self.dropout = arch["dropout"]
        self.c_attn = nn.Linear(arch["n_embd"], 3 * self.width, bias=arch["bias"])  # q, k, v at once
        self.c_proj = nn.Linear(self.width, arch["n_embd"], bias=arch["bias"])
        self.resid_dropout = nn.Dropout(self.dropout)

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.width, dim=2)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, P+T, hs)
            v = torch.cat([past[1], v], dim=2)
        dropout = self.dropout if self.training else 0.0
        if torch.is_autocast_enabled(x.device.type):
            # Under bf16 autocast, attend in fp32: PyTorch's CPU flash-attention backward is several
            # times slower in bf16 at these head sizes, and an fp32 softmax is the safer one anyway.
            with torch.autocast(x.device.type, enabled=False):
                y = attend(q.float(), k.float(), v.float(), past is not None, dropout)
        else:
            y = attend(q, k, v, past is not None, dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, self.width)  # re-assemble heads: (B, T, nh * hs)
        return self.resid_dropout(self.c_proj(y)), (k, v)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, has_past: bool, dropout: float) -> torch.Tensor:
    """Causal attention of q (B, nh, T, hs) over k, v (B, nh, P+T, hs) -> (B, nh, T, hs)."""
    if not has_past:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    # With a past, is_causal=True would align the mask top-left (query i sees keys <= i); the new
    # queries sit at the end, so query i must see keys <= P + i (bottom-right).
    mask = causal_mask(q.size(2), k.size(2)).to(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


def causal_mask(n_new: int, n_total: int) -> torch.Tensor:
    """(n_new, n_total) bool mask, True where attention is allowed: query i sees keys <= past + i."""
    past = n_total - n_new
    query = torch.arange(n_new).unsqueeze(1)
    key = torch.arange(n_total).unsqueeze(0)
    return key <= query + past


class MLP(nn.Module):
    def __init__(self, arch: dict[str, Any], hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(arch["n_embd"], hidden, bias=arch["bias"])
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, arch["n_embd"], bias=arch["bias"])
        self.dropout = nn.Dropout(arch["dropout"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, arch: dict[str, Any], layer: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(arch["n_embd"], arch["bias"])
        self.attn = CausalSelfAttention(arch)
        self.ln_2 = LayerNorm(arch["n_embd"], arch["bias"])
        self.mlp = MLP(arch, mlp_widths(arch)[layer])

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attended, present = self.attn(self.ln_1(x), past)
        x = x + attended
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT(nn.Module):
    # lm_head.weight *is* transformer.wte.weight; checkpoints store it once (safetensors refuses aliases).
    tied_weights = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        self.arch = arch
        self.block_size: int = arch["block_size"]
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(arch["vocab_size"], arch["n_embd"]),
                wpe=nn.Embedding(arch["block_size"], arch["n_embd"]),
                drop=nn.Dropout(arch["dropout"]),
                h=nn.ModuleList([Block(arch, i) for i in range(arch["n_layer"])]),
                ln_f=LayerNorm(arch["n_embd"], arch["bias"]),
            )
        )
        self.lm_head = nn.Linear(arch["n_embd"], arch["vocab_size"], bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        # Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"):
        # keep only each block's input in training and recompute the rest in backward.
        self.activation_checkpointing = False

    def forward(self, idx: torch.Tensor, past: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """idx (B, T) token ids -> logits (B, T, V) and the KV cache including these tokens."""
        T = idx.size(1)
        P = 0 if past is None else past[0][0].size(2)
        if P + T > self.block_size:
            raise ValueError(f"context of {P + T} tokens exceeds block_size {self.block_size}")
        pos = torch.arange(P, P + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        present: KVCache = []
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training and past is None:
                x, layer_kv = checkpoint(block, x, None, use_reentrant=False)
            else:
                x, layer_kv = block(x, None if past is None else past[i])
            present.append(layer_kv)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        return logits, present

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
        top_k: int | None = None, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append max_new_tokens tokens to idx (B, T), decoding with the KV cache.

        The context is always the last block_size tokens (as nanoGPT crops it): once the window is
        full the cache cannot simply grow, so each further step re-reads the cropped window.
        """
        logits, past = self(idx[:, -self.block_size :])
        for _ in range(max_new_tokens):
            next_logits = logits[:, -1, :]
            if temperature == 0:
                next_id = next_logits.argmax(dim=-1, keepdim=True)
            else:
                next_logits = next_logits / temperature
                if top_k is not None:
                    kth = torch.topk(next_logits, min(top_k, next_logits.size(-1))).values[:, [-1]]
                    next_logits = next_logits.masked_fill(next_logits < kth, float("-inf"))
                probs = F.softmax(next_logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
            if past[0][0].size(2) + 1 > self.block_size:
                logits, past = self(idx[:, -self.block_size :])
            else:
                logits, past = self(next_id, past)
        return idx


def head_size(arch: dict[str, Any]) -> int:
    """Per-head width: n_embd / n_head, kept fixed when structured pruning removes heads."""
    return int(arch.get("head_size") or arch["n_embd"] // arch["n_head"])


def mlp_widths(arch: dict[str, Any]) -> list[int]:
    """Hidden width of each block's MLP: 4 x n_embd, unless structured pruning narrowed them."""
    return list(arch.get("mlp_hidden") or [4 * arch["n_embd"]] * arch["n_layer"])


def build(arch: dict[str, Any]) -> GPT:
    return GPT(arch)


def architecture(model_cfg: Any, data_manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "family": "gpt",
        "task": "lm",
        "vocab_size": data_manifest["vocab_size"],
        **{k: getattr(model_cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias")},
    }


def init_weights(model: GPT, scheme: str, std: float) -> None:
    """`gpt2`: N(0, 0.02) everywhere and N(0, 0.02/sqrt(2 * n_layer)) for the projections that write
    into the residual stream, so its variance does not grow with depth (GPT-2 paper, section 2.3).
    Other schemes apply to the Linear weights; embeddings keep N(0, std)."""
    n_layer = model.arch["n_layer"]
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02 if scheme == "gpt2" else std)
        elif isinstance(module, nn.Linear) and module is not model.lm_head:  # lm_head is wte
            if scheme == "gpt2":
                scale = 1 / math.sqrt(2 * n_layer) if name.endswith("c_proj") else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=0.02 * scale)
            elif scheme == "normal":
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif scheme == "xavier_uniform":
                nn.init.xavier_uniform_(module.weight)
            elif scheme == "xavier_normal":
                nn.init.xavier_normal_(module.weight)
            elif scheme == "kaiming_uniform":
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
            elif scheme == "kaiming_normal":
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            else:
                raise ValueError(f"unknown init scheme {scheme!r}")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def parameter_counts(model: GPT) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())  # the tied head is counted once
    return {"total": total, "without_position_embeddings": total - model.transformer.wpe.weight.numel()}
