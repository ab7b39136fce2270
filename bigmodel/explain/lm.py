"""explain for a decoder LM: Captum's LLMAttribution, feature ablation over the prompt's tokens.

The model first continues each prompt greedily (explain.max_new_tokens, its own generate). Then each prompt
token in turn is replaced by a baseline token (explain.baseline_token, default the pad / end-of-text id) and
the change in the log-probability of the whole continuation, and of each generated token, is its
attribution: how much that prompt token drives what the model said. Captum drives a Hugging Face-style
model and tokenizer; the two small adapters below give bigmodel's GPT and tokenizer that face (logits
from one forward over prompt + continuation, as Captum's `forward` expects).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from bigmodel import registry
from bigmodel import tokenizer as tokenizers
from bigmodel.config import Config
from bigmodel.errors import UserError
from bigmodel.io import jsonl_objects
from bigmodel.models.gpt import GPT


class CausalLM(nn.Module):
    """bigmodel's GPT with the calling convention of a Hugging Face causal LM: forward(input_ids, ...) ->
    an object with .logits (B, T, V)."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        del attention_mask  # (one unpadded sequence at a time)
        return SimpleNamespace(logits=self.model(input_ids)[0])


class HFStyleTokenizer:
    """bigmodel's tokenizer with the methods Captum calls on a transformers tokenizer. Prompts are encoded
    as the model reads them (no special tokens added: a chat template, where wanted, is part of the prompt)."""

    def __init__(self, tok: tokenizers.Tokenizer) -> None:
        self.tok = tok

    def encode(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None) -> Any:
        ids = self.tok.encode(text)
        return torch.tensor([ids]) if return_tensors == "pt" else ids

    def decode(self, token_ids: Any) -> str:
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids
        return self.tok.decode([ids] if isinstance(ids, int) else ids)

    def convert_ids_to_tokens(self, token_ids: Any) -> Any:
        if isinstance(token_ids, int):
            return self.tok.decode([token_ids])
        return [self.tok.decode([i]) for i in token_ids]

    def convert_tokens_to_ids(self, tokens: Any) -> Any:
        if isinstance(tokens, str):
            return self._one_id(tokens)
        return [self._one_id(token) for token in tokens]

    def _one_id(self, token: str) -> int:
        ids = self.tok.encode(token)
        if len(ids) != 1:
            raise UserError(f"explain.baseline_token {token!r} is {len(ids)} tokens for this tokenizer, not one")
        return ids[0]

    def __call__(self, text: str, return_offsets_mapping: bool = False, **_: Any) -> dict[str, Any]:
        ids, offsets = self.tok.encode_with_offsets(text)
        return {"input_ids": ids, "offset_mapping": offsets}


def explain(config: Config, checkpoint: Path) -> dict[str, Any]:
    from captum.attr import FeatureAblation, LLMAttribution, TextTokenInput

    ec = config.explain
    model, manifest = registry.load_model(checkpoint)  # (a LoRA checkpoint is merged into its base)
    assert isinstance(model, GPT)  # the family table sends only decoders here
    model.eval()
    tok = HFStyleTokenizer(tokenizers.from_json(manifest.data.tokenizer or "", f"{checkpoint} (tokenizer)"))
    baseline = _baseline_id(ec.baseline_token, tok, manifest.data.special_tokens or {})
    attribution = LLMAttribution(FeatureAblation(CausalLM(model)), tok)
    items = []
    for prompt in _prompts(config)[: ec.rows]:
        ids = tok.encode(prompt)
        if not ids:
            raise UserError(f"explain: the prompt {prompt!r} encodes to no tokens")
        if len(ids) + ec.max_new_tokens > model.block_size:
            raise UserError(
                f"explain: a prompt of {len(ids)} tokens + explain.max_new_tokens {ec.max_new_tokens} exceeds the "
                f"model's context ({model.block_size}); shorten the prompt or lower max_new_tokens"
            )
        with torch.no_grad():
            generated = model.generate(torch.tensor([ids]), ec.max_new_tokens, temperature=0.0)[0, len(ids) :]
        # one forward over prompt + continuation per ablation (Captum's default decodes token by token
        # through a Hugging Face generation cache: the same log-probabilities, many more calls)
        with warnings.catch_warnings():  # (a continuation cut inside a character: Captum decodes it naively)
            warnings.filterwarnings("ignore", message=".*(Skipping this token|Falling back to naive decoding)")
            result = attribution.attribute(
                TextTokenInput(prompt, tok, baselines=baseline), target=generated, forward_in_tokens=False
            )
        items.append(
            {
                "prompt": prompt,
                "generated": tok.decode(generated.tolist()),
                "generated_ids": generated.tolist(),
                "prompt_tokens": list(result.input_tokens),
                "generated_tokens": list(result.output_tokens),
                "sequence_attributions": [float(v) for v in result.seq_attr.tolist()],
                "token_attributions": [[float(v) for v in row] for row in result.token_attr.tolist()]
                if result.token_attr is not None
                else [],
            }
        )
    return {
        "kind": "lm",
        "unit": "prompts",
        "method": "LLMAttribution (feature ablation of each prompt token)",
        "baseline": f"each prompt token replaced by token {baseline} ({tok.decode([baseline])!r})",
        "baseline_id": baseline,
        "explains": "the log-probability of the model's greedy continuation (and of each of its tokens)",
        "items": items,
        "summary": [
            f"{item['prompt'][:40]!r} -> {item['generated'][:40]!r}: most from "
            + ", ".join(
                repr(t)
                for t, _ in sorted(
                    zip(item["prompt_tokens"], item["sequence_attributions"], strict=True), key=lambda p: -abs(p[1])
                )[:3]
            )
            for item in items[:3]
        ],
    }


def _baseline_id(token: str | None, tok: HFStyleTokenizer, special: dict[str, Any]) -> int:
    """The id a prompt token is replaced by: explain.baseline_token, else the pad or end-of-text token (a
    character vocabulary without either: the space)."""
    if token is not None:
        return tok._one_id(token)
    for name in ("pad", "eos", "bos"):
        value = special.get(name)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    eot = tok.tok.eot_id
    if eot is not None:
        return eot
    space = tok.tok.encode(" ")  # a character-level model: a space says the least
    if len(space) == 1:
        return space[0]
    raise UserError("explain: this tokenizer has no pad or end-of-text token; set explain.baseline_token")


def _prompts(config: Config) -> list[str]:
    """explain.prompts, else explain.input's lines (a .jsonl's 'prompt' fields)."""
    ec = config.explain
    if ec.prompts:
        return list(ec.prompts)
    if ec.input is None:
        raise UserError("explain: give the prompts to explain (explain.prompts, or --input FILE of prompts)")
    if not ec.input.is_file():
        raise UserError(f"explain.input {ec.input} does not exist")
    lines = ec.input.read_text(encoding="utf-8").splitlines()
    if ec.input.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts = []
    for number, record in jsonl_objects(lines, ec.input):
        if not isinstance(record.get("prompt"), str):
            raise UserError(f"{ec.input}: line {number} has no 'prompt' string")
        prompts.append(record["prompt"])
    return prompts
