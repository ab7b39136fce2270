"""export.format genai: the ONNX export as a folder onnxruntime-genai's runtime loads (`og.Model(folder)`).

onnxruntime-genai (og) drives a decoder graph by the names its genai_config.json gives: input_ids, an
attention_mask over past + new tokens, and the per-layer past/present caches. bigmodel's graph takes
exactly these (its caches named past_keys.%d / present_keys.%d, which the config names), so the folder
holds the export itself -- model.onnx and model.onnx.data cloned (a reflink where the filesystem has
them) -- beside genai_config.json (the architecture, special tokens, a greedy default search) and
tokenizer.json + tokenizer_config.json, which og's tokenizer reads as Hugging Face's does (with the chat
template). og pads a batch's shorter prompts on the right and masks its pad token wherever a prompt
holds it; the graph numbers each row's positions over its real tokens, so padding anywhere is skipped.
A GroupQueryAttention graph (metadata attention group_query) is run as the builder's are: og binds one
buffer per layer as past and present and the graph writes each step into it (past_present_share_buffer).

The gate is og itself: its tokenizer must encode held-out text to bigmodel's tokens, and its generator,
decoding greedily from held-out prompts, must see the logits bigmodel's runtime computes for the same
tokens (export.atol + rtol x max |logit|); then the folder is published as export/genai. og is a
verification extra (bigmodel[genai]), never needed to write the ONNX model or to serve it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel import console, memory
from bigmodel import parity as gate
from bigmodel import tokenizer as tokenizers
from bigmodel.config import Config
from bigmodel.datasets import load_tokens
from bigmodel.errors import GateFailed, UserError
from bigmodel.export.gpt import held_out_windows
from bigmodel.export.hf import publish_folder, write_tokenizer_files
from bigmodel.io import clone, write_json
from bigmodel.manifests import DecoderMetadata

FOLDER = "genai"
PROMPT_TOKENS = 16
NEW_TOKENS = 16


def export_folder(config: Config, model: Path, out_dir: Path) -> dict[str, Any]:
    """`model` (a gated decoder export) as out_dir/genai, published once onnxruntime-genai running it agrees."""
    from bigmodel.infer.session import file_metadata

    meta = file_metadata(model)
    if not isinstance(meta, DecoderMetadata):
        raise UserError(f"export.format 'genai' writes decoder language models; {model} is not one")
    check_ready(meta.tokenizer, str(model))
    import onnx

    inputs = [value.name for value in onnx.load(str(model), load_external_data=False).graph.input]
    if "attention_mask" not in inputs:  # (exported before December 2026: a left_padding count)
        raise UserError(f"{model} takes no attention_mask (an older export); export it again for onnxruntime-genai")
    og = _genai()
    memory.guard(
        memory.runtime_peak("export (genai)", meta.architecture, memory.onnx_file_bytes(model), 2, meta.block_size),
        config.memory_limit,
    )
    final = out_dir / FOLDER
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        folder = Path(work) / FOLDER
        folder.mkdir()
        write_folder(model, meta, folder)
        val = np.asarray(load_tokens(config, "val"), dtype=np.int64)
        report = check(og, folder, model, meta, val, config)
        write_json(out_dir / "genai_parity.json", {"model": str(model), "folder": str(final), **report})
        verdict = "ok" if report["passed"] else "FAILED"
        console.info(
            f"export: onnxruntime-genai {og.__version__} runs the folder: greedy decoding of {report['prompts']} "
            f"held-out prompts, max abs logit diff {report['max_abs_diff']:.3g} ({gate.allowed(report)}), "
            f"tokens {'equal' if report['tokens_equal'] else 'DIFFER'}; tokenizer "
            f"{'agrees' if report['tokenizer_agrees'] else 'DISAGREES'} -> {verdict}"
        )
        if not report["passed"]:
            raise GateFailed(
                f"export.format 'genai': onnxruntime-genai does not run the folder as bigmodel does "
                f"({out_dir / 'genai_parity.json'}); the folder was not published",
                {"genai": report},
            )
        publish_folder(folder, final)
    console.info(f"export: {final} (onnxruntime-genai: og.Model('{final}'))")
    return {"genai_folder": str(final), "genai_max_abs_diff": report["max_abs_diff"]}


def check_ready(tokenizer_json: str | None, where: str) -> None:
    """Refuse, before anything is exported, a model og could not read or a machine without og."""
    if not isinstance(tokenizers.from_json(tokenizer_json or "", f"{where} (tokenizer)"), tokenizers.BPETokenizer):
        raise UserError(
            "export.format 'genai': onnxruntime-genai reads Hugging Face tokenizers, and a character-level "
            "tokenizer has no such form; use a BPE tokenizer (data.tokenizer.kind: bpe) or an imported model's"
        )
    _genai()


def _genai() -> Any:
    try:
        import onnxruntime_genai
    except ImportError:
        raise UserError(
            "export.format 'genai' checks the folder with onnxruntime-genai's own runtime, which is not "
            "installed: pip install onnxruntime-genai (or bigmodel[genai])"
        ) from None
    return onnxruntime_genai


def write_folder(model: Path, meta: DecoderMetadata, folder: Path) -> None:
    """The export's graph and weights (cloned), genai_config.json and the tokenizer files."""
    for source in (model, model.with_name(f"{model.name}.data")):
        if source.exists():  # (a small model is one self-contained file)
            clone(source, folder / source.name)
    (folder / "genai_config.json").write_text(json.dumps(genai_config(meta), indent=2))
    write_tokenizer_files(folder, meta.tokenizer, meta.special_tokens, meta.chat_template, meta.block_size)


def genai_config(meta: DecoderMetadata) -> dict[str, Any]:
    """og's description of the model: the graph's names, the shape of its cache, special tokens, and a
    greedy search by default (a caller's search options override it)."""
    special = meta.special_tokens
    eos = list(special.get("eos") or [])
    pad = special.get("pad")
    model: dict[str, Any] = {
        "type": "decoder",
        "context_length": meta.block_size,
        "vocab_size": meta.vocab_size,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": pad if pad is not None else (eos[0] if eos else 0),
        "decoder": {
            "filename": "model.onnx",
            "session_options": {"log_id": "bigmodel", "provider_options": []},
            "head_size": meta.head_size,
            "hidden_size": meta.architecture.n_embd,
            "num_attention_heads": meta.n_head,
            "num_key_value_heads": meta.n_kv_head,
            "num_hidden_layers": meta.n_layer,
            "inputs": {
                "input_ids": "input_ids",
                "attention_mask": "attention_mask",
                "past_key_names": "past_keys.%d",
                "past_value_names": "past_values.%d",
            },
            "outputs": {
                "logits": "logits",
                "present_key_names": "present_keys.%d",
                "present_value_names": "present_values.%d",
            },
        },
    }
    if special.get("bos") is not None:
        model["bos_token_id"] = special["bos"]
    search = {
        "do_sample": False,
        "num_beams": 1,
        "max_length": meta.block_size,
        # A GroupQueryAttention graph writes the new keys and values into buffers of max_length positions
        # bound as both past and present; ONNX's Attention returns past + new as a new tensor.
        "past_present_share_buffer": meta.attention == "group_query",
    }
    return {"model": model, "search": search}


def check(og: Any, folder: Path, model: Path, meta: DecoderMetadata, val: np.ndarray, config: Config) -> dict[str, Any]:
    """og's tokenizer on held-out text and its greedy decoding of held-out prompts, against bigmodel."""
    from bigmodel.infer.gpt import Decoder
    from bigmodel.infer.session import open_model

    span = max(1, min(PROMPT_TOKENS, meta.block_size - NEW_TOKENS))
    prompts = held_out_windows(val, 2, span)
    pad = genai_config(meta)["model"]["pad_token_id"]
    prompts[prompts == pad] = (pad + 1) % meta.vocab_size  # og masks its pad token wherever a prompt has it
    steps = min(NEW_TOKENS, meta.block_size - span)
    ours_tokenizer = tokenizers.from_json(meta.tokenizer)
    text = ours_tokenizer.decode(val[: 4 * PROMPT_TOKENS].tolist())
    settings = og.Config(str(folder))
    if config.threads:  # (the folder itself leaves the thread count to og)
        settings.overlay(
            json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": config.threads}}}})
        )
    og_model = og.Model(settings)
    theirs_ids = [int(t) for t in og.Tokenizer(og_model).encode(text)]
    decoded = [_og_greedy(og, og_model, prompt, steps) for prompt in prompts]
    del og_model  # (one runtime holds the file at a time)
    session, _ = open_model(model, ["CPUExecutionProvider"], config.threads, DecoderMetadata)
    decoder = Decoder.from_session(session, meta, model)
    diffs, scale, equal = [], 0.0, True
    for prompt, (tokens, their_logits) in zip(prompts, decoded):
        ours = _teacher_forced(decoder, prompt, tokens)
        diffs.append(float(np.abs(ours - their_logits).max()))
        scale = max(scale, float(np.abs(ours).max()))
        equal = equal and [int(t) for t in ours.argmax(-1)] == tokens
    tokenizer_agrees = theirs_ids == ours_tokenizer.encode(text)
    atol = config.export.fp16_atol if meta.dtype == "fp16" else config.export.atol
    result = gate.verdict(max(diffs), scale, atol, config.export.rtol)
    return {
        "onnxruntime_genai": og.__version__,
        "prompts": len(prompts),
        "prompt_tokens": span,
        "new_tokens": [len(tokens) for tokens, _ in decoded],  # (each up to NEW_TOKENS, or to the end token)
        "max_abs_diff": max(diffs),
        "tokens_equal": equal,
        "tokenizer_agrees": tokenizer_agrees,
        **result,
        "passed": result["passed"] and equal and tokenizer_agrees,
    }


def _og_greedy(og: Any, model: Any, prompt: np.ndarray, steps: int) -> tuple[list[int], np.ndarray]:
    """og's greedy tokens after `prompt` (up to `steps`, or to the end-of-sequence token), and the last
    position's logits it chose each from (tokens, V)."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.reshape(1, -1).astype(np.int32))
    tokens: list[int] = []
    logits: list[np.ndarray] = []
    while len(tokens) < steps and not generator.is_done():  # (done at the end-of-sequence token)
        logits.append(np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1))
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens, np.stack(logits)


def _teacher_forced(decoder: Any, prompt: np.ndarray, tokens: list[int]) -> np.ndarray:
    """bigmodel's runtime on the same tokens, one at a time after the prompt: the logits each token was
    chosen from (steps, V)."""
    logits, cache = decoder.run(prompt.reshape(1, -1), decoder.empty_cache(1))
    found = [logits[0, -1]]
    for token in tokens[:-1]:
        logits, cache = decoder.run(np.array([[token]], dtype=np.int64), cache)
        found.append(logits[0, -1])
    return np.stack(found).astype(np.float32)
