"""Records (one dict per example) from the files corpora come in, read a batch at a time.

- JSONL (`.jsonl`, `.jsonl.gz`): one JSON object per line.
- Parquet (`.parquet`): pyarrow reads the named columns one row group batch at a time.
- A Hugging Face `datasets` folder written by `Dataset.save_to_disk` (state.json + data-*.arrow): its
  Arrow files, memory-mapped, a record batch at a time -- what `datasets.load_from_disk` reads. A
  DatasetDict's folder holds one such folder per split: data.path names the split's.

Every reader yields `(where, record)`, `where` saying which line or row a record came from, so a record
without the field a stage needs is named in the error. In a table a null is an absent field. pyarrow is needed only for Parquet and datasets
folders (`pip install pyarrow`, or bigmodel[data]); nothing here needs `datasets` itself.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from bigmodel.errors import UserError
from bigmodel.io import jsonl_objects, sha256_file

BATCH_ROWS = 1024  # rows converted to Python at a time: memory follows this, not the file


def is_records(path: Path) -> bool:
    """Whether `path` is a file or folder of records (not plain text or CSV)."""
    return path.name.endswith((".jsonl", ".jsonl.gz", ".parquet")) or is_datasets_folder(path)


def is_datasets_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def is_source(path: Path) -> bool:
    """Whether `path` is something prepare reads: a file, or a datasets folder."""
    return path.is_file() or is_datasets_folder(path)


def source_entries(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """A manifest's record of its sources: every file read (a datasets folder's each), its sha256 and size."""
    return [
        {"path": str(file), "sha256": sha256_file(file), "bytes": file.stat().st_size}
        for path in paths
        for file in files_of(path)
    ]


def files_of(path: Path) -> list[Path]:
    """The files a source is read from (a datasets folder: its description and its Arrow files), for
    manifests and staleness checks."""
    if not is_datasets_folder(path):
        return [path]
    return sorted(child for child in path.iterdir() if child.is_file())


def sha256_of(path: Path) -> str:
    """A source's sha256: a file's own; a datasets folder's over its files' names and digests."""
    from hashlib import sha256

    if not is_datasets_folder(path):
        return sha256_file(path)
    listing = "".join(f"{file.name} {sha256_file(file)}\n" for file in files_of(path))
    return sha256(listing.encode()).hexdigest()


def read(
    path: Path, columns: list[str] | None, hint: str = "", encoding: str = "utf-8"
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for every record of `path`, each holding at least `columns` (a record or file
    without one is refused by name; `hint` says which setting names the columns); columns None: every
    field of every record, unchecked. `encoding`: a JSONL file's (any file not Parquet is read as JSONL)."""
    if path.name.endswith(".parquet"):
        yield from _parquet(path, columns, hint)
    elif is_datasets_folder(path):
        yield from _datasets_folder(path, columns, hint)
    else:  # (JSONL whatever its name: a stage reading records from a file of another kind says so first)
        yield from _jsonl(path, columns, hint, encoding)


def _jsonl(path: Path, columns: list[str] | None, hint: str, encoding: str) -> Iterator[tuple[str, dict[str, Any]]]:
    opener: Any = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding=encoding) as handle:
        try:
            for line_no, record in jsonl_objects(handle, path):
                missing = [column for column in columns or [] if column not in record]
                if missing:
                    raise UserError(f"{path}: line {line_no} has no field '{missing[0]}' ({hint})")
                yield f"line {line_no}", record
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not {encoding} text ({exc.reason} at byte {exc.start})") from None


def _pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError:
        raise UserError(
            "reading Parquet files and datasets folders needs pyarrow: pip install pyarrow (or bigmodel[data])"
        ) from None
    return pyarrow


def _check_columns(path: Path, names: list[str], columns: list[str] | None, hint: str) -> None:
    missing = [column for column in columns or [] if column not in names]
    if missing:
        raise UserError(f"{path}: no column '{missing[0]}' (its columns: {', '.join(names)}; {hint})")


def _parquet(path: Path, columns: list[str] | None, hint: str) -> Iterator[tuple[str, dict[str, Any]]]:
    pyarrow = _pyarrow()
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pyarrow.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from None
    with table:
        _check_columns(path, table.schema_arrow.names, columns, hint)
        row = 0
        for batch in table.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            for record in batch.to_pylist():
                row += 1
                yield f"row {row}", _present(record)


def _datasets_folder(path: Path, columns: list[str] | None, hint: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        raise UserError(
            f"{path} holds a DatasetDict ({', '.join(splits)}): point data.path at one split's folder, "
            f"e.g. {path / (splits[0] if splits else 'train')}"
        )
    pyarrow = _pyarrow()
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    files = [path / entry["filename"] for entry in state.get("_data_files", [])]
    if state.get("_indices_data_files"):  # (save_to_disk flattens indices; a hand-made folder may not)
        raise UserError(f"{path}: its rows are selected through an indices file; save it with save_to_disk first")
    row = 0
    for file in files:
        with pyarrow.memory_map(str(file)) as source:
            try:
                stream = pyarrow.ipc.open_stream(source)
            except pyarrow.ArrowInvalid as exc:
                raise UserError(f"{file}: not an Arrow stream ({exc})") from None
            _check_columns(path, stream.schema.names, columns, hint)
            for batch in stream:
                for start in range(0, batch.num_rows, BATCH_ROWS):
                    rows = batch.slice(start, BATCH_ROWS)
                    for record in (rows if columns is None else rows.select(columns)).to_pylist():
                        row += 1
                        yield f"row {row}", _present(record)


def _present(record: dict[str, Any]) -> dict[str, Any]:
    """A table row as a record: a null is a field the example does not have (a table gives every row
    every column; JSONL records of different shapes -- prompt/completion beside chat -- just omit them)."""
    return {key: value for key, value in record.items() if value is not None}
