"""prepare for labelled texts (data.format text_classification): CSV or JSONL -> WordPiece token ids per
split, labels, and the tokenizer, for an encoder.

Texts are tokenized with the imported model's own tokenizer (init.from) or with a WordPiece vocabulary
trained here on the training split only (HF tokenizers; BERT's normaliser and pre-tokenizer). Each
example becomes `[CLS] text [SEP]` (`[CLS] a [SEP] b [SEP]` for pairs, token type 1 for the second
segment), at most model.block_size tokens: longer ones are truncated and counted, or refused
(`too_long: error`). The split is seeded and stratified by label, as the tabular data's.

Written to the prepare folder: `data.safetensors` with, per split, the token ids of all examples end to
end (`{split}_ids`, int32), where each one starts (`{split}_offsets`, N+1), token types for pairs
(`{split}_types`) and labels (`{split}_y`); `tokenizer.json`; `test.jsonl` (the test split's raw
records, what infer reads by default); `manifest.json` (labels, special-token ids, counts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from bigmodel import console
from bigmodel.config import Config, TextClassificationDataConfig
from bigmodel.datasets import DATA_FILE, MANIFEST_FILE, TOKENIZER_FILE
from bigmodel.errors import UserError
from bigmodel.io import atomic_open, atomic_path, jsonl_objects, require_file, sha256_file, write_json
from bigmodel.prepare.tabular import SPLITS, label_order, seeded_split
from bigmodel.tabular_io import read_csv, read_text

TEST_JSONL = "test.jsonl"
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def run(config: Config) -> dict[str, Any]:
    data = config.data
    assert isinstance(data, TextClassificationDataConfig)
    path = require_file(data.path, "data.path", "set data.path to a CSV or JSONL file of labelled texts")
    records = read_records(path)
    columns = [data.text] + ([data.text_pair] if data.text_pair else [])
    _check_columns(records, [*columns, data.label], path)
    texts = [[_text(record, column, index, path) for column in columns] for index, record in enumerate(records)]
    labels = label_order({str(record[data.label]).strip() for record in records})
    if len(labels) < 2:
        raise UserError(f"{path}: every text has the label {labels[0]!r}; a classifier needs at least two classes "
                        f"in column '{data.label}'")
    y = np.array([labels.index(str(record[data.label]).strip()) for record in records], dtype=np.int64)
    split = seeded_split(len(records), y if data.stratify else None, _Fractions(data), config.seed)

    tok, source = _tokenizer(config, [texts[i] for i in split["train"]])
    max_tokens = config.model.block_size
    out_dir = config.stage_dir("prepare")
    arrays: dict[str, np.ndarray] = {}
    truncated: dict[str, int] = {}
    for name in SPLITS:
        ids, types, cut = _encode(tok, [texts[i] for i in split[name]], max_tokens, data.too_long, path, split[name])
        lengths = np.array([len(row) for row in ids], dtype=np.int64)
        arrays[f"{name}_ids"] = np.concatenate(ids).astype(np.int32)
        arrays[f"{name}_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        arrays[f"{name}_y"] = y[split[name]]
        if data.text_pair:
            arrays[f"{name}_types"] = np.concatenate(types).astype(np.uint8)
        truncated[name] = cut
    with atomic_path(out_dir / DATA_FILE) as tmp:
        save_file(arrays, str(tmp))
    with atomic_path(out_dir / TOKENIZER_FILE) as tmp:
        tmp.write_text(tok.to_str(), encoding="utf-8")
    with atomic_open(out_dir / TEST_JSONL) as handle:
        for i in split["test"]:
            handle.write(json.dumps(records[i], ensure_ascii=False) + "\n")

    special = {name: tok.token_to_id(name) for name in SPECIALS}
    manifest = {
        "kind": "text-classification-data",
        "format_version": 1,
        "source": {"path": str(path), "sha256": sha256_file(path), "rows": len(records)},
        "task": "classification",
        "text": data.text,
        "text_pair": data.text_pair,
        "target": data.label,
        "labels": labels,
        "seed": config.seed,
        "vocab_size": tok.get_vocab_size(),
        "tokenizer": {"kind": "wordpiece" if source is None else "pretrained", "file": TOKENIZER_FILE,
                      "source": source},
        "special_ids": special,
        "pad_id": special["[PAD]"] or 0,
        "max_tokens": max_tokens,
        "truncated": truncated,
        "splits": {name: int(len(split[name])) for name in SPLITS},
        "class_counts": {name: np.bincount(y[split[name]], minlength=len(labels)).tolist() for name in SPLITS},
    }
    write_json(out_dir / MANIFEST_FILE, manifest)
    sizes = ", ".join(f"{name} {manifest['splits'][name]}" for name in SPLITS)
    cut = sum(truncated.values())
    console.info(f"prepare: {len(records)} texts from {path.name}; {sizes}; {len(labels)} classes; vocab "
                 f"{manifest['vocab_size']}" + (f"; {cut} texts truncated to {max_tokens} tokens" if cut else ""))
    return {"manifest": str(out_dir / MANIFEST_FILE), "data": str(out_dir / DATA_FILE), "rows": manifest["splits"],
            "truncated": truncated}


class _Fractions:
    """The split fractions in the shape the tabular splitter reads (no train subset for texts)."""

    def __init__(self, data: TextClassificationDataConfig) -> None:
        self.val_fraction, self.test_fraction, self.train_subset = data.val_fraction, data.test_fraction, 1.0


def read_records(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV (by header name) or the objects of a JSONL file."""
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        records = [record for _, record in jsonl_objects(read_text(path).splitlines(), path)]
        if not records:
            raise UserError(f"{path}: no records; one JSON object per line is expected")
        return records
    header, rows = read_csv(path)
    return [dict(zip(header, row)) for row in rows]


def _check_columns(records: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    have = list(records[0])
    for column in columns:
        if column not in have:
            raise UserError(f"{path}: no column '{column}' (columns: {', '.join(have)}); set data.text / "
                            "data.text_pair / data.label to the right names")


def _text(record: dict[str, Any], column: str, index: int, path: Path) -> str:
    value = record.get(column)
    text = "" if value is None else str(value).strip()
    if not text:
        raise UserError(f"{path}: record {index + 1} has an empty '{column}'; fill it or drop the record")
    return text


def _tokenizer(config: Config, train_texts: list[list[str]]) -> tuple[Any, str | None]:
    """The imported model's tokenizer (init.from), or WordPiece trained on the training texts."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if config.init.from_ is not None:
        from bigmodel import pretrained

        source = pretrained.describe(config.init.from_)
        tok = Tokenizer.from_str(source.tokenizer_json)
        console.info(f"prepare: the tokenizer of {config.init.from_.name} ({source.model_type}, vocab "
                     f"{tok.get_vocab_size()})")
        return tok, str(config.init.from_)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=config.data.vocab_size, special_tokens=list(SPECIALS),
                                        show_progress=False)
    tok.train_from_iterator((text for row in train_texts for text in row), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    console.info(f"prepare: trained a WordPiece vocabulary of {tok.get_vocab_size()} on the training texts")
    return tok, None


def _encode(tok: Any, texts: list[list[str]], max_tokens: int, too_long: str, path: Path,
            rows: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Token ids and types of each example, at most max_tokens ([CLS] and [SEP] kept: the tokenizer cuts
    the text before its template adds them); how many were truncated."""
    tok.enable_truncation(max_length=max_tokens, strategy="longest_first")
    try:
        encodings = tok.encode_batch([tuple(row) if len(row) == 2 else row[0] for row in texts])
    finally:
        tok.no_truncation()  # the saved tokenizer.json is the model's, without this run's limit
    ids, types, truncated = [], [], 0
    for row, encoding in zip(rows, encodings):
        if encoding.overflowing:
            if too_long == "error":
                raise UserError(f"{path}: record {row + 1} is longer than model.block_size ({max_tokens} tokens); "
                                "shorten it, raise model.block_size, or set data.too_long: truncate")
            truncated += 1
        ids.append(np.asarray(encoding.ids))
        types.append(np.asarray(encoding.type_ids))
    return ids, types, truncated
