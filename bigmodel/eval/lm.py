"""Evaluate a GPT checkpoint: loss, perplexity, bits per token and per character, and samples.

The text (the val shard, or eval.text_file encoded with the checkpoint's own tokenizer) is cut into
consecutive windows of block_size + 1 tokens; every token after the first of its window is predicted
once. bits_per_char divides the total bits by the characters those predicted tokens decode to, so it is
comparable across tokenizers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bigmodel import console, registry
from bigmodel import tokenizer as tokenizers
from bigmodel.config import Config
from bigmodel.datasets import load_tokens
from bigmodel.errors import UserError
from bigmodel.eval import check_gate
from bigmodel.io import require_file, sha256_file, write_json
from bigmodel.runtime import setup_torch


def run(config: Config) -> dict[str, Any]:
    device = setup_torch(config)
    ec = config.eval
    path = config.checkpoint_path(ec.checkpoint)
    model, manifest = registry.load_model(path)
    model.to(device).eval()
    tok = tokenizers.from_json(manifest["data"]["tokenizer"], f"{path} (tokenizer)")
    if ec.text_file is not None:
        text = require_file(ec.text_file, "eval.text_file", "fix the path").read_text(encoding="utf-8")
        tokens = np.asarray(tok.encode(text), dtype=np.int64)
        source = str(ec.text_file)
    else:
        tokens = np.asarray(load_tokens(config, "val"), dtype=np.int64)
        source = "val"
    scores = score(model, tokens, tok, batch_size=config.train.batch_size, device=device)
    samples = generate_samples(model, tok, config, device) if ec.samples else []

    report = {"source": source, "checkpoint": str(path), "checkpoint_sha256": sha256_file(path),
              "step": manifest.get("step"), "metrics": scores, "samples": samples}
    out = config.stage_dir("eval") / "metrics.json"
    write_json(out, report)
    console.info(
        f"eval ({source}, {scores['tokens']:,} tokens): loss {scores['loss']:.4f}, perplexity "
        f"{scores['perplexity']:.3f}, {scores['bits_per_char']:.4f} bits/char, "
        f"{scores['bits_per_token']:.4f} bits/token"
    )
    for i, sample in enumerate(samples):
        console.info(f"--- sample {i + 1} ---\n{sample}")
    check_gate(scores, ec.fail_under, ec.fail_above)
    headline = {k: scores[k] for k in ("loss", "perplexity", "bits_per_char", "bits_per_token")}
    return {"metrics_file": str(out), "source": source, **headline, "samples": samples}


@torch.no_grad()
def score(model: torch.nn.Module, tokens: np.ndarray, tok: tokenizers.Tokenizer, batch_size: int,
          device: torch.device) -> dict[str, float]:
    block = model.block_size
    if len(tokens) < 2:
        raise UserError(f"the text to evaluate has {len(tokens)} tokens; at least 2 are needed")
    span = block + 1
    n_windows = max(1, (len(tokens) - 1) // block)
    total_nats, predicted = 0.0, 0
    predicted_ids: list[np.ndarray] = []
    starts = [i * block for i in range(n_windows)]
    for i in range(0, len(starts), batch_size):
        windows = [tokens[s : s + span] for s in starts[i : i + batch_size]]
        width = min(len(w) for w in windows)
        batch = torch.from_numpy(np.stack([w[:width] for w in windows])).to(device)
        logits, _ = model(batch[:, :-1])
        nats = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum")
        total_nats += nats.item()
        predicted += batch[:, 1:].numel()
        predicted_ids.append(batch[:, 1:].reshape(-1).cpu().numpy())
    n_chars = len(tok.decode(np.concatenate(predicted_ids).tolist()))
    loss = total_nats / predicted
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_token": loss / math.log(2),
        "bits_per_char": total_nats / math.log(2) / max(n_chars, 1),
        "tokens": predicted,
        "characters": n_chars,
    }


def generate_samples(model: torch.nn.Module, tok: tokenizers.Tokenizer, config: Config,
                     device: torch.device) -> list[str]:
    ec = config.eval
    prompt_ids = tok.encode(ec.prompt)
    if not prompt_ids:
        raise UserError("eval.prompt encodes to no tokens; give a non-empty prompt")
    generator = torch.Generator(device=device).manual_seed(config.seed)
    idx = torch.tensor([prompt_ids] * ec.samples, dtype=torch.long, device=device)
    out = model.generate(idx, ec.max_new_tokens, temperature=ec.temperature, top_k=ec.top_k, generator=generator)
    return [tok.decode(row.tolist()) for row in out]
