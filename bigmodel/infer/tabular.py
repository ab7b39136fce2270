"""Predict rows from CSV or JSONL (a file or stdin) with an exported tabular model.

Columns are matched by name against the feature names stored in the model. The target column may be
present (it is passed through, and accuracy is reported). Output columns: `prediction` (the label, or
the value for regression), then `prob_<label>` for each class; any other unknown column is an error, as is a
missing feature or a non-numeric value.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import IO, Any

import numpy as np

from bigmodel import console, metrics
from bigmodel.config import STDIO, InferConfig
from bigmodel.errors import UserError
from bigmodel.io import atomic_open, jsonl_objects
from bigmodel.manifests import TabularMetadata
from bigmodel.tabular_io import parse_number, read_csv, read_text


def run_model(
    session: Any,
    meta: TabularMetadata,
    path: Path,
    settings: InferConfig,
    source: Path | None,
    dest: Path,
    seed: int,
    bench_settings: dict[str, int] | None,
) -> dict[str, Any]:
    """infer's entry for tabular models: predict the rows of a file (or stdin)."""
    if bench_settings is not None:
        raise UserError("--bench measures language-model decoding; this is a tabular model")
    if source is None:
        raise UserError("infer needs rows to predict: --input FILE (CSV or JSONL) or '-' for stdin")
    return predict_file(session, meta, path, source, dest, settings)


def predict_file(
    session: Any, meta: TabularMetadata, model: Path, source: Path, dest: Path, settings: InferConfig
) -> dict[str, Any]:
    records = _read_records(source, settings.format)
    outputs, rows, targets = predict_records(session, meta, records, source, settings.batch_size)
    _write(rows, dest, _format(settings.format, dest))
    result: dict[str, Any] = {"predictions": str(dest), "rows": len(rows), "model": str(model)}
    if targets is not None and meta.task == "classification":
        known = {label: i for i, label in enumerate(meta.labels or [])}
        if all(t in known for t in targets):
            y = np.array([known[t] for t in targets])
            result["accuracy"] = metrics.classification(y, outputs, meta.labels or [])["accuracy"]
    console.info(
        f"infer: {len(rows)} rows -> {'stdout' if str(dest) == STDIO else dest}"
        + (f" (accuracy against the '{meta.target}' column: {result['accuracy']:.4f})" if "accuracy" in result else "")
    )
    return result


def predict_records(
    session: Any, meta: TabularMetadata, records: list[dict[Any, Any]], source: Path | str, batch_size: int
) -> tuple[np.ndarray, list[dict[str, Any]], list[str] | None]:
    """Model outputs, prediction rows and the passed-through targets for rows given as {column: value}
    (key None: the row's line number, for error messages). infer and serve predict through this."""
    x, targets = _to_matrix(records, meta.features, meta.target, Path(str(source)))
    outputs = np.concatenate(
        [session.run(None, {"features": x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    )
    return outputs, _prediction_rows(outputs, meta, targets), targets


def _format(setting: str, path: Path) -> str:
    if setting != "auto":
        return setting
    return "jsonl" if path.name.endswith((".jsonl", ".jsonl.gz", ".ndjson")) else "csv"


def _read_records(source: Path, setting: str) -> list[dict[Any, Any]]:
    """Rows as dicts column -> cell, each with its 1-based line number under key None."""
    if str(source) == STDIO:
        text = sys.stdin.read()
        # stdin has no extension to go by: a JSON object on the first line means JSONL.
        fmt = setting if setting != "auto" else ("jsonl" if text.lstrip().startswith("{") else "csv")
    else:
        if not source.is_file():
            raise UserError(f"input file not found: {source} (set infer.input or --input)")
        text = read_text(source)
        fmt = _format(setting, source)
    if fmt == "csv":
        header, cells = read_csv(source, text)
        return [{None: i + 2, **dict(zip(header, row))} for i, row in enumerate(cells)]
    records = [{None: line_no, **record} for line_no, record in jsonl_objects(text.splitlines(), source)]
    if not records:
        raise UserError(f"{source}: no rows to predict")
    return records


def _to_matrix(
    records: list[dict[Any, Any]], features: list[str], target: str, source: Path
) -> tuple[np.ndarray, list[str] | None]:
    columns = {k for k in records[0] if k is not None}
    missing = [f for f in features if f not in columns]
    extra = sorted(columns - set(features) - {target})
    if missing:
        raise UserError(
            f"{source}: missing feature column(s) {', '.join(missing[:5])}"
            + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            + "; the model needs every feature it was trained on"
        )
    if extra:
        raise UserError(
            f"{source}: unknown column(s) {', '.join(extra[:5])}; the model takes "
            f"{len(features)} features (and optionally '{target}'): drop the others"
        )
    x = np.empty((len(records), len(features)), dtype=np.float32)
    for r, record in enumerate(records):
        line = record[None]
        for c, name in enumerate(features):
            if name not in record:
                raise UserError(f"{source}: line {line} has no value for column '{name}'")
            x[r, c] = parse_number(str(record[name]) if record[name] is not None else "", line, name, source)
    targets = [str(rec.get(target, "")).strip() for rec in records] if target in columns else None
    return x, targets


def _prediction_rows(outputs: np.ndarray, meta: TabularMetadata, targets: list[str] | None) -> list[dict[str, Any]]:
    # The true target passes through under its own name unless that clashes with an output column.
    target_col = meta.target
    if target_col == "prediction" or target_col.startswith("prob_"):
        target_col = f"{target_col}_true"
    rows = []
    for i, out in enumerate(outputs):
        row: dict[str, Any] = {} if targets is None else {target_col: targets[i]}
        if meta.task == "classification":
            row["prediction"] = (meta.labels or [])[int(out.argmax())]
            row.update({f"prob_{label}": float(p) for label, p in zip(meta.labels or [], out)})
        else:
            row["prediction"] = float(out)
        rows.append(row)
    return rows


def _write(rows: list[dict[str, Any]], dest: Path, fmt: str) -> None:
    if str(dest) == STDIO:
        _write_to(sys.stdout, rows, fmt)
        sys.stdout.flush()
        return
    with atomic_open(dest) as handle:
        _write_to(handle, rows, fmt)


def _write_to(handle: IO[str], rows: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "jsonl":
        for row in rows:
            handle.write(json.dumps(nest_probabilities(row)) + "\n")
        return
    writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows)


def nest_probabilities(row: dict[str, Any]) -> dict[str, Any]:
    """{..., prob_a, prob_b} -> {..., probabilities: {a, b}}: a prediction's JSON shape (infer, serve)."""
    probs = {k.removeprefix("prob_"): v for k, v in row.items() if k.startswith("prob_")}
    plain = {k: v for k, v in row.items() if not k.startswith("prob_")}
    return {**plain, "probabilities": probs} if probs else plain
