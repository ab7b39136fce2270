"""export.format gguf: a checkpoint as a GGUF file for llama.cpp (and ollama, LM Studio, llama-cpp-python).

Written with the `gguf` package the way llama.cpp's converter (convert_hf_to_gguf.py) writes a Hugging
Face model: its architecture names (llama, qwen2, qwen3), its tensor names -- the same table bigmodel's GGUF
import reads (pretrained/gguf_file.py), inverted here, so the two cannot drift -- a llama's q/k rows
permuted for llama.cpp's RoPE layout (qwen2/qwen3 files are not), norms and biases in F32, and the
tokenizer as byte-level BPE vocabulary + merges + token types, special tokens and the chat template.
Matrices in `export.gguf.dtype`: f32, f16, bf16 or q8_0 (the gguf package's own quantiser; a matrix whose
rows are not whole blocks of 32 is written f16, as llama.cpp does).

The file is streamed: every tensor's size is known from the architecture, so the header is written first
and then each tensor, read from the checkpoint one at a time. The gate reads the written file back with
bigmodel's GGUF import (the reader init.from uses, itself held to transformers' GGUF loader) and requires
every tensor to equal the checkpoint's after the same rounding (f32: bit for bit) -- names, shapes,
permutation and tokenizer; llama.cpp running it is checked in the tests (llama-cpp-python).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel import console, memory, registry, streaming
from bigmodel import tokenizer as tokenizers
from bigmodel.arch import DecoderArch
from bigmodel.config import Config
from bigmodel.errors import GateFailed, UserError
from bigmodel.export.hf import hf_model_type
from bigmodel.io import atomic_path, write_json
from bigmodel.manifests import DataInfo
from bigmodel.pretrained import decoder_targets
from bigmodel.pretrained.gguf_file import LAYER, PART, PERMUTED
from bigmodel.weights import check_free_space

FILE = "model.gguf"
SAMPLE = "def add(a, b):\n    return a + b  # 1905: héllo, wörld! 你好 🙂\n\tThe quick brown fox."
# llama.cpp's K-quant mixes, made by its own quantizer (llama-cpp-python) from the f16 file
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # Hugging Face model type -> GGUF's
Q8_BLOCK = 32


def check_ready(arch: DecoderArch, tokenizer_json: str | None, where: str, dtype: str = "f16") -> str:
    """The GGUF architecture a checkpoint is written as; refused (before anything is exported) when
    llama.cpp has no mapping bigmodel writes, the tokenizer is not byte-level BPE, or a K-quant is asked
    for without llama.cpp's quantizer installed."""
    if dtype in K_QUANTS:
        _llama_cpp(dtype)
    try:
        model_type = hf_model_type(arch)
    except UserError:
        model_type = "none"
    if model_type not in ARCHITECTURES or any(arch.windows) or arch.n_experts:
        raise UserError(
            f"export.format 'gguf': {where} is a {model_type} model, which bigmodel does not write as GGUF yet "
            f"(it writes {', '.join(ARCHITECTURES)} without sliding windows or experts); use format onnx or hf"
        )
    if arch.rope_scaling is not None and arch.rope_scaling.kind != "linear":
        raise UserError(
            f"export.format 'gguf': rope scaling {arch.rope_scaling.kind!r} is written by llama.cpp as a "
            "rope_freqs tensor, which bigmodel does not write yet; use format onnx or hf"
        )
    if not isinstance(tokenizers.from_json(tokenizer_json or "", f"{where} (tokenizer)"), tokenizers.BPETokenizer):
        raise UserError(
            "export.format 'gguf': llama.cpp reads byte-level BPE tokenizers, and a character-level tokenizer has "
            "no such form; use a BPE tokenizer (data.tokenizer.kind: bpe) or an imported model's"
        )
    return ARCHITECTURES[model_type]


def export_checkpoint(config: Config, ckpt: Path, out_dir: Path, file: str = FILE) -> dict[str, Any]:
    """`ckpt` as out_dir/`file`, published once bigmodel's GGUF import reads it back as the checkpoint (an
    adapter checkpoint: merged into its base)."""
    weights, manifest = registry.open_weights(ckpt)
    arch = manifest.architecture
    assert isinstance(arch, DecoderArch)  # (config validation: format gguf is for decoders)
    dtype = config.export.gguf.dtype
    architecture = check_ready(arch, manifest.data.tokenizer, str(ckpt), dtype)
    plan = tensor_plan(arch, set(weights.names()))
    largest = memory.largest_matrix(arch)  # one tensor at a time: as stored, in fp32, encoded; read back alike
    memory.guard(
        memory.Estimate("export (gguf)", {"runtime": memory.TORCH_RUNTIME, "one tensor": largest * (4 + 4 + 4 + 4)}),
        config.memory_limit,
    )
    per_value = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 1.07, "q4_k_m": 2}[dtype]  # (q4_k_m: its f16 file first)
    parameters = sum(int(np.prod(shape)) for shape in parameter_shapes(arch).values())
    check_free_space(out_dir, int(1.1 * parameters * per_value), "export (gguf)")
    final = out_dir / file
    tokenizer_json = manifest.data.tokenizer or ""
    with atomic_path(final) as tmp:  # (renamed into place only once the gate passed)
        if dtype in K_QUANTS:
            with tempfile.TemporaryDirectory(dir=out_dir) as work:  # llama.cpp's quantizer reads a float file
                f16 = Path(work) / "model.f16.gguf"
                write(f16, arch, architecture, manifest.data, weights, plan, "f16")
                quantize_with_llama_cpp(f16, tmp, dtype)
            written = tmp.stat().st_size
        else:
            written = write(tmp, arch, architecture, manifest.data, weights, plan, dtype)
        report = check(tmp, weights, plan, architecture, arch, dtype, tokenizer_json)
        write_json(out_dir / "gguf_parity.json", {"checkpoint": str(ckpt), "file": str(final), **report})
        verdict = "ok" if report["passed"] else "FAILED"
        measure = (
            f"max abs difference {report['max_abs_diff']:.3g} after {dtype} rounding"
            if dtype not in K_QUANTS
            else f"worst relative RMS error {report['max_relative_rms_error']:.3f} (limit {report['limit']})"
        )
        console.info(
            f"export: GGUF ({architecture}, {dtype}) read back by bigmodel's GGUF import: {report['tensors']} "
            f"tensors, {measure}, tokenizer {'agrees' if report['tokenizer_agrees'] else 'DISAGREES'} -> {verdict}"
        )
        if not report["passed"]:
            raise GateFailed(
                f"export.format 'gguf': the written file does not read back as the checkpoint (tensor "
                f"{report['worst']}); it was not published",
                {"gguf": report},
            )
    if file == FILE:  # (the model users run; a LoRA's base is not)
        with atomic_path(out_dir / MODELFILE) as tmp:
            tmp.write_text(modelfile(config, arch, manifest.data, file), encoding="utf-8")
    console.info(f"export: {final} ({written:,} bytes; llama.cpp: llama-cli -m {final}; ollama: {MODELFILE})")
    return {"gguf_file": str(final), "gguf_dtype": dtype, "gguf_bytes": written}


MODELFILE = "Modelfile"
# ollama's ChatML template (Go text/template), written when the model's own template renders as ChatML
OLLAMA_CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)


def modelfile(config: Config, arch: DecoderArch, data: DataInfo, gguf_name: str) -> str:
    """An ollama Modelfile for the GGUF beside it (`ollama create NAME -f Modelfile`): FROM, the template --
    ollama's ChatML when the model's own chat template renders conversations exactly as ChatML does (with
    and without a system message), else none, and ollama reads the template the GGUF file carries -- a stop
    for each end-of-sequence token, the context length, and infer's sampling settings."""
    from bigmodel import chat

    lines = [f"# ollama create NAME -f {MODELFILE} (written by bigmodel export)", f"FROM ./{gguf_name}"]
    tok = tokenizers.from_json(data.tokenizer or "")
    special = data.special_tokens or {}
    texts = chat.token_texts(tok, special)
    conversations = [
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "2+2?"},
        ],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    ]
    if data.chat_template and all(
        chat.render(data.chat_template, c, texts) == chat.render(chat.CHATML, c, texts) for c in conversations
    ):
        lines.append(f'TEMPLATE """{OLLAMA_CHATML}"""')
    for token in special.get("eos") or []:
        lines.append(f"PARAMETER stop {json.dumps(tok.id_to_token(token))}")  # type: ignore[attr-defined]
    lines.append(f"PARAMETER num_ctx {arch.block_size}")
    settings = config.infer
    lines.append(f"PARAMETER temperature {settings.temperature}")
    if settings.top_k is not None:
        lines.append(f"PARAMETER top_k {settings.top_k}")
    if settings.top_p is not None:
        lines.append(f"PARAMETER top_p {settings.top_p}")
    return "\n".join(lines) + "\n"


# PEFT's Llama module names (lora.LLAMA_MODULES) -> llama.cpp's
ADAPTED = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
LORA_FILE, BASE_FILE = "lora.gguf", "base.gguf"


def export_lora(config: Config, ckpt: Path, out_dir: Path) -> dict[str, Any]:
    """A LoRA checkpoint as llama.cpp takes one: its base as out_dir/base.gguf (the base checkpoint,
    written and gated as any GGUF export) and the adapter as out_dir/lora.gguf (`llama-cli -m base.gguf
    --lora lora.gguf`), as llama.cpp's convert_lora_to_gguf writes PEFT adapters: lora_a (r x in) and
    lora_b (out x r) per adapted matrix in F32, a llama's q/k lora_b rows permuted like its weights, and
    adapter.lora.alpha (llama.cpp scales by alpha / r, as bigmodel does)."""
    import gguf

    from bigmodel import lora
    from bigmodel.checkpoint import read_manifest

    record = read_manifest(ckpt).adapter
    if record is None:
        raise UserError(
            f"export.peft: {ckpt} is not a LoRA adapter checkpoint (train with train.lora); remove export.peft"
        )
    model, manifest = registry.load_model(ckpt, merge=False)
    arch = manifest.architecture
    assert isinstance(arch, DecoderArch)
    architecture = check_ready(arch, manifest.data.tokenizer, str(ckpt))
    outputs = export_checkpoint(config, Path(record.base.path), out_dir, BASE_FILE)
    tensors, _ = lora.peft_tensors(model, "llama")  # (Llama-style modules: one per adapter, no per-module ranks)
    settings = lora.settings_of(record)
    with atomic_path(out_dir / LORA_FILE) as tmp:
        writer = gguf.GGUFWriter(str(tmp), architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(settings.alpha))
        count = 0
        for name, tensor in tensors.items():  # base_model.model.model.layers.{i}.{module}.lora_{A,B}.weight
            layer, _, rest = name.removeprefix("base_model.model.model.layers.").partition(".")
            module, _, kind = rest.removesuffix(".weight").rpartition(".")
            target = f"blk.{layer}.{ADAPTED[module]}.weight.{kind.lower()}"
            heads = permuted_heads(target, arch, architecture)
            value = tensor.float() if heads is None else permute(tensor.float(), heads)
            writer.add_tensor(target, value.contiguous().numpy())
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    console.info(
        f"export: {out_dir / LORA_FILE} ({count // 2} adapted matrices, rank {settings.rank}; base {BASE_FILE})"
    )
    return {**{f"base_{k}": v for k, v in outputs.items()}, "gguf_lora_file": str(out_dir / LORA_FILE)}


def quantize_with_llama_cpp(source: Path, target: Path, dtype: str) -> None:
    """llama.cpp's own quantizer (llama_model_quantize, through llama-cpp-python) from `source` to `target`."""
    import ctypes

    llama_cpp = _llama_cpp(dtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[dtype])
    params.nthread = max(1, torch.get_num_threads())
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise UserError(f"export.gguf.dtype {dtype}: llama.cpp's quantizer failed on {source}")


def _llama_cpp(dtype: str) -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            f"export.gguf.dtype {dtype} is made by llama.cpp's own quantizer, through llama-cpp-python, which is "
            "not installed: pip install llama-cpp-python (or choose f16, bf16, f32 or q8_0)"
        ) from None
    return llama_cpp


def parameter_shapes(arch: DecoderArch) -> dict[str, tuple[int, ...]]:
    """Each checkpoint tensor's shape ('model.<parameter>'; a tied head under both names), from the model
    built on the meta device."""
    from bigmodel.models.gpt import GPT

    with torch.device("meta"):
        return {f"model.{n}": tuple(t.shape) for n, t in GPT(arch).state_dict(keep_vars=True).items()}


def tensor_plan(arch: DecoderArch, stored: set[str]) -> dict[str, tuple[str, int, int]]:
    """GGUF tensor name -> (checkpoint name, first row, rows), in the order llama.cpp's converter writes
    them: the inverse of the import's table (a fused c_attn is written as attn_q, attn_k and attn_v)."""
    top = {
        "token_embd.weight": "transformer.wte.weight",
        "output_norm.weight": "transformer.ln_f.weight",
        "output.weight": "lm_head.weight",
    }
    layer = {gguf: ours for gguf, ours in LAYER.items() if PART not in gguf and gguf != "attn_qkv.weight"}
    names = [*top] + [
        f"blk.{i}.{rest}"
        for i in range(arch.n_layer)
        for rest in [*layer, *(f"attn_{p}.{kind}" for p in "qkv" for kind in ("weight", "bias"))]
    ]
    rows = {"attn_q": arch.q_width, "attn_k": arch.kv_width, "attn_v": arch.kv_width}
    plan = {}
    for name, (ours, first) in decoder_targets(
        arch, names, top, "blk.", layer, {f"attn_{p}": p for p in "qkv"}
    ).items():
        if f"model.{ours}" not in stored or (name == "output.weight" and arch.tie_embeddings):
            continue  # (a tied head: llama.cpp reads token_embd; absent norms, biases, QK-norms)
        module = name.split(".")[-2]
        plan[name] = (f"model.{ours}", first, rows.get(module, 0))
    return plan


def permuted_heads(name: str, arch: DecoderArch, architecture: str) -> int | None:
    """The heads whose rows llama.cpp permutes in GGUF tensor `name` (a llama's attn_q and attn_k, and
    their adapters' lora_b), None when it is written as it is."""
    parts = name.split(".")  # blk.N.<module>.weight[.lora_b]
    module = parts[2] if parts[0] == "blk" else ""
    if architecture not in PERMUTED or module not in ("attn_q", "attn_k") or parts[-1] == "lora_a":
        return None
    return arch.n_head if module == "attn_q" else arch.n_kv_head


def _tensor(
    weights: streaming.Readable, source: tuple[str, int, int], name: str, arch: DecoderArch, architecture: str
) -> torch.Tensor:
    """One GGUF tensor's values in fp32 (PyTorch's (out, in) layout), permuted where llama.cpp permutes."""
    ours, first, rows = source
    value = weights.read(ours)
    if rows:
        value = value[first : first + rows]
    value = value.float()
    heads = permuted_heads(name, arch, architecture)
    return (value if heads is None else permute(value, heads)).contiguous()


def permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order for its RoPE (neighbouring dimensions paired): per head, rows (0, 1, ...,
    hs-1) -> (0, hs/2, 1, hs/2+1, ...); bigmodel's import undoes it (pretrained/gguf_file.unpermute)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def encoded(value: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(the bytes as a uint8 array of shape (rows, bytes per row), their GGML type): 1-D tensors in F32."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if value.dim() == 1 or dtype == "f32":
        array, kind = value.numpy().astype(np.float32), Q.F32
    elif dtype == "bf16":
        array, kind = value.to(torch.bfloat16).view(torch.int16).numpy(), Q.BF16
    elif dtype == "q8_0" and value.shape[-1] % Q8_BLOCK == 0:
        return quantize(value.numpy(), Q.Q8_0), Q.Q8_0
    else:  # f16, and q8_0's matrices whose rows are not whole blocks
        array, kind = value.numpy().astype(np.float16), Q.F16
    return array.view(np.uint8).reshape(*array.shape[:-1], -1), kind


def write(
    path: Path,
    arch: DecoderArch,
    architecture: str,
    data: DataInfo,
    weights: streaming.Readable,
    plan: dict[str, tuple[str, int, int]],
    dtype: str,
) -> int:
    """The GGUF file: metadata, then every tensor's description, then each tensor read, converted, written."""
    import gguf

    shapes = parameter_shapes(arch)
    writer = gguf.GGUFWriter(str(path), architecture)
    _metadata(writer, arch, data)
    for name, (ours, _, rows) in plan.items():  # sizes first: the header lists every tensor before any data
        shape = (rows, *shapes[ours][1:]) if rows else shapes[ours]
        one_row, kind = encoded(torch.zeros((1, *shape[1:]) if len(shape) > 1 else (shape[0],)), dtype)
        byte_shape = (shape[0], one_row.shape[-1]) if len(shape) > 1 else one_row.shape
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, source in plan.items():
        array, _ = encoded(_tensor(weights, source, name, arch, architecture), dtype)
        writer.write_tensor_data(array)
    writer.close()
    return path.stat().st_size


def _metadata(writer: Any, arch: DecoderArch, data: DataInfo) -> None:
    writer.add_name("bigmodel export")
    writer.add_block_count(arch.n_layer)
    writer.add_context_length(arch.block_size)
    writer.add_embedding_length(arch.n_embd)
    writer.add_feed_forward_length(arch.mlp_hidden[0])
    writer.add_head_count(arch.n_head)
    writer.add_head_count_kv(arch.n_kv_head)
    writer.add_rope_freq_base(arch.rope_theta)
    writer.add_layer_norm_rms_eps(arch.norm_eps)
    writer.add_rope_dimension_count(arch.head_size)
    writer.add_key_length(arch.head_size)
    writer.add_value_length(arch.head_size)
    writer.add_vocab_size(arch.vocab_size)
    if arch.rope_scaling is not None:  # (linear only: check_ready)
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(arch.rope_scaling.factor)
    _tokenizer(writer, arch, data)


def _tokenizer(writer: Any, arch: DecoderArch, data: DataInfo) -> None:
    """Byte-level BPE as llama.cpp's converter writes it: every token in id order (the model's rows past the
    tokenizer's padded with unused tokens), its type (1 normal, 3 control, 4 user-defined, 5 unused), the
    merges, special token ids, whether a BOS is added, and the chat template."""
    spec = json.loads(data.tokenizer or "{}")
    vocab = dict(spec["model"]["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    vocab.update({content: t["id"] for content, t in added.items()})
    by_id = {i: token for token, i in vocab.items()}
    tokens, types = [], []
    for i in range(arch.vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"<unused{i}>")
            types.append(5)
        else:
            tokens.append(token)
            types.append((3 if added[token].get("special") else 4) if token in added else 1)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    special = data.special_tokens or {}
    if special.get("bos") is not None:
        writer.add_bos_token_id(special["bos"])
    eos = special.get("eos") or []
    if eos:
        writer.add_eos_token_id(eos[0])
    if special.get("pad") is not None:
        writer.add_pad_token_id(special["pad"])
    bos = special.get("bos")
    adds_bos = bos is not None and tokenizers.from_json(data.tokenizer or "").encode("a")[:1] == [bos]
    writer.add_add_bos_token(adds_bos)
    if data.chat_template:
        writer.add_chat_template(data.chat_template)


def check(
    path: Path,
    weights: streaming.Readable,
    plan: dict[str, tuple[str, int, int]],
    architecture: str,
    arch: DecoderArch,
    dtype: str,
    tokenizer_json: str,
) -> dict[str, Any]:
    """The written file read back by bigmodel's GGUF import: each tensor against the checkpoint rounded
    as written (f32, f16, bf16, q8_0: equal), or, for llama.cpp's K-quants (whose per-tensor types its
    quantizer picks), within MAX_ROUNDING relative RMS error of the checkpoint; and its tokenizer encoding a
    sample text as the checkpoint's does."""
    from gguf.quants import dequantize

    from bigmodel.export.gpt import MAX_ROUNDING
    from bigmodel.pretrained.gguf_file import describe

    source = describe(path)
    missing = sorted(set(plan) - set(source.targets))
    exact = dtype not in K_QUANTS
    worst, largest = "", 0.0
    for name, origin in plan.items():
        if name in missing:
            continue
        written = _tensor(weights, origin, name, arch, architecture)
        read = source.fetch(name)  # (the import undoes llama.cpp's permutation: compared as written)
        heads = permuted_heads(name, arch, architecture)
        read = (read if heads is None else permute(read, heads)).numpy()
        if exact:
            array, kind = encoded(written, dtype)
            target = dequantize(array, kind).reshape(written.shape)
            difference = float(np.abs(read - target).max()) if target.size else 0.0
        else:
            target = written.numpy()
            scale = float(np.sqrt(np.mean(target**2))) or 1.0
            difference = float(np.sqrt(np.mean((read - target) ** 2))) / scale
        if difference >= largest:
            worst, largest = name, difference
    theirs, ours = (tokenizers.from_json(text) for text in (source.tokenizer_json, tokenizer_json))
    agrees = theirs.encode(SAMPLE) == ours.encode(SAMPLE)
    within = largest == 0.0 if exact else largest <= MAX_ROUNDING
    return {
        "architecture": architecture,
        "dtype": dtype,
        "tensors": len(plan) - len(missing),
        "missing": missing,
        ("max_abs_diff" if exact else "max_relative_rms_error"): largest,
        **({} if exact else {"limit": MAX_ROUNDING}),
        "worst": worst,
        "tokenizer_agrees": agrees,
        "passed": not missing and within and agrees,
    }
