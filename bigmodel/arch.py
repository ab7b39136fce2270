"""A model's architecture as one typed, validated, torch-free object per family.

The config builds it (each family's `architecture(model_cfg, data)`), checkpoints store it in their
manifest, ONNX models carry it in their metadata, `plan`/`accounting` read it, and the model code is
built from it. Derived values (head size, KV heads, the MLP width of each layer) are fields filled in
when the object is made, so every reader sees the same numbers and no code re-derives them from dict
keys.

Checkpoints written before this object existed stored a plain dict with fewer keys; `parse` fills the
missing ones with the values those models had (learned positions, LayerNorm, GELU, tied head), so old
checkpoints and ONNX files keep working.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bigmodel.errors import UserError


class Arch(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    # What a distillation student must share with its teacher (same outputs over the same inputs).
    interface: ClassVar[tuple[str, ...]] = ()
    # The field holding each hidden layer's width (what structured pruning narrows).
    hidden_widths_field: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @property
    def context(self) -> int | None:
        """The longest input sequence the model reads (None: rows, not sequences)."""
        return None


class RopeScaling(BaseModel):
    """Rotary frequency scaling of the supported checkpoints: `linear` (position interpolation, Chen et
    al. 2023) and `llama3` (Llama 3.1's frequency-dependent scaling)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["linear", "llama3"]
    factor: float = Field(gt=0)
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


class DecoderArch(Arch):
    """A decoder-only transformer: GPT-2 by default, Llama/Mistral/Qwen2 through the options."""

    interface: ClassVar[tuple[str, ...]] = ("vocab_size",)
    hidden_widths_field: ClassVar[str] = "mlp_hidden"
    family: Literal["gpt"] = "gpt"
    task: Literal["lm"] = "lm"
    vocab_size: int = Field(gt=0)
    n_layer: int = Field(gt=0)
    n_head: int = Field(gt=0)
    n_kv_head: int = Field(gt=0, description="Key/value heads (grouped-query attention when < n_head).")
    n_embd: int = Field(gt=0)
    head_size: int = Field(gt=0)
    block_size: int = Field(gt=0, description="Longest context the model attends over.")
    mlp_hidden: tuple[int, ...] = Field(description="Hidden width of each layer's MLP.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = False  # Linear layers and LayerNorms
    qkv_bias: bool = False  # the query/key/value projection (Qwen2 has it without the others)
    # RMSNorm of the queries and keys before the rotation (Dehghani et al. 2023, "Scaling Vision Transformers
    # to 22 Billion Parameters"), with the model's norm_eps: of each head over its head_size values, one weight
    # shared by the heads (Qwen3, Gemma 3), or with qk_norm_per_head off over all heads' values at once, one
    # weight per value (OLMoE, OLMo 2).
    qk_norm: bool = False
    qk_norm_per_head: bool = True
    position: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # Partial rotary: only the first rotary_dim values of each head turn (Phi-4-mini, GPT-NeoX); None: all.
    rotary_dim: int | None = Field(None, gt=0)
    # Sliding-window attention (Child et al. 2019; Beltagy et al. 2020; Mistral 7B): a query at position i
    # sees the keys j with i - sliding_window < j <= i, on the layers `local_layers` marks (None: every
    # layer; Qwen2's max_window_layers and Gemma's alternation make some layers global).
    sliding_window: int | None = Field(None, gt=0)
    local_layers: tuple[bool, ...] | None = None
    # The rotary base of the local layers, unscaled (Gemma 3: 10000 there, rope_theta on the global ones).
    local_rope_theta: float | None = Field(None, gt=0)
    # rmsnorm_unit_offset: RMSNorm whose weight is stored as its offset from 1, x / rms(x) * (1 + w),
    # multiplied in fp32 before the cast (Gemma).
    norm: Literal["layernorm", "rmsnorm", "rmsnorm_unit_offset"] = "layernorm"
    norm_eps: float = 1e-5
    # Gated MLPs: swiglu = silu(gate) * up (Llama), geglu_tanh = gelu_tanh(gate) * up (Gemma).
    mlp: Literal["gelu", "gelu_tanh", "swiglu", "geglu_tanh"] = "gelu"
    tie_embeddings: bool = True
    # Gemma's options: token embeddings times sqrt(n_embd); a norm after attention and after the MLP too
    # ("sandwich"); attention scores scaled by attention_scale instead of head_size^-0.5; and scores and
    # logits soft-capped, cap * tanh(x / cap) (Gemma 2).
    embedding_scale: bool = False
    sandwich_norms: bool = False
    attention_scale: float | None = Field(None, gt=0)
    attention_softcap: float | None = Field(None, gt=0)
    logit_softcap: float | None = Field(None, gt=0)
    # Mixture of experts (Shazeer et al. 2017; Mixtral, Jiang et al. 2024): each layer's MLP is n_experts gated
    # MLPs of mlp_hidden width, of which a router's softmax picks experts_per_token per token, their outputs
    # weighted by the picked scores (renormalised to sum to 1 when normalize_expert_weights: Mixtral; as
    # configured for Qwen3-MoE). 0: one dense MLP.
    n_experts: int = Field(0, ge=0)
    experts_per_token: int = Field(0, ge=0)
    normalize_expert_weights: bool = True
    # Structured pruning's bookkeeping: the widths and head count before the first pruning.
    original_widths: tuple[int, ...] | None = None
    original_heads: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _derived(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        for key in ("n_layer", "n_head", "n_embd"):
            if not isinstance(raw.get(key), int) or raw[key] <= 0:
                return raw  # field validation names the problem
        raw.setdefault("n_kv_head", raw["n_head"])
        if raw.get("head_size") is None:
            raw["head_size"] = raw["n_embd"] // raw["n_head"]
        if raw.get("mlp_hidden") is None:
            raw["mlp_hidden"] = [4 * raw["n_embd"]] * raw["n_layer"]
        elif isinstance(raw["mlp_hidden"], int):
            raw["mlp_hidden"] = [raw["mlp_hidden"]] * raw["n_layer"]
        raw.setdefault("qkv_bias", raw.get("bias", False))
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> DecoderArch:
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if len(self.mlp_hidden) != self.n_layer:
            raise ValueError(f"mlp_hidden has {len(self.mlp_hidden)} widths for {self.n_layer} layers")
        if self.position == "rope" and self.rope_dim % 2:
            raise ValueError(f"rope needs an even number of rotated values per head (got {self.rope_dim})")
        if self.rotary_dim is not None and self.rotary_dim > self.head_size:
            raise ValueError(f"rotary_dim {self.rotary_dim} exceeds head_size {self.head_size}")
        if self.local_layers is not None and len(self.local_layers) != self.n_layer:
            raise ValueError(f"local_layers has {len(self.local_layers)} entries for {self.n_layer} layers")
        if self.local_layers is not None and self.sliding_window is None:
            raise ValueError("local_layers needs a sliding_window")
        if self.local_rope_theta is not None and (self.sliding_window is None or self.position != "rope"):
            raise ValueError("local_rope_theta needs rope and a sliding_window")
        if self.n_experts and not (0 < self.experts_per_token <= self.n_experts and self.gated_mlp):
            raise ValueError(
                f"a mixture of {self.n_experts} experts needs 1..{self.n_experts} experts_per_token (got "
                f"{self.experts_per_token}) and a gated MLP (swiglu or geglu_tanh)"
            )
        return self

    @property
    def context(self) -> int | None:
        return self.block_size

    @property
    def q_width(self) -> int:
        return self.n_head * self.head_size

    @property
    def kv_width(self) -> int:
        return self.n_kv_head * self.head_size

    def is_local(self, layer: int) -> bool:
        """Whether this layer is a sliding-window one (its rotary base is local_rope_theta if set)."""
        return self.sliding_window is not None and (self.local_layers is None or self.local_layers[layer])

    def window(self, layer: int) -> int | None:
        """The sliding window of this layer; None where it attends to the whole context (a window as long
        as the context is no window)."""
        if not self.is_local(layer) or self.sliding_window is None or self.sliding_window >= self.block_size:
            return None
        return self.sliding_window

    @property
    def gated_mlp(self) -> bool:
        return self.mlp in ("swiglu", "geglu_tanh")

    @property
    def rmsnorm(self) -> bool:
        return self.norm in ("rmsnorm", "rmsnorm_unit_offset")

    @property
    def windows(self) -> tuple[int | None, ...]:
        return tuple(self.window(layer) for layer in range(self.n_layer))

    @property
    def rope_dim(self) -> int:
        """The values of each head that rope turns (all of them unless rotary_dim says fewer)."""
        return self.rotary_dim or self.head_size


class TabularArch(Arch):
    """A multi-layer perceptron on standardised features."""

    interface: ClassVar[tuple[str, ...]] = ("n_inputs", "n_outputs")
    hidden_widths_field: ClassVar[str] = "hidden_sizes"
    family: Literal["mlp"] = "mlp"
    task: Literal["classification", "regression"]
    n_inputs: int = Field(gt=0)
    n_outputs: int = Field(gt=0)
    hidden_sizes: tuple[int, ...]
    activation: Literal["relu", "gelu", "tanh", "silu"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    original_widths: tuple[int, ...] | None = None


class EncoderArch(Arch):
    """A BERT-style bidirectional encoder and the head its task needs: `mlm` (masked-token prediction),
    `classification` (n_outputs labels, from the pooled first token) or `embedding` (mean-pooled,
    normalised sentence vectors)."""

    interface: ClassVar[tuple[str, ...]] = ("vocab_size", "n_outputs")
    hidden_widths_field: ClassVar[str] = "mlp_hidden"
    family: Literal["bert"] = "bert"
    task: Literal["mlm", "classification", "embedding"]
    vocab_size: int = Field(gt=0)
    n_layer: int = Field(gt=0)
    n_head: int = Field(gt=0)
    n_embd: int = Field(gt=0)
    block_size: int = Field(gt=0, description="Longest input (positions the model has embeddings for).")
    mlp_hidden: tuple[int, ...] = Field(description="Hidden width of each layer's MLP.")
    type_vocab_size: int = Field(2, ge=1, description="Token types (segments A/B of a sentence pair).")
    n_outputs: int = Field(0, ge=0, description="Labels of a classifier (0 for the other tasks).")
    pooling: Literal["cls", "mean"] = Field(
        "cls",
        description="What a classifier reads: the first token through "
        "BERT's pooler (cls), or the mean of the token states (mean).",
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    norm_eps: float = 1e-12
    pad_id: int = Field(0, ge=0, description="Token id of padding (never attended to).")
    original_widths: tuple[int, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _derived(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and isinstance(raw.get("n_layer"), int) and isinstance(raw.get("n_embd"), int):
            raw = dict(raw)
            if raw.get("mlp_hidden") is None:
                raw["mlp_hidden"] = [4 * raw["n_embd"]] * raw["n_layer"]
            elif isinstance(raw["mlp_hidden"], int):
                raw["mlp_hidden"] = [raw["mlp_hidden"]] * raw["n_layer"]
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> EncoderArch:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head ({self.n_head}) must divide n_embd ({self.n_embd})")
        if len(self.mlp_hidden) != self.n_layer:
            raise ValueError(f"mlp_hidden has {len(self.mlp_hidden)} widths for {self.n_layer} layers")
        if (self.task == "classification") != (self.n_outputs > 0):
            raise ValueError(f"n_outputs is {self.n_outputs}: a classifier needs its labels, other tasks none")
        return self

    @property
    def mlp(self) -> Literal["gelu"]:
        """BERT's MLP, named as a decoder's `mlp` (what LoRA's targets and the accounting read)."""
        return "gelu"

    # The fused q, k, v projection's row blocks (what LoRA's q, k and v targets adapt), as a decoder's.
    @property
    def q_width(self) -> int:
        return self.n_embd

    @property
    def kv_width(self) -> int:
        return self.n_embd

    @property
    def context(self) -> int | None:
        return self.block_size

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


AnyArch = DecoderArch | TabularArch | EncoderArch
ARCHES: dict[str, type[Arch]] = {"gpt": DecoderArch, "mlp": TabularArch, "bert": EncoderArch}


def parse(raw: Any, origin: str) -> AnyArch:
    """Validate a stored architecture (checkpoint manifest, ONNX metadata); one-line error if it is not one."""
    if isinstance(raw, Arch):
        return raw  # type: ignore[return-value]
    if not isinstance(raw, dict):
        raise UserError(f"{origin}: no model architecture recorded; re-create it with this version of bigmodel")
    family = raw.get("family")
    if family not in ARCHES:
        raise UserError(f"{origin}: unknown model family {family!r}; known: {', '.join(sorted(ARCHES))}")
    try:
        return ARCHES[family].model_validate(raw)  # type: ignore[return-value]
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'architecture'}: {e['msg']}" for e in exc.errors())
        raise UserError(f"{origin}: invalid model architecture ({problems}); re-create it") from None
