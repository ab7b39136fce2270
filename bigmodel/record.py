"""The run record: every stage writes the resolved config it runs with to <run_dir>/config.yaml
(atomically, before it starts), so a run directory alone is enough for `report`, `eval`, `inspect` and
`config show` (`--run-dir DIR` without -c). Listing and comparing runs is runs.py's."""

from __future__ import annotations

from pathlib import Path

from bigmodel.config import Config, dump_yaml, load_config
from bigmodel.console import is_main_process
from bigmodel.errors import UserError
from bigmodel.io import atomic_open

RECORD = "config.yaml"


def write_record(config: Config) -> None:
    """<run_dir>/config.yaml: the resolved config of the stage about to run (defaults filled in, paths
    absolute)."""
    if not is_main_process():
        return
    with atomic_open(run_dir_of(config) / RECORD) as handle:
        handle.write("# Written by bigmodel: the resolved config of the last stage run here.\n")
        handle.write(dump_yaml(config))


def run_dir_of(config: Config) -> Path:
    return config.stage_dir("prepare").parent


def record_of(run_dir: str | Path) -> Path:
    """<run_dir>/config.yaml, which must exist."""
    folder = Path(run_dir)
    record = folder / RECORD
    if not record.is_file():
        what = "not a folder" if not folder.is_dir() else f"has no {RECORD} (no stage has run there)"
        raise UserError(f"--run-dir {folder}: {what}; give -c CONFIG, or the folder of a run")
    return record


def load_run(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The config a run directory recorded (what `-c` would give), with --set overrides on top."""
    return load_config(record_of(run_dir), overrides, Path(run_dir))


def config_path(config: Path | None, run_dir: str | None) -> Path:
    """-c, or else the config recorded in --run-dir (a finished run is enough for eval, report, ...)."""
    if config is not None:
        return config
    if run_dir is None:
        raise UserError("give -c CONFIG (the experiment YAML), or --run-dir DIR of a run (its recorded config.yaml)")
    return record_of(run_dir)
