"""train.mlflow: the training run recorded in MLflow -- the resolved config as parameters, every line of
metrics.jsonl as metrics at its step, and metrics.jsonl and config.yaml as artifacts (checkpoints are
named in a tag, not copied: they are gigabytes at 1-8B).

`train.mlflow: true` records into $MLFLOW_TRACKING_URI when it is set, else a local store in the run
folder (sqlite:///<run_dir>/mlflow.db, artifacts in <run_dir>/mlartifacts; `mlflow ui --backend-store-uri
sqlite:///<run_dir>/mlflow.db` shows it); a string is the tracking URI itself (http://host:5000, sqlite:///...).
The experiment is the run folder's name; each `bigmodel train` is an MLflow run. A resumed run continues
its MLflow run (its id is kept in train/mlflow.json): a resume recomputes the steps after the last
checkpoint bit for bit, so what MLflow already holds of them is not logged twice -- its history equals
metrics.jsonl. MLflow is an optional extra (bigmodel[mlflow]); it talks only from rank 0.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bigmodel import console
from bigmodel.config import Config
from bigmodel.errors import UserError
from bigmodel.io import write_json

RECORD = "mlflow.json"  # in the train folder: which MLflow run this training run is
PARAMS_PER_BATCH = 100  # MLflow's limits on one log_batch call
METRICS_PER_BATCH = 1000
MAX_PARAM_CHARS = 6000


def tracking_uri(config: Config) -> str:
    setting = config.train.mlflow
    if isinstance(setting, str):
        return setting
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_folder(config) / 'mlflow.db'}"


def run_folder(config: Config) -> Path:
    return config.stage_dir("train").parent.resolve()


def params_of(config: Config) -> dict[str, str]:
    """The resolved config, flattened to dotted keys (train.lr), as MLflow's string parameters."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            text = str(value)
            flat[prefix] = text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 1] + "…"

    walk("", config.model_dump(mode="json", by_alias=True))
    return flat


class MlflowRun:
    """One training run's MLflow run: opened (or continued, on resume) when training starts."""

    def __init__(self, config: Config, out_dir: Path, resuming: bool) -> None:
        client_class = _mlflow_client()
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # (its store set-up talks at INFO)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = tracking_uri(config)
        self.client = client_class(self.uri)
        self.record = out_dir / RECORD
        self.artifacts = [out_dir / "metrics.jsonl", run_folder(config) / "config.yaml"]
        self.checkpoint = out_dir / "best.safetensors"
        self.logged: Counter[tuple[str, int]] = Counter()  # (key, step) entries MLflow holds from before a resume
        previous = _read_record(self.record) if resuming and self.record.is_file() else None
        try:
            self._open(config, out_dir, previous)
        except UserError:
            raise
        except Exception as exc:  # the tracking server or store: before any step runs, one line
            raise UserError(
                f"train.mlflow: cannot record in {self.uri} ({type(exc).__name__}: {str(exc)[:200]}); start the "
                "tracking server, fix the URI, or set train.mlflow: true (a local store) or false"
            ) from exc
        console.info(f"train: MLflow run {self.run_id} in {self.uri}")

    def _open(self, config: Config, out_dir: Path, previous: dict[str, str] | None) -> None:
        if previous is not None and previous["tracking_uri"] != self.uri:
            console.info(f"train: the run was recorded in {previous['tracking_uri']}; continuing in a new MLflow run")
            previous = None
        if previous is not None:
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            for key in self.client.get_run(self.run_id).data.metrics:
                self.logged.update((key, m.step) for m in self.client.get_metric_history(self.run_id, key))
        else:
            self.run_id = self._new_run(config, out_dir)

    def _new_run(self, config: Config, out_dir: Path) -> str:
        name = run_folder(config).name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            # a sqlite store's artifacts beside its database (MLflow's default is ./mlruns, wherever it runs);
            # a server's, where the server keeps them
            database = self.uri.removeprefix("sqlite:///") if self.uri.startswith("sqlite:///") else None
            artifacts = (Path(database).resolve().parent / "mlartifacts").as_uri() if database else None
            experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        run = self.client.create_run(
            experiment_id,
            run_name=f"train {time.strftime('%Y-%m-%d %H:%M:%S')}",
            tags={"bigmodel.train_dir": str(out_dir.resolve()), "bigmodel.family": config.model.family},
        )
        from mlflow.entities import Param

        params = [Param(key, value) for key, value in params_of(config).items()]
        for start in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(run.info.run_id, params=params[start : start + PARAMS_PER_BATCH])
        write_json(self.record, {"tracking_uri": self.uri, "run_id": run.info.run_id})
        return str(run.info.run_id)

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl line: each number at its step (what a resume recomputed and MLflow holds, skipped)."""
        from mlflow.entities import Metric

        step, now = int(record["step"]), int(time.time() * 1000)
        metrics = []
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if self.logged[(key, step)]:
                self.logged[(key, step)] -= 1
                continue
            metrics.append(Metric(key, float(value), now, step))
        for start in range(0, len(metrics), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + METRICS_PER_BATCH])

    def close(self, finished: bool) -> None:
        """metrics.jsonl and config.yaml as artifacts, the best checkpoint's path as a tag; FINISHED, or
        KILLED when it stopped before its last step (--until-step): a resume sets it running again."""
        for path in self.artifacts:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        if self.checkpoint.is_file():
            self.client.set_tag(self.run_id, "bigmodel.checkpoint", str(self.checkpoint.resolve()))
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


def _read_record(path: Path) -> dict[str, str]:
    import json

    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return {"run_id": str(record["run_id"]), "tracking_uri": str(record["tracking_uri"])}
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not the MLflow record bigmodel writes; delete it to start a new MLflow run") from None


def _mlflow_client() -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UserError(
            "train.mlflow needs MLflow, which is not installed: pip install 'bigmodel[mlflow]' (or mlflow), "
            "or set train.mlflow: false"
        ) from None
    return MlflowClient
