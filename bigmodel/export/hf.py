"""export.format hf: a checkpoint -> a Hugging Face model folder that transformers loads as its own.

The decoder is written as the Hugging Face architecture that computes exactly the same function:
- learned positions + LayerNorm + GELU -> `gpt2` (biases the model does not have are written as zeros,
  which changes nothing; GPT-2's Conv1D layers store weights transposed);
- rotary positions + RMSNorm + SwiGLU -> `llama` (`mistral` with a window on every layer), `qwen2` when the
  q/k/v projection has a bias, `qwen3` with QK-norm;
- Gemma's norms, scales and caps -> `gemma2` or `gemma3_text`;
- a mixture of experts -> `mixtral` (renormalised scores), `qwen3_moe` (per-head QK-norm) or `olmoe`
  (QK-norm over all heads).
Anything else has no Hugging Face twin and is refused by name. The folder is published only when
transformers, loading it, gives bigmodel's logits on held-out text within export.atol (the round trip).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel import console, registry
from bigmodel import tokenizer as tokenizers
from bigmodel.arch import DecoderArch
from bigmodel.config import Config
from bigmodel.datasets import load_tokens
from bigmodel.errors import UserError
from bigmodel.export.gpt import held_out_windows
from bigmodel.io import write_json
from bigmodel.manifests import DataInfo
from bigmodel.models.gpt import GPT
from bigmodel.pretrained import build
from bigmodel.pretrained.hf import EXPERT_FILES, GEMMA_LAYER, LLAMA_LAYER, LLAMA_QKV, mixture_layer

FOLDER = "hf"
PEFT_FOLDER = "peft"
PEFT_BASE_FOLDER = "peft-base"  # the base as a Hugging Face folder, when it was not one
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def export_checkpoint(config: Config, ckpt: Path, out_dir: Path, name: str = FOLDER) -> dict[str, Any]:
    """`ckpt` as a Hugging Face folder out_dir/`name`, published once transformers loading it agrees."""
    from bigmodel import memory

    _, parameters, stored = registry.checkpoint_size(ckpt)
    memory.guard(
        memory.Estimate(
            "export (hf)",
            {
                "runtime": memory.TORCH_RUNTIME + memory.TRANSFORMERS_RUNTIME,
                # bigmodel's model in fp32 beside the checkpoint's tensors, then transformers' round trip in fp32
                "models": parameters * (4 + stored + 4),
            },
            ["export.format onnx (written tensor by tensor)"],
        ),
        config.memory_limit,
    )
    model, manifest = registry.load_model(ckpt)
    assert isinstance(model, GPT)  # (stage_checkpoint checked the family)
    model.eval()
    arch = manifest.architecture
    if not isinstance(arch, DecoderArch):
        raise UserError("export.format 'hf' writes decoder language models; this checkpoint is a tabular MLP")
    tok = tokenizers.from_json(manifest.data.tokenizer or "", f"{ckpt} (tokenizer)")
    if not isinstance(tok, tokenizers.BPETokenizer):
        raise UserError(
            "export.format 'hf': a character-level tokenizer has no Hugging Face form; use a BPE "
            "tokenizer (data.tokenizer.kind: bpe) or an imported model's"
        )
    model_type = hf_model_type(arch)
    tensors = _gpt2_tensors(model, arch) if model_type == "gpt2" else _llama_tensors(model, arch, model_type)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        folder = Path(work) / name
        _write_folder(folder, model_type, arch, tensors, manifest.data, imported_context(config))
        val = np.asarray(load_tokens(config, "val"), dtype=np.int64)
        ids = held_out_windows(val, batch=2, span=min(32, arch.block_size))
        parity = round_trip(model, folder, ids, config.export.atol, config.export.rtol)
        key = name.replace("-", "_")
        write_json(out_dir / f"{key}_parity.json", {"checkpoint": str(ckpt), "folder": str(final), **parity})
        build.enforce(
            parity,
            "export",
            f"transformers loads the {model_type} folder, held-out text",
            "the folder was not published",
        )
        publish_folder(folder, final)
    console.info(f"export: {final} ({model_type}, {sum(t.numel() for t in tensors.values()):,} values)")
    return {f"{key}_folder": str(final), "hf_model_type": model_type, f"{key}_max_abs_diff": parity["max_abs_diff"]}


def imported_context(config: Config) -> int | None:
    """The imported model's own context (its max_position_embeddings), which a Hugging Face folder keeps:
    model.block_size is the length this run trained and serves at, not a limit of a rotary model."""
    from bigmodel import pretrained
    from bigmodel.checkpoint import read_manifest

    init = config.stage_dir("init") / "model.safetensors"
    record = read_manifest(init).import_ if init.is_file() else None
    if record is not None and record.context:
        return record.context
    source = config.init.from_
    return pretrained.describe(source).arch.block_size if source is not None and Path(source).exists() else None


def export_peft(config: Config, ckpt: Path, out_dir: Path) -> dict[str, Any]:
    """A LoRA checkpoint's adapter as a PEFT folder (export/peft) for the Hugging Face twin of its base.
    peft loads the base named in adapter_config.json with transformers: an imported Hugging Face folder
    is named as it is when its modules have the names the adapter's do; any other base (a GGUF file, a model
    bigmodel initialised, a Phi-3 folder whose q/k/v and gate/up are fused) is written beside the adapter as
    a Hugging Face folder (export/peft-base, round-trip checked) and named instead."""
    from bigmodel import lora
    from bigmodel.checkpoint import read_manifest

    if read_manifest(ckpt).adapter is None:
        raise UserError(
            f"export.peft: {ckpt} is not a LoRA adapter checkpoint (train with train.lora); remove export.peft"
        )
    source = config.init.from_
    outputs: dict[str, Any] = {}
    model, manifest = registry.load_model(ckpt, merge=False)
    arch = manifest.architecture
    assert isinstance(arch, DecoderArch)
    source_type = _model_type(Path(source)) if source is not None else None
    if source is not None and source_type in PEFT_NAMED:
        base, model_type = str(Path(source).absolute()), source_type
    else:
        model_type = hf_model_type(arch)  # (refuses, by name, a model no written folder computes)
        outputs = export_checkpoint(config, config.stage_dir("init") / "model.safetensors", out_dir, PEFT_BASE_FOLDER)
        base = str((out_dir / PEFT_BASE_FOLDER).absolute())
    final = out_dir / PEFT_FOLDER
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as work:  # published whole, or not at all
        publish_folder(lora.peft_folder(model, model_type, Path(work) / PEFT_FOLDER, base), final)
    console.info(f"export: {final} (PEFT LoRA adapter for a {model_type} model; base {base})")
    return {**outputs, "peft_folder": str(final), "peft_base": base}


# Hugging Face model types whose modules PEFT finds under the adapter's names (q_proj, ..., gate_proj, ...).
PEFT_NAMED = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "mixtral", "qwen3_moe", "olmoe")


def _model_type(folder: Path) -> str | None:
    """A Hugging Face folder's model_type (None: not a folder with a config.json)."""
    if not (folder / "config.json").is_file():
        return None
    model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    return str(model_type) if model_type is not None else None


def publish_folder(folder: Path, final: Path) -> None:
    """Replace `final` by `folder` (written beside it, in a temporary folder of the same parent)."""
    if final.exists():
        shutil.rmtree(final)
    folder.rename(final)


HF_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}


def hf_model_type(arch: DecoderArch) -> str:
    uniform = len(set(arch.mlp_hidden)) == 1
    gpt2_like = (arch.position, arch.norm) == ("learned", "layernorm") and arch.mlp in ("gelu", "gelu_tanh")
    windows = set(arch.windows)  # {None}: global attention everywhere
    if (
        gpt2_like
        and arch.n_kv_head == arch.n_head
        and arch.q_width == arch.n_embd
        and uniform
        and not arch.qk_norm
        and windows == {None}
    ):
        return "gpt2"
    whole_heads = arch.rotary_dim is None  # (llama, qwen2, qwen3 and gemma turn every value of a head)
    gemma = _gemma_type(arch, uniform and whole_heads and not arch.n_experts and arch.qk_norm_per_head)
    if gemma is not None:
        return gemma
    llama_like = (
        not (arch.embedding_scale or arch.sandwich_norms or arch.attention_scale or arch.local_rope_theta)
        and not (arch.attention_softcap or arch.logit_softcap)
        and (arch.position, arch.norm, arch.mlp) == ("rope", "rmsnorm", "swiglu")
        and not arch.bias
        and uniform
        and whole_heads
    )
    if llama_like and arch.n_experts:
        mixture = _mixture_type(arch)
        if mixture is not None:
            return mixture
    elif llama_like and arch.qk_norm_per_head:
        if arch.qk_norm:  # qwen2 and qwen3 name each layer's attention (layer_types): any windows
            if not arch.qkv_bias:
                return "qwen3"
        elif arch.qkv_bias:
            return "qwen2"
        elif windows == {None}:
            return "llama"
        elif None not in windows:  # a window on every layer
            return "mistral"
    raise UserError(
        f"export.format 'hf': no Hugging Face architecture computes this model (position "
        f"{arch.position}, norm {arch.norm}, mlp {arch.mlp}, {arch.n_kv_head}/{arch.n_head} kv heads, "
        f"bias {arch.bias}, qk_norm {arch.qk_norm}, rotary_dim {arch.rotary_dim}, sliding windows "
        f"{arch.windows}, {arch.n_experts} experts); gpt2, llama, mistral (a window on every layer), qwen2, qwen3, "
        "gemma2, gemma3_text, mixtral, qwen3_moe and olmoe shapes can be written"
    )


def _mixture_type(arch: DecoderArch) -> str | None:
    """mixtral (no QK-norm, scores renormalised, a window on every layer or none), qwen3_moe (per-head
    QK-norm) or olmoe (QK-norm over all heads), both without windows; None: none of them."""
    windows = set(arch.windows)
    if arch.qkv_bias:
        return None
    if not arch.qk_norm:
        return "mixtral" if arch.normalize_expert_weights and (windows == {None} or None not in windows) else None
    if windows != {None}:
        return None
    return "qwen3_moe" if arch.qk_norm_per_head else "olmoe"


def _gemma_type(arch: DecoderArch, plain_layers: bool) -> str | None:
    """gemma2 (soft caps, one rotary base) or gemma3_text (QK-norm, no caps, a local base) when every one of
    Gemma's options is on and the rest is Gemma's."""
    gemma = (arch.position, arch.norm, arch.mlp) == ("rope", "rmsnorm_unit_offset", "geglu_tanh") and (
        arch.embedding_scale and arch.sandwich_norms and not arch.bias and not arch.qkv_bias and plain_layers
    )
    if not gemma:
        return None
    if not arch.qk_norm and arch.local_rope_theta is None:
        return "gemma2"
    if arch.qk_norm and not (arch.attention_softcap or arch.logit_softcap):
        return "gemma3_text"
    return None


def _hf_config(model_type: str, arch: DecoderArch, data: DataInfo, context: int | None = None) -> dict[str, Any]:
    """config.json; a rotary model keeps `context` (the imported model's) when it is longer than block_size
    (GPT-2's learned positions are a table of block_size rows: its n_positions is that)."""
    special = data.special_tokens or {}
    eos = special.get("eos") or []
    common = {
        "model_type": model_type,
        "vocab_size": arch.vocab_size,
        "tie_word_embeddings": arch.tie_embeddings,
        "bos_token_id": special.get("bos"),
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "torch_dtype": "float32",
    }
    if model_type == "gpt2":
        return {
            **common,
            "architectures": ["GPT2LMHeadModel"],
            "n_positions": arch.block_size,
            "n_embd": arch.n_embd,
            "n_layer": arch.n_layer,
            "n_head": arch.n_head,
            "n_inner": arch.mlp_hidden[0],
            "activation_function": "gelu_new" if arch.mlp == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": arch.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": arch.rope_theta}
    if arch.rope_scaling is not None:
        scaling = arch.rope_scaling.model_dump()
        rope = {**rope, "rope_type": scaling.pop("kind"), **scaling}
    if model_type.startswith("gemma"):
        return {**common, **_gemma_config(model_type, arch, rope, context)}
    return {
        **common,
        **_rotary_shape(model_type, arch, context),
        "hidden_act": "silu",
        "rope_parameters": rope,
        "rope_theta": arch.rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        **_sliding_window(model_type, arch),
        **_experts(model_type, arch),
        "attention_dropout": 0.0,
    }


def _experts(model_type: str, arch: DecoderArch) -> dict[str, Any]:
    """config.json's mixture keys (none for a dense model), as each type names them."""
    if not arch.n_experts:
        return {}
    picked = {"num_experts_per_tok": arch.experts_per_token, "output_router_logits": False}
    if model_type == "mixtral":  # (always renormalised)
        return {**picked, "num_local_experts": arch.n_experts}
    scores = {**picked, "num_experts": arch.n_experts, "norm_topk_prob": arch.normalize_expert_weights}
    if model_type == "qwen3_moe":  # every layer a mixture of experts moe_intermediate_size wide
        return {**scores, "moe_intermediate_size": arch.mlp_hidden[0], "decoder_sparse_step": 1, "mlp_only_layers": []}
    return {**scores, "clip_qkv": None}


def _rotary_shape(model_type: str, arch: DecoderArch, context: int | None) -> dict[str, Any]:
    """config.json's class and shape keys of a llama-like model (llama, mistral, qwen, gemma)."""
    return {
        "architectures": [HF_CLASSES[model_type]],
        "hidden_size": arch.n_embd,
        "intermediate_size": arch.mlp_hidden[0],
        "num_hidden_layers": arch.n_layer,
        "num_attention_heads": arch.n_head,
        "num_key_value_heads": arch.n_kv_head,
        "head_dim": arch.head_size,
        "max_position_embeddings": max(arch.block_size, context or 0),
        "rms_norm_eps": arch.norm_eps,
    }


def _gemma_config(model_type: str, arch: DecoderArch, rope: dict[str, Any], context: int | None) -> dict[str, Any]:
    kinds = ["sliding_attention" if arch.is_local(layer) else "full_attention" for layer in range(arch.n_layer)]
    if model_type == "gemma3_text":  # each kind of layer its own rotary parameters
        local = {"rope_type": "default", "rope_theta": arch.local_rope_theta or arch.rope_theta}
        rope = {"full_attention": rope, "sliding_attention": local}
    scalar = round((arch.attention_scale or arch.head_size**-0.5) ** -2, 6)  # scores scaled by scalar^-0.5
    if not scalar.is_integer():  # (transformers takes a whole number)
        raise UserError(
            f"export.format 'hf': attention scale {arch.attention_scale} is not 1/sqrt of a whole number, which "
            f"{model_type}'s query_pre_attn_scalar must be"
        )
    return {
        **_rotary_shape(model_type, arch, context),
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": rope,
        "query_pre_attn_scalar": int(scalar),
        "attn_logit_softcapping": arch.attention_softcap,
        "final_logit_softcapping": arch.logit_softcap,
        # (no window: one as long as the context)
        "sliding_window": arch.sliding_window or max(arch.block_size, context or 0),
        "layer_types": kinds,
        "attention_bias": False,
        "attention_dropout": 0.0,
    }


def _sliding_window(model_type: str, arch: DecoderArch) -> dict[str, Any]:
    """config.json's window keys: Mistral's window covers every layer; Qwen2/3 name each layer's kind."""
    window = next((w for w in arch.windows if w is not None), None)
    if model_type in ("mistral", "mixtral"):
        return {"sliding_window": window}
    if model_type == "olmoe":
        return {}
    if window is None:
        return {"use_sliding_window": False, "sliding_window": None}
    kinds = ["full_attention" if w is None else "sliding_attention" for w in arch.windows]
    return {"use_sliding_window": True, "sliding_window": window, "layer_types": kinds}


def _gpt2_tensors(model: GPT, arch: DecoderArch) -> dict[str, torch.Tensor]:
    """bigmodel's names are GPT-2's; missing biases become zeros, Linear weights become Conv1D's (in, out)."""
    state = {name: t.detach() for name, t in model.state_dict().items() if name not in model.tied_weights}
    tensors = {}
    for name, tensor in state.items():
        tensors[name] = tensor.t().contiguous() if name.endswith(GPT2_CONV1D) else tensor
    for i in range(arch.n_layer):  # the biases GPT-2 always has
        prefix = f"transformer.h.{i}."
        widths = {
            "ln_1": arch.n_embd,
            "ln_2": arch.n_embd,
            "attn.c_attn": arch.q_width + 2 * arch.kv_width,
            "attn.c_proj": arch.n_embd,
            "mlp.c_fc": arch.mlp_hidden[i],
            "mlp.c_proj": arch.n_embd,
        }
        for module, width in widths.items():
            tensors.setdefault(f"{prefix}{module}.bias", torch.zeros(width))
    tensors.setdefault("transformer.ln_f.bias", torch.zeros(arch.n_embd))
    return tensors


def _llama_tensors(model: GPT, arch: DecoderArch, model_type: str) -> dict[str, torch.Tensor]:
    state = {name: t.detach() for name, t in model.state_dict().items()}
    if arch.n_experts:
        layer = mixture_layer(arch.n_experts, EXPERT_FILES[model_type])
    else:
        layer = GEMMA_LAYER if arch.sandwich_norms else LLAMA_LAYER
    ours_to_hf = {ours: hf for hf, ours in layer.items()}
    widths = {"q": arch.q_width, "k": arch.kv_width, "v": arch.kv_width}
    tensors = {
        "model.embed_tokens.weight": state["transformer.wte.weight"],
        "model.norm.weight": state["transformer.ln_f.weight"],
    }
    if not arch.tie_embeddings:
        tensors["lm_head.weight"] = state["lm_head.weight"]
    for i in range(arch.n_layer):
        prefix, hf_prefix = f"transformer.h.{i}.", f"model.layers.{i}."
        for ours, hf in ours_to_hf.items():
            if prefix + ours in state:  # (q_norm and k_norm: QK-norm models only)
                tensors[hf_prefix + hf] = state[prefix + ours]
        for kind in ("weight", "bias") if arch.qkv_bias else ("weight",):
            q, k, v = state[f"{prefix}attn.c_attn.{kind}"].split(list(widths.values()))
            for module, part in LLAMA_QKV.items():
                tensors[f"{hf_prefix}{module}.{kind}"] = {"q": q, "k": k, "v": v}[part]
    return {name: t.contiguous() for name, t in tensors.items()}


def _write_folder(
    folder: Path,
    model_type: str,
    arch: DecoderArch,
    tensors: dict[str, torch.Tensor],
    data: DataInfo,
    context: int | None = None,
) -> None:
    from safetensors.torch import save_file

    folder.mkdir()
    save_file(
        {name: t.float() for name, t in tensors.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"}
    )
    (folder / "config.json").write_text(json.dumps(_hf_config(model_type, arch, data, context), indent=2))
    write_tokenizer_files(folder, data.tokenizer or "", data.special_tokens or {}, data.chat_template, arch.block_size)


def write_tokenizer_files(
    folder: Path, tokenizer_json: str, special: dict[str, Any], chat_template: str | None, max_length: int
) -> None:
    """tokenizer.json and tokenizer_config.json as Hugging Face's fast tokenizer (and onnxruntime-genai's,
    which reads the same two files) takes them: special tokens by their text, the chat template."""
    (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    tok = tokenizers.from_json(tokenizer_json)

    def text(token_id: Any) -> str | None:
        return tok.id_to_token(token_id) if isinstance(token_id, int) else None  # type: ignore[attr-defined]

    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "bos_token": text(special.get("bos")),
        "eos_token": text((special.get("eos") or [None])[0]),
        "pad_token": text(special.get("pad")),
        "chat_template": chat_template,
    }
    (folder / "tokenizer_config.json").write_text(
        json.dumps({k: v for k, v in settings.items() if v is not None}, indent=2)
    )


def round_trip(model: GPT, folder: Path, ids: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    """transformers loading `folder` against bigmodel's model, on the same token windows."""
    transformers, reference = build.load_transformers(folder)
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids)).logits.float().numpy()
        ours = model.reference_output(torch.from_numpy(ids)).float().numpy()
    return {
        **build.compare(ours, theirs, f"transformers {transformers.__version__}", atol, rtol),
        "windows": list(ids.shape),
    }
