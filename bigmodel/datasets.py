"""Reading what `prepare` wrote. Later stages meet the data only through these files."""

from __future__ import annotations

from typing import Any

import numpy as np
from safetensors.numpy import load_file

from bigmodel.config import Config
from bigmodel.errors import UserError
from bigmodel.io import read_json, require_file

DATA_FILE = "data.safetensors"
MANIFEST_FILE = "manifest.json"
TEST_CSV = "test.csv"


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
