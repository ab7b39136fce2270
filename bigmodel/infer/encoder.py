"""Classify or embed texts from CSV or JSONL (a file or stdin) with an exported encoder (no PyTorch).

Texts are tokenized with the model's own tokenizer (from the file's metadata), cut to the model's
context ([CLS] and [SEP] kept) and padded per batch. A classifier writes one JSON object per text:
`prediction` (the label) and `probabilities` ({label: p}); the label column, when present, is passed
through and accuracy reported. An embedding model writes `embedding` (a unit vector) per text, or one
(N, C) float32 array when the output file ends in .npy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel import console
from bigmodel.config import STDIO, InferConfig
from bigmodel.errors import UserError
from bigmodel.io import atomic_open, atomic_path
from bigmodel.manifests import EncoderMetadata

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def run_model(
    session: Any,
    meta: EncoderMetadata,
    path: Path,
    settings: InferConfig,
    source: Path | None,
    dest: Path,
    seed: int,
    bench_settings: dict[str, int] | None,
) -> dict[str, Any]:
    """infer's entry for encoders: classify or embed the texts of a file (or stdin)."""
    if bench_settings is not None:
        raise UserError("--bench measures language-model decoding; this is an encoder")
    if meta.task == "mlm":
        raise UserError(
            f"{path}: a masked-LM encoder has no predictions to write; export it with model.task "
            "classification or embedding"
        )
    if source is None:
        raise UserError("infer needs texts: --input FILE (CSV or JSONL with a text column) or '-' for stdin")
    records = _records(source)
    cut: list[int] = []
    outputs = run_texts(
        session, meta, [_texts(r, meta, i, source) for i, r in enumerate(records)], settings.batch_size, cut=cut
    )
    if cut:
        console.warn(
            f"infer: {len(cut)} of {len(records)} texts (the first: record {cut[0] + 1}) were longer than the "
            f"model's context of {meta.architecture.block_size} tokens and were cut to it"
        )
    if meta.task == "embedding" and dest.suffix == ".npy":
        with atomic_path(dest) as tmp, open(tmp, "wb") as handle:
            np.save(handle, outputs.astype(np.float32), allow_pickle=False)
        console.info(f"infer: {len(records)} embeddings of width {outputs.shape[1]} -> {dest}")
        return {"embeddings": str(dest), "rows": len(records), "model": str(path)}
    rows = _rows(outputs, records, meta)
    _write(rows, dest)
    result: dict[str, Any] = {"predictions": str(dest), "rows": len(rows), "model": str(path)}
    target = meta.target
    if meta.task == "classification" and target and all(target in r for r in records):
        result["accuracy"] = float(
            np.mean([row["prediction"] == str(r[target]).strip() for row, r in zip(rows, records)])
        )
    console.info(
        f"infer: {len(rows)} texts -> {'stdout' if str(dest) == STDIO else dest}"
        + (f" (accuracy against the '{target}' column: {result['accuracy']:.4f})" if "accuracy" in result else "")
    )
    return result


def tokenizer_of(meta: EncoderMetadata) -> Any:
    """The model's own tokenizer (from its metadata), cutting inputs to the model's context."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(meta.tokenizer)
    tok.no_padding()  # batches are padded here, to their own longest text, with the mask that says so
    tok.enable_truncation(max_length=meta.architecture.block_size, strategy="longest_first")
    return tok


def run_texts(
    session: Any,
    meta: EncoderMetadata,
    texts: list[list[str]],
    batch_size: int,
    tok: Any = None,
    tokens: list[int] | None = None,
    cut: list[int] | None = None,
) -> np.ndarray:
    """The graph's output for each text (or pair), in padded batches: (N, L) probabilities or (N, C) embeddings.
    tok: the model's tokenizer when the caller keeps one; tokens: the count of real tokens is added; cut:
    the indices of texts longer than the model's context (cut to it) are added."""
    tok = tok or tokenizer_of(meta)
    parts = []
    for start in range(0, len(texts), batch_size):
        encodings = encode_texts(tok, texts[start : start + batch_size])
        if tokens is not None:
            tokens.append(sum(len(e.ids) for e in encodings))
        if cut is not None:
            cut += [start + i for i in cut_texts(encodings)]
        parts.append(run_encodings(session, meta, encodings))
    return np.concatenate(parts)


def encode_texts(tok: Any, texts: list[list[str]]) -> list[Any]:
    """Each text (or [text, text_pair]) as the model's tokenizer encodes it, cut to the model's context."""
    return list(tok.encode_batch([tuple(t) if len(t) == 2 else t[0] for t in texts]))


def cut_texts(encodings: list[Any]) -> list[int]:
    """Which encodings lost tokens to the model's context."""
    return [i for i, encoding in enumerate(encodings) if encoding.overflowing]


def run_encodings(session: Any, meta: EncoderMetadata, encodings: list[Any]) -> np.ndarray:
    """The graph's output for one batch of encodings, padded to the longest with the mask that says so."""
    pad_id = meta.architecture.pad_id
    width = max(len(e.ids) for e in encodings)
    feeds = {name: np.zeros((len(encodings), width), dtype=np.int64) for name in INPUTS}
    feeds["input_ids"][:] = pad_id
    for i, encoding in enumerate(encodings):
        n = len(encoding.ids)
        feeds["input_ids"][i, :n], feeds["token_type_ids"][i, :n] = encoding.ids, encoding.type_ids
        feeds["attention_mask"][i, :n] = 1
    return session.run(None, feeds)[0]


def _records(source: Path) -> list[dict[str, Any]]:
    if str(source) == STDIO:
        text = sys.stdin.read()
        lines = text.splitlines()
        if lines and lines[0].lstrip().startswith("{"):
            return [json.loads(line) for line in lines if line.strip()]
        import csv
        import io

        return list(csv.DictReader(io.StringIO(text)))
    from bigmodel.prepare.text_classification import read_records

    return read_records(source)


def _texts(record: dict[str, Any], meta: EncoderMetadata, index: int, source: Path) -> list[str]:
    # An embedding model embeds one text each (its pairs were for training and scoring).
    pair = meta.text_pair if meta.task == "classification" else None
    columns = [meta.text or "text"] + ([pair] if pair else [])
    texts = []
    for column in columns:
        value = record.get(column)
        if value is None or not str(value).strip():
            raise UserError(
                f"{source}: record {index + 1} has no '{column}' text; the model reads "
                f"{' and '.join(repr(c) for c in columns)}"
            )
        texts.append(str(value).strip())
    return texts


def _rows(outputs: np.ndarray, records: list[dict[str, Any]], meta: EncoderMetadata) -> list[dict[str, Any]]:
    if meta.task == "embedding":
        return [{"embedding": [round(float(v), 6) for v in vector]} for vector in outputs]
    labels = meta.labels or []
    return [
        {
            "prediction": labels[int(p.argmax())],
            "probabilities": {label: round(float(v), 6) for label, v in zip(labels, p)},
        }
        for p in outputs
    ]


def _write(rows: list[dict[str, Any]], dest: Path) -> None:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if str(dest) == STDIO:
        sys.stdout.write(text)
        return
    with atomic_open(dest) as handle:
        handle.write(text)
