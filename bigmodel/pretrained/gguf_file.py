"""GGUF files (llama.cpp's format) of llama, qwen2, qwen3, phi3, qwen3moe, gemma2 and gemma3 models, read with
the `gguf` package.

Quantised tensors are dequantised to float32 one at a time. llama.cpp's converter permutes the rows of a
llama's query and key projections (its RoPE pairs neighbouring dimensions, Hugging Face's rotate-half pairs
i with i + hs/2); the permutation is undone here, per head, with n_kv_head heads for the keys (qwen2 and
qwen3 files are written unpermuted: llama.cpp runs them in the rotate-half order). A phi3 file keeps
Phi-3's fused projections: attn_qkv is our c_attn as it is, and ffn_up (gate's rows, then up's) is split
into gate and up as the Hugging Face import splits gate_up_proj. A qwen3moe file stacks each layer's
experts in one tensor per projection (ffn_gate_exps, ffn_up_exps, ffn_down_exps: experts x rows x columns);
each expert's rows are read from their own byte range of it (whole quantisation blocks), and its router is
ffn_gate_inp. Gemma files store each norm's weight as 1 + w (subtracted here, as transformers does) and carry
the soft caps and window; what they leave out is read as llama.cpp reads it (_gemma_options). The
tokenizer is rebuilt from the vocabulary and merges the file carries (byte-level BPE, as transformers
does for `tokenizer.ggml.model == "gpt2"`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bigmodel.arch import DecoderArch, RopeScaling
from bigmodel.errors import UserError
from bigmodel.pretrained import Source, Target, decoder_targets
from bigmodel.pretrained.hf import FUSED_PARTS, PART

SUPPORTED = ("llama", "qwen2", "qwen3", "phi3", "qwen3moe", "gemma2", "gemma3")
GEMMA = ("gemma2", "gemma3")  # norms stored as 1 + w (llama.cpp's converter adds the 1), no q/k permutation
MIXTURES = ("qwen3moe",)  # mixture-of-experts architectures: experts stacked per layer, renormalised top-k
EXPERTS = {"ffn_gate_exps": "c_gate", "ffn_up_exps": "c_fc", "ffn_down_exps": "c_proj"}
FUSED_UP = ("phi3",)  # architectures whose ffn_up holds the gate's rows and then the up projection's
PERMUTED = ("llama",)  # architectures whose q/k rows llama.cpp's converter permutes
LAYER = {
    "attn_norm.weight": "ln_1.weight",
    "ffn_norm.weight": "ln_2.weight",
    "attn_output.weight": "attn.c_proj.weight",
    "ffn_gate.weight": "mlp.c_gate.weight",
    "ffn_up.weight": "mlp.c_fc.weight",
    "ffn_down.weight": "mlp.c_proj.weight",
    "attn_q_norm.weight": "attn.q_norm.weight",  # QK-norm (qwen3)
    "attn_k_norm.weight": "attn.k_norm.weight",
    "attn_qkv.weight": "attn.c_attn.weight",  # (phi3: q, k and v rows, in our order)
    "post_attention_norm.weight": "attn_out_norm.weight",  # (gemma's sandwich norms; its ffn_norm is ln_2)
    "post_ffw_norm.weight": "mlp_out_norm.weight",
    f"ffn_up.weight{PART}gate": "mlp.c_gate.weight",  # (phi3's fused ffn_up, split)
    f"ffn_up.weight{PART}up": "mlp.c_fc.weight",
}


def describe(path: Path) -> Source:
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise UserError("reading GGUF files needs the 'gguf' package: pip install gguf") from exc
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError and friends for files that are not GGUF
        raise UserError(f"{path}: not a readable GGUF file ({exc})") from exc
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.")}
    architecture = meta.get("general.architecture")
    if architecture not in SUPPORTED:
        raise UserError(
            f"{path}: GGUF architecture {architecture!r} is not supported; bigmodel imports "
            f"{', '.join(SUPPORTED)} GGUF files (and more types as Hugging Face folders: docs/pretrained.md)"
        )
    arch = _arch(meta, reader, path, architecture)
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise UserError(
            f"{path}: the file carries rope_freqs (Llama 3.1-style rope scaling baked into a tensor), "
            "which bigmodel does not import; use the model's Hugging Face folder"
        )
    if "rope_factors_long.weight" in tensors:
        raise UserError(
            f"{path}: the file carries rope_factors_long/short (Phi-3's longrope scaling), which bigmodel does not "
            "reproduce; the model would compute something else"
        )
    names = _names(tensors, architecture, arch.n_experts)
    targets = _targets(arch, names, path)
    shapes = {name: _shape(tensors, name) for name in targets}
    kinds = sorted({tensors[_file(name)].tensor_type.name for name in targets})
    for kind in {tensors[_file(name)].tensor_type for name in targets}:
        if not _dequantizable(kind):
            first = next(_file(name) for name in targets if tensors[_file(name)].tensor_type == kind)
            raise UserError(
                f"{path}: tensor {first} is of type {kind.name}, which the installed gguf package cannot "
                "dequantise; use a file of another quantisation (Q4_K, Q8_0, F16, ...) or the model's folder"
            )
    tokenizer_json, special, template = tokenizer_of(reader, path)
    return Source(
        path=path,
        format="gguf",
        model_type=architecture,
        arch=arch,
        tokenizer_json=tokenizer_json,
        special_tokens=special,
        chat_template=template,
        dtype="/".join(kinds),
        shapes=shapes,
        targets=targets,
        fetch=lambda name: _fetch(path, arch, tensors[_file(name)], architecture in PERMUTED, name),
        notes=[],
    )


def _names(tensors: dict[str, Any], architecture: str, experts: int) -> list[str]:
    """The file's tensors as the import places them: a fused ffn_up (phi3) as its two halves, a stacked
    experts tensor (qwen3moe) as its experts ("<name>#<expert>")."""
    names = []
    for name in tensors:
        if architecture in FUSED_UP and name.endswith(".ffn_up.weight"):
            names += [f"{name}{PART}{part}" for part in FUSED_PARTS]
        elif experts and name.endswith(tuple(f".{stacked}.weight" for stacked in EXPERTS)):
            names += [f"{name}{PART}{e}" for e in range(experts)]
        else:
            names.append(name)
    return names


def _file(name: str) -> str:
    """The file tensor a placed name reads (a fused tensor's half: the whole)."""
    return name.partition(PART)[0]


def _shape(tensors: dict[str, Any], name: str) -> tuple[int, ...]:
    """PyTorch's (out, in) shape of a placed tensor; a half of a fused one has half its rows, an expert of a
    stacked one is one of its (out, in) matrices."""
    dims = tuple(reversed([int(d) for d in tensors[_file(name)].shape]))
    part = name.partition(PART)[2]
    if part.isdigit():
        return dims[1:]
    return (dims[0] // 2, *dims[1:]) if part else dims


def _arch(meta: dict[str, Any], reader: Any, path: Path, architecture: str) -> DecoderArch:
    """The architecture from the file's `<architecture>.*` metadata (llama.cpp's keys)."""

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{architecture}.{name}", default)
        if value is None:
            raise UserError(f"{path}: GGUF metadata {architecture}.{name} is missing")
        return value

    experts = int(meta.get(f"{architecture}.expert_count") or 0)
    if experts and architecture not in MIXTURES:
        raise UserError(
            f"{path}: a mixture-of-experts {architecture} file ({architecture}.expert_count = {experts}) is not "
            f"read by bigmodel (GGUF mixtures: {', '.join(MIXTURES)}); import the model's Hugging Face folder "
            "(mixtral, qwen3_moe and olmoe folders are)"
        )
    scaling = None
    kind = meta.get(f"{architecture}.rope.scaling.type", "none")
    if kind == "linear":
        scaling = RopeScaling(kind="linear", factor=float(key("rope.scaling.factor")))
    elif kind not in ("none", None):
        raise UserError(f"{path}: rope scaling {kind!r} is not supported (bigmodel reproduces 'linear' and 'llama3')")
    n_embd, n_head, n_layer = int(key("embedding_length")), int(key("attention.head_count")), int(key("block_count"))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents() if "tokenizer.ggml.tokens" in reader.fields else []
    names = {t.name for t in reader.tensors}
    head_size = int(meta.get(f"{architecture}.attention.key_length") or n_embd // n_head)
    turned = int(meta.get(f"{architecture}.rope.dimension_count") or head_size)  # (partial rotary: fewer)
    if turned % 2 or not 0 < turned <= head_size:
        raise UserError(f"{path}: {architecture}.rope.dimension_count {turned} is not an even count up to {head_size}")
    width = int(key("expert_feed_forward_length") if experts else key("feed_forward_length"))
    gemma = _gemma_options(meta, architecture, n_layer, n_embd // n_head, head_size) if architecture in GEMMA else {}
    return DecoderArch(
        **gemma,
        n_experts=experts,
        experts_per_token=int(key("expert_used_count")) if experts else 0,
        normalize_expert_weights=True,  # (llama.cpp's qwen3moe renormalises the picked scores)
        rotary_dim=turned if turned < head_size else None,
        vocab_size=int(meta.get(f"{architecture}.vocab_size") or len(tokens)),
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=int(key("attention.head_count_kv", n_head)),
        n_embd=n_embd,
        head_size=head_size,
        block_size=int(key("context_length")),
        mlp_hidden=[width] * n_layer,
        bias=False,
        qkv_bias="blk.0.attn_q.bias" in names,  # (qwen2)
        qk_norm="blk.0.attn_q_norm.weight" in names,  # (qwen3)
        position="rope",
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
        **({} if gemma else {"norm": "rmsnorm", "mlp": "swiglu"}),
    )


# Where llama.cpp's Gemma runs attention at 1/sqrt(n_embd / n_head) instead of 1/sqrt(head_dim): the 27B
# models, which it recognises by their layer count (gemma_pytorch's query_pre_attn_scalar for them).
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# Every how many layers one is global (the rest slide), as llama.cpp reads a Gemma file without the key.
GEMMA_PATTERN = {"gemma2": 2, "gemma3": 6}


def _gemma_options(
    meta: dict[str, Any], architecture: str, n_layer: int, head_width: int, head_size: int
) -> dict[str, Any]:
    """The Gemma options of a gemma2/gemma3 file, as llama.cpp reads it: (1 + w) norms, sandwich norms, GeGLU,
    embeddings x sqrt(n_embd); the sliding window on all but every pattern-th layer (Gemma 2's default window
    4096; Gemma 3 slides only when the file says), Gemma 3's local rotary base (10000 unless stated); the
    soft caps the file states; attention at 1/sqrt(head_dim) (the 27B models: 1/sqrt(n_embd / n_head))."""
    window = int(meta.get(f"{architecture}.attention.sliding_window") or (4096 if architecture == "gemma2" else 0))
    pattern = meta.get(f"{architecture}.attention.sliding_window_pattern", GEMMA_PATTERN[architecture])
    if isinstance(pattern, list):  # (per layer, as newer files write it)
        local = tuple(bool(flag) for flag in pattern)
    else:
        local = tuple(layer % int(pattern) < int(pattern) - 1 for layer in range(n_layer))
    sliding = window > 0 and any(local)
    scalar = head_width if n_layer == GEMMA_27B_LAYERS[architecture] else head_size
    return {
        "norm": "rmsnorm_unit_offset",
        "mlp": "geglu_tanh",
        "embedding_scale": True,
        "sandwich_norms": True,
        "sliding_window": window if sliding else None,
        "local_layers": (None if all(local) else local) if sliding else None,
        "local_rope_theta": (
            float(meta.get("gemma3.rope.freq_base_swa", 10000.0)) if sliding and architecture == "gemma3" else None
        ),
        "attention_scale": float(scalar) ** -0.5,
        "attention_softcap": meta.get(f"{architecture}.attn_logit_softcapping") or None,
        "logit_softcap": meta.get(f"{architecture}.final_logit_softcapping") or None,
    }


def _targets(arch: DecoderArch, names: list[str], path: Path) -> dict[str, Target]:
    top = {
        "token_embd.weight": "transformer.wte.weight",
        "output_norm.weight": "transformer.ln_f.weight",
        "output.weight": "lm_head.weight",
    }
    qkv = {"attn_q": "q", "attn_k": "k", "attn_v": "v"}
    layer = dict(LAYER)
    if arch.n_experts:  # the router, and each expert of the stacked tensors
        layer["ffn_gate_inp.weight"] = "mlp.router.weight"
        for stacked, ours in EXPERTS.items():
            layer.update(
                {f"{stacked}.weight{PART}{e}": f"mlp.experts.{e}.{ours}.weight" for e in range(arch.n_experts)}
            )
    targets = decoder_targets(arch, names, top, "blk.", layer, qkv)
    extra = sorted(set(names) - set(targets))
    if extra:
        raise UserError(
            f"{path}: tensors {', '.join(extra[:4])} have no place in the decoder its metadata describes; this GGUF "
            "file is a variant bigmodel does not import"
        )
    return targets


def _dequantizable(kind: Any) -> bool:
    """Whether the `gguf` package dequantises tensors of this type (one block of zeros, tried)."""
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    block, size = GGML_QUANT_SIZES[kind]
    try:
        dequantize(np.zeros((1, size) if block > 1 else size, np.uint8), kind)
    except NotImplementedError:
        return False
    except Exception:  # another complaint about the probe itself: leave the type to the real read
        return True
    return True


def unpermute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, rows (0, 2, 4, ..., 1, 3, ...) back to (0, 1, 2, ...)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _fetch(path: Path, arch: DecoderArch, tensor: Any, permuted: bool, name: str) -> Any:
    """One tensor, dequantised to float32 in PyTorch's (out, in) layout (`name`: the placed name, a half of a
    fused tensor reads its rows). Its bytes are read from the file into a buffer of their own, not through
    the reader's memory map: mapped pages would stay resident."""
    import torch
    from gguf.quants import dequantize

    part = name.partition(PART)[2]
    size, offset = int(tensor.n_bytes), int(tensor.data_offset)
    stored = tuple(tensor.data.shape)  # the reader's view of the bytes (numpy order)
    dims = tuple(reversed([int(d) for d in tensor.shape]))  # GGUF lists dimensions fastest-first
    if part.isdigit():  # one expert of a stacked tensor: its own byte range (rows are whole blocks)
        size //= dims[0]
        offset += int(part) * size
        stored, dims = stored[1:], dims[1:]
    raw = np.empty(size, dtype=np.uint8)
    with open(path, "rb", buffering=0) as handle:
        handle.seek(offset)
        if handle.readinto(raw.data) != raw.size:
            raise UserError(f"{path} is truncated (tensor {tensor.name}); re-download it")
    data = raw.view(tensor.data.dtype).reshape(stored)
    weight = dequantize(data, tensor.tensor_type).reshape(dims)  # PyTorch's (out, in)
    if permuted and tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
        weight = unpermute(weight, arch.n_head)
    elif permuted and tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
        weight = unpermute(weight, arch.n_kv_head)
    if part in FUSED_PARTS:  # gate's rows first, then up's
        weight = np.split(weight, 2)[FUSED_PARTS.index(part)]
    if arch.norm == "rmsnorm_unit_offset" and tensor.name.endswith("norm.weight"):  # (Gemma's) stored as 1 + w
        weight = weight - 1
    return torch.from_numpy(np.require(weight, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))


# ---------------------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 byte values (byte-level BPE's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def tokenizer_of(reader: Any, path: Path) -> tuple[str, dict[str, Any], str | None]:
    """A byte-level BPE `tokenizers.Tokenizer` from the file's vocabulary and merges; control tokens
    (type 3) become special tokens. The same construction as transformers' GGUF converter."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    def field(name: str, default: Any = None) -> Any:
        return reader.fields[name].contents() if name in reader.fields else default

    if field("tokenizer.ggml.model") != "gpt2":
        raise UserError(
            f"{path}: tokenizer kind {field('tokenizer.ggml.model')!r} is not supported (byte-level BPE, 'gpt2', only)"
        )
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type") or []
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ")) for m in field("tokenizer.ggml.merges")]
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, kind in zip(tokens, types)
            if kind == 3 and set(t) <= alphabet
        ]
    )
    user = [AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types) if kind == 4]
    if user:
        tok.add_tokens(user)
    bos, eos = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
    add_bos = bool(field("tokenizer.ggml.add_bos_token", False)) and bos is not None
    single = ([f"{tokens[bos]}:0"] if add_bos else []) + ["$A:0"]
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=[*single, "$B:1"], special_tokens=[(tokens[bos], bos)] if add_bos else []
    )
    special = {"bos": bos, "eos": [eos] if eos is not None else [], "pad": field("tokenizer.ggml.padding_token_id")}
    return tok.to_str(), special, field("tokenizer.chat_template")
