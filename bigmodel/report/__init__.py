"""report: a run's artifacts -> PNG plots and one self-contained HTML page in <run_dir>/report/.

It reads only what the stages wrote (metrics.jsonl, the manifests, eval's metrics.json, compress's
report.json, export's parity.json, infer's output) and runs nothing. Stages that have not run are
left out of the page. matplotlib is an optional extra; without it `report` exits 2 and says so.
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path
from typing import Any

from bigmodel import console
from bigmodel.checkpoint import read_manifest
from bigmodel.config import Config
from bigmodel.errors import UserError
from bigmodel.io import atomic_open, atomic_path, jsonl_objects, read_json

SAMPLE_ROWS = 8


def run(config: Config) -> dict[str, Any]:
    try:
        from bigmodel.report import plots
    except ImportError as exc:
        raise UserError(
            f"report draws its plots with matplotlib, which is not installed ({exc}); "
            "install the extra: pip install 'bigmodel[report]'"
        ) from None
    from bigmodel.report import page

    run_dir = config.stage_dir("report").parent
    artifacts = collect(config)
    if not artifacts:
        raise UserError(f"nothing to report in {run_dir}: run a stage first (bigmodel pipeline -c CONFIG)")
    figures = draw(artifacts, config, plots)
    out_dir = config.stage_dir("report")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (_, png) in figures.items():
        with atomic_path(out_dir / name) as tmp:
            tmp.write_bytes(png)
    html_path = out_dir / "index.html"
    with atomic_open(html_path) as handle:
        handle.write(page.render(config, artifacts, figures))
    console.info(f"report: {len(figures)} plots and {html_path}")
    return {"report": str(html_path), "plots": [str(out_dir / name) for name in figures], "stages": sorted(artifacts)}


def collect(config: Config) -> dict[str, Any]:
    """Whatever each stage left on disk, keyed by stage name (absent stages are simply missing)."""
    from bigmodel import inspect

    found: dict[str, Any] = {}
    stage = config.stage_dir
    if (stage("prepare") / "manifest.json").is_file():
        found["prepare"] = read_json(stage("prepare") / "manifest.json", "prepared-data manifest")
    for name, path in (("init", stage("init") / "model.safetensors"), ("train", stage("train") / "best.safetensors")):
        if path.is_file():
            found[name] = inspect.run(path)
    if (stage("train") / "last.safetensors").is_file() and "train" in found:
        # A private run's guarantee is what the whole run spent (its best checkpoint was chosen among all).
        privacy = read_manifest(stage("train") / "last.safetensors").privacy
        if privacy is not None:
            found["train"]["privacy"] = privacy.model_dump(mode="json")
    if (stage("train") / "metrics.jsonl").is_file():
        path = stage("train") / "metrics.jsonl"
        records = [record for _, record in jsonl_objects(path.read_text().splitlines(), path)]
        found.setdefault("train", {})["records"] = records
    for name, file in (("eval", "metrics.json"), ("compress", "report.json"), ("export", "parity.json")):
        if (stage(name) / file).is_file():
            found[name] = read_json(stage(name) / file, f"{name} output")
    if (stage("explain") / "attributions.json").is_file():
        found["explain"] = read_json(stage("explain") / "attributions.json", "explain output")
    samples = _infer_samples(stage("infer"))
    if samples:
        found["infer"] = samples
    return found


def _infer_samples(folder: Path) -> list[dict[str, Any]]:
    """The first few predictions or generations infer wrote."""
    if (folder / "generations.jsonl").is_file():
        path = folder / "generations.jsonl"
        return [r for _, r in itertools.islice(jsonl_objects(path.read_text().splitlines(), path), SAMPLE_ROWS)]
    if (folder / "predictions.csv").is_file():
        with open(folder / "predictions.csv", newline="") as handle:
            return list(itertools.islice(csv.DictReader(handle), SAMPLE_ROWS))
    return []


def draw(artifacts: dict[str, Any], config: Config, plots: Any) -> dict[str, tuple[str, bytes]]:
    """PNG name -> (caption, bytes), for every figure the artifacts allow."""
    figures: dict[str, tuple[str, bytes]] = {}
    records = artifacts.get("train", {}).get("records", [])
    if records:
        figures["loss_vs_step.png"] = (
            "Train and val loss against optimizer steps.",
            plots.loss_curves(records, "step", "step"),
        )
        if any("tokens" in r for r in records):
            figures["loss_vs_tokens.png"] = (
                "Loss against training tokens seen.",
                plots.loss_curves(records, "tokens", "tokens"),
            )
        elif any("epoch" in r for r in records):
            figures["loss_vs_epoch.png"] = ("Loss against epochs.", plots.loss_curves(records, "epoch", "epoch"))
        if any("lr" in r for r in records):
            figures["lr.png"] = (
                "The learning-rate schedule as it ran.",
                plots.series(records, "lr", "learning rate", "lr"),
            )
        if any("tokens_per_s" in r for r in records):
            figures["tokens_per_s.png"] = (
                "Training throughput per logging window.",
                plots.series(records, "tokens_per_s", "throughput", "tokens/s"),
            )
        if any("epsilon" in r for r in records):
            figures["epsilon.png"] = (
                "The privacy spent (epsilon at the run's delta) against optimizer steps.",
                plots.series(records, "epsilon", "privacy spent", "epsilon"),
            )
        if any("val_accuracy" in r for r in records):
            figures["val_accuracy.png"] = (
                "Validation accuracy during training.",
                plots.series(records, "val_accuracy", "val accuracy", "accuracy"),
            )
    metrics = artifacts.get("eval", {}).get("metrics", {})
    if "confusion_matrix" in metrics:
        labels = [str(label) for label in metrics.get("labels") or range(len(metrics["confusion_matrix"]))]
        figures["confusion_matrix.png"] = (
            f"Confusion matrix on the {artifacts['eval'].get('split', 'test')} split, each row normalised to 1.",
            plots.confusion_matrix(metrics["confusion_matrix"], labels),
        )
        figures["per_class.png"] = ("Precision and recall of every class.", plots.per_class(metrics["per_class"]))
    if artifacts.get("compress", {}).get("steps"):
        figures["compress_tradeoff.png"] = (
            "The main metric of every compression step against weight size and latency.",
            plots.compression_tradeoff(artifacts["compress"]["steps"]),
        )
    return figures
