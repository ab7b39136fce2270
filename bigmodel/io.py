"""Artifact I/O without PyTorch: atomic writes, JSON manifests, content hashes.

Every file is written to a temporary name in the same folder, flushed to disk, then renamed over the
target (os.replace is atomic on POSIX and Windows), so a crash leaves either the old file or the new one,
never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from bigmodel.errors import UserError


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error removed. A
    target that cannot be written, or a disk that fills up while it is (whoever writes: safetensors
    says so in its own exception type), is one line naming `path`, not the temporary file."""
    if path.exists() and not path.is_file():
        raise UserError(f"{path} exists and is not a regular file; choose a file path to write to")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror}); choose a path you can write to") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result gets a normal file's mode
        os.replace(tmp, path)
    except Exception as exc:
        if is_disk_full(exc):
            raise disk_full(path) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
FULL_WORDS = ("No space left on device", "Disk quota exceeded", "File too large")


def is_disk_full(exc: BaseException) -> bool:
    """A write refused for room: the OS's errno, or its words in a library's own exception (safetensors)."""
    return (isinstance(exc, OSError) and exc.errno in FULL) or any(words in str(exc) for words in FULL_WORDS)


def disk_full(path: Path, needed: int | None = None) -> UserError:
    free = shutil.disk_usage(path if path.is_dir() else path.parent).free
    want = f" ({needed / 2**30:.1f} GiB needed, " if needed else " ("
    return UserError(
        f"the disk filled up while writing {path}{want}{free / 2**30:.1f} GiB free); nothing was "
        "published: free space, or point run_dir at a disk with room, and run it again"
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file for writing that becomes `path` only when the block succeeds.

    A target that exists and is not a regular file (/dev/stdout, a named pipe) is written in place:
    renaming over it would replace the device with a plain file.
    """
    encoding = None if "b" in mode else "utf-8"
    if path.exists() and not path.is_file():
        with open(path, mode, encoding=encoding) as handle:
            yield handle
        return
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as handle:
        yield handle


def write_json(path: Path, payload: Any) -> None:
    with atomic_open(path) as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")


def read_json(path: Path, what: str) -> Any:
    """Read a JSON artifact; a missing or unreadable one is the user's to fix (exit 2)."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path} (run the stage that makes it first)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} is corrupt ({exc}); delete it and re-run its stage") from exc


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one line; a line is small enough that the write is all-or-nothing in practice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()


def sha256_file(path: Path) -> str:
    """The file's sha256, hashed once per process while its inode, size and times stay the same (a stage
    names its multi-GB checkpoint in its lineage and again in its stamp)."""
    info = os.stat(path)
    key = (os.path.realpath(path), info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


_SHA256: dict[tuple[str, int, int, int, int], str] = {}


def require_file(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise UserError(f"{what} not found: {path} ({fix})")
    return path


def jsonl_objects(lines: Iterable[str], source: Path | str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; invalid JSON or a non-object is the user's to fix. A
    UTF-8 byte-order mark on the first line (what some Windows editors write) is dropped, as for CSV."""
    for line_no, line in enumerate(lines, start=1):
        if line_no == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{source}: line {line_no} is not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise UserError(f"{source}: line {line_no} must be a JSON object")
        yield line_no, record


def safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The `__metadata__` of a safetensors file, read from its JSON header alone (no tensor library), or
    None when the file is not safetensors."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= 100 << 20:
                return None
            header = json.loads(handle.read(size))
    except (OSError, ValueError):
        return None
    return header.get("__metadata__") or {} if isinstance(header, dict) else None


def clone(source: Path, target: Path) -> None:
    """A copy of `source` at `target` that shares its blocks where the filesystem can (a reflink: XFS,
    btrfs), else a plain copy. Not a hard link: onnx refuses external data with several links."""
    import fcntl

    with open(source, "rb") as src, open(target, "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            return
        except OSError:  # not supported here: copy
            pass
    shutil.copyfile(source, target)


FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
