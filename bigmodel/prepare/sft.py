"""SFT prepare: JSONL examples -> rendered, tokenized, masked examples on disk (see bigmodel/sft.py).

Every example stays its own record (training pads a batch of whole examples; no window crosses two).
An example longer than model.block_size is truncated (its end is cut; counted and reported) or refused
(data.too_long: error). One that truncation leaves with no trained token is dropped and reported.

Writes to <run_dir>/prepare/, per split: <split>.bin (token ids of all examples, one after another),
<split>.mask.bin (uint8, 1 where the token is a target of the loss), <split>.starts.bin (int64, where
each example starts, plus the end); tokenizer.json and manifest.json.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel import chat, console, records
from bigmodel import sft as examples
from bigmodel.config import Config, GPTConfig, SFTDataConfig
from bigmodel.datasets import MANIFEST_FILE, TOKENIZER_FILE, sft_files
from bigmodel.errors import UserError
from bigmodel.io import atomic_open, atomic_path, write_json
from bigmodel.prepare import redact
from bigmodel.prepare.text import pretrained_tokenizer


@dataclass
class SplitCounts:
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_no_trained_tokens: int = 0
    shapes: dict[str, int] = field(default_factory=dict)


def run(config: Config) -> dict[str, Any]:
    data = config.data
    assert isinstance(data, SFTDataConfig) and config.init.from_ is not None
    tok, info = pretrained_tokenizer(config.init.from_)
    template = _template(data.template, info["chat_template"], config.init.from_)
    special = dict(info["special_tokens"])
    eos = list(special.get("eos") or [])
    if template == chat.CHATML and (end := tok.token_to_id(chat.CHATML_END)) is not None and end not in eos:
        special["eos"] = [*eos, end]  # generation stops at the end of the assistant's turn
    eos_id = (special.get("eos") or [tok.eot_id])[0]
    origin = (
        "the built-in ChatML template" if template == chat.CHATML else f"the chat template of {config.init.from_.name}"
    )
    renderer = examples.Renderer(tok, template, special, data.train_on, eos_id, origin)
    limit = context_length(config)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    out_dir = config.stage_dir("prepare")

    counts = {"train": SplitCounts(), "val": SplitCounts()}
    with ExitStack() as stack:
        files = {
            split: {
                kind: stack.enter_context(open(stack.enter_context(atomic_path(path)), "wb"))
                for kind, path in sft_files(out_dir, split).items()
            }
            for split in counts
        }
        starts: dict[str, list[int]] = {"train": [0], "val": [0]}
        rng = np.random.default_rng(config.seed)
        redactions = redact.Redactions()
        for split, where, record in _records(data, rng, redactions):
            example = renderer.example(record, where)
            kept = _fit(example, limit, data.too_long, where, counts[split])
            if kept is None:
                continue
            c = counts[split]
            c.examples += 1
            c.tokens += len(kept.ids)
            c.trained_tokens += sum(kept.trained[1:])  # the first token is never predicted
            c.shapes[record.shape] = c.shapes.get(record.shape, 0) + 1
            np.asarray(kept.ids, dtype=dtype).tofile(files[split]["tokens"])
            np.asarray(kept.trained, dtype=np.uint8).tofile(files[split]["mask"])
            starts[split].append(starts[split][-1] + len(kept.ids))
        for split in counts:
            np.asarray(starts[split], dtype=np.int64).tofile(files[split]["starts"])
            for handle in files[split].values():
                handle.flush()
        for split, c in counts.items():
            if c.examples == 0:
                raise UserError(
                    f"data: the {split} split has no examples; "
                    + (
                        "add examples to data.val_path"
                        if split == "val" and data.val_path
                        else "use more examples or change data.val_fraction"
                    )
                )
            if c.trained_tokens == 0:
                raise UserError(
                    f"data: no token of the {split} split is trained (data.train_on "
                    f"'{data.train_on}'); check the examples' completions"
                )
    with atomic_open(out_dir / TOKENIZER_FILE) as tokenizer_file:
        tokenizer_file.write(tok.to_json())

    manifest = {
        "kind": "sft-data",
        "format": "sft",
        "format_version": 1,
        "sources": records.source_entries(p for p in (data.path, data.val_path) if p is not None),
        "tokenizer": {
            "kind": "pretrained",
            "vocab_size": tok.vocab_size,
            "file": TOKENIZER_FILE,
            "source": str(config.init.from_),
        },
        "special_tokens": special,
        # The template the examples were rendered with travels to the model (infer --chat renders it).
        "chat_template": template,
        "template": data.template
        if data.template != "auto"
        else ("model" if template == info["chat_template"] else "chatml"),
        "train_on": data.train_on,
        "too_long": data.too_long,
        "context_length": limit,
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(dtype).name,
        "seed": config.seed,
        "tokens": {s: c.tokens for s, c in counts.items()},
        "examples": {s: c.examples for s, c in counts.items()},
        "trained_tokens": {s: c.trained_tokens for s, c in counts.items()},
        "truncated": {s: c.truncated for s, c in counts.items()},
        "dropped_no_trained_tokens": {s: c.dropped_no_trained_tokens for s, c in counts.items()},
        "shapes": {s: c.shapes for s, c in counts.items()},
        "cleaning": {"redacted": redactions.counts, "redacted_examples": redactions.examples},
    }
    write_json(out_dir / MANIFEST_FILE, manifest)
    _report(manifest)
    if data.cleaning.redact:
        redact.announce(redactions, data.cleaning.redact)
    return {
        "manifest": str(out_dir / MANIFEST_FILE),
        "examples": manifest["examples"],
        "tokens": manifest["tokens"],
        "trained_tokens": manifest["trained_tokens"],
        "truncated": manifest["truncated"],
        "tokenizer": str(out_dir / TOKENIZER_FILE),
        "vocab_size": tok.vocab_size,
    }


def context_length(config: Config) -> int:
    """The longest example the model takes: model.block_size, or the imported model's context."""
    from bigmodel import pretrained

    assert isinstance(config.model, GPTConfig)  # fine-tuning data is a decoder's
    if config.init.from_ is None or "block_size" in config.model.model_fields_set:
        return config.model.block_size
    return pretrained.describe(config.init.from_).arch.block_size


def _template(kind: str, model_template: str | None, source: Path) -> str | None:
    if kind == "plain":
        return None
    if kind == "chatml" or (kind == "auto" and model_template is None):
        return chat.CHATML
    if model_template is None:
        raise UserError(f"data.template 'model': {source.name} has no chat template; use chatml or plain")
    return model_template


def _records(data: SFTDataConfig, rng: np.random.Generator, redactions: redact.Redactions) -> Any:
    """(split, "file: line N", Record) for every example (its texts redacted as data.cleaning.redact asks);
    without val_path each goes to val with probability val_fraction (seeded, one draw per example in file
    order)."""
    sources = [(data.path, None)] + ([(data.val_path, "val")] if data.val_path is not None else [])
    for path, fixed in sources:
        if not records.is_source(path):
            raise UserError(f"data.{'val_path' if fixed else 'path'}: file not found: {path}")
        for line, raw in records.read(path, None):
            where = f"{path}: {line}"
            if data.cleaning.redact:
                raw = redact.redact_strings(raw, data.cleaning.redact, redactions)
            record = examples.read_record(raw, where)
            split = fixed or ("train" if data.val_path is not None or rng.random() >= data.val_fraction else "val")
            yield split, where, record


def _fit(
    example: examples.Example, limit: int, too_long: str, where: str, counts: SplitCounts
) -> examples.Example | None:
    if len(example.ids) <= limit:
        return example
    if too_long == "error":
        raise UserError(
            f"{where}: the example has {len(example.ids)} tokens, more than the context of {limit} "
            "(model.block_size); shorten it, or set data.too_long: truncate"
        )
    counts.truncated += 1
    cut = examples.Example(example.ids[:limit], example.trained[:limit], example.text)
    if not any(cut.trained[1:]):
        counts.dropped_no_trained_tokens += 1
        return None
    return cut


def _report(manifest: dict[str, Any]) -> None:
    for split in ("train", "val"):
        shapes = ", ".join(f"{n} {k.replace('_', '/')}" for k, n in sorted(manifest["shapes"][split].items()))
        console.info(
            f"prepare: {split} {manifest['examples'][split]:,} examples ({shapes}), {manifest['tokens'][split]:,} "
            f"tokens, {manifest['trained_tokens'][split]:,} trained ({manifest['train_on']}); "
            f"{manifest['truncated'][split]} truncated to {manifest['context_length']} tokens"
            + (
                f", {manifest['dropped_no_trained_tokens'][split]} dropped (nothing trained left after truncation)"
                if manifest["dropped_no_trained_tokens"][split]
                else ""
            )
        )
    console.info(f"prepare: template {manifest['template']}, vocab {manifest['vocab_size']}")
