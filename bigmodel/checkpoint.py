"""Checkpoints: weights in safetensors, the manifest as JSON inside the same file's header.

One file per checkpoint keeps writes atomic (temp file + rename) and makes a checkpoint impossible to
separate from its description. The manifest (bigmodel/manifests.py: typed and
versioned) holds the model family and architecture, the resolved config, the step, metrics and lineage.
Nothing is unpickled: safetensors stores raw tensors and a JSON header.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bigmodel.errors import UserError
from bigmodel.io import atomic_path
from bigmodel.manifests import CheckpointManifest, read_checkpoint_manifest

T = TypeVar("T")


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], manifest: CheckpointManifest) -> None:
    """Write tensors + manifest atomically. Tensors are made contiguous and detached from autograd."""
    plain = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp), metadata=manifest.header())


def read_manifest(path: Path) -> CheckpointManifest:
    """The manifest alone (reads only the header). Refuses anything that is not a bigmodel checkpoint."""

    def read() -> CheckpointManifest:
        with _open(path) as handle:
            return _manifest_of(path, handle)

    return _consistent_read(path, read)


def load_checkpoint(path: Path, prefix: str = "") -> tuple[CheckpointManifest, dict[str, torch.Tensor]]:
    """Manifest and the tensors whose names start with `prefix` (all of them by default)."""

    def read() -> tuple[CheckpointManifest, dict[str, torch.Tensor]]:
        with _open(path) as handle:
            manifest = _manifest_of(path, handle)
            try:
                tensors = {k: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)}
            except Exception as exc:  # safetensors raises its own error type for truncated data
                raise UserError(f"checkpoint {path} is truncated or corrupt ({exc}); re-create it") from exc
        return manifest, tensors

    return _consistent_read(path, read)


def iter_tensors(path: Path, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors whose names start with `prefix`, one at a time: loading a large model this way never
    holds more than one full tensor beyond the model itself. For files no one replaces meanwhile (a run
    reading its own or its init checkpoint); `load_checkpoint` guards against concurrent replacement."""
    with _open(path) as handle:
        _manifest_of(path, handle)
        for name in handle.keys():
            if name.startswith(prefix):
                try:
                    tensor = handle.get_tensor(name)
                except Exception as exc:
                    raise UserError(f"checkpoint {path} is truncated or corrupt ({exc}); re-create it") from exc
                yield name, tensor


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _consistent_read(path: Path, read: Callable[[], T], attempts: int = 20) -> T:
    """Read a checkpoint that a running `train` may replace (atomically) at any moment.

    safetensors reads the header and maps the data through separate opens of the path, so a rename in
    between can pair one file's header with the other file's data. The read counts only if the file
    is the same one before and after it; otherwise it is read again.
    """
    for attempt in range(attempts):
        before = _identity(path)
        try:
            result = read()
        except UserError:
            if _identity(path) == before:
                raise
        else:
            if _identity(path) == before:
                return result
        time.sleep(0.005 * attempt)  # replaced while being read: read the new one, a little later
    raise UserError(f"{path} kept changing while being read (a training run is writing it); try again")


def _open(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (run the stage that writes it, or fix the path)")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:
        raise UserError(
            f"{path} is not a readable safetensors checkpoint ({exc}); it may be truncated or another "
            "kind of file: re-create it with 'bigmodel init' or 'bigmodel train'"
        ) from exc


def _manifest_of(path: Path, handle: Any) -> CheckpointManifest:
    return read_checkpoint_manifest(handle.metadata(), str(path))


def check_shapes(path: Path, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint whose tensors do not match the model built from its architecture."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = [
        f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    if missing or extra or wrong:
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing[:5])}" if missing else "",
                f"unexpected {', '.join(extra[:5])}" if extra else "",
                f"shape mismatch {', '.join(wrong[:5])}" if wrong else "",
            )
            if part
        )
        raise UserError(f"{path} does not match its architecture ({detail}); re-create the checkpoint")


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's state dict under the 'model.' prefix (room for optimizer state beside it).

    Tied weights (GPT's lm_head is its token embedding) are stored once: safetensors refuses
    aliased tensors, and the model re-ties them when it is built. A model being adapted (LoRA) saves
    its adapters only: the frozen rest is the base checkpoint its manifest names."""
    from bigmodel import lora

    if lora.is_adapted(model):
        return {f"model.{name}": p for name, p in lora.adapter_tensors(model).items()}
    tied = getattr(model, "tied_weights", {})
    return {f"model.{name}": t for name, t in model.state_dict().items() if name not in tied}
