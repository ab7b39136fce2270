"""Weights on disk, one tensor at a time: safetensors read by positioned reads, and written streamed.

A big model never fits twice in memory, and often not once in fp32, so every stage that touches its
weights reads one tensor, uses it, and lets it go. `SafetensorsFile` reads a tensor straight from the
file into its own buffer (no memory map: mapped pages would count against the process as they are
touched, and a 15 GB model would look 15 GB big). `ShardedWeights` does the same across the shards of a
Hugging Face folder. `SafetensorsWriter` writes a file whose tensors are declared up front: the header
first (with room for metadata only known at the end, such as a parity verdict), then each tensor as it
is made, then the final header in place; the file appears at its name only when it is complete.

The format (https://github.com/huggingface/safetensors#format): 8 bytes little-endian header length, a
JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, which may be
padded with spaces, then the data. The header of an untrusted file is validated before anything is read:
offsets inside the file, no overlaps, sizes that match shape and dtype -- a truncated shard is refused by
name instead of failing half-way through a stage.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bigmodel.errors import UserError
from bigmodel.io import FULL, atomic_path, disk_full

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER = 100 << 20  # safetensors' own limit
# A write that cannot be made: the disk is full, a quota is reached, or the file passes a size limit.


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offset in the file (absolute)
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse before writing `needed` bytes into `folder` when the disk does not have them."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise UserError(
            f"{what} needs {needed / 2**30:.1f} GiB of disk in {folder} but {free / 2**30:.1f} GiB is "
            "free; free space, or point run_dir at a disk with room"
        )


class SafetensorsFile:
    """One safetensors file: its validated header, and tensors read one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                if not 2 <= length <= min(MAX_HEADER, size - 8):
                    raise ValueError("bad header length")
                header = json.loads(handle.read(length))
        except FileNotFoundError:
            raise UserError(f"{path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is not a readable safetensors file ({exc}); re-create or re-download it") from exc
        if not isinstance(header, dict):
            raise UserError(f"{path} is not a safetensors file (its header is not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, Entry] = {}
        start = 8 + length
        spans = []
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (start + int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise UserError(
                    f"{path}: tensor {name!r} has a malformed or unsupported entry ({info!r:.80})"
                ) from None
            if end - begin != torch.Size(shape).numel() * dtype.itemsize or begin < start:
                raise UserError(
                    f"{path}: tensor {name} claims {end - begin} bytes for shape {shape}; the file is corrupt"
                )
            if end > size:
                raise UserError(
                    f"{path} is truncated: tensor {name} ends at byte {end:,} but the file has {size:,}; "
                    "re-download or re-create it"
                )
            self.entries[name] = Entry(dtype, shape, begin, end)
            spans.append((begin, end, name))
        spans.sort()
        for (_, end, name), (begin, _, other) in itertools.pairwise(spans):
            if begin < end:
                raise UserError(f"{path}: tensors {name} and {other} overlap; the file is corrupt")

    def names(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str) -> torch.Tensor:
        """The tensor, in a buffer of its own (writable; nothing stays mapped)."""
        entry = self.entries[name]
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        view = tensor.view(-1).view(torch.uint8).numpy().data if entry.nbytes else memoryview(b"")
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(entry.begin)
            got = 0
            while got < entry.nbytes:
                count = handle.readinto(view[got:])
                if not count:
                    raise UserError(f"{self.path} is truncated (tensor {name}); re-download or re-create it")
                got += count
        return tensor


class ShardedWeights:
    """Tensors spread over several safetensors files (a Hugging Face folder's shards), by name."""

    def __init__(self, files: Iterable[Path]) -> None:
        self.files = [SafetensorsFile(path) for path in files]
        self.where: dict[str, SafetensorsFile] = {}
        for file in self.files:
            for name in file.entries:
                self.where.setdefault(name, file)

    def names(self) -> list[str]:
        return list(self.where)

    def entry(self, name: str) -> Entry:
        return self.where[name].entries[name]

    def read(self, name: str) -> torch.Tensor:
        return self.where[name].read(name)


class SafetensorsWriter:
    """A safetensors file being written, its tensors declared up front and written one at a time
    (`safetensors_writer`)."""

    RESERVE = 1 << 16  # header room for metadata that grows after the data is written

    def __init__(
        self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
    ) -> None:
        self.path, self.tmp = path, path
        self.order = [name for name, _, _ in entries]
        self.layout: dict[str, dict[str, Any]] = {}
        offset = 0
        for name, dtype, shape in entries:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            self.layout[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self.data_bytes = offset
        self.header_length = len(self._header(metadata)) + self.RESERVE
        self.header_length += -self.header_length % 8  # the data starts 8-byte aligned
        self.written = 0
        self.handle: Any = None

    def _header(self, metadata: dict[str, str]) -> bytes:
        return json.dumps({"__metadata__": metadata, **self.layout}, separators=(",", ":")).encode()

    def _write_header(self, metadata: dict[str, str]) -> None:
        header = self._header(metadata)
        if len(header) > self.header_length:
            raise ValueError(f"safetensors header of {len(header)} bytes exceeds the {self.header_length} reserved")
        self.handle.seek(0)
        self.handle.write(self.header_length.to_bytes(8, "little") + header.ljust(self.header_length))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self.written] if self.written < len(self.order) else None
        info = self.layout.get(name)
        if name != expected or info is None:
            raise ValueError(f"tensor {name} written out of order (expected {expected})")
        if NAMES[tensor.dtype] != info["dtype"] or list(tensor.shape) != info["shape"]:
            raise ValueError(
                f"tensor {name}: {tensor.dtype} {tuple(tensor.shape)} written where "
                f"{info['dtype']} {tuple(info['shape'])} was declared"
            )
        self.handle.write(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().data)
        self.written += 1

    def flush(self) -> None:
        """Make what was written readable through `tmp` (a parity gate reads it before publishing)."""
        self.handle.flush()

    def finish(self, metadata: dict[str, str]) -> None:
        """Replace the header's metadata (known only now)."""
        self._write_header(metadata)


@contextlib.contextmanager
def safetensors_writer(
    path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> Iterator[SafetensorsWriter]:
    """Write a safetensors file whose tensors are declared up front, one tensor at a time, atomically:

        with safetensors_writer(path, [(name, dtype, shape), ...], metadata) as out:
            for name, tensor in made_one_at_a_time():
                out.write(name, tensor)
            out.finish(final_metadata)   # optional: metadata known only at the end

    Tensors come in the declared order. `out.tmp` is the file being written (readable with SafetensorsFile
    once every tensor is in); it is renamed to `path` when the block ends without error. On an error, or if
    a declared tensor was never written, nothing appears at `path`; a full disk is refused before writing
    when it can be seen coming, and a one-line error when it cannot."""
    out = SafetensorsWriter(path, entries, metadata)
    check_free_space(path.parent, out.header_length + out.data_bytes, f"writing {path.name}")
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            out.tmp, out.handle = tmp, handle
            out._write_header(metadata)
            handle.seek(8 + out.header_length)
            yield out
            if out.written != len(out.order):
                raise ValueError(f"{path}: {len(out.order) - out.written} declared tensors were never written")
    except OSError as exc:
        if exc.errno in FULL:
            raise disk_full(path, out.header_length + out.data_bytes) from exc
        raise
