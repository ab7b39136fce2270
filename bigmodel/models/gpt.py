"""A decoder-only language model: GPT-2 as in nanoGPT by default, Llama-family options when asked.

Token embeddings, pre-norm blocks (Radford et al. 2019), causal self-attention (through
`scaled_dot_product_attention`: causal in training, with an explicit mask over the cache when decoding), an
MLP, dropout, and an output head tied to the token embedding (Press & Wolf 2017) or its own. The options of
`DecoderArch` cover the Llama family:
- positions: learned (GPT-2) or rotary (RoFormer, Su et al. 2021), in Hugging Face's rotate-half layout;
- norm: LayerNorm, or RMSNorm (Zhang & Sennrich 2019), computed in fp32 as Llama does;
- MLP: GELU (exact or tanh), or SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer");
- grouped-query attention (Ainslie et al. 2023): n_kv_head key/value heads shared by n_head query heads;
  the KV cache stores n_kv_head heads;
- sliding-window attention (Beltagy et al. 2020; Mistral 7B) on the layers the architecture marks local:
  their mask also hides the keys a window or more behind the query (every other layer sees the whole
  context), in training, in the cached decode and in the exported graph;
- Gemma's (Gemma Team 2024): RMSNorm with a (1 + w) weight, embeddings times sqrt(n_embd), GeGLU, a norm
  after attention and after the MLP as well as before ("sandwich"), its own attention scale, attention
  scores and logits soft-capped (cap * tanh(x / cap), Gemma 2), and a rotary base of their own on the
  local layers (Gemma 3);
- a mixture of experts in place of the MLP (Shazeer et al. 2017; Mixtral): a router's softmax picks
  experts_per_token of n_experts gated MLPs per token and weights their outputs by the picked scores.

The forward takes an optional KV cache (`past`: per layer, keys and values of the tokens already seen)
and returns the updated one (`present`), so one graph serves both the prompt and every decode step. An
optional `left_padding` (B,) lets rows of different lengths share a batch (a server decoding many requests
together): row b's first left_padding[b] positions are padding, its real tokens are numbered from 0, and
no query attends to padding. `attention_mask` (B, P + T) says the same for padding anywhere (the exported
graph takes it, as Hugging Face's models and onnxruntime-genai's runtime do: it pads batches on the right).
Export writes the cached attention with ONNX's Attention operator, or with ONNX Runtime's
GroupQueryAttention, which rotates q and k itself and writes the cache in place (`_decode_group_query`).
Shapes: B batch, T new tokens, P past tokens, C n_embd, nh query heads, nkv key/value heads, hs head
size, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bigmodel.arch import DecoderArch

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (B, nkv, P, hs) keys, values
# The additive attention masks (B or 1, 1, T, P+T) of the global and of the local (sliding-window) layers;
# None where attention is plainly causal (training through SDPA's is_causal).
Masks = tuple[torch.Tensor | None, torch.Tensor | None]
Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin
# The rotary tables of the global and of the local layers (the local one only with local_rope_theta).
Ropes = tuple[Rope | None, Rope | None]


@dataclass(frozen=True)
class GroupQueryInputs:
    """What ONNX Runtime's GroupQueryAttention reads besides q, k, v and the cache (export only: set on
    every attention layer by export/gpt.py's GroupQueryStep for the trace)."""

    seqlens_k: torch.Tensor  # (B,) int32: each row's real tokens after this step, minus one
    total: torch.Tensor  # () int32: the attention mask's width (past + new positions)
    cos: torch.Tensor | None  # (block_size, r/2): the rotary tables of every position; None: no rotary
    sin: torch.Tensor | None
    window: int | None = None  # the layer's sliding window


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's own cannot drop only the bias)."""

    def __init__(self, ndim: int, bias: bool, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019), in fp32 whatever the input dtype (as Llama). With
    unit_offset the weight is stored as its offset from 1 and applied in fp32 before the cast (Gemma)."""

    def __init__(self, ndim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(ndim) if unit_offset else torch.ones(ndim))
        self.eps, self.unit_offset = eps, unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        # x / sqrt(...) rather than x * rsqrt(...): the exported graph then has the pattern ONNX Runtime
        # fuses into one SimplifiedLayerNormalization node (seven small nodes fewer per norm when decoding).
        normed = x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return normed.to(x.dtype) * self.weight


def make_norm(arch: DecoderArch, width: int | None = None) -> nn.Module:
    """The architecture's norm over `width` values (default n_embd)."""
    if arch.rmsnorm:
        return RMSNorm(width or arch.n_embd, arch.norm_eps, unit_offset=arch.norm == "rmsnorm_unit_offset")
    return LayerNorm(width or arch.n_embd, arch.bias, arch.norm_eps)


def rope_inverse_frequencies(arch: DecoderArch, local: bool = False) -> torch.Tensor:
    """(hs/2,) rotation frequencies theta^(-2i/hs), rescaled as the checkpoint's rope_scaling says; `local`:
    the local layers' own base, unscaled (Gemma 3)."""
    hs = arch.rope_dim  # (partial rotary: the rotated values only)
    theta = arch.local_rope_theta if local and arch.local_rope_theta else arch.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, hs, 2, dtype=torch.int64).float() / hs))
    scaling = None if local else arch.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":  # position interpolation (Chen et al. 2023)
        return inv_freq / scaling.factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between (Llama 3.1).
    old_context = scaling.original_max_position_embeddings
    low_wavelen = old_context / scaling.low_freq_factor
    high_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(arch: DecoderArch, positions: torch.Tensor, local: bool = False) -> Rope:
    """cos, sin (T, hs) for the rotary embedding of these positions (T,); (B, 1, T, hs) for per-row
    positions (B, T), which broadcast over the heads of (B, h, T, hs)."""
    inverse = rope_inverse_frequencies(arch, local).to(positions.device)
    freqs = positions.float()[..., None] * inverse  # (..., T, hs/2)
    angles = torch.cat([freqs, freqs], dim=-1)  # rotate-half layout: the two halves share frequencies
    if positions.dim() == 2:
        angles = angles.unsqueeze(1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, h, T, hs) by position: pairs (i, i + hs/2) turn by their angle (rotate-half, as HF).
    Tables narrower than the head (partial rotary, r values): the first r values turn, the rest pass."""
    turned = cos.size(-1)
    if turned < x.size(-1):
        return torch.cat([apply_rope(x[..., :turned], cos, sin), x[..., turned:]], dim=-1)
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class CausalSelfAttention(nn.Module):
    # Set by export at opset >= 23 (`onnx_operators`): the decode step is written with ONNX's own
    # RotaryEmbedding and Attention operators, which ONNX Runtime runs as one kernel each.
    onnx_operators: bool = False
    # Set by export with export.attention ort (`_decode_group_query`).
    group_query: GroupQueryInputs | None = None

    def __init__(self, arch: DecoderArch) -> None:
        super().__init__()
        self.arch = arch
        self.n_head, self.n_kv_head, self.head_size = arch.n_head, arch.n_kv_head, arch.head_size
        self.dropout = arch.dropout
        # q, k, v at once: (nh + 2 nkv) * hs outputs
        self.c_attn = nn.Linear(arch.n_embd, arch.q_width + 2 * arch.kv_width, bias=arch.qkv_bias)
        self.c_proj = nn.Linear(arch.q_width, arch.n_embd, bias=arch.bias)
        self.resid_dropout = nn.Dropout(self.dropout)
        # QK-norm (arch.qk_norm): one RMSNorm over each head's hs values, its weight shared by the heads, or
        # over all nh * hs query (nkv * hs key) values at once (qk_norm_per_head off: OLMoE)
        unit_offset = arch.norm == "rmsnorm_unit_offset"
        self.per_head_norm = arch.qk_norm_per_head
        q_norm_width, k_norm_width = (arch.head_size,) * 2 if arch.qk_norm_per_head else (arch.q_width, arch.kv_width)
        self.q_norm = RMSNorm(q_norm_width, arch.norm_eps, unit_offset) if arch.qk_norm else None
        self.k_norm = RMSNorm(k_norm_width, arch.norm_eps, unit_offset) if arch.qk_norm else None
        self.scale = arch.attention_scale  # None: head_size^-0.5
        self.softcap = arch.attention_softcap

    def forward(
        self,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """`mask` (B or 1, 1, T, P+T): additive, 0 where attention is allowed, -inf elsewhere; given
        whenever there is a cache (decoding), absent in training (causal attention without a cache)."""
        if self.group_query is not None and past is not None:
            return self._decode_group_query(x, past, self.group_query)
        if self.onnx_operators and past is not None and mask is not None:
            return self._decode_onnx(x, past, rope, mask)
        B, T, _ = x.shape
        qkv = self.c_attn(x)  # (B, T, (nh + 2 nkv) hs)
        if not self.per_head_norm:
            qkv = self._norm_whole_qk(qkv)
        heads = qkv.view(B, T, self.n_head + 2 * self.n_kv_head, self.head_size).transpose(1, 2)
        qk, v = heads.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=1)  # (B, nh+nkv, T, hs), v
        if self.per_head_norm and self.q_norm is not None and self.k_norm is not None:  # each head over its hs
            q, k = qk.split([self.n_head, self.n_kv_head], dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        if rope is not None:  # queries and keys rotate together: one rotation instead of two
            qk = apply_rope(qk, *rope)
        q, k = qk.split([self.n_head, self.n_kv_head], dim=1)  # (B, nh, T, hs), (B, nkv, T, hs)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nkv, P+T, hs)
            v = torch.cat([past[1], v], dim=2)
        if not x.is_meta and torch.is_autocast_enabled(x.device.type):  # (export traces on the meta device)
            # Under bf16 autocast, attend in fp32: PyTorch's CPU flash-attention backward is several
            # times slower in bf16 at these head sizes, and an fp32 softmax is the safer one anyway.
            with torch.autocast(x.device.type, enabled=False):
                y = self._attend(q.float(), k.float(), v.float(), mask)
        else:
            y = self._attend(q, k, v, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, self.arch.q_width)  # re-assemble heads: (B, T, nh * hs)
        return self.resid_dropout(self.c_proj(y)), (k, v)

    def _decode_onnx(
        self,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor],
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The decode step in opset 23's operators (torch.onnx.ops: a reference computation in eager, one
        node each in the exported graph): the rotation is one RotaryEmbedding node, and the attention one
        Attention node that appends the new keys and values to the cache itself. Heads stay packed in the
        last axis, (B, T, heads * hs), so the graph has no reshapes or transposes around them."""
        B, T, _ = x.shape
        q_width, kv_width = self.arch.q_width, self.arch.kv_width
        qkv = self.c_attn(x)
        if not self.per_head_norm:
            qkv = self._norm_whole_qk(qkv)
        qk, v = qkv.split([q_width + kv_width, kv_width], dim=-1)  # (B, T, (nh+nkv) hs), (B, T, nkv hs)
        if self.per_head_norm and self.q_norm is not None and self.k_norm is not None:  # per head, packed again
            q, k = qk.split([q_width, kv_width], dim=-1)
            q = self.q_norm(q.view(B, T, self.n_head, self.head_size)).view(B, T, q_width)
            k = self.k_norm(k.view(B, T, self.n_kv_head, self.head_size)).view(B, T, kv_width)
            qk = torch.cat([q, k], dim=-1)
        if rope is not None:  # the operator takes cos/sin (B, T, r/2): our rotate-half tables repeat that half
            turned = self.arch.rope_dim  # (r < hs: partial rotary, the operator's rotary_embedding_dim)
            cos, sin = (table.expand(B, 1, T, turned)[:, 0, :, : turned // 2] for table in rope)
            qk = torch.onnx.ops.rotary_embedding(
                qk,
                cos,
                sin,
                num_heads=self.n_head + self.n_kv_head,
                rotary_embedding_dim=turned if turned != self.head_size else 0,
            )
        q, k = qk.split([q_width, kv_width], dim=-1)
        y, keys, values, _ = torch.onnx.ops.attention(  # y (B, T, nh hs); keys, values (B, nkv, P+T, hs)
            q,
            k,
            v,
            mask.to(q.dtype),
            past[0],
            past[1],
            q_num_heads=self.n_head,
            kv_num_heads=self.n_kv_head,
            scale=self.scale,
            softcap=self.softcap or 0.0,
        )
        return self.c_proj(y), (keys, values)

    def _decode_group_query(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor], inputs: GroupQueryInputs
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The decode step as one com.microsoft GroupQueryAttention node (export only: in eager the
        operator is a stand-in without values). It rotates q and k itself, from tables of every position
        and each row's length (seqlens_k), and writes the new keys and values at each row's end: where
        the runtime binds one buffer as both past and present, in place -- no copy of the cache per step,
        as onnxruntime-genai runs it. Rows are padded on the right (the operator's convention)."""
        B, T, _ = x.shape
        q_width, kv_width = self.arch.q_width, self.arch.kv_width
        qkv = self.c_attn(x)  # (B, T, (nh + 2 nkv) hs): the operator takes them packed
        if not self.per_head_norm:
            qkv = self._norm_whole_qk(qkv)
        elif self.q_norm is not None and self.k_norm is not None:  # per head, packed again
            q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
            q = self.q_norm(q.view(B, T, self.n_head, self.head_size)).view(B, T, q_width)
            k = self.k_norm(k.view(B, T, self.n_kv_head, self.head_size)).view(B, T, kv_width)
            qkv = torch.cat([q, k, v], dim=-1)
        optional = {"scale": self.scale, "softcap": self.softcap, "local_window_size": inputs.window}
        # (local_window_size: the keys a query sees, its own included -- the window, as here)
        attributes = {
            "num_heads": self.n_head,
            "kv_num_heads": self.n_kv_head,
            "do_rotary": int(inputs.cos is not None),
        }
        present = (B, self.n_kv_head, past[0].size(2) + T, self.head_size)  # (the buffer's length when bound)
        y, keys, values = torch.onnx.ops.symbolic_multi_out(
            "com.microsoft::GroupQueryAttention",
            [qkv, None, None, past[0], past[1], inputs.seqlens_k, inputs.total, inputs.cos, inputs.sin],
            {**attributes, **{key: value for key, value in optional.items() if value is not None}},
            dtypes=(x.dtype, past[0].dtype, past[1].dtype),
            shapes=((B, T, q_width), present, present),
            version=1,
        )
        return self.c_proj(y.to(x.device)), (keys.to(x.device), values.to(x.device))

    def _norm_whole_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, T, (nh + 2 nkv) hs) with the queries normalised over their nh * hs values and the keys over
        their nkv * hs (QK-norm over the whole projection, OLMoE's); no QK-norm: unchanged."""
        if self.q_norm is None or self.k_norm is None:
            return qkv
        q, k, v = qkv.split([self.arch.q_width, self.arch.kv_width, self.arch.kv_width], dim=-1)
        return torch.cat([self.q_norm(q), self.k_norm(k), v], dim=-1)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        dropout = self.dropout if self.training else 0.0
        if self.softcap is not None:
            return self._attend_softcapped(q, k, v, mask, dropout, self.softcap)
        if mask is not None:
            # Decoding over a cache, or a local layer's window. SDPA with grouped heads (enable_gqa: each
            # key/value head serves n_head / n_kv_head query heads, the cache is never copied). Export at
            # opset >= 23 writes the decode step with ONNX's own operators instead (_decode_onnx).
            grouped = self.n_kv_head != self.n_head
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask.to(q.dtype), dropout_p=dropout, enable_gqa=grouped, scale=self.scale
            )
        # Training: causal without a cache, through SDPA's fused kernels (flash attention).
        if self.n_kv_head != self.n_head:  # each key/value head serves n_head / n_kv_head query heads
            k, v = repeat_kv(k, self.n_head // self.n_kv_head), repeat_kv(v, self.n_head // self.n_kv_head)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=self.scale)

    def _attend_softcapped(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float, cap: float
    ) -> torch.Tensor:
        """Attention with its scores soft-capped before the mask, cap * tanh(s / cap) (Gemma 2): written
        out, as no fused kernel takes a cap (every score is kept for backward)."""
        if self.n_kv_head != self.n_head:
            k, v = repeat_kv(k, self.n_head // self.n_kv_head), repeat_kv(v, self.n_head // self.n_kv_head)
        scale = self.scale if self.scale is not None else self.head_size**-0.5
        scores = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, S)
        scores = cap * torch.tanh(scores / cap)
        if mask is None:  # training: causal
            mask = additive(causal_mask(q.size(2), k.size(2)).to(q.device)[None, None], scores.dtype)
        probs = F.softmax((scores + mask.to(scores.dtype)).float(), dim=-1).to(q.dtype)
        return F.dropout(probs, dropout, self.training) @ v


def repeat_kv(x: torch.Tensor, times: int) -> torch.Tensor:
    """(B, nkv, S, hs) -> (B, nkv * times, S, hs), each head repeated `times` times in a row."""
    B, n_kv, S, hs = x.shape
    return x[:, :, None].expand(B, n_kv, times, S, hs).reshape(B, n_kv * times, S, hs)


def causal_mask(n_new: int, n_total: int) -> torch.Tensor:
    """(n_new, n_total) bool mask, True where attention is allowed: query i sees keys <= past + i."""
    past = n_total - n_new
    query = torch.arange(n_new).unsqueeze(1)
    key = torch.arange(n_total).unsqueeze(0)
    return key <= query + past


def window_mask(n_new: int, n_total: int, window: int) -> torch.Tensor:
    """(n_new, n_total) bool, True where a local layer may attend: causal, and the key less than `window`
    positions behind the query (key > query - window, as transformers' sliding_window_overlay). Positions
    are the cache's, padding included: a row's padding shifts its query and keys alike."""
    past = n_total - n_new
    query = torch.arange(n_new).unsqueeze(1) + past
    key = torch.arange(n_total).unsqueeze(0)
    return (key <= query) & (key > query - window)


def masked_causal_mask(n_new: int, real: torch.Tensor) -> torch.Tensor:
    """(B, 1, n_new, S) bool for a (B, S) mask of real positions (S = past + new): causal (bottom-right),
    and no key where the mask says padding. A padding query still sees itself: a softmax row with nothing
    allowed is NaN, and a NaN in a padding position's value would poison the real rows' sums even at
    weight zero."""
    n_total = real.size(1)
    key = torch.arange(n_total, device=real.device)
    query_position = torch.arange(n_new, device=real.device) + (n_total - n_new)
    is_self = key[None, :] == query_position[:, None]  # (T, S)
    causal = causal_mask(n_new, n_total).to(real.device)  # (T, S)
    return (causal[None] & (real[:, None, :] | is_self[None]))[:, None]


def left_padding_mask(left_padding: torch.Tensor, n_total: int) -> torch.Tensor:
    """(B, S) bool: True from each row's first real position (row b's first left_padding[b] are padding)."""
    return torch.arange(n_total, device=left_padding.device)[None, :] >= left_padding[:, None]


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (B or 1, 1, T, S) as an additive scores offset: 0 where allowed, -inf elsewhere. Built
    once per forward and shared by the layers (a bool attn_mask would be converted in every layer)."""
    # masked_fill with a Python number: no tensor constant to lift, so the model traces on the meta device
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


class MLP(nn.Module):
    """GELU: c_proj(gelu(c_fc(x))). Gated (Shazeer 2020, "GLU Variants Improve Transformer"):
    c_proj(act(c_gate(x)) * c_fc(x)), act silu (SwiGLU) or tanh-approximated gelu (GeGLU)."""

    def __init__(self, arch: DecoderArch, hidden: int) -> None:
        super().__init__()
        self.gated = arch.gated_mlp
        if self.gated:
            self.c_gate = nn.Linear(arch.n_embd, hidden, bias=arch.bias)
        self.c_fc = nn.Linear(arch.n_embd, hidden, bias=arch.bias)
        # gelu_tanh is GPT-2's own activation (Hendrycks & Gimpel 2016, tanh approximation), and Gemma's gate.
        tanh = arch.mlp in ("gelu_tanh", "geglu_tanh")
        self.act = nn.SiLU() if arch.mlp == "swiglu" else nn.GELU(approximate="tanh" if tanh else "none")
        self.c_proj = nn.Linear(hidden, arch.n_embd, bias=arch.bias)
        self.dropout = nn.Dropout(arch.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.c_gate(x)) * self.c_fc(x) if self.gated else self.act(self.c_fc(x))
        return self.dropout(self.c_proj(hidden))


class MixtureOfExperts(nn.Module):
    """n_experts gated MLPs and a router (Mixtral, Qwen3-MoE, OLMoE): each token's output is the sum of its top
    experts_per_token experts' outputs, weighted by their softmax scores (renormalised over the picked ones
    when the architecture says so). Three spellings of the same function:
    - eager (training, eval, the gates): each expert runs on the tokens that picked it, gathered, and adds
      into their rows in expert order (as transformers does): experts_per_token / n_experts of the FLOPs;
    - traced (torch.compile, export's dense form): every expert on every token, the unpicked weighted by
      exactly 0 -- one fixed shape, a plain graph;
    - set by export (`route_for_onnx`): ONNX Runtime's routed MoE operator."""

    experts_gate_up: nn.Parameter  # (registered by route_for_onnx only)
    experts_down: nn.Parameter

    def __init__(self, arch: DecoderArch, hidden: int) -> None:
        super().__init__()
        self.top_k, self.normalize = arch.experts_per_token, arch.normalize_expert_weights
        self.router = nn.Linear(arch.n_embd, arch.n_experts, bias=False)
        self.experts = nn.ModuleList([MLP(arch, hidden) for _ in range(arch.n_experts)])
        self.onnx_routed = False  # (export only: route_for_onnx)

    def route_for_onnx(self, enabled: bool) -> None:
        """Export only, on the meta device: the forward becomes one com.microsoft MoE node reading the experts
        as the operator stores them, `experts_gate_up` (E, 2 I, C) with each expert's gate and up rows
        interleaved (g0, u0, g1, u1, ...: its SwiGLU layout) and `experts_down` (E, C, I); export writes
        those from the experts' own weights. The operator's routing is this module's: a softmax over all
        experts and the top k, renormalised (without `normalize`, the output is then scaled back by the picked
        scores' total)."""
        if not enabled:
            for name in ("experts_gate_up", "experts_down"):
                self._parameters.pop(name, None)
            self.onnx_routed = False
            return
        first = self.experts[0]
        assert isinstance(first, MLP) and first.gated
        (hidden, width), like = first.c_fc.weight.shape, first.c_fc.weight
        experts = len(self.experts)
        gate_up = nn.Parameter(like.new_empty(experts, 2 * hidden, width), requires_grad=False)
        down = nn.Parameter(like.new_empty(experts, width, hidden), requires_grad=False)
        self.register_parameter("experts_gate_up", gate_up)  # (named: export reads them by these names)
        self.register_parameter("experts_down", down)
        self.onnx_routed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onnx_routed:  # (read as attributes, so that the exporter sees them as this module's parameters)
            return self._routed_onnx(x, self.experts_gate_up, self.experts_down)
        scores = F.softmax(self.router(x).float(), dim=-1)  # (B, T, E), in fp32 as transformers does
        picked, chosen = scores.topk(self.top_k, dim=-1)  # (B, T, k)
        if self.normalize:
            picked = picked / picked.sum(dim=-1, keepdim=True)
        if x.is_meta or torch.compiler.is_compiling():  # a trace: one shape whatever the routing
            weights = torch.zeros_like(scores).scatter(-1, chosen, picked).to(x.dtype)  # (B, T, E); 0 unpicked
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):  # in expert order, as transformers adds them up
                out = out + weights[..., e : e + 1] * expert(x)
            return out
        return self._gathered(x, picked, chosen)

    def _gathered(self, x: torch.Tensor, picked: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Each expert on the rows of the tokens that picked it, weighted and added back in expert order. An
        expert no token picked still runs (on no rows), so every parameter takes part in the step (DDP
        expects them all)."""
        B, T, C = x.shape
        rows = x.reshape(B * T, C)
        picked, chosen = picked.reshape(B * T, -1), chosen.reshape(B * T, -1)  # (B T, k)
        out = torch.zeros_like(rows)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)  # the rows that picked e, and in which place
            out = out.index_add(0, token, expert(rows[token]) * picked[token, slot, None].to(x.dtype))
        return out.view(B, T, C)

    def _routed_onnx(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        rows = x.reshape(B * T, C)  # (B T, C): the operator takes rows
        # The router over rows traces as a Gemm, which int4 export leaves float: top-k is a discrete choice
        # that rounding could flip.
        logits = self.router(rows)  # (B T, E)
        y = torch.onnx.ops.symbolic(
            "com.microsoft::MoE",
            [rows, logits, gate_up, None, down],  # (no fc1 bias)
            {
                "k": self.top_k,
                # always renormalised: ONNX Runtime's CPU QMoE (1.32) renormalises whatever this says
                "normalize_routing_weights": 1,
                # SwiGLU, gate and up rows interleaved: silu(gate) * up, with no scaling (alpha 1) or shift
                "activation_type": "swiglu",
                "swiglu_fusion": 1,
                "activation_alpha": 1.0,
                "activation_beta": 0.0,
            },
            dtype=rows.dtype,
            shape=rows.shape,
            version=1,
        )
        y = y.to(x.device)  # (the operator's stand-in output is made on the default device, whatever the trace's)
        if not self.normalize:  # the sum weighted by the picked scores themselves = renormalised one x their total
            picked = F.softmax(logits.float(), dim=-1).topk(self.top_k, dim=-1).values  # (B T, k)
            y = y * picked.sum(dim=-1, keepdim=True).to(y.dtype)
        return y.view(B, T, C)


class Block(nn.Module):
    def __init__(self, arch: DecoderArch, layer: int) -> None:
        super().__init__()
        self.local = arch.is_local(layer)  # a sliding-window layer (with the local rotary base, if any)
        self.window = arch.window(layer)  # its window; None where attention sees the whole context
        self.ln_1 = make_norm(arch)
        self.attn = CausalSelfAttention(arch)
        self.ln_2 = make_norm(arch)
        hidden = arch.mlp_hidden[layer]
        self.mlp: nn.Module = MixtureOfExperts(arch, hidden) if arch.n_experts else MLP(arch, hidden)
        # Sandwich norms (Gemma): the attention's and the MLP's outputs normed before the residual add too.
        self.attn_out_norm = make_norm(arch) if arch.sandwich_norms else None
        self.mlp_out_norm = make_norm(arch) if arch.sandwich_norms else None

    def forward(
        self,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        ropes: Ropes = (None, None),
        masks: Masks = (None, None),
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        mask = masks[1] if self.window is not None else masks[0]
        rope = ropes[1] if self.local and ropes[1] is not None else ropes[0]
        attended, present = self.attn(self.ln_1(x), past, rope, mask)
        if self.attn_out_norm is not None:
            attended = self.attn_out_norm(attended)
        x = x + attended
        transformed = self.mlp(self.ln_2(x))
        if self.mlp_out_norm is not None:
            transformed = self.mlp_out_norm(transformed)
        return x + transformed, present


class GPT(nn.Module):
    def __init__(self, arch: DecoderArch) -> None:
        super().__init__()
        self.arch = arch
        self.block_size: int = arch.block_size
        modules: dict[str, nn.Module] = {"wte": nn.Embedding(arch.vocab_size, arch.n_embd)}
        if arch.position == "learned":
            modules["wpe"] = nn.Embedding(arch.block_size, arch.n_embd)
        modules.update(
            drop=nn.Dropout(arch.dropout),
            h=nn.ModuleList([Block(arch, i) for i in range(arch.n_layer)]),
            ln_f=make_norm(arch),
        )
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(arch.n_embd, arch.vocab_size, bias=False)
        # A tied lm_head.weight *is* transformer.wte.weight; checkpoints store it once (safetensors
        # refuses aliases) and loading re-ties it.
        self.tied_weights: dict[str, str] = {}
        if arch.tie_embeddings:
            self.lm_head.weight = self.transformer["wte"].weight  # type: ignore[assignment]
            self.tied_weights = {"lm_head.weight": "transformer.wte.weight"}
        # Gemma scales the embeddings by sqrt(n_embd) rounded to the weights' dtype (as transformers does)
        self.embedding_scales = {
            dtype: torch.tensor(arch.n_embd**0.5, dtype=dtype, device="cpu").item()
            for dtype in (torch.float32, torch.bfloat16, torch.float16)
        }
        # Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"):
        # keep only each block's input in training and recompute the rest in backward.
        self.activation_checkpointing = False

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (what LoRA adapts)."""
        return self.transformer.h  # type: ignore[return-value]

    def layers(self) -> list[Block]:
        """The blocks, typed as what they are (a ModuleList yields plain modules)."""
        return [block for block in self.blocks if isinstance(block, Block)]

    def neuron_groups(self) -> list[tuple[list[str], str]]:
        """Each block's MLP for structured pruning: the layers making its neurons (SwiGLU: gate and up)
        and the layer reading them."""
        groups = []
        for i in range(len(self.blocks)):
            prefix = f"transformer.h.{i}.mlp"
            makers = [f"{prefix}.c_gate", f"{prefix}.c_fc"] if self.arch.gated_mlp else [f"{prefix}.c_fc"]
            groups.append((makers, f"{prefix}.c_proj"))
        return groups

    def forward(
        self,
        idx: torch.Tensor,
        past: KVCache | None = None,
        left_padding: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """idx (B, T) token ids -> logits (B, T, V) and the KV cache including these tokens. With
        left_padding (B,), row b's first left_padding[b] positions (past and idx together) are padding;
        or, more generally, attention_mask (B, P + T): 1 at real positions, 0 at padding anywhere."""
        P = 0 if past is None else past[0][0].size(2)
        x, ropes, masks = self.embed(idx, P, left_padding, decoding=past is not None, attention_mask=attention_mask)
        present: KVCache = []
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and past is None:
                x, layer_kv = checkpoint(block, x, None, ropes, masks, use_reentrant=False)
            else:
                x, layer_kv = block(x, None if past is None else past[i], ropes, masks)
            present.append(layer_kv)
        return self.head(x), present

    def embed(
        self,
        idx: torch.Tensor,
        P: int,
        left_padding: torch.Tensor | None = None,
        decoding: bool = True,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Ropes, Masks]:
        """What the blocks read for tokens idx (B, T) after P cached ones: the embedded tokens (B, T, C),
        the rotary tables (rope models: the global layers', and the local layers' where they have a base of
        their own) and the additive attention masks of the global and the local
        layers (`Masks`: when decoding over a cache or with left padding; in training only a local
        layer's, when the sequence is longer than its window)."""
        T = idx.size(1)
        if self.block_size < P + T:
            raise ValueError(f"context of {P + T} tokens exceeds block_size {self.block_size}")
        pos = torch.arange(P, P + T, dtype=torch.long, device=idx.device)  # (T,)
        allowed = None  # where attention may look, when decoding (training attends causally through SDPA)
        real = left_padding_mask(left_padding, P + T) if left_padding is not None else attention_mask
        if real is not None:  # each row counts its positions over its real tokens only
            real = real.bool()  # (B, P+T)
            pos = (real.long().cumsum(1)[:, -T:] - 1).clamp(min=0)  # (B, T); padding sits at 0
            allowed = masked_causal_mask(T, real)  # (B, 1, T, P+T)
        elif decoding:
            allowed = causal_mask(T, P + T).to(idx.device)[None, None]  # (1, 1, T, P+T)
        local = None  # where a local layer may look: also within its window
        window = self.arch.sliding_window if any(self.arch.windows) else None
        if window is not None and (allowed is not None or window < T):
            near = window_mask(T, P + T, window).to(idx.device)[None, None]  # (1, 1, T, P+T)
            local = near if allowed is None else allowed & near
        x = self.transformer["wte"](idx)  # (B, T, C)
        if self.arch.embedding_scale:
            x = x * self.embedding_scales[x.dtype]
        # built once, shared by the layers
        masks = (
            None if allowed is None else additive(allowed, x.dtype),
            None if local is None else additive(local, x.dtype),
        )
        ropes: Ropes = (None, None)
        if self.arch.position == "learned":
            x = x + self.transformer["wpe"](pos)
        else:  # fp32 tables; an fp16 model (export dtype fp16) rotates in fp16
            kinds = (False, True) if self.arch.local_rope_theta is not None else (False,)
            tables = [tuple(t.to(x.dtype) for t in rope_cos_sin(self.arch, pos, local)) for local in kinds]
            ropes = (tables[0], tables[1] if len(tables) > 1 else None)  # type: ignore[assignment]
        return self.transformer["drop"](x), ropes, masks

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm and the output head: (B, T, C) -> logits (B, T, V), soft-capped where the model
        caps them (Gemma 2)."""
        logits = self.lm_head(self.transformer["ln_f"](x))
        cap = self.arch.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def reference_output(self, idx: torch.Tensor) -> torch.Tensor:
        """What an import is checked on against transformers' causal LM: the logits (B, T, V)."""
        return self(idx)[0]

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
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


def build(arch: DecoderArch) -> GPT:
    return GPT(arch)


def architecture(model_cfg: Any, data_manifest: dict[str, Any]) -> DecoderArch:
    """The architecture a `model:` config section describes, with the prepared data's vocabulary."""
    fields = model_cfg.model_dump(exclude={"family", "intermediate_size", "qkv_bias", "n_kv_head", "head_size"})
    return DecoderArch(
        vocab_size=data_manifest["vocab_size"],
        **fields,
        n_kv_head=model_cfg.n_kv_head or model_cfg.n_head,
        head_size=model_cfg.head_size or model_cfg.n_embd // model_cfg.n_head,
        mlp_hidden=[model_cfg.intermediate_size or 4 * model_cfg.n_embd] * model_cfg.n_layer,
        qkv_bias=model_cfg.bias if model_cfg.qkv_bias is None else model_cfg.qkv_bias,
    )


def init_weights(model: GPT, scheme: str, std: float) -> None:
    """`gpt2`: N(0, 0.02) everywhere and N(0, 0.02/sqrt(2 * n_layer)) for the projections that write
    into the residual stream, so its variance does not grow with depth (GPT-2 paper, section 2.3).
    Other schemes apply to the Linear weights; embeddings keep N(0, std)."""
    n_layer = model.arch.n_layer
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02 if scheme == "gpt2" else std)
        elif isinstance(module, nn.Linear) and not (model.arch.tie_embeddings and module is model.lm_head):  # tied: wte
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


def parameter_counts(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    wpe = sum(p.numel() for name, p in model.named_parameters() if name.startswith("transformer.wpe."))
    return {"total": total, "without_position_embeddings": total - wpe}
