"""explain for an encoder classifier: Layer Integrated Gradients over the token embeddings, per token.

IG runs in embedding space (token ids are not continuous): from the baseline text's embeddings -- the same
text with every token but [CLS] and [SEP] replaced by [PAD] -- to the input's. Each token's attribution is
the sum over its embedding's dimensions; together they add up to the predicted class's log-probability
(log-softmax) minus the baseline text's, up to the convergence delta reported. Position and token-type embeddings are the same for both
texts, so they carry no attribution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigmodel import registry
from bigmodel.arch import EncoderArch
from bigmodel.config import Config
from bigmodel.errors import UserError
from bigmodel.models.bert import BERT


class LogProbabilities(nn.Module):
    """input_ids, token_type_ids (B, T) -> the classes' log-probabilities (B, L), every token real (one text
    at a time)."""

    def __init__(self, model: BERT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.model(input_ids, torch.ones_like(input_ids), token_type_ids), dim=-1)


def explain(config: Config, checkpoint: Path) -> dict[str, Any]:
    from captum.attr import LayerIntegratedGradients
    from tokenizers import Tokenizer

    ec = config.explain
    model, manifest = registry.load_model(checkpoint)
    assert isinstance(model, BERT)  # the family table sends only encoders here
    arch = manifest.architecture
    assert isinstance(arch, EncoderArch)
    if arch.task != "classification":
        raise UserError(
            f"bigmodel explain explains a classifier's decisions; this encoder is for {arch.task} (no class "
            "to attribute)"
        )
    model.eval()
    tok = Tokenizer.from_str(manifest.data.tokenizer or "")
    tok.no_padding()
    tok.enable_truncation(max_length=arch.block_size, strategy="longest_first")
    specials = {i for i in (manifest.data.special_ids or {}).values() if i is not None}
    labels = manifest.data.labels or []
    forward = LogProbabilities(model)
    attribution = LayerIntegratedGradients(forward, model.embeddings.wte)
    items: list[dict[str, Any]] = []
    for text in _texts(config, manifest.data.text or "text", manifest.data.text_pair)[: ec.rows]:
        encoding = tok.encode(text[0], text[1]) if len(text) == 2 else tok.encode(text[0])
        ids = torch.tensor([encoding.ids])
        types = torch.tensor([encoding.type_ids])
        baseline = torch.tensor([[i if i in specials else arch.pad_id for i in encoding.ids]])
        with torch.no_grad():
            log_p = forward(ids, types)[0]
            base_log_p = forward(baseline, types)[0]
        predicted = int(log_p.argmax())
        scores, delta = attribution.attribute(
            ids,
            baselines=baseline,
            additional_forward_args=(types,),
            target=predicted,
            n_steps=ec.steps,
            return_convergence_delta=True,
        )
        per_token = scores.sum(-1)[0]  # (T,)
        items.append(
            {
                "text": text if len(text) == 2 else text[0],
                "prediction": str(labels[predicted]) if labels else predicted,
                "probability": float(log_p[predicted].exp()),
                "explains": f"log-probability of class {labels[predicted] if labels else predicted!r}",
                "f_input": float(log_p[predicted]),
                "f_baseline": float(base_log_p[predicted]),
                "delta": float(delta[0]),
                "tokens": [
                    {"token": token, "attribution": float(value)}
                    for token, value in zip(encoding.tokens, per_token.tolist(), strict=True)
                ],
            }
        )
    worst = max((abs(item["delta"]) for item in items), default=0.0)
    return {
        "kind": "text_classification",
        "unit": "texts",
        "method": f"LayerIntegratedGradients on the token embeddings ({ec.steps} steps)",
        "baseline": "the same text with every token but [CLS]/[SEP] replaced by [PAD]",
        "items": items,
        "summary": [
            f"{item['prediction']} ({item['probability']:.2f}): most for it "
            + ", ".join(t["token"] for t in sorted(item["tokens"], key=lambda t: -t["attribution"])[:3])
            for item in items[:3]
        ]
        + [f"largest |convergence delta| {worst:.2e}"],
    }


def _texts(config: Config, column: str, pair_column: str | None) -> list[list[str]]:
    """explain.input's records (the model's text column(s)), else the test split prepare kept."""
    from bigmodel.prepare.text_classification import read_records

    source = config.explain.input or config.stage_dir("prepare") / "test.jsonl"
    if not source.is_file():
        raise UserError(f"no inputs to explain at {source}: give explain.input (--input), a JSONL or CSV of texts")
    texts = []
    for number, record in enumerate(read_records(source), start=1):
        columns = [column] + ([pair_column] if pair_column else [])
        found = [str(record.get(name) or "").strip() for name in columns]
        if not all(found):
            raise UserError(
                f"{source}: record {number} has no {' and '.join(repr(c) for c in columns)} text to explain"
            )
        texts.append(found)
    return texts
