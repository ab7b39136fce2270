"""Evaluate a GPT checkpoint: loss, perplexity, bits per token and per character, and samples.

The text (the val shard, or eval.text_file encoded with the model's own tokenizer) is cut into
consecutive windows of block_size + 1 tokens; every token after the first of its window is predicted
once. bits_per_char divides the total bits by the characters those predicted tokens decode to, so it
is comparable across tokenizers. A checkpoint runs in PyTorch, an .onnx model (fp32 or int8) in ONNX
Runtime; both feed the same scoring code, so compressed models are measured exactly like the original.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel import console, memory, registry
from bigmodel import tokenizer as tokenizers
from bigmodel.config import Config
from bigmodel.datasets import Examples, load_examples, load_tokens
from bigmodel.errors import UserError
from bigmodel.eval import check_gate
from bigmodel.io import require_file, sha256_file, write_json
from bigmodel.manifests import DecoderMetadata
from bigmodel.models.gpt import GPT
from bigmodel.runtime import setup_torch


def run(config: Config) -> dict[str, Any]:
    device = setup_torch(config)
    ec = config.eval
    path = registry.stage_checkpoint(config, ec.checkpoint, "eval")
    artifact = load_artifact(path, config, device)
    scores, source = score_artifact(artifact, config)
    samples: list[str] = []
    if ec.samples:
        if artifact.decoder is not None:
            samples = _onnx_samples(artifact.decoder, config)
        elif artifact.model is not None:
            samples = generate_samples(artifact.model, artifact.tokenizer, config, device)

    report = {
        "source": source,
        "checkpoint": str(path),
        "checkpoint_sha256": sha256_file(path),
        "step": artifact.step,
        "metrics": scores,
        "samples": samples,
    }
    out = config.eval_output()
    write_json(out, report)
    console.info(
        f"eval ({source}, {scores['tokens']:,} tokens{', ONNX' if artifact.decoder else ''}): loss "
        f"{scores['loss']:.4f}, perplexity {scores['perplexity']:.3f}, {scores['bits_per_char']:.4f} "
        f"bits/char, {scores['bits_per_byte']:.4f} bits/byte, {scores['bits_per_token']:.4f} bits/token"
    )
    for i, sample in enumerate(samples):
        console.info(f"--- sample {i + 1} ---\n{sample}")
    headline = {k: scores[k] for k in ("loss", "perplexity", "bits_per_char", "bits_per_byte", "bits_per_token")}
    outputs = {"metrics_file": str(out), "source": source, **headline, "samples": samples}
    return check_gate(scores, ec.fail_under, ec.fail_above, outputs)


LogitsFn = Callable[[np.ndarray], np.ndarray]  # token ids (B, T) -> logits (B, T, V)


@dataclass
class Artifact:
    """A language model to score, whatever it is stored as."""

    logits: LogitsFn
    block_size: int
    tokenizer: tokenizers.Tokenizer
    step: int | None = None  # training step (checkpoints only)
    model: GPT | None = None  # checkpoints: the PyTorch model
    decoder: Any = None  # .onnx models: the ONNX Runtime decoder


def scores_for(config: Config, path: Path) -> tuple[dict[str, Any], str, int | None]:
    """Metrics of a checkpoint or an .onnx model on val (or eval.text_file), without writing anything."""
    artifact = load_artifact(path, config, setup_torch(config))
    return score_artifact(artifact, config)[0], "lm", artifact.step


LOGITS_BUDGET = 1 << 30  # bytes of fp32 logits one scoring batch may hold


def scoring_rows(batch_size: int, width: int, vocab: int) -> int:
    """Windows per scoring batch: train.batch_size, fewer when their logits would pass LOGITS_BUDGET (a
    2048-token window of a 49,152-token vocabulary is 400 MB of logits; 64 of them would be 25 GB)."""
    return max(1, min(batch_size, LOGITS_BUDGET // (width * vocab * 4)))


def load_artifact(path: Path, config: Config, device: torch.device) -> Artifact:
    if path.suffix != ".onnx":
        registry.check_adapter_base(path, config.stage_dir("init") / "model.safetensors")
    memory.guard(eval_peak(path, config), config.memory_limit)
    if path.suffix == ".onnx":
        from bigmodel.infer.gpt import Decoder
        from bigmodel.infer.session import open_model

        session, meta = open_model(
            path, config.infer.providers, config.infer.threads or config.threads, DecoderMetadata
        )
        decoder = Decoder.from_session(session, meta, path)
        # An fp16 model's logits are scored in fp32, like every other artifact's.
        return Artifact(
            lambda ids: decoder.run(ids, decoder.empty_cache(len(ids)))[0].astype(np.float32, copy=False),
            decoder.block_size,
            decoder.tokenizer,
            decoder=decoder,
        )
    model, manifest = registry.load_model(path, merge=False)  # a LoRA checkpoint runs as base + adapter
    assert isinstance(model, GPT)  # (stage_checkpoint checked the family)
    model.to(device).eval()

    @torch.no_grad()
    def logits(ids: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(ids).to(device))[0].float().cpu().numpy()

    tok = tokenizers.from_json(manifest.data.tokenizer or "", f"{path} (tokenizer)")
    return Artifact(logits, model.block_size, tok, step=manifest.step, model=model)


def eval_peak(path: Path, config: Config) -> memory.Estimate:
    """What scoring `path` holds at its peak: the model (an ONNX file in ONNX Runtime, or a checkpoint
    loaded whole in fp32 beside its stored tensors) and one batch's logits with their log-softmax."""
    if path.suffix == ".onnx":
        from bigmodel.infer.session import file_metadata

        meta = file_metadata(path)
        block, vocab = (meta.block_size, meta.vocab_size) if isinstance(meta, DecoderMetadata) else (0, 0)
        runtime, model = memory.ORT_RUNTIME, int(memory.SESSION_OVER_FILE * memory.onnx_file_bytes(path))
    else:
        arch, parameters, stored = registry.checkpoint_size(path)
        block, vocab = getattr(arch, "block_size", 1), getattr(arch, "vocab_size", 0)
        runtime, model = memory.TORCH_RUNTIME, parameters * (4 + stored)
    logits = scoring_rows(config.train.batch_size, block, vocab or 1) * block * vocab * 4
    return memory.Estimate(
        "eval",
        {"runtime": runtime, "model": model, "logits and their log-softmax": 3 * logits},
        ["export.dtype int4 and eval that file (eval.checkpoint: the .onnx path)"],
    )


def score_artifact(artifact: Artifact, config: Config) -> tuple[dict[str, float], str]:
    """Scores on eval.text_file (encoded with the artifact's own tokenizer) or the val shard."""
    ec = config.eval
    if ec.text_file is not None:
        text = require_file(ec.text_file, "eval.text_file", "fix the path").read_text(encoding="utf-8")
        tokens, source = np.asarray(artifact.tokenizer.encode(text), dtype=np.int64), str(ec.text_file)
    elif config.data.format == "sft":  # fine-tuning examples: the loss on their trained tokens only
        examples = load_examples(config, "val")
        rows = scoring_rows(config.train.batch_size, artifact.block_size, artifact.tokenizer.vocab_size)
        return score_examples(artifact.logits, examples, artifact.tokenizer, rows), "val"
    else:
        tokens, source = np.asarray(load_tokens(config, "val"), dtype=np.int64), "val"
    rows = scoring_rows(config.train.batch_size, artifact.block_size, artifact.tokenizer.vocab_size)
    scores = score(artifact.logits, artifact.block_size, tokens, artifact.tokenizer, rows)
    return scores, source


def _onnx_samples(decoder: Any, config: Config) -> list[str]:
    from bigmodel.infer.gpt import complete

    ec = config.eval
    settings = config.derive(
        "eval samples",
        infer={
            "max_new_tokens": ec.max_new_tokens,
            "temperature": ec.temperature,
            "top_k": ec.top_k,
            "top_p": None,
            "stop": [],
        },
    ).infer
    return [
        ec.prompt + complete(decoder, ec.prompt, settings, config.seed + i)["completion"] for i in range(ec.samples)
    ]


def score(
    logits_fn: LogitsFn, block: int, tokens: np.ndarray, tok: tokenizers.Tokenizer, batch_size: int
) -> dict[str, float]:
    """Loss over consecutive windows; the same code for checkpoints and ONNX models."""
    if len(tokens) < 2:
        raise UserError(f"the text to evaluate has {len(tokens)} tokens; at least 2 are needed")
    n_windows = max(1, (len(tokens) - 1) // block)
    starts = [i * block for i in range(n_windows)]
    total_nats, squared_nats, predicted = 0.0, 0.0, 0
    predicted_ids: list[np.ndarray] = []
    for i in range(0, len(starts), batch_size):
        windows = [tokens[s : s + block + 1] for s in starts[i : i + batch_size]]
        width = min(len(w) for w in windows)
        batch = np.stack([w[:width] for w in windows])
        targets = batch[:, 1:]
        nats = _nats(logits_fn(batch[:, :-1]), targets)
        total_nats, squared_nats = total_nats + float(nats.sum()), squared_nats + float((nats**2).sum())
        predicted += targets.size
        predicted_ids.append(targets.reshape(-1))
    return _scores(total_nats, predicted, tok.decode(np.concatenate(predicted_ids).tolist()), squared_nats)


def score_examples(
    logits_fn: LogitsFn, examples: Examples, tok: tokenizers.Tokenizer, batch_size: int
) -> dict[str, float]:
    """Loss over every val example's trained tokens (the completions), each example padded in its batch."""
    from bigmodel.scoring import IGNORE, pad

    total_nats, squared_nats, predicted_ids, predicted = 0.0, 0.0, [], 0
    for first in range(0, len(examples), batch_size):
        x, y = pad([examples.example(i) for i in range(first, min(first + batch_size, len(examples)))], 0)
        targets = y.numpy()
        scored = targets != IGNORE
        nats = _nats(logits_fn(x.numpy()), np.where(scored, targets, 0)) * scored
        total_nats, squared_nats = total_nats + float(nats.sum()), squared_nats + float((nats**2).sum())
        predicted += int(scored.sum())
        predicted_ids.append(targets[scored])
    return _scores(total_nats, predicted, tok.decode(np.concatenate(predicted_ids).tolist()), squared_nats)


def _nats(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) per position, in float64 (a stable log-softmax)."""
    shifted = logits.astype(np.float64)
    shifted -= shifted.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=-1))
    return log_norm - np.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]


def _scores(total_nats: float, predicted: int, text: str, squared_nats: float) -> dict[str, float]:
    n_chars, n_bytes = len(text), len(text.encode("utf-8"))
    loss = total_nats / predicted
    return {
        "loss": loss,
        # the standard error of the mean token loss, tokens taken as independent: a lower bound on the real
        # uncertainty (neighbouring tokens are correlated), enough to say when a difference means nothing
        "loss_stderr": math.sqrt(max(0.0, squared_nats / predicted - loss**2) / predicted),
        "perplexity": math.exp(loss),
        "bits_per_token": loss / math.log(2),
        "bits_per_char": total_nats / math.log(2) / max(n_chars, 1),
        # per UTF-8 byte: comparable across tokenizers and languages (as in the Pile and GPT-NeoX reports)
        "bits_per_byte": total_nats / math.log(2) / max(n_bytes, 1),
        "tokens": predicted,
        "characters": n_chars,
        "bytes": n_bytes,
    }


def generate_samples(model: GPT, tok: tokenizers.Tokenizer, config: Config, device: torch.device) -> list[str]:
    ec = config.eval
    prompt_ids = tok.encode(ec.prompt)
    if not prompt_ids:
        raise UserError("eval.prompt encodes to no tokens; give a non-empty prompt")
    generator = torch.Generator(device=device).manual_seed(config.seed)
    idx = torch.tensor([prompt_ids] * ec.samples, dtype=torch.long, device=device)
    out = model.generate(idx, ec.max_new_tokens, temperature=ec.temperature, top_k=ec.top_k, generator=generator)
    return [tok.decode(row.tolist()) for row in out]
