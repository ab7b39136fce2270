"""Hugging Face model folders: config.json + model.safetensors (or a sharded index) + tokenizer.json.

The architecture is read from config.json's `model_type` (never from the folder's name): gpt2, llama,
mistral, qwen2, qwen3, phi3, gemma2, gemma3_text and the mixtures of experts mixtral, qwen3_moe and olmoe
(decoders) and bert (encoders: BertModel, BertForMaskedLM, BertForSequenceClassification folders). Weights are read from safetensors only; a folder with only `pytorch_model.bin`
(a pickle, which can run code when loaded) is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bigmodel.arch import DecoderArch, EncoderArch, RopeScaling
from bigmodel.errors import UserError
from bigmodel.pretrained import REFERENCE, Source, Target, decoder_targets
from bigmodel.weights import ShardedWeights

SUPPORTED = (
    *("gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"),
    *("mixtral", "qwen3_moe", "olmoe", "bert"),
)
MIXTURES = ("mixtral", "qwen3_moe", "olmoe")  # the mixture-of-experts types whose routing bigmodel computes
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")
FLOAT_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# A part of a fused file tensor, named "<file tensor>#<part>": Phi-3's gate_up_proj holds gate's rows, then up's.
PART = "#"
# Buffers some GPT-2 files carry beside the weights (the causal mask, rotary caches): not parameters.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", "embeddings.position_ids")


def describe(folder: Path) -> Source:
    config = _read_json(folder / "config.json", "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise UserError(
            f"{folder}/config.json: model_type {model_type!r} is not supported; bigmodel imports "
            f"{', '.join(SUPPORTED)} (read from config.json, whatever the folder is called)"
        )
    moe = [key for key in MOE_KEYS if config.get(key)]
    if moe and model_type not in MIXTURES:
        raise UserError(
            f"{folder}: a mixture-of-experts {model_type} ({moe[0]} = {config[moe[0]]}) cannot be imported: its "
            f"routing is not implemented; bigmodel computes the experts of {', '.join(MIXTURES)}"
        )
    notes = []
    if config.get("auto_map"):
        notes.append(
            f"config.json names custom code (auto_map); it was ignored: the architecture is bigmodel's own {model_type}"
        )
    arch_of, targets_of = KINDS[model_type]
    arch = arch_of(config, notes, folder)
    weights = ShardedWeights(_weight_files(folder))  # every header validated: a truncated shard is refused here
    shapes = {name: weights.entry(name).shape for name in weights.names()}
    dtypes = {name: weights.entry(name).dtype for name in weights.names()}
    targets = targets_of(arch, shapes, folder)
    kinds = sorted({dtypes[name.partition(PART)[0]] for name in targets}, key=str)
    bad = [kind for kind in kinds if kind not in FLOAT_DTYPES]
    if bad:
        raise UserError(
            f"{folder}: weights of dtype {str(bad[0]).removeprefix('torch.')} cannot be imported "
            "(float32, float16 or bfloat16 only)"
        )
    transposed = _gpt2_conv1d(targets) if model_type == "gpt2" else set()
    shapes = {name: tuple(reversed(shapes[name])) if name in transposed else shapes[name] for name in targets}
    tokenizer_json, special, template = _tokenizer(folder, config)
    return Source(
        path=folder,
        format="hf",
        model_type=model_type,
        arch=arch,
        tokenizer_json=tokenizer_json,
        special_tokens=special,
        chat_template=template,
        dtype="/".join(FLOAT_DTYPES[k] for k in kinds),
        shapes=shapes,
        targets=targets,
        fetch=lambda name: _fetch(weights, name, transposed),
        notes=notes,
        reference=("AutoModel", "last_hidden_state") if isinstance(arch, EncoderArch) else REFERENCE,
    )


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path.parent}: no {what}; a Hugging Face model folder needs config.json beside its weights")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def _optional_json(path: Path) -> dict[str, Any]:
    return _read_json(path, path.name) if path.is_file() else {}


# ------------------------------------------------------------------------------------ architecture


def sliding_windows(config: dict[str, Any], n_layer: int, origin: str) -> tuple[int | None, tuple[bool, ...] | None]:
    """The sliding window and which layers use it, as transformers reads config.json: `layer_types`
    ("sliding_attention" per local layer) where the config has it; otherwise Qwen2's use_sliding_window with
    max_window_layers (the layers from there on slide), or Mistral's window on every layer."""
    window = config.get("sliding_window")
    if window is None or config.get("use_sliding_window", True) is False:
        return None, None
    if not isinstance(window, int) or window <= 0:
        raise UserError(f"{origin}: sliding_window {window!r} must be a positive number of tokens")
    layer_types = config.get("layer_types")
    if layer_types is not None:
        unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
        if unknown or len(layer_types) != n_layer:
            raise UserError(
                f"{origin}: layer_types must name full_attention or sliding_attention for each of the "
                f"{n_layer} layers (got {unknown or len(layer_types)})"
            )
        local = tuple(kind == "sliding_attention" for kind in layer_types)
    elif "max_window_layers" in config and "use_sliding_window" in config:  # Qwen2 before layer_types
        local = tuple(layer >= int(config["max_window_layers"]) for layer in range(n_layer))
    else:
        local = (True,) * n_layer
    if not any(local):
        return None, None
    return window, None if all(local) else local


def _gpt2_arch(config: dict[str, Any], notes: list[str], folder: Path) -> DecoderArch:
    activation = config.get("activation_function", "gelu_new")
    mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(activation)
    refusals = {
        "activation_function": mlp is None,
        "scale_attn_by_inverse_layer_idx": bool(config.get("scale_attn_by_inverse_layer_idx")),
        "add_cross_attention": bool(config.get("add_cross_attention")),
        "scale_attn_weights": config.get("scale_attn_weights", True) is False,
    }
    for key, refused in refusals.items():
        if refused:
            raise UserError(
                f"{folder}/config.json: {key} = {config.get(key)!r} is not supported by bigmodel's "
                "GPT-2 (it would change what the model computes)"
            )
    n_embd = int(config["n_embd"])
    return DecoderArch(
        vocab_size=int(config["vocab_size"]),
        n_layer=int(config["n_layer"]),
        n_head=int(config["n_head"]),
        n_kv_head=int(config["n_head"]),
        head_size=n_embd // int(config["n_head"]),
        n_embd=n_embd,
        block_size=int(config.get("n_positions", 1024)),
        mlp_hidden=[int(config.get("n_inner") or 4 * n_embd)] * int(config["n_layer"]),
        bias=True,
        qkv_bias=True,
        position="learned",
        norm="layernorm",
        norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        mlp=mlp,
        tie_embeddings=bool(config.get("tie_word_embeddings", True)),
    )


def rope_settings(config: dict[str, Any], origin: str) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling, from transformers >= 5's `rope_parameters` or the older rope_theta/rope_scaling."""
    params = dict(config.get("rope_parameters") or {})
    if not params:
        params = {**(config.get("rope_scaling") or {}), "rope_theta": config.get("rope_theta", 10000.0)}
    kind = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise UserError(
            f"{origin}: rope scaling {kind!r} is not supported (bigmodel reproduces 'linear' and "
            "'llama3' exactly); the model would compute something else"
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, RopeScaling(kind=kind, **{k: params[k] for k in keys if k in params})


def rotary_dim(config: dict[str, Any], head_size: int, origin: str) -> int | None:
    """How many values of each head rope turns, from partial_rotary_factor (None: all of them)."""
    params = config.get("rope_parameters") or {}
    factor = float(params.get("partial_rotary_factor", config.get("partial_rotary_factor") or 1.0))
    if factor == 1.0:
        return None
    turned = int(head_size * factor)  # as transformers computes it
    if turned % 2 or turned <= 0:
        raise UserError(
            f"{origin}: partial_rotary_factor {factor} turns {turned} of each head's {head_size} values; rope "
            "needs an even number of them"
        )
    return turned


def _llama_arch(config: dict[str, Any], notes: list[str], folder: Path) -> DecoderArch:
    model_type = config["model_type"]
    origin = f"{folder}/config.json"
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"{origin}: hidden_act {config['hidden_act']!r} is not supported (SwiGLU uses silu)")
    if model_type in ("llama", "qwen3", "phi3", *MIXTURES) and (config.get("attention_bias") or config.get("mlp_bias")):
        raise UserError(f"{origin}: attention_bias/mlp_bias on a {model_type} model are not supported")
    if config.get("clip_qkv") is not None:
        raise UserError(f"{origin}: clip_qkv (queries, keys and values clamped) is not supported; the model needs it")
    shape = _shape(config)
    theta, scaling = rope_settings(config, origin)
    window, local = sliding_windows(config, shape["n_layer"], origin)
    experts, per_token, normalize, width = _experts(config, origin)
    return DecoderArch(
        **shape,
        n_experts=experts,
        experts_per_token=per_token,
        normalize_expert_weights=normalize,
        rotary_dim=rotary_dim(config, shape["head_size"], origin),
        mlp_hidden=[width] * shape["n_layer"],
        bias=False,
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type in ("qwen3", "qwen3_moe", "olmoe"),
        qk_norm_per_head=model_type != "olmoe",  # (OLMoE normalises all heads' queries, and keys, as one vector)
        sliding_window=window,
        local_layers=local,
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        norm="rmsnorm",
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        mlp="swiglu",
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def _shape(config: dict[str, Any]) -> dict[str, int]:
    """The sizes every llama-like config.json states alike."""
    n_embd, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])
    return {
        "vocab_size": int(config["vocab_size"]),
        "n_layer": int(config["num_hidden_layers"]),
        "n_head": n_head,
        "n_kv_head": int(config.get("num_key_value_heads") or n_head),
        "n_embd": n_embd,
        "head_size": int(config.get("head_dim") or n_embd // n_head),
        "block_size": int(config["max_position_embeddings"]),
    }


def _experts(config: dict[str, Any], origin: str) -> tuple[int, int, bool, int]:
    """A mixture's experts, experts per token, whether the picked scores are renormalised, and each expert's
    width (0, 0, True and intermediate_size for a dense model). Mixtral renormalises; Qwen3-MoE and OLMoE as
    their norm_topk_prob says, and every layer of a Qwen3-MoE must be a mixture (no dense layers between)."""
    model_type = config["model_type"]
    if model_type == "mixtral":
        return (
            int(config["num_local_experts"]),
            int(config["num_experts_per_tok"]),
            True,
            int(config["intermediate_size"]),
        )
    if model_type in ("qwen3_moe", "olmoe"):
        if model_type == "qwen3_moe" and (
            config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1
        ):
            raise UserError(
                f"{origin}: dense layers between the mixtures (mlp_only_layers, decoder_sparse_step) are not supported"
            )
        experts = int(config.get("num_experts") or config["num_local_experts"])  # (transformers >= 5 writes the latter)
        width = config["moe_intermediate_size" if model_type == "qwen3_moe" else "intermediate_size"]
        return experts, int(config["num_experts_per_tok"]), bool(config.get("norm_topk_prob", False)), int(width)
    return 0, 0, True, int(config["intermediate_size"])


def _gemma_arch(config: dict[str, Any], notes: list[str], folder: Path) -> DecoderArch:
    """Gemma 2 and Gemma 3 (text): llama's layout with a (1 + w) RMSNorm, sandwich norms, GeGLU, embeddings
    times sqrt(hidden), attention scaled by query_pre_attn_scalar, local (sliding) and global layers, and
    Gemma 2's soft-capped scores and logits / Gemma 3's QK-norm and local rotary base."""
    model_type = config["model_type"]
    origin = f"{folder}/config.json"
    activation = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if activation != "gelu_pytorch_tanh" or config.get("attention_bias"):
        raise UserError(
            f"{origin}: a {model_type} with hidden_activation {activation!r} or attention_bias is not supported "
            "(GeGLU with the tanh gelu, no biases)"
        )
    if config.get("use_bidirectional_attention"):
        raise UserError(
            f"{origin}: use_bidirectional_attention (an encoder) is not supported; bigmodel imports the causal LM"
        )
    shape = _shape(config)
    n_layer = shape["n_layer"]
    if config.get("layer_types") is None:  # configs from before layer_types: Gemma 2 alternates, Gemma 3 5:1
        pattern = int(config.get("sliding_window_pattern") or (2 if model_type == "gemma2" else 6))
        config = {
            **config,
            "layer_types": [
                "full_attention" if (layer + 1) % pattern == 0 else "sliding_attention" for layer in range(n_layer)
            ],
        }
    window, local = sliding_windows(config, n_layer, origin)
    theta, scaling, local_theta = _gemma_rope(config, origin)
    return DecoderArch(
        **shape,
        mlp_hidden=[int(config["intermediate_size"])] * n_layer,
        bias=False,
        qkv_bias=False,
        qk_norm=model_type == "gemma3_text",
        sliding_window=window,
        local_layers=local,
        local_rope_theta=local_theta if window is not None else None,
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        norm="rmsnorm_unit_offset",
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        mlp="geglu_tanh",
        tie_embeddings=bool(config.get("tie_word_embeddings", True)),
        embedding_scale=True,
        sandwich_norms=True,
        attention_scale=float(config.get("query_pre_attn_scalar") or shape["head_size"]) ** -0.5,
        attention_softcap=_positive(config.get("attn_logit_softcapping")),
        logit_softcap=_positive(config.get("final_logit_softcapping")),
    )


def _positive(value: Any) -> float | None:
    return float(value) if value else None


def _gemma_rope(config: dict[str, Any], origin: str) -> tuple[float, RopeScaling | None, float | None]:
    """The global layers' rotary base and scaling, and the local layers' base (Gemma 3's own; Gemma 2's
    local layers rotate as the global ones): from rope_parameters keyed by layer type (transformers >= 5)
    or rope_theta/rope_scaling/rope_local_base_freq."""
    params = config.get("rope_parameters") or {}
    if "full_attention" in params:
        theta, scaling = rope_settings({"rope_parameters": params["full_attention"]}, origin)
        local = params.get("sliding_attention", params["full_attention"])
        local_theta, local_scaling = rope_settings({"rope_parameters": local}, origin)
        if local_scaling is not None:
            raise UserError(f"{origin}: a rope scaling on the sliding layers is not supported (their base is plain)")
        return theta, scaling, local_theta
    theta, scaling = rope_settings(config, origin)
    return theta, scaling, _positive(config.get("rope_local_base_freq"))


# ------------------------------------------------------------------------------------------ weights


def weights(folder: Path) -> ShardedWeights:
    """The folder's weight files, read by name (headers validated)."""
    return ShardedWeights(_weight_files(folder))


def _weight_files(folder: Path) -> list[Path]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = _read_json(index, "model.safetensors.index.json").get("weight_map") or {}
        names = sorted(set(weight_map.values()))
        for name in names:  # shard names come from an untrusted file: plain names inside this folder only
            if Path(name).name != name or not name.endswith(".safetensors"):
                raise UserError(f"{index}: shard {name!r} is not a .safetensors file in the model folder")
            if not (folder / name).is_file():
                raise UserError(f"{index}: shard {name} is missing; download the whole model folder")
        return [folder / name for name in names]
    if any(folder.glob("pytorch_model*.bin")) or (folder / "model.pt").exists():
        raise UserError(
            f"{folder}: has only pickle weights (pytorch_model.bin), which can run code when loaded; "
            "bigmodel reads safetensors only: get the model's model.safetensors (most hub models "
            "have one), or convert it where you trust the file"
        )
    raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json found")


def _fetch(weights: ShardedWeights, name: str, transposed: set[str]) -> torch.Tensor:
    file_name, _, part = name.partition(PART)
    tensor = weights.read(file_name)
    if part:  # a fused tensor's half (gate_up_proj: gate's rows first)
        tensor = tensor.chunk(2, dim=0)[FUSED_PARTS.index(part)]
    return tensor.t() if name in transposed else tensor


def _unplaced(shapes: dict[str, tuple[int, ...]], placed: dict[str, Target], folder: Path) -> None:
    extra = [n for n in shapes if n not in placed and not n.endswith(IGNORED_SUFFIXES)]
    if extra:
        raise UserError(
            f"{folder}: tensors {', '.join(sorted(extra)[:4])} have no place in the architecture "
            "config.json describes; the weights and the config disagree"
        )


def _gpt2_targets(arch: DecoderArch, shapes: dict[str, tuple[int, ...]], folder: Path) -> dict[str, Target]:
    """GPT-2 uses bigmodel's own names (nanoGPT copied them), with or without the 'transformer.' prefix."""
    targets: dict[str, Target] = {}
    for name in shapes:
        if name.endswith(IGNORED_SUFFIXES):
            continue
        ours = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        if ours == "lm_head.weight" and arch.tie_embeddings:
            continue  # the tied head is the token embedding
        targets[name] = (ours, 0)
    _unplaced(shapes, targets, folder)
    return targets


def _gpt2_conv1d(targets: dict[str, Target]) -> set[str]:
    """GPT-2's Conv1D layers store weights as (in, out): transposed to Linear's (out, in) on the way in."""
    conv = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
    return {name for name, (ours, _) in targets.items() if ours.endswith(conv)}


LLAMA_LAYER = {
    "input_layernorm.weight": "ln_1.weight",
    "post_attention_layernorm.weight": "ln_2.weight",
    "self_attn.o_proj.weight": "attn.c_proj.weight",
    "mlp.gate_proj.weight": "mlp.c_gate.weight",
    "mlp.up_proj.weight": "mlp.c_fc.weight",
    "mlp.down_proj.weight": "mlp.c_proj.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",  # QK-norm (qwen3)
    "self_attn.k_norm.weight": "attn.k_norm.weight",
}


LLAMA_QKV = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}


def _llama_targets(arch: DecoderArch, shapes: dict[str, tuple[int, ...]], folder: Path) -> dict[str, Target]:
    return _layered_targets(arch, shapes, folder, LLAMA_LAYER, LLAMA_QKV)


def _layered_targets(
    arch: DecoderArch, shapes: dict[str, tuple[int, ...]], folder: Path, layer: dict[str, str], qkv: dict[str, str]
) -> dict[str, Target]:
    """Llama's top-level names (embed_tokens, norm, lm_head) and `model.layers.N.` tensors placed by `layer`
    and `qkv` (see decoder_targets); every file tensor must find a place."""
    top = {"model.embed_tokens.weight": "transformer.wte.weight", "model.norm.weight": "transformer.ln_f.weight"}
    if arch.tie_embeddings:
        shapes.pop("lm_head.weight", None)  # some files store the tied head too: it is the embedding
    else:
        top["lm_head.weight"] = "lm_head.weight"
    targets = decoder_targets(arch, list(shapes), top, "model.layers.", layer, qkv)
    _unplaced(shapes, targets, folder)
    return targets


GEMMA_LAYER = {
    **LLAMA_LAYER,
    "post_attention_layernorm.weight": "attn_out_norm.weight",  # (llama's post-attention norm is our ln_2)
    "pre_feedforward_layernorm.weight": "ln_2.weight",
    "post_feedforward_layernorm.weight": "mlp_out_norm.weight",
}


def _gemma_targets(arch: DecoderArch, shapes: dict[str, tuple[int, ...]], folder: Path) -> dict[str, Target]:
    return _layered_targets(arch, shapes, folder, GEMMA_LAYER, LLAMA_QKV)


# Where a mixture's router and experts are in each type's files: (module, gate, up, down) under a layer.
EXPERT_FILES = {
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "olmoe": ("mlp", "gate_proj", "up_proj", "down_proj"),
}


def mixture_layer(n_experts: int, layout: tuple[str, str, str, str]) -> dict[str, str]:
    """A mixture layer's file names (under `model.layers.N.`) -> bigmodel's: llama's attention and norms, the
    router `<module>.gate` and the experts `<module>.experts.E.<gate|up|down>`."""
    module, gate, up, down = layout
    layer = {name: ours for name, ours in LLAMA_LAYER.items() if not name.startswith("mlp.")}
    layer[f"{module}.gate.weight"] = "mlp.router.weight"
    for e in range(n_experts):
        for theirs, ours in ((gate, "c_gate"), (up, "c_fc"), (down, "c_proj")):
            layer[f"{module}.experts.{e}.{theirs}.weight"] = f"mlp.experts.{e}.{ours}.weight"
    return layer


def _mixture_targets(arch: DecoderArch, shapes: dict[str, tuple[int, ...]], folder: Path) -> dict[str, Target]:
    """Llama's layout with each layer's MLP a router and experts (mixture_layer)."""
    # the layout whose router the files hold (config.json was read by describe: not read again)
    layout = next(
        (layout for layout in EXPERT_FILES.values() if f"model.layers.0.{layout[0]}.gate.weight" in shapes),
        EXPERT_FILES["mixtral"],  # (none: _unplaced names the missing router)
    )
    return _layered_targets(arch, shapes, folder, mixture_layer(arch.n_experts, layout), LLAMA_QKV)


FUSED_PARTS = ("gate", "up")
PHI3_LAYER = {
    **LLAMA_LAYER,
    "self_attn.qkv_proj.weight": "attn.c_attn.weight",  # q, k and v rows, in our c_attn's order
    f"mlp.gate_up_proj.weight{PART}gate": "mlp.c_gate.weight",
    f"mlp.gate_up_proj.weight{PART}up": "mlp.c_fc.weight",
}


def _phi3_targets(arch: DecoderArch, shapes: dict[str, tuple[int, ...]], folder: Path) -> dict[str, Target]:
    """Phi-3: llama's layout with q/k/v in one qkv_proj (our c_attn as it is) and gate and up in one
    gate_up_proj, split here into its halves (so LoRA's targets and every later stage see gate and up)."""
    for name in [n for n in shapes if n.endswith("mlp.gate_up_proj.weight")]:
        rows, columns = shapes.pop(name)
        for part in FUSED_PARTS:
            shapes[f"{name}{PART}{part}"] = (rows // 2, columns)
    return _layered_targets(arch, shapes, folder, PHI3_LAYER, {})


def _bert_arch(config: dict[str, Any], notes: list[str], folder: Path) -> EncoderArch:
    """A BERT encoder; its task head is chosen by the run (the data), not by the folder."""
    origin = f"{folder}/config.json"
    refusals = {
        "hidden_act": config.get("hidden_act", "gelu") != "gelu",
        "position_embedding_type": config.get("position_embedding_type", "absolute") != "absolute",
        "is_decoder": bool(config.get("is_decoder")),
        "add_cross_attention": bool(config.get("add_cross_attention")),
    }
    for key, refused in refusals.items():
        if refused:
            raise UserError(
                f"{origin}: {key} = {config.get(key)!r} is not supported by bigmodel's BERT (it "
                "would change what the model computes)"
            )
    n_layer, n_embd = int(config["num_hidden_layers"]), int(config["hidden_size"])
    pooling = "cls"
    pooling_file = folder / "1_Pooling" / "config.json"  # a sentence-transformers model says how it pools
    if pooling_file.is_file() and _read_json(pooling_file, "pooling config").get("pooling_mode_mean_tokens"):
        pooling = "mean"
        notes.append(
            "a classifier reads the mean of the token states (the folder's 1_Pooling/config.json: the "
            "model was trained to be read that way)"
        )
    return EncoderArch(
        task="embedding",
        vocab_size=int(config["vocab_size"]),
        n_layer=n_layer,
        pooling=pooling,
        n_head=int(config["num_attention_heads"]),
        n_embd=n_embd,
        block_size=int(config.get("max_position_embeddings", 512)),
        mlp_hidden=[int(config.get("intermediate_size") or 4 * n_embd)] * n_layer,
        type_vocab_size=int(config.get("type_vocab_size", 2)),
        dropout=float(config.get("hidden_dropout_prob", 0.1)),
        norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        pad_id=int(config.get("pad_token_id") or 0),
    )


BERT_TOP = {
    "embeddings.word_embeddings.weight": "embeddings.wte.weight",
    "embeddings.position_embeddings.weight": "embeddings.wpe.weight",
    "embeddings.token_type_embeddings.weight": "embeddings.wtt.weight",
    "embeddings.LayerNorm.weight": "embeddings.ln.weight",
    "embeddings.LayerNorm.bias": "embeddings.ln.bias",
    # the heads of BertForSequenceClassification / BertForMaskedLM: used when the run's task has them
    "pooler.dense.weight": "head.pooler.weight",
    "pooler.dense.bias": "head.pooler.bias",
    "classifier.weight": "head.out.weight",
    "classifier.bias": "head.out.bias",
    "cls.predictions.transform.dense.weight": "head.dense.weight",
    "cls.predictions.transform.dense.bias": "head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "head.ln.weight",
    "cls.predictions.transform.LayerNorm.bias": "head.ln.bias",
    "cls.predictions.bias": "head.decoder.bias",
}
BERT_LAYER = {
    "attention.output.dense": "attn.c_proj",
    "attention.output.LayerNorm": "ln_1",
    "intermediate.dense": "mlp.c_fc",
    "output.dense": "mlp.c_proj",
    "output.LayerNorm": "ln_2",
}
BERT_QKV = {"attention.self.query": 0, "attention.self.key": 1, "attention.self.value": 2}
# Stored copies of tied or derived tensors: the decoder of the MLM head is the word embedding.
BERT_SKIPPED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def _bert_targets(arch: EncoderArch, shapes: dict[str, tuple[int, ...]], folder: Path) -> dict[str, Target]:
    """Names with or without the `bert.` prefix of the task models; q, k and v fill the fused c_attn."""
    targets: dict[str, Target] = {}
    for name in list(shapes):
        bare = name.removeprefix("bert.")
        if bare in BERT_SKIPPED:
            shapes.pop(name)
        elif bare in BERT_TOP:
            targets[name] = (BERT_TOP[bare], 0)
        elif bare.startswith("encoder.layer."):
            index, _, rest = bare.removeprefix("encoder.layer.").partition(".")
            module, _, kind = rest.rpartition(".")
            if module in BERT_LAYER:
                targets[name] = (f"h.{index}.{BERT_LAYER[module]}.{kind}", 0)
            elif module in BERT_QKV:
                targets[name] = (f"h.{index}.attn.c_attn.{kind}", BERT_QKV[module] * arch.n_embd)
    _unplaced(shapes, targets, folder)
    return targets


# model_type -> (its architecture from config.json, where each of its weights goes); each pair takes its own
# architecture class, so the table types the architecture as Any.
ArchOf = Callable[[dict[str, Any], list[str], Path], DecoderArch | EncoderArch]
TargetsOf = Callable[[Any, dict[str, tuple[int, ...]], Path], dict[str, Target]]
KINDS: dict[str, tuple[ArchOf, TargetsOf]] = {
    "gpt2": (_gpt2_arch, _gpt2_targets),
    "llama": (_llama_arch, _llama_targets),
    "mistral": (_llama_arch, _llama_targets),
    "qwen2": (_llama_arch, _llama_targets),
    "qwen3": (_llama_arch, _llama_targets),
    "phi3": (_llama_arch, _phi3_targets),
    "gemma2": (_gemma_arch, _gemma_targets),
    "gemma3_text": (_gemma_arch, _gemma_targets),
    "mixtral": (_llama_arch, _mixture_targets),
    "qwen3_moe": (_llama_arch, _mixture_targets),
    "olmoe": (_llama_arch, _mixture_targets),
    "bert": (_bert_arch, _bert_targets),
}


# ---------------------------------------------------------------------------------------- tokenizer


def _tokenizer(folder: Path, config: dict[str, Any]) -> tuple[str, dict[str, Any], str | None]:
    """tokenizer.json (HF tokenizers), with special-token ids and the chat template from tokenizer_config.json."""
    from bigmodel import tokenizer as tokenizers

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(
            f"{folder}: no tokenizer.json; bigmodel needs the model's fast tokenizer file beside "
            "its weights (a folder saved by transformers has one)"
        )
    text = path.read_text(encoding="utf-8")
    tok = tokenizers.from_json(text, str(path))
    settings = _optional_json(folder / "tokenizer_config.json")
    generation = _optional_json(folder / "generation_config.json")

    def token_id(key: str) -> int | None:
        value = settings.get(key)
        if isinstance(value, dict):  # {"content": "<s>", ...}
            value = value.get("content")
        return tok.token_to_id(value) if isinstance(value, str) else None  # type: ignore[attr-defined]

    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not eos_ids and token_id("eos_token") is not None:
        eos_ids = [token_id("eos_token")]
    bos = config.get("bos_token_id")
    special = {
        "bos": bos if isinstance(bos, int) else token_id("bos_token"),
        "eos": eos_ids,
        "pad": token_id("pad_token"),
    }
    template = settings.get("chat_template")
    if not isinstance(template, str):
        jinja = folder / "chat_template.jinja"
        template = jinja.read_text(encoding="utf-8") if jinja.is_file() else None
    return text, special, template
