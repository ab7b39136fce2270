"""Text prepare: files/globs/JSONL -> cleaned documents -> tokenizer -> train.bin / val.bin token shards.

The corpus is streamed in chunks of `data.chunk_chars` characters, in passes:
  1. scan: clean every document, measure it, hash it (exact dedupe), collect characters (char vocab);
  2. (bpe only) train the byte-level BPE tokenizer on the kept documents, streamed;
  3. encode the kept documents chunk by chunk and append the tokens to the split's shard on disk.
Peak memory depends on the chunk size (plus one small record per document), not on the corpus size.

Writes to <run_dir>/prepare/: train.bin, val.bin (uint16 when the vocabulary fits, else uint32; read
with np.memmap), tokenizer.json, manifest.json.
"""

from __future__ import annotations

import glob
import hashlib
import re
import unicodedata
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from bigmodel import console, records
from bigmodel import tokenizer as tokenizers
from bigmodel.config import Config, TextDataConfig
from bigmodel.datasets import MANIFEST_FILE, TOKENIZER_FILE, shard_name
from bigmodel.errors import UserError
from bigmodel.io import atomic_open, atomic_path, write_json
from bigmodel.prepare import redact
from bigmodel.prepare.redact import Redactions


@dataclass
class Report:
    """What cleaning did, for the manifest and the console."""

    documents_seen: int = 0
    documents_kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"too_short": 0, "too_long": 0, "duplicate": 0})
    chars_seen: int = 0
    chars_kept: int = 0
    control_chars_removed: int = 0
    redactions: Redactions = field(default_factory=Redactions)

    def as_dict(self) -> dict[str, Any]:
        """For the manifest: redactions as counts per kind and masked examples."""
        found = {k: v for k, v in self.__dict__.items() if k != "redactions"}
        return {**found, "redacted": self.redactions.counts, "redacted_examples": self.redactions.examples}


def run(config: Config) -> dict[str, Any]:
    data = config.data
    assert isinstance(data, TextDataConfig)
    files = source_files(data)
    report = Report()

    # Pass 1: which documents survive cleaning, and which characters they use.
    keep, chars = _scan(files, data, report)
    if report.chars_seen == 0:
        raise UserError(
            f"data: no text in {', '.join(str(f) for f in files)} (the files are empty); "
            "give data.path a file with text"
        )
    if report.documents_kept == 0:
        raise UserError(
            f"data: every one of {report.documents_seen} documents was dropped by cleaning "
            f"({report.dropped}); loosen data.cleaning.min_chars/max_chars"
        )

    visible = sorted(c for c in chars if not c.isspace())
    if len(visible) < 2:  # a model of it learns nothing (the loss falls to 0 and means nothing)
        raise UserError(
            f"data: the text uses {len(visible)} distinct character(s) besides whitespace "
            f"({''.join(visible)!r}); there is nothing to learn from it: give data.path real text"
        )

    # Pass 2 (bpe): the tokenizer.
    pretrained = pretrained_tokenizer(config.init.from_) if config.init.from_ is not None else None
    tok = pretrained[0] if pretrained else _tokenizer(data, files, keep, chars)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32

    # Pass 3: encode into the shards.
    out_dir = config.stage_dir("prepare")
    counts = _encode(files, data, keep, tok, dtype, report.chars_kept, config.seed, out_dir)
    with atomic_open(out_dir / TOKENIZER_FILE) as handle:
        handle.write(tok.to_json())

    manifest = {
        "kind": "text-data",
        "format_version": 1,
        "sources": records.source_entries(files),
        "tokenizer": {
            "kind": "pretrained" if pretrained else tok.kind,
            "vocab_size": tok.vocab_size,
            "file": TOKENIZER_FILE,
            **({"source": str(config.init.from_)} if pretrained else {}),
        },
        **(pretrained[1] if pretrained else {}),
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(dtype).name,
        "split": data.split,
        "val_fraction": data.val_fraction,
        "seed": config.seed,
        "tokens": counts["tokens"],
        "characters": counts["chars"],
        "augment": {"steps": [a.model_dump() for a in data.augment], "train_tokens_added": counts["augmented_tokens"]},
        "cleaning": report.as_dict(),
    }
    write_json(out_dir / MANIFEST_FILE, manifest)
    dropped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in report.dropped.items() if v) or "none"
    if data.cleaning.redact:
        redact.announce(report.redactions, data.cleaning.redact)
    console.info(
        f"prepare: {len(files)} files, {report.documents_kept}/{report.documents_seen} documents kept "
        f"(dropped: {dropped}), {report.chars_kept:,} characters"
    )
    console.info(
        f"prepare: {manifest['tokenizer']['kind']} tokenizer, vocab {tok.vocab_size}; tokens train "
        f"{counts['tokens']['train']:,}, val {counts['tokens']['val']:,} ({np.dtype(dtype).name})"
    )
    if data.augment:
        copies = sum(a.copies for a in data.augment)
        console.info(
            f"prepare: bpe_dropout added {copies} re-segmented cop{'y' if copies == 1 else 'ies'} of the "
            f"train text: {counts['augmented_tokens']:,} of the {counts['tokens']['train']:,} train tokens"
        )
    return {
        "manifest": str(out_dir / MANIFEST_FILE),
        "train": str(out_dir / shard_name("train")),
        "val": str(out_dir / shard_name("val")),
        "tokenizer": str(out_dir / TOKENIZER_FILE),
        "vocab_size": tok.vocab_size,
        "tokens": counts["tokens"],
    }


# ------------------------------------------------------------------------------------------ sources


def source_files(data: TextDataConfig) -> list[Path]:
    """data.path then data.paths, globs expanded (sorted, so the order is reproducible)."""
    patterns = ([str(data.path)] if data.path is not None else []) + [str(p) for p in data.paths]
    files: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matched = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matched:
                raise UserError(f"data.path: no files match {pattern!r}; check the pattern")
            files.extend(matched)
        elif records.is_source(Path(pattern)):
            files.append(Path(pattern))
        else:
            raise UserError(f"data.path: file not found: {pattern} (set data.path to a text file or glob)")
    return files


def _documents(files: list[Path], data: TextDataConfig) -> Iterator[Iterator[str]]:
    """Each document as an iterator of raw text chunks (a whole file streams in several)."""
    for path in files:
        if records.is_records(path):  # JSONL, Parquet, a datasets folder: one document per record
            yield from _record_documents(path, data)
            continue
        with open(path, encoding=data.encoding, errors="strict", newline="") as handle:
            if data.document == "file":
                documents: Iterator[Iterator[str]] = iter([_file_chunks(handle, data.chunk_chars)])
            elif data.document == "line":
                documents = (iter([line]) for line in handle)
            else:
                documents = (iter([p]) for p in _paragraphs(handle))
            # Text is decoded as it is read: a bad byte surfaces while a document is being consumed.
            yield from _decoding_checked(documents, path, data.encoding)


def _decoding_checked(documents: Iterator[Iterator[str]], path: Path, encoding: str) -> Iterator[Iterator[str]]:
    def chunks(document: Iterator[str]) -> Iterator[str]:
        try:
            yield from document
        except UnicodeDecodeError:
            raise UserError(_not_text(path, encoding)) from None

    try:
        for document in documents:
            yield chunks(document)
    except UnicodeDecodeError:
        raise UserError(_not_text(path, encoding)) from None


def _not_text(path: Path, encoding: str) -> str:
    """Where the first byte that is not `encoding` is, and what to do about it."""
    raw = path.read_bytes()
    try:
        raw.decode(encoding)
        offset = None
    except UnicodeDecodeError as exc:
        offset = exc.start
    if b"\x00" in raw[:8192]:
        return f"{path}: a binary file, not text (NUL bytes near the start); point data.path at text files"
    where = f" (the first bad byte is at offset {offset})" if offset is not None else ""
    return (
        f"{path}: not {encoding} text{where}; set data.encoding to the file's "
        "encoding (e.g. latin-1, cp1252) or convert it to UTF-8"
    )


def _file_chunks(handle: Any, size: int) -> Iterator[str]:
    """About `size` characters at a time, each chunk ending at a line break that is followed by a
    non-whitespace character. Byte-level BPE pre-tokenizers always split there (and normalisation never
    sees half a combining sequence), so the tokens do not depend on the chunk size."""
    carry = ""
    while True:
        chunk = carry + handle.read(size)
        carry = ""
        if not chunk:
            return
        while line := handle.readline():
            if chunk.endswith("\n") and not line[:1].isspace():
                carry = line
                break
            chunk += line
        yield chunk


def _paragraphs(handle: Any) -> Iterator[str]:
    lines: list[str] = []
    for line in handle:
        if not line.strip() and lines and lines[-1].strip():
            yield "".join(lines) + line
            lines = []
        else:
            lines.append(line)
    if lines:
        yield "".join(lines)


def _record_documents(path: Path, data: TextDataConfig) -> Iterator[Iterator[str]]:
    field = data.jsonl_field
    hint = "set data.jsonl_field to the text's field"
    for where, record in records.read(path, [field], hint, data.encoding):
        if not isinstance(record.get(field), str):
            raise UserError(f"{path}: {where}: field '{field}' is not text ({hint})")
        yield iter([record[field]])


# ------------------------------------------------------------------------------------------ cleaning


# Unicode category Cc is exactly U+0000-001F and U+007F-009F; keep tab and newline.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str, data: TextDataConfig, report: Report | None = None) -> str:
    if data.cleaning.normalize != "none":
        text = unicodedata.normalize(data.cleaning.normalize, text)
    if data.cleaning.strip_control:
        text, removed = _CONTROL.subn("", text)
        if report is not None:
            report.control_chars_removed += removed
    if data.cleaning.redact:  # (counted in the scan, which passes its report; the encoding pass redacts alike)
        found = report.redactions if report is not None else Redactions(keeps_examples=False)
        text = found.redact(text, data.cleaning.redact)
    return text


def _scan(files: list[Path], data: TextDataConfig, report: Report) -> tuple[list[bool], set[str]]:
    keep: list[bool] = []
    chars: set[str] = set()
    seen_hashes: set[bytes] = set()
    rules = data.cleaning
    for document in _documents(files, data):
        digest = hashlib.blake2b(digest_size=16)
        length = 0
        doc_chars: set[str] = set()
        for raw in document:
            report.chars_seen += len(raw)
            text = clean(raw, data, report)
            length += len(text)
            digest.update(text.encode("utf-8"))
            doc_chars.update(text)
        report.documents_seen += 1
        reason = None
        if length < rules.min_chars:
            reason = "too_short"
        elif rules.max_chars is not None and length > rules.max_chars:
            reason = "too_long"
        elif rules.dedupe:
            key = digest.digest()
            reason = "duplicate" if key in seen_hashes else None
            seen_hashes.add(key)
        keep.append(reason is None)
        if reason is None:
            report.documents_kept += 1
            report.chars_kept += length
            chars |= doc_chars
        else:
            report.dropped[reason] += 1
    return keep, chars


def _kept_chunks(files: list[Path], data: TextDataConfig, keep: list[bool]) -> Iterator[tuple[int, str, bool]]:
    """(document index, cleaned chunk, is the document's last chunk) for the kept documents."""
    for index, document in enumerate(_documents(files, data)):
        if not keep[index]:
            for _ in document:
                pass
            continue
        previous: str | None = None
        for raw in document:
            if previous is not None:
                yield index, previous, False
            previous = clean(raw, data)
        yield index, previous or "", True


# ------------------------------------------------------------------------------- tokenizer, encoding


def pretrained_tokenizer(source_path: Path) -> tuple[tokenizers.BPETokenizer, dict[str, Any]]:
    """The imported model's own tokenizer, with its special tokens and chat template (init.from)."""
    from bigmodel import pretrained

    source = pretrained.describe(source_path)
    tok = tokenizers.from_json(source.tokenizer_json, f"{source_path} (tokenizer)")
    assert isinstance(tok, tokenizers.BPETokenizer)  # an imported tokenizer is a HF one (BPE, WordPiece, Unigram)
    eos = source.special_tokens.get("eos")
    if tok.eot_id is None and eos:  # documents end with the model's own EOS
        tok.eot_id = eos[0]
    console.info(f"prepare: the tokenizer of {source_path.name} ({source.model_type}, vocab {tok.vocab_size})")
    return tok, {"special_tokens": source.special_tokens, "chat_template": source.chat_template}


def _tokenizer(data: TextDataConfig, files: list[Path], keep: list[bool], chars: set[str]) -> tokenizers.Tokenizer:
    kind = data.tokenizer.kind
    if kind == "char":
        return tokenizers.CharTokenizer.from_chars(chars)
    if kind == "file":
        assert data.tokenizer.path is not None
        return tokenizers.load(data.tokenizer.path)
    console.info(f"prepare: training byte-level BPE, vocab {data.tokenizer.vocab_size}")
    return tokenizers.train_bpe((chunk for _, chunk, _ in _kept_chunks(files, data, keep)), data.tokenizer.vocab_size)


def _encode(
    files: list[Path],
    data: TextDataConfig,
    keep: list[bool],
    tok: tokenizers.Tokenizer,
    dtype: type,
    total_chars: int,
    seed: int,
    out_dir: Path,
) -> dict[str, Any]:
    tokens = {"train": 0, "val": 0}
    chars = {"train": 0, "val": 0}
    boundary = int(total_chars * (1.0 - data.val_fraction))  # tail split: first val character
    rng = np.random.default_rng(seed)
    doc_split: dict[int, str] = {}
    offset = 0
    augmented = 0  # train tokens that BPE-dropout copies added

    def write(handle: BinaryIO, split: str, text: str, end_of_doc: bool, encode: Any = tok.encode) -> int:
        ids = encode(text) if text else []
        if end_of_doc and tok.eot_id is not None:
            ids.append(tok.eot_id)
        np.asarray(ids, dtype=dtype).tofile(handle)
        tokens[split] += len(ids)
        chars[split] += len(text)
        return len(ids)

    with ExitStack() as stack:
        shards = {
            split: stack.enter_context(open(stack.enter_context(atomic_path(out_dir / shard_name(split))), "wb"))
            for split in ("train", "val")
        }
        for index, chunk, last in _kept_chunks(files, data, keep):
            if data.split == "document":
                split = doc_split.setdefault(index, "val" if rng.random() < data.val_fraction else "train")
                write(shards[split], split, chunk, last)
                continue
            cut = max(0, min(len(chunk), boundary - offset))
            if cut:
                write(shards["train"], "train", chunk[:cut], last and cut == len(chunk))
            if cut < len(chunk):
                write(shards["val"], "val", chunk[cut:], last)
            offset += len(chunk)
        # BPE-dropout: whole extra passes over the train text, appended after it (never interleaved
        # chunk by chunk, which would teach the model that text repeats itself).
        for number, augment in enumerate(data.augment):
            assert isinstance(tok, tokenizers.BPETokenizer)  # the config refuses bpe_dropout for other tokenizers
            for copy in range(augment.copies):
                rng = np.random.default_rng([seed, number, copy])
                encode = partial(tok.encode_with_dropout, dropout=augment.dropout, rng=rng)
                offset = 0
                for index, chunk, last in _kept_chunks(files, data, keep):
                    if data.split == "document":
                        train_part = chunk if doc_split[index] == "train" else ""
                    else:
                        train_part = chunk[: max(0, min(len(chunk), boundary - offset))]
                        offset += len(chunk)
                    if train_part:
                        augmented += write(
                            shards["train"], "train", train_part, last and len(train_part) == len(chunk), encode
                        )
        for handle in shards.values():
            handle.flush()
    for split in ("train", "val"):
        if tokens[split] == 0:
            raise UserError(
                f"data: the {split} split is empty; "
                + (
                    "use data.split 'tail' or more documents"
                    if data.split == "document"
                    else "use more text or change data.val_fraction"
                )
            )
    return {"tokens": tokens, "chars": chars, "augmented_tokens": augmented}
