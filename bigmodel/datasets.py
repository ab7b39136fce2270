"""Reading what `prepare` wrote. Later stages meet the data only through these files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from bigmodel.config import Config
from bigmodel.errors import UserError
from bigmodel.io import read_json, require_file

DATA_FILE = "data.safetensors"
MANIFEST_FILE = "manifest.json"
TEST_CSV = "test.csv"
TOKENIZER_FILE = "tokenizer.json"


def shard_name(split: str) -> str:
    return f"{split}.bin"


def prepared_files(config: Config) -> list[Path]:
    """What `prepare` writes for this config's data format (the inputs of init and train)."""
    folder = config.stage_dir("prepare")
    if config.data.format == "text":
        names = [MANIFEST_FILE, shard_name("train"), shard_name("val"), TOKENIZER_FILE]
    else:
        names = [MANIFEST_FILE, DATA_FILE, TEST_CSV]
    return [folder / name for name in names]


def data_manifest(config: Config) -> dict[str, Any]:
    return read_json(config.stage_dir("prepare") / MANIFEST_FILE, "prepared-data manifest")


def load_split(config: Config, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one split: x float32 (N, F); y int64 class indices or float32 targets (N,)."""
    path = require_file(
        config.stage_dir("prepare") / DATA_FILE, "prepared data", "run 'bigmodel prepare' first"
    )
    try:
        arrays = load_file(str(path))
    except Exception as exc:
        raise UserError(f"{path} is truncated or corrupt ({exc}); re-run 'bigmodel prepare'") from exc
    if f"{split}_x" not in arrays:
        raise UserError(f"{path} has no '{split}' split; re-run 'bigmodel prepare'")
    return arrays[f"{split}_x"], arrays[f"{split}_y"]


def load_tokens(config: Config, split: str) -> np.ndarray:
    """A token shard as a read-only memmap: nothing is loaded until it is indexed."""
    manifest = data_manifest(config)
    path = require_file(
        config.stage_dir("prepare") / shard_name(split), f"{split} token shard", "run 'bigmodel prepare' first"
    )
    dtype = np.dtype(manifest["dtype"])
    if path.stat().st_size != manifest["tokens"][split] * dtype.itemsize:
        raise UserError(f"{path} does not have the {manifest['tokens'][split]} tokens its manifest says; "
                        "re-run 'bigmodel prepare'")
    return np.memmap(path, dtype=dtype, mode="r")
