"""What a transformer (GPT decoder or BERT encoder) costs, from its architecture alone: FLOPs, memory and
bytes on disk.

Used by `init` (a one-line report) and `plan` (the full estimate). Every formula names its source;
where bigmodel's own implementation differs from the paper's assumptions, the constant says so and
was measured on this implementation (tests/test_plan.py re-measures it on CPU).
"""

from __future__ import annotations

import math

from bigmodel.arch import DecoderArch, EncoderArch

TransformerArch = DecoderArch | EncoderArch

MiB = 2**20

# Activation bytes one GPT block keeps for backward, per (sequence position x batch row x n_embd).
# fp32: the tensors autograd saves are ln_1's input, c_attn's input, q, k, v, the attention output,
# c_proj's input, ln_2's input, c_fc's input, GELU's input (4 wide) and the MLP projection's input
# (4 wide): 17 values x 4 bytes. This is Korthikanti et al. 2022 ("Reducing Activation Recomputation in
# Large Transformer Models", sec. 4.1) without their 5·a·s² attention-score term, which fused (flash)
# attention never stores, and without dropout masks (dropout 0). bf16 autocast: matmul inputs are
# bf16 but norms, residuals and attention (kept in fp32 by models/gpt.py) are not: 56 bytes measured.
# Other shapes (grouped-query attention, a head width of its own, SwiGLU) scale the same count: see
# block_activation_values.
BLOCK_ACTIVATION_BYTES = {"fp32": 68, "bf16": 56}
GPT2_BLOCK_VALUES = 17
# Outside the blocks: the embedding sum, ln_f's and lm_head's inputs (fp32), and per logit the fp32
# logits, log-softmax, and their gradients during the loss's backward (4 x 4 bytes).
OUTER_ACTIVATION_BYTES = 3 * 4
LOGIT_BYTES = 4 * 4
# With dropout, scaled_dot_product_attention on CPU cannot use its fused kernel: the math path keeps every
# attention score for backward (scores, softmax, dropout mask, dropped probabilities): 13.5 bytes per score
# measured for the encoder, 16.5 for GPT (fp32, torch 2.13, scripts/check_plan_memory.py). CUDA's flash
# kernel fuses dropout and keeps none. Soft-capped attention (Gemma 2) is written out everywhere: its
# scores, their tanh, the masked scores and the probabilities are kept alike (counted the same).
UNFUSED_SCORE_BYTES = 15
# Optimizer state per parameter (fp32): Adam/AdamW keep two moments; SGD a momentum buffer (if any).
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 1}


def flops_per_token(arch: TransformerArch, n_params_no_pos: int) -> int:
    """Training FLOPs per token: 6N for the weight matmuls (forward + backward) plus 12·L·H·Q·T for
    attention scores and values (PaLM, Chowdhery et al. 2022, appendix B), T at most the window on a local
    layer. N: the parameters that take part in a matmul (a GPT's without its position table; an encoder's
    see encoder_matmul_parameters)."""
    H, Q, T = arch.n_head, arch.head_size, arch.block_size
    windows = getattr(arch, "windows", (None,) * arch.n_layer)  # (a decoder's; an encoder's are global)
    return 6 * n_params_no_pos + 12 * H * Q * sum(min(T, window or T) for window in windows)


def encoder_matmul_parameters(arch: EncoderArch, n_params: int) -> int:
    """An encoder's parameters that take part in a matmul: all but its position and token-type tables, and
    its word table too unless the masked-LM head multiplies by it (tied decoder, all positions)."""
    tables = (arch.block_size + arch.type_vocab_size) * arch.n_embd
    return n_params - tables - (0 if arch.task == "mlm" else arch.vocab_size * arch.n_embd)


def block_parameters(arch: DecoderArch) -> int:
    """Parameters of the largest transformer block (what FSDP gathers at once)."""
    d, bias = arch.n_embd, int(arch.bias)
    norm_count = 4 if arch.sandwich_norms else 2
    qk_norms = (2 * arch.head_size if arch.qk_norm_per_head else arch.q_width + arch.kv_width) * int(arch.qk_norm)
    norms = norm_count * d * (1 + int(bias and arch.norm == "layernorm")) + qk_norms
    qkv = arch.q_width + 2 * arch.kv_width
    attention = d * qkv + qkv * int(arch.qkv_bias) + arch.q_width * d + d * bias
    return norms + attention + mlp_parameters(arch, max(arch.mlp_hidden)) * max(1, arch.n_experts) + d * arch.n_experts


def mlp_parameters(arch: DecoderArch, hidden: int) -> int:
    """One MLP of `hidden` width (one expert of a mixture)."""
    d, bias = arch.n_embd, int(arch.bias)
    matrices = 3 if arch.gated_mlp else 2
    return matrices * d * hidden + (matrices - 1) * hidden * bias + d * bias


def active_parameters(arch: DecoderArch, total: int) -> int:
    """The parameters a token passes through: a mixture's unpicked experts left out (all, when dense)."""
    idle = max(0, arch.n_experts - arch.experts_per_token)
    return total - idle * sum(mlp_parameters(arch, hidden) for hidden in arch.mlp_hidden)


def training_memory(
    arch: TransformerArch,
    n_params: int,
    *,
    batch: int,
    precision: str = "fp32",
    optimizer: str = "adamw",
    momentum: float = 0.9,
    sharding: str = "none",
    devices: int = 1,
    activation_checkpointing: bool = False,
    fsdp_param_bytes: int = 4,
    runtime: int = 0,
    adapter: int | None = None,
    fused_dropout: bool = True,
    frozen_bytes: int = 4,
    per_example: int = 0,
) -> dict[str, int]:
    """Peak bytes on one device for a training step with `batch` sequences on that device.

    Sharded state (ZeRO-3 accounting, Rajbhandari et al. 2019; here FSDP2) divides weights, gradients
    and optimizer state by `devices` and adds the two blocks FSDP holds unsharded at once (the current
    and the prefetched one). DDP keeps everything whole plus its gradient buckets (a second copy of the
    gradients, PyTorch's default). Gradients and activations are not held at once: gradients appear
    during backward as activations are freed, so the step's peak takes the larger of the two.
    fused_dropout False: attention with dropout keeps its scores (CPU; see UNFUSED_SCORE_BYTES).
    frozen_bytes: bytes per frozen base weight with an adapter (2: LoRA under bf16 autocast keeps a bf16
    checkpoint's matrices as they are, and autocast then has nothing to copy).
    per_example: rows whose gradients are kept one by one (train.privacy: Opacus's per-example gradients of
    the trainable parameters, for the largest Poisson batch the step is likely to draw).
    """
    shards = devices if sharding == "fsdp" else 1
    weights = 4 * n_params // shards
    if precision == "bf16" and sharding != "fsdp":
        weights += 2 * n_params  # autocast's bf16 copies of the weights, kept for backward
    if sharding == "fsdp":
        assert isinstance(arch, DecoderArch)  # FSDP trains decoders only (families.py: distributed)
        weights += 2 * block_parameters(arch) * fsdp_param_bytes  # gathered blocks
    gradients = 4 * n_params // shards + (4 * n_params if sharding == "ddp" and devices > 1 else 0)
    states = OPTIMIZER_STATES[optimizer] if optimizer != "sgd" or momentum > 0 else 0
    optimizer_bytes = 4 * states * n_params // shards
    activations = activation_memory(arch, batch, precision, activation_checkpointing, fused_dropout)
    if adapter is not None:
        # LoRA (Hu et al. 2021): the n_params base weights are frozen; gradients and optimizer state exist
        # for the adapter's parameters only. Activations stay: backward still runs through every layer.
        if frozen_bytes != 4 and sharding != "fsdp":
            weights = frozen_bytes * n_params
        weights += 4 * adapter
        gradients = 4 * adapter * (2 if sharding == "ddp" and devices > 1 else 1)
        optimizer_bytes = 4 * states * adapter
    gradients += 4 * per_example * (adapter if adapter is not None else n_params // shards)
    memory = {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer_bytes,
        "activations": activations,
        "runtime": runtime,
    }
    memory["total"] = weights + optimizer_bytes + max(gradients, activations) + runtime
    return memory


def poisson_ceiling(batch: int) -> int:
    """The largest batch a private run's Poisson sampling (mean `batch`) draws but about once in 30,000
    steps: the mean plus four standard deviations (at most sqrt(batch))."""
    return batch + math.ceil(4 * math.sqrt(batch))


def lora_parameters(arch: TransformerArch, targets: tuple[str, ...], rank: int) -> int:
    """Adapter parameters: rank x (inputs + outputs) of every targeted projection (see bigmodel/lora.py)."""
    d, q, kv = arch.n_embd, arch.q_width, arch.kv_width
    total = 0
    for hidden in arch.mlp_hidden:
        shapes = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "up": (d, hidden), "down": (hidden, d)}
        if getattr(arch, "gated_mlp", False):  # (an encoder's MLP is GELU)
            shapes["gate"] = (d, hidden)
        if getattr(arch, "n_experts", 0):  # a mixture's experts get no adapters (bigmodel/lora.py)
            shapes = {name: shape for name, shape in shapes.items() if name not in ("gate", "up", "down")}
        total += sum(rank * sum(shapes[t]) for t in targets if t in shapes)
    return total


def activation_memory(
    arch: TransformerArch, batch: int, precision: str, checkpointing: bool, fused_dropout: bool = True
) -> int:
    """Bytes of activations kept for backward (see BLOCK_ACTIVATION_BYTES). With activation
    checkpointing (Chen et al. 2016) each block keeps only its fp32 input; during backward one block
    at a time is recomputed, and its activations and their gradients (about as large again, measured)
    are alive together. Logits: one per vocabulary entry and position for a language model (GPT's next
    token, an encoder's masked-LM head), none per position for the other heads."""
    tokens = batch * arch.block_size
    per_value = BLOCK_ACTIVATION_BYTES[precision] / GPT2_BLOCK_VALUES
    per_block = int(per_value * tokens * max(block_activation_values(arch)))
    softcapped = getattr(arch, "attention_softcap", None) is not None  # written out on every device (Gemma 2)
    if (arch.dropout > 0 and not fused_dropout) or softcapped:
        per_block += UNFUSED_SCORE_BYTES * batch * arch.n_head * arch.block_size**2
    if checkpointing:
        blocks = arch.n_layer * 4 * tokens * arch.n_embd + 2 * per_block
    else:
        blocks = arch.n_layer * per_block
    logits = arch.vocab_size if arch.task in ("lm", "mlm") else 0
    return blocks + OUTER_ACTIVATION_BYTES * tokens * arch.n_embd + LOGIT_BYTES * tokens * logits


def block_activation_values(arch: TransformerArch) -> list[int]:
    """Values per token each block saves for backward (17·n_embd for GPT-2's shape): the norms' and
    c_attn's inputs (3d: ln_1, c_attn, ln_2), q, k and v, the attention output and c_proj's input (2 q
    widths), the MLP's input (d), and inside the MLP GELU's input and c_proj's input (2 hidden), or for
    SwiGLU the gate and up outputs, silu's output and their product (4 hidden)."""
    d = arch.n_embd
    attention = arch.q_width + 2 * arch.kv_width + 2 * arch.q_width
    gated = getattr(arch, "gated_mlp", False)  # an encoder's MLP is GELU
    experts = max(1, getattr(arch, "n_experts", 0))  # every expert runs on every token (models/gpt.py)
    return [4 * d + attention + (4 if gated else 2) * hidden * experts for hidden in arch.mlp_hidden]


def inference_memory(
    arch: TransformerArch, n_params: int, *, batch: int, context: int, weight_bytes: float, cache_bytes: int = 4
) -> dict[str, int]:
    """Bytes to generate: the weights, and the KV cache (keys and values of every layer for every
    position of the context: 2·L·b·T·(n_kv_head·head_size) values; grouped-query attention stores
    n_kv_head heads, not n_head) plus one step's logits. An encoder keeps no cache; a masked-LM encoder's
    logits cover every position."""
    weights = int(weight_bytes * n_params)
    if isinstance(arch, EncoderArch):
        logits = batch * context * arch.vocab_size * 4 if arch.task == "mlm" else 0
        return {"weights": weights, "kv_cache": 0, "logits": logits, "total": weights + logits}
    kv_cache = 2 * arch.n_layer * batch * context * arch.kv_width * cache_bytes
    logits = batch * arch.vocab_size * 4
    return {"weights": weights, "kv_cache": kv_cache, "logits": logits, "total": weights + kv_cache + logits}


def disk_sizes(arch: TransformerArch, n_params: int, optimizer: str, momentum: float = 0.9) -> dict[str, int]:
    """Bytes on disk. Checkpoints: fp32 safetensors, the tied embedding once; the resumable one adds the
    optimizer state. ONNX: the exporter stores the tied embedding twice (for the lookup and, transposed,
    for the output matmul); int8 quantises the matmul weights to one byte and keeps the rest fp32 (the
    lookup tables: token, position and an encoder's token-type embeddings)."""
    states = OPTIMIZER_STATES[optimizer] if optimizer != "sgd" or momentum > 0 else 0
    embedding = arch.vocab_size * arch.n_embd
    if isinstance(arch, EncoderArch):
        positions = (arch.block_size + arch.type_vocab_size) * arch.n_embd
        tied = arch.task == "mlm"
    else:
        positions = arch.block_size * arch.n_embd if arch.position == "learned" else 0
        tied = arch.tie_embeddings
    head_copy = embedding if tied else 0  # untied: the head is a parameter already
    # blocks (their norms too: a rounding error) and the output head (the tied copy, or its own weights)
    matmul = n_params - positions - (0 if tied else embedding)
    return {
        "checkpoint": 4 * n_params,
        "training_state": 4 * n_params * (1 + states),
        "onnx_fp32": 4 * (n_params + head_copy),
        "onnx_int8": 4 * (embedding + positions) + matmul,
    }


def communication_per_step(
    sharding: str,
    devices: int,
    *,
    parameters: int,
    trainable: int,
    micro_batches: int,
    param_bytes: int = 4,
    reduce_bytes: int = 4,
    reshard_after_forward: bool = True,
) -> dict[str, float]:
    """Bytes each device sends (and as many it receives) per optimizer step, by collective, for ring
    algorithms (NCCL's; Patarasuk & Yuan 2009): an all-reduce of S bytes moves 2(n-1)/n x S, an all-gather
    or a reduce-scatter (n-1)/n x S. Gradients are synchronised once per step (bigmodel accumulates
    micro-batches locally).
    DDP all-reduces the trainable gradients (fp32: autocast leaves them in the weights' dtype). FSDP
    (ZeRO-3, Rajbhandari et al. 2019) all-gathers every parameter before each micro-batch's forward and, when
    it reshards after forward, again before its backward, then reduce-scatters the gradients: 1.5x DDP's
    traffic at one micro-batch and the same dtypes, the paper's figure (sec. 7)."""
    if devices <= 1 or sharding == "none":
        return {}
    share = (devices - 1) / devices
    if sharding == "ddp":
        return {"all_reduce": 2 * share * trainable * 4}
    gather = share * parameters * param_bytes * micro_batches
    return {
        "all_gather_forward": gather,
        "all_gather_backward": gather if reshard_after_forward else 0.0,
        "reduce_scatter": share * trainable * reduce_bytes,
    }
