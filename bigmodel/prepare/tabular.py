"""Tabular prepare: CSV -> seeded, stratified train/val/test split, with statistics fitted on train.

Writes to <run_dir>/prepare/:
  data.safetensors  train_x, train_y, val_x, val_y, test_x, test_y (x float32; y int64 labels or float32)
  manifest.json     columns, label list, standardisation statistics, split sizes, source sha256
  test.csv          the raw test rows, for trying `infer` and checking it against `eval`
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from bigmodel import console
from bigmodel.config import Config, TabularDataConfig
from bigmodel.datasets import DATA_FILE, MANIFEST_FILE, TEST_CSV
from bigmodel.errors import UserError, did_you_mean
from bigmodel.io import atomic_open, atomic_path, require_file, sha256_file, write_json
from bigmodel.tabular_io import parse_number, read_csv

SPLITS = ("train", "val", "test")


def run(config: Config) -> dict[str, Any]:
    data = config.data
    assert isinstance(data, TabularDataConfig)  # the family table sends only tabular data here
    path = require_file(data.path, "data.path", "set data.path to a CSV file, e.g. --set data.path=FILE")
    header, rows = read_csv(path)
    target_col, feature_cols = _columns(header, data.target, data.features, path)

    x = _features(rows, header, feature_cols, path)
    labels, y = _target(rows, header.index(target_col), target_col, data.task, path)
    split = seeded_split(len(rows), y if data.task == "classification" and data.stratify else None, data, config.seed)
    stats = _fit_statistics(x[split["train"]], y[split["train"]], data.task)

    out_dir = config.stage_dir("prepare")
    arrays: dict[str, np.ndarray] = {}
    for name in SPLITS:
        arrays[f"{name}_x"] = x[split[name]]
        arrays[f"{name}_y"] = y[split[name]]
    with atomic_path(out_dir / DATA_FILE) as tmp:
        save_file(arrays, str(tmp))
    _write_raw_rows(out_dir / TEST_CSV, header, [rows[i] for i in split["test"]])

    manifest: dict[str, Any] = {
        "kind": "tabular-data",
        "format_version": 1,
        "source": {"path": str(path), "sha256": sha256_file(path), "rows": len(rows)},
        "task": data.task,
        "target": target_col,
        "features": feature_cols,
        "labels": labels,
        "seed": config.seed,
        "splits": {name: int(len(split[name])) for name in SPLITS},
        "class_counts": _class_counts(y, split, labels) if data.task == "classification" else None,
        "statistics": stats,
    }
    write_json(out_dir / MANIFEST_FILE, manifest)
    sizes = ", ".join(f"{name} {manifest['splits'][name]}" for name in SPLITS)
    console.info(
        f"prepare: {len(rows)} rows x {len(feature_cols)} features from {path.name}; {sizes}"
        + (f"; {len(labels)} classes" if data.task == "classification" else "")
    )
    return {
        "manifest": str(out_dir / MANIFEST_FILE),
        "data": str(out_dir / DATA_FILE),
        "test_csv": str(out_dir / TEST_CSV),
        "rows": manifest["splits"],
    }


def _columns(header: list[str], target: str, features: list[str] | None, path: Path) -> tuple[str, list[str]]:
    if target not in header:
        raise UserError(
            f"{path}: target column '{target}' (data.target) is not in the header"
            f"{did_you_mean(target, header)}; columns: {', '.join(header[:12])}" + (" ..." if len(header) > 12 else "")
        )
    if features is None:
        return target, [c for c in header if c != target]
    for name in features:
        if name not in header:
            raise UserError(
                f"{path}: feature column '{name}' (data.features) is not in the header{did_you_mean(name, header)}"
            )
    if target in features:
        raise UserError(f"data.features contains the target column '{target}'; remove it from the list")
    if len(set(features)) != len(features):
        raise UserError("data.features lists a column twice; list each feature once")
    return target, list(features)


def _features(rows: list[list[str]], header: list[str], columns: list[str], path: Path) -> np.ndarray:
    indices = [header.index(c) for c in columns]
    x = np.empty((len(rows), len(columns)), dtype=np.float32)
    for r, row in enumerate(rows):
        for c, (col, idx) in enumerate(zip(columns, indices)):
            x[r, c] = parse_number(row[idx], r + 2, col, path)
    return x


def label_order(values: set[str]) -> list[str]:
    """Numeric labels sort as numbers ('2' before '10'); others alphabetically."""
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def _target(rows: list[list[str]], index: int, column: str, task: str, path: Path) -> tuple[list[str], np.ndarray]:
    if task == "regression":
        y = np.array([parse_number(row[index], r + 2, column, path) for r, row in enumerate(rows)])
        return [], y.astype(np.float32)
    cells = [row[index].strip() for row in rows]
    for r, cell in enumerate(cells):
        if not cell:
            raise UserError(f"{path}: missing label at row {r + 2}, column '{column}'")
    labels = label_order(set(cells))
    if len(labels) < 2:
        raise UserError(f"{path}: target column '{column}' has a single class; classification needs 2+")
    lookup = {label: i for i, label in enumerate(labels)}
    return labels, np.array([lookup[c] for c in cells], dtype=np.int64)


def seeded_split(n: int, strata: np.ndarray | None, data: Any, seed: int) -> dict[str, np.ndarray]:
    """Seeded split; with strata, each class is split in the same proportions."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(strata == k) for k in np.unique(strata)]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for group in groups:
        shuffled = rng.permutation(group)
        n_test = int(round(len(group) * data.test_fraction))
        n_val = int(round(len(group) * data.val_fraction))
        parts["test"].append(shuffled[:n_test])
        parts["val"].append(shuffled[n_test : n_test + n_val])
        train = shuffled[n_test + n_val :]  # in random order: its head is a random subset
        parts["train"].append(train[: max(1, int(round(len(train) * data.train_subset)))])
    split = {name: np.sort(np.concatenate(p)) for name, p in parts.items()}
    for name in SPLITS:
        if len(split[name]) == 0:
            raise UserError(
                f"data: the {name} split is empty ({n} rows); use more rows or a larger data.{name}_fraction"
                if name != "train"
                else f"data: no training rows left ({n} rows); lower data.val_fraction/test_fraction"
            )
    return split


def _fit_statistics(x: np.ndarray, y: np.ndarray, task: str) -> dict[str, Any]:
    mean = x.astype(np.float64).mean(axis=0)
    std = x.astype(np.float64).std(axis=0)
    # A constant column (std 0) is left unscaled rather than divided by zero.
    std = np.where(std > 1e-12, std, 1.0)
    stats: dict[str, Any] = {"feature_mean": mean.tolist(), "feature_std": std.tolist()}
    if task == "regression":
        stats["target_mean"] = float(y.mean())
        stats["target_std"] = float(y.std()) if y.std() > 1e-12 else 1.0
    return stats


def _class_counts(y: np.ndarray, split: dict[str, np.ndarray], labels: list[str]) -> dict[str, list[int]]:
    return {name: np.bincount(y[idx], minlength=len(labels)).tolist() for name, idx in split.items()}


def _write_raw_rows(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with atomic_open(path) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
