"""Reading what `prepare` wrote. Later stages meet the data only through these files."""

from __future__ import annotations

from dataclasses import dataclass
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


def sft_files(folder: Path, split: str) -> dict[str, Path]:
    """A split of fine-tuning examples: token ids, the trained-token mask, and where each example starts."""
    return {
        "tokens": folder / shard_name(split),
        "mask": folder / f"{split}.mask.bin",
        "starts": folder / f"{split}.starts.bin",
    }


def prepared_files(config: Config) -> list[Path]:
    """What `prepare` writes for this config's data format (the inputs of init and train); the second is
    the one whose sha256 a checkpoint's lineage records."""
    folder = config.stage_dir("prepare")
    if config.data.format == "text":
        names = [MANIFEST_FILE, shard_name("train"), shard_name("val"), TOKENIZER_FILE]
    elif config.data.format == "sft":
        return [
            folder / MANIFEST_FILE,
            *sft_files(folder, "train").values(),
            *sft_files(folder, "val").values(),
            folder / TOKENIZER_FILE,
        ]
    elif config.data.format == "text_classification":
        names = [MANIFEST_FILE, DATA_FILE, TOKENIZER_FILE]
    else:
        names = [MANIFEST_FILE, DATA_FILE, TEST_CSV]
    return [folder / name for name in names]


def data_manifest(config: Config) -> dict[str, Any]:
    return read_json(config.stage_dir("prepare") / MANIFEST_FILE, "prepared-data manifest")


def load_split(config: Config, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one split: x float32 (N, F); y int64 class indices or float32 targets (N,)."""
    path = require_file(config.stage_dir("prepare") / DATA_FILE, "prepared data", "run 'bigmodel prepare' first")
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
        raise UserError(
            f"{path} does not have the {manifest['tokens'][split]} tokens its manifest says; re-run 'bigmodel prepare'"
        )
    return np.memmap(path, dtype=dtype, mode="r")


@dataclass
class Examples:
    """A split of fine-tuning examples (memmapped): example i is tokens[starts[i]:starts[i + 1]], and
    mask marks the tokens the loss predicts."""

    tokens: np.ndarray
    mask: np.ndarray
    starts: np.ndarray

    def __len__(self) -> int:
        return len(self.starts) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.starts[i], self.starts[i + 1]
        return self.tokens[a:b], self.mask[a:b]


def load_examples(config: Config, split: str) -> Examples:
    """A split prepared from data.format 'sft', checked against its manifest."""
    manifest = data_manifest(config)
    paths = sft_files(config.stage_dir("prepare"), split)
    for path in paths.values():
        require_file(path, f"{split} examples", "run 'bigmodel prepare' first")
    tokens = load_tokens(config, split)
    mask = np.memmap(paths["mask"], dtype=np.uint8, mode="r")
    starts = np.fromfile(paths["starts"], dtype=np.int64)
    if len(mask) != len(tokens) or len(starts) != manifest["examples"][split] + 1 or starts[-1] != len(tokens):
        raise UserError(
            f"{paths['starts'].parent}: the {split} examples do not match their manifest; re-run 'bigmodel prepare'"
        )
    return Examples(tokens, mask, starts)


@dataclass
class TextSplit:
    """One split of prepared texts: token ids end to end, where each example starts, token types (sentence
    pairs) and labels (a classifier's)."""

    ids: np.ndarray  # (total tokens,) int32
    offsets: np.ndarray  # (N + 1,) int64
    types: np.ndarray | None  # (total tokens,) uint8, for pairs
    y: np.ndarray | None  # (N,) int64, for a classifier

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def batch(self, rows: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
        """The examples `rows` right-padded to the longest of them: input_ids, attention_mask, token_type_ids."""
        lengths = self.offsets[rows + 1] - self.offsets[rows]
        width = int(lengths.max())
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        types = np.zeros((len(rows), width), dtype=np.int64)
        for i, (row, length) in enumerate(zip(rows, lengths)):
            start = self.offsets[row]
            ids[i, :length] = self.ids[start : start + length]
            if self.types is not None:
                types[i, :length] = self.types[start : start + length]
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def load_texts(config: Config, split: str, side: str = "") -> TextSplit:
    """A split of data.format text_classification, as prepare wrote it; side "b_": the second texts of an
    embedding model's pairs."""
    path = require_file(config.stage_dir("prepare") / DATA_FILE, "prepared data", "run 'bigmodel prepare' first")
    arrays = load_file(str(path))
    if f"{split}_{side}ids" not in arrays:
        raise UserError(
            f"{path}: no {split} texts{' (second of each pair)' if side else ''} for model.task "
            f"'{config.task}'; re-run 'bigmodel prepare'"
        )
    return TextSplit(
        arrays[f"{split}_{side}ids"],
        arrays[f"{split}_{side}offsets"],
        arrays.get(f"{split}_types") if not side else None,
        arrays.get(f"{split}_y"),
    )
