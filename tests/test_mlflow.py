"""train.mlflow: MLflow's own client (the oracle) reads back what a run recorded -- every metric equal to
metrics.jsonl, step for step, also across a resume; the config as parameters; the run's files as artifacts."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import cli, tiny_digits
from tests.test_lm import lm_config

mlflow = pytest.importorskip("mlflow")


def history(client: object, run_id: str) -> dict[str, list[tuple[int, float]]]:
    run = client.get_run(run_id)  # type: ignore[attr-defined]
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))  # type: ignore[attr-defined]
        for key in run.data.metrics
    }


def jsonl_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    found: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                found[key].append((record["step"], float(value)))
    return {key: sorted(values) for key, values in found.items()}


def test_mlflow_holds_metrics_jsonl_params_and_artifacts_across_a_resume(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    config = lm_config(tmp_path, max_steps=30, log_every=5, eval_every=10)
    for stage in ("prepare", "init"):
        assert cli(stage, "-c", config, "-q").code == 0
    first = cli("train", "-c", config, "--set", "train.mlflow=true", "--until-step", "15", "-q")
    assert first.code == 0, first.stderr
    train = tmp_path / "run" / "train"
    run_id = json.loads((train / "mlflow.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "KILLED"  # stopped before its last step
    resumed = cli("train", "-c", config, "--set", "train.mlflow=true", "--resume", "-q")
    assert resumed.code == 0, resumed.stderr
    assert json.loads((train / "mlflow.json").read_text())["run_id"] == run_id  # the same MLflow run, continued
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert history(client, run_id) == jsonl_metrics(train / "metrics.jsonl")  # every step once, as written
    assert run.data.params["train.lr"] == "0.003" and run.data.params["model.n_layer"] == "1"
    assert {a.path for a in client.list_artifacts(run_id)} == {"metrics.jsonl", "config.yaml"}
    assert run.data.tags["bigmodel.checkpoint"].endswith("best.safetensors")
    assert client.get_experiment(run.info.experiment_id).name == "run"  # the run folder's name
    # a new (not resumed) training run is a new MLflow run in the same experiment
    again = cli("train", "-c", config, "--set", "train.mlflow=true", "--restart", "-q")
    assert again.code == 0, again.stderr
    assert json.loads((train / "mlflow.json").read_text())["run_id"] != run_id
    assert len(client.search_runs([run.info.experiment_id])) == 2


def test_an_epoch_recipe_records_into_a_named_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    config = tiny_digits(tmp_path)
    for stage in ("prepare", "init"):
        assert cli(stage, "-c", config, "-q").code == 0
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    result = cli("train", "-c", config, "--set", f"train.mlflow={uri}", "-q")
    assert result.code == 0, result.stderr
    run_dir = next(p.parent for p in tmp_path.rglob("mlflow.json"))
    run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    client = MlflowClient(uri)
    assert history(client, run_id) == jsonl_metrics(run_dir / "metrics.jsonl")
    assert not list(tmp_path.rglob("mlflow.db"))  # nothing in the run folder: the URI was named
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert artifacts == {"metrics.jsonl", "config.yaml"} and (tmp_path / "mlartifacts").is_dir()  # beside the db
    assert not (tmp_path / "mlruns").exists()  # (MLflow's default: the working directory)


def test_an_unreachable_tracking_server_stops_before_the_previous_run_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = lm_config(tmp_path, max_steps=4)
    for stage in ("prepare", "init", "train"):
        assert cli(stage, "-c", config, "-q").code == 0
    metrics = (tmp_path / "run" / "train" / "metrics.jsonl").read_text()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    result = cli("train", "-c", config, "--set", "train.mlflow=http://127.0.0.1:9", "--restart")
    assert result.code == 2 and "train.mlflow: cannot record in http://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "run" / "train" / "metrics.jsonl").read_text() == metrics  # the previous run is intact
