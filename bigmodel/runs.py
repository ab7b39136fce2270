"""A run directory as a record: the config it ran with, each stage's status, and runs listed or compared.

Every stage writes the resolved config it runs with to <run_dir>/config.yaml (atomically, before it
starts), so a run directory alone is enough for `report`, `eval`, `inspect` and `config show`
(`--run-dir DIR` without -c). Each checkpoint also carries the config it was trained with in its header:
`inspect DIR` compares them with config.yaml, so a run whose artifacts come from different configs says so.

No PyTorch here: checkpoint headers are read as JSON.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from bigmodel.config import Config, flatten
from bigmodel.errors import UserError
from bigmodel.io import safetensors_metadata
from bigmodel.manifests import CheckpointManifest, read_checkpoint_manifest
from bigmodel.record import RECORD, load_run
from bigmodel.stages import ORDER, STAGES


def checkpoint_manifest(path: Path) -> CheckpointManifest | None:
    """A bigmodel checkpoint's manifest, or None when `path` is not one (or not a readable one)."""
    meta = safetensors_metadata(path) if path.is_file() else None
    if not meta:
        return None
    try:
        return read_checkpoint_manifest(meta, str(path))
    except UserError:
        return None


# ------------------------------------------------------------------------------------ stage status


def stage_status(config: Config) -> dict[str, dict[str, Any]]:
    """For each stage: status (done, stale, unfinished, not run), and its step, main metric and, for
    checkpoints, whether they were made with the recorded config."""

    recorded = flatten(config.model_dump(mode="json", by_alias=True))
    rows: dict[str, dict[str, Any]] = {}
    for name in ORDER:
        stage = STAGES[name]
        outputs = [p for p in stage.outputs(config) if str(p) != "-"]
        if not outputs or not any(p.exists() for p in outputs):
            rows[name] = {"status": "not run"}
            continue
        row: dict[str, Any] = {"status": "done" if stage.is_up_to_date(config) else "stale"}
        row.update(_details(name, config))
        if row.pop("unfinished", False):
            row["status"] = "unfinished"
        saved = row.pop("checkpoint_config", None)
        if saved is not None:
            changed = [k for k, v in flatten(saved).items() if k in recorded and recorded[k] != v and k != "run_dir"]
            row["config"] = "as config.yaml" if not changed else f"differs from config.yaml in {', '.join(changed)}"
        rows[name] = row
    return rows


def _details(name: str, config: Config) -> dict[str, Any]:
    folder = config.stage_dir(name)
    if name == "prepare":
        manifest = _json(folder / "manifest.json") or {}
        return {k: manifest[k] for k in ("tokens", "splits", "examples") if k in manifest}
    if name == "init":
        init = checkpoint_manifest(folder / "model.safetensors")
        return {"source": init.import_.source if init is not None and init.import_ is not None else "bigmodel init"}
    if name == "train":
        last = checkpoint_manifest(folder / "last.safetensors")
        best = checkpoint_manifest(folder / "best.safetensors")
        loop = last.resume.loop if last is not None and last.resume is not None else {}
        return {
            "step": loop.get("step", best.step if best else None),
            "total_steps": loop.get("total_steps"),
            "unfinished": bool(loop) and not loop.get("finished", False),
            "best_step": best.step if best else None,
            "best": best.metrics if best else None,
            "checkpoint_config": (best.config if best else None) or (last.config if last else None),
        }
    if name == "eval":
        metrics = _json(config.eval_output()) or {}
        return {"checkpoint": metrics.get("checkpoint"), "metrics": headline(metrics.get("metrics") or {})}
    if name == "compress":
        report = _json(folder / "report.json") or {}
        return {"steps": max(len(report.get("steps") or []) - 1, 0)}  # the first row is the baseline
    if name == "export":
        parity = _json(folder / "parity.json") or {}
        return {k: parity[k] for k in ("passed", "max_abs_diff") if k in parity}
    return {}


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics a run is judged by: loss and perplexity (LM), accuracy and F1 (classification), R² and
    MAE (regression)."""
    keys = ("loss", "perplexity", "accuracy", "f1_macro", "r2", "mae")
    return {k: metrics[k] for k in keys if isinstance(metrics.get(k), (int, float))}


def _json(path: Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def describe(run_dir: Path) -> dict[str, Any]:
    """`inspect DIR` of a run directory: its config and each stage's status."""
    config = load_run(run_dir)
    return {
        "kind": "run",
        "path": str(run_dir),
        "family": config.model.family,
        "data": config.data.format,
        "config": str(run_dir / RECORD),
        "stages": stage_status(config),
    }


# ---------------------------------------------------------------------------------- list, compare


def find_runs(root: Path, depth: int = 3) -> list[Path]:
    """Run directories (folders with a config.yaml record) under `root`, `root` included."""
    if not root.is_dir():
        raise UserError(f"{root}: not a folder; give the folder that holds your runs (default: runs)")
    found = [root] if (root / RECORD).is_file() else []
    if depth > 0:
        for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found += find_runs(child, depth - 1)
    return found


def summary(run_dir: Path) -> dict[str, Any]:
    """One line's worth of a run: family, the last stage done, step, main metric, when."""
    config = load_run(run_dir)
    stages = stage_status(config)
    ran = sorted(
        (name for name, row in stages.items() if row["status"] != "not run"),
        key=lambda name: _newest(config.stage_dir(name)),
    )  # the last one run, not the last in ORDER
    train, evaluation = stages.get("train", {}), stages.get("eval", {})
    metric = evaluation.get("metrics") or (train.get("best") or {})
    latest = max((p.stat().st_mtime for p in run_dir.rglob("*") if p.is_file()), default=None)
    return {
        "path": str(run_dir),
        "family": config.model.family,
        "last_stage": f"{ran[-1]} ({stages[ran[-1]]['status']})" if ran else "none",
        "step": train.get("step"),
        "metric": metric,
        "when": datetime.datetime.fromtimestamp(latest).isoformat(timespec="minutes") if latest else None,
    }


def _newest(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=0.0)


def compare(first: Path, second: Path) -> dict[str, Any]:
    """The config keys that differ between two runs, and their metrics side by side."""
    configs = [flatten(load_run(run).model_dump(mode="json", by_alias=True)) for run in (first, second)]
    ignored = {"run_dir"}
    differ = {
        key: [configs[0].get(key), configs[1].get(key)]
        for key in sorted(configs[0].keys() | configs[1].keys())
        if key not in ignored and configs[0].get(key) != configs[1].get(key)
    }
    metrics = [_metrics_of(run) for run in (first, second)]
    names = sorted(metrics[0].keys() | metrics[1].keys())
    return {
        "runs": [str(first), str(second)],
        "config_differences": differ,
        "metrics": {name: [metrics[0].get(name), metrics[1].get(name)] for name in names},
    }


def _metrics_of(run_dir: Path) -> dict[str, Any]:
    stages = stage_status(load_run(run_dir))
    train, evaluation = stages.get("train", {}), stages.get("eval", {})
    found = {f"train.{k}": v for k, v in (train.get("best") or {}).items()}
    found.update({"train.steps": train.get("step")} if train.get("step") is not None else {})
    found.update({f"eval.{k}": v for k, v in (evaluation.get("metrics") or {}).items()})
    return found
