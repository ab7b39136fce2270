"""prepare for an encoder (data.format text_classification): texts -> WordPiece token ids per split, labels
and the tokenizer. Three kinds of input, by model.task:

- classification: a CSV or JSONL file with a text column (and a second for sentence pairs) and a label
  column; the split is seeded and stratified by label, as the tabular data's.
- embedding: a CSV or JSONL file of pairs of texts that belong together (text, text_pair); each side is
  its own input (`{split}_ids` and `{split}_b_ids`), seeded split.
- mlm: a .txt corpus (masked-LM pre-training), split in order by paragraphs and cut into windows of
  model.block_size tokens; or the texts of a CSV/JSONL file, one example each.

Texts are tokenized with the imported model's own tokenizer (init.from) or with a WordPiece vocabulary
trained here on the training split only (HF tokenizers; BERT's normaliser and pre-tokenizer). Each
example becomes `[CLS] text [SEP]` (`[CLS] a [SEP] b [SEP]` for pairs, token type 1 for the second
segment), at most model.block_size tokens: longer ones are truncated and counted, or refused
(`too_long: error`).

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
from bigmodel import records as records_io
from bigmodel.config import BERTConfig, Config, TextClassificationDataConfig
from bigmodel.datasets import DATA_FILE, MANIFEST_FILE, TOKENIZER_FILE
from bigmodel.errors import UserError
from bigmodel.io import atomic_open, atomic_path, require_file, write_json
from bigmodel.prepare import redact
from bigmodel.prepare.tabular import SPLITS, label_order, seeded_split
from bigmodel.tabular_io import read_csv, read_text

TEST_JSONL = "test.jsonl"
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def run(config: Config) -> dict[str, Any]:
    data, model = _sections(config)
    path = data.path
    if not records_io.is_datasets_folder(path):
        require_file(
            path,
            "data.path",
            "set data.path to a CSV, JSONL or Parquet file of texts, a datasets folder, or a .txt corpus",
        )
    out_dir = config.stage_dir("prepare")
    records: list[dict[str, Any]] | None
    labels: list[str]
    redactions = redact.Redactions()
    if path.suffix == ".txt":
        arrays, tok, source, splits, truncated = _corpus(config, path, redactions)
        records, labels, what = None, [], "windows"
    else:
        arrays, tok, source, splits, truncated, records, labels = _records(config, path, redactions)
        what = "pairs" if config.task == "embedding" else "texts"
    with atomic_path(out_dir / DATA_FILE) as tmp:
        save_file(arrays, str(tmp))
    with atomic_path(out_dir / TOKENIZER_FILE) as tmp:
        tmp.write_text(tok.to_str(), encoding="utf-8")
    if records is not None:
        with atomic_open(out_dir / TEST_JSONL) as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    special = {name: tok.token_to_id(name) for name in SPECIALS}
    manifest = {
        "kind": "text-classification-data",
        "format_version": 2,
        "source": {"path": str(path), "sha256": records_io.sha256_of(path)},
        "task": config.task,
        "text": data.text if records is not None else None,
        "text_pair": data.text_pair if records is not None else None,
        "target": data.label if labels else None,
        "labels": labels,
        "seed": config.seed,
        "vocab_size": tok.get_vocab_size(),
        "tokenizer": {
            "kind": "wordpiece" if source is None else "pretrained",
            "file": TOKENIZER_FILE,
            "source": source,
        },
        "special_ids": special,
        "pad_id": special["[PAD]"] or 0,
        "max_tokens": model.block_size,
        "truncated": truncated,
        "splits": splits,
        "tokens": {
            name: int(sum(arrays[key].size for key in (f"{name}_ids", f"{name}_b_ids") if key in arrays))
            for name in SPLITS
        },
        "cleaning": {"redacted": redactions.counts, "redacted_examples": redactions.examples},
        "class_counts": (
            {name: np.bincount(arrays[f"{name}_y"], minlength=len(labels)).tolist() for name in SPLITS}
            if labels
            else None
        ),
    }
    write_json(out_dir / MANIFEST_FILE, manifest)
    sizes = ", ".join(f"{name} {splits[name]}" for name in SPLITS)
    cut = sum(truncated.values())
    console.info(
        f"prepare: {sum(splits.values())} {what} from {path.name}; {sizes}"
        + (f"; {len(labels)} classes" if labels else "")
        + f"; vocab {manifest['vocab_size']}"
        + (f"; {cut} texts truncated to {model.block_size} tokens" if cut else "")
    )
    if data.cleaning.redact:
        redact.announce(redactions, data.cleaning.redact)
    return {
        "manifest": str(out_dir / MANIFEST_FILE),
        "data": str(out_dir / DATA_FILE),
        "rows": splits,
        "truncated": truncated,
    }


def _sections(config: Config) -> tuple[TextClassificationDataConfig, BERTConfig]:
    """The data and model sections this module reads (the family table sends only an encoder's texts here)."""
    assert isinstance(config.data, TextClassificationDataConfig) and isinstance(config.model, BERTConfig)
    return config.data, config.model


def _records(
    config: Config, path: Path, redactions: redact.Redactions
) -> tuple[dict[str, np.ndarray], Any, str | None, dict[str, int], dict[str, int], list[dict[str, Any]], list[str]]:
    """The texts of a CSV/JSONL file, split seeded (stratified by label for a classifier), tokenized.
    Returns arrays, tokenizer, its source, split sizes, truncation counts, the test records and labels."""
    (data, model), task = _sections(config), config.task
    records = read_records(path)
    columns = [data.text] + ([data.text_pair] if data.text_pair else [])
    if data.cleaning.redact:  # the texts only (a label is not personal data), before anything is kept
        records = [
            {k: redact.redact_strings(v, data.cleaning.redact, redactions) if k in columns else v for k, v in r.items()}
            for r in records
        ]
    if task == "embedding" and not data.text_pair:
        raise UserError(
            "data.text_pair: an embedding model learns from and is scored on pairs of texts that belong "
            "together; set data.text_pair to the column of each text's partner"
        )
    _check_columns(records, [*columns, *([data.label] if task == "classification" else [])], path)
    texts = [[_text(record, column, index, path) for column in columns] for index, record in enumerate(records)]
    labels: list[str] = []
    y = None
    if task == "classification":
        labels = label_order({str(record[data.label]).strip() for record in records})
        if len(labels) < 2:
            raise UserError(
                f"{path}: every text has the label {labels[0]!r}; a classifier needs at least two "
                f"classes in column '{data.label}'"
            )
        y = np.array([labels.index(str(record[data.label]).strip()) for record in records], dtype=np.int64)
    split = seeded_split(len(records), y if data.stratify else None, _Fractions(data), config.seed)
    tok, source = _tokenizer(config, [text for i in split["train"] for text in texts[i]])

    arrays: dict[str, np.ndarray] = {}
    truncated: dict[str, int] = {}
    # A pair is one input ([CLS] a [SEP] b [SEP]) for a classifier, two inputs (a, b) for an embedding model.
    sides = [("", None)] if task != "embedding" else [("", 0), ("b_", 1)]
    for name in SPLITS:
        rows = [texts[i] for i in split[name]]
        truncated[name] = 0
        for prefix, side in sides:
            ids, types, cut = _encode(
                tok,
                rows if side is None else [[row[side]] for row in rows],
                model.block_size,
                data.too_long,
                path,
                split[name],
            )
            _store(arrays, f"{name}_{prefix}", ids)
            if data.text_pair and side is None:
                arrays[f"{name}_types"] = np.concatenate(types).astype(np.uint8)
            truncated[name] += cut
        if y is not None:
            arrays[f"{name}_y"] = y[split[name]]
    splits = {name: int(len(split[name])) for name in SPLITS}
    return arrays, tok, source, splits, truncated, [records[i] for i in split["test"]], labels


def _corpus(
    config: Config, path: Path, redactions: redact.Redactions
) -> tuple[dict[str, np.ndarray], Any, str | None, dict[str, int], dict[str, int]]:
    """A .txt corpus for masked-LM pre-training: paragraphs (blank-line separated) in order, the first ones
    train, the next validate, the last test (by characters; no passage is in two splits); each split's
    tokens end to end, cut into windows of model.block_size tokens with [CLS] and [SEP] (nothing is lost)."""
    if config.task != "mlm":
        raise UserError(
            f"{path}: a .txt corpus has no labels or pairs, it trains model.task mlm (got "
            f"'{config.task}'); use a CSV or JSONL file for {config.task}"
        )
    text = read_text(path)
    kinds = _sections(config)[0].cleaning.redact
    if kinds:
        text = redactions.redact(text, kinds)
    paragraphs = [" ".join(block.split()) for block in text.split("\n\n")]
    paragraphs = [p for p in paragraphs if p]
    ends = np.cumsum([len(p) for p in paragraphs]) if paragraphs else np.array([0])
    total = int(ends[-1])
    data, model = _sections(config)
    val_from = int(np.searchsorted(ends, total * (1 - data.val_fraction - data.test_fraction)))
    test_from = int(np.searchsorted(ends, total * (1 - data.test_fraction)))
    parts = {"train": paragraphs[:val_from], "val": paragraphs[val_from:test_from], "test": paragraphs[test_from:]}
    for name, part in parts.items():
        if not part:
            raise UserError(
                f"{path}: {len(paragraphs)} paragraphs are too few to give a {name} split; use a longer "
                "corpus (paragraphs are separated by blank lines)"
            )
    tok, source = _tokenizer(config, parts["train"])
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    width = model.block_size - 2
    arrays: dict[str, np.ndarray] = {}
    for name, part in parts.items():
        stream = np.concatenate(
            [np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(part, add_special_tokens=False)]
        )
        _store(
            arrays,
            f"{name}_",
            [np.concatenate([[cls_id], stream[i : i + width], [sep_id]]) for i in range(0, len(stream), width)],
        )
    splits = {name: len(arrays[f"{name}_offsets"]) - 1 for name in SPLITS}
    return arrays, tok, source, splits, dict.fromkeys(SPLITS, 0)


def _store(arrays: dict[str, np.ndarray], prefix: str, ids: list[np.ndarray]) -> None:
    """Examples end to end (`{prefix}ids`, int32) and where each starts (`{prefix}offsets`, N+1)."""
    lengths = np.array([len(row) for row in ids], dtype=np.int64)
    arrays[f"{prefix}ids"] = np.concatenate(ids).astype(np.int32)
    arrays[f"{prefix}offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


class _Fractions:
    """The split fractions in the shape the tabular splitter reads (no train subset for texts)."""

    def __init__(self, data: TextClassificationDataConfig) -> None:
        self.val_fraction, self.test_fraction, self.train_subset = data.val_fraction, data.test_fraction, 1.0


def read_records(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV (by header name), or the records of a JSONL or Parquet file or a datasets folder."""
    if records_io.is_records(path):
        records = [record for _, record in records_io.read(path, None)]
        if not records:
            raise UserError(f"{path}: no records; one JSON object per line (or a row per text) is expected")
        return records
    header, rows = read_csv(path)
    return [dict(zip(header, row)) for row in rows]


def _check_columns(records: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    have = list(records[0])
    for column in columns:
        if column not in have:
            raise UserError(
                f"{path}: no column '{column}' (columns: {', '.join(have)}); set data.text / "
                "data.text_pair / data.label to the right names"
            )


def _text(record: dict[str, Any], column: str, index: int, path: Path) -> str:
    value = record.get(column)
    text = "" if value is None else str(value).strip()
    if not text:
        raise UserError(f"{path}: record {index + 1} has an empty '{column}'; fill it or drop the record")
    return text


def _tokenizer(config: Config, train_texts: list[str]) -> tuple[Any, str | None]:
    """The imported model's tokenizer (init.from), or WordPiece trained on the training texts."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if config.init.from_ is not None:
        from bigmodel import pretrained

        source = pretrained.describe(config.init.from_)
        tok = Tokenizer.from_str(source.tokenizer_json)
        # Its own padding (all-MiniLM-L6-v2's pads every text to 128 tokens) and truncation would put [PAD]
        # into the stored texts and cut them at its length, not model.block_size: batches pad here.
        tok.no_padding()
        tok.no_truncation()
        console.info(
            f"prepare: the tokenizer of {config.init.from_.name} ({source.model_type}, vocab {tok.get_vocab_size()})"
        )
        return tok, str(config.init.from_)
    tok = Tokenizer(
        models.WordPiece(train_wordpiece_vocab(train_texts, _sections(config)[0].vocab_size), unk_token="[UNK]")
    )
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    console.info(f"prepare: trained a WordPiece vocabulary of {tok.get_vocab_size()} on the training texts")
    return tok, None


def train_wordpiece_vocab(texts: list[str], vocab_size: int) -> dict[str, int]:
    """A WordPiece vocabulary (BERT's: lowercased, `##` marks a piece that continues a word) learned from
    `texts`, the same for the same texts in every process.

    HF tokenizers' WordPieceTrainer is not: it numbers the `##` pieces in the order it walks a hash map of
    the words, which differs per process, and equal pair counts are broken by those numbers (on a small
    corpus two runs gave different vocabularies). So the same BPE training runs here on words whose
    continuing characters are written as distinct private-use characters, all of them in a sorted
    initial alphabet: every symbol's number is fixed before training and ties are broken the same way
    every time. The learned tokens are then spelled back, continuing ones with `##` -- the vocabulary
    WordPieceTrainer would build from the same merges (it, too, trains BPE and converts)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = [word for text in texts for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))]
    continuing = {c: chr(0x100000 + i) for i, c in enumerate(sorted({c for w in words for c in w[1:]}))}
    spelled_back = {v: k for k, v in continuing.items()}
    symbols = sorted({w[0] for w in words} | set(continuing.values()))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), initial_alphabet=symbols, show_progress=False
    )
    bpe.train_from_iterator((w[0] + "".join(continuing[c] for c in w[1:]) for w in words), trainer=trainer)
    vocab = {}
    for token, number in sorted(bpe.get_vocab().items(), key=lambda item: item[1]):
        if token in SPECIALS or token[0] not in spelled_back:
            vocab[token if token in SPECIALS else token[0] + "".join(spelled_back[c] for c in token[1:])] = number
        else:
            vocab["##" + "".join(spelled_back[c] for c in token)] = number
    return vocab


def _encode(
    tok: Any, texts: list[list[str]], max_tokens: int, too_long: str, path: Path, rows: np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray], int]:
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
                raise UserError(
                    f"{path}: record {row + 1} is longer than model.block_size ({max_tokens} tokens); "
                    "shorten it, raise model.block_size, or set data.too_long: truncate"
                )
            truncated += 1
        ids.append(np.asarray(encoding.ids))
        types.append(np.asarray(encoding.type_ids))
    return ids, types, truncated
