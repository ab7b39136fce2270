"""CSV reading and cell parsing shared by `prepare` and `infer` (no PyTorch here)."""

from __future__ import annotations

import csv
import gzip
import io
import math
from pathlib import Path

from bigmodel.errors import UserError


def read_csv(path: Path, text: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows as text, from `path` (or from `text` already read, e.g. stdin)."""
    if text is None:
        text = read_text(path)
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header:
        raise UserError(f"{path}: the file is empty; a CSV with a header row is expected")
    header = [name.strip() for name in header]
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise UserError(
            f"{path}: the header names column {repeated[0]!r} {header.count(repeated[0])} times; "
            "give each column its own name"
        )
    rows = []
    for line_no, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise UserError(f"{path}: row {line_no} has {len(row)} cells but the header has {len(header)}")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: the CSV has a header but no data rows")
    return header, rows


def read_text(path: Path) -> str:
    """A text file's contents; `.gz` is decompressed on the fly; a UTF-8 BOM is dropped."""
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
        return raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read as UTF-8 text ({exc})") from exc


def parse_number(cell: str, line_no: int, column: str, path: Path | str) -> float:
    text = cell.strip()
    if not text:
        raise UserError(f"{path}: missing value at row {line_no}, column '{column}'; fill or drop the row")
    try:
        value = float(text)
    except ValueError:
        raise UserError(
            f"{path}: non-numeric value {text!r} at row {line_no}, column '{column}'; "
            "feature columns must be numbers (encode categories first)"
        ) from None
    if not math.isfinite(value):
        raise UserError(f"{path}: non-finite value {text!r} at row {line_no}, column '{column}'")
    return value
