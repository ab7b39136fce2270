"""The stages, in pipeline order, with what each reads and writes.

Each stage module exposes `run(config) -> outputs`. A stage's stamp is removed when it starts and written
when it finishes its work (a train run stopped by --until-step has not): it records the hash of the config
sections the stage depends on and, for each input file, its size, times and sha256. `pipeline` skips a
stage when its outputs exist, the stamp matches the current config and every input still has the content
it had: size and times are compared first, the sha256 when they differ (or always, with --verify), so a
file changed with its modification time set back is still seen, and a file merely touched is not.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigmodel import records
from bigmodel.config import STDIO, Config
from bigmodel.console import is_main_process
from bigmodel.datasets import prepared_files
from bigmodel.families import family
from bigmodel.infer import default_output as default_infer_output
from bigmodel.io import sha256_file, write_json
from bigmodel.record import write_record

STAMP = ".stamp.json"


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]
    inputs: Callable[[Config], list[Path]]
    outputs: Callable[[Config], list[Path]]
    stamp_name: Callable[[Config], str] = lambda config: STAMP

    def run(self, config: Config, **options: Any) -> dict[str, Any]:
        module = importlib.import_module(f"bigmodel.{self.name}")
        if is_main_process():  # a crash or interrupt from here on leaves the stage not up to date
            self._stamp_path(config).unlink(missing_ok=True)
        outputs = module.run(config, **options)
        write_record(config)  # the run's config.yaml: what its newest artifacts were made with
        if outputs.get("finished", True):
            self._write_stamp(config)
        return outputs

    def is_up_to_date(self, config: Config, verify: bool = False) -> bool:
        outputs = self.outputs(config)
        if not outputs or any(str(p) == STDIO or not p.exists() for p in outputs):
            return False
        stamp = self._read_stamp(config)
        if stamp.get("config") != config.section_hash(*self.sections):
            return False
        recorded = stamp.get("inputs", {})
        inputs = {_key(config, p): p for p in self._input_files(config)}
        if set(recorded) != set(inputs):
            return False
        current = {}
        for key, path in inputs.items():
            if not _same_content(path, recorded[key], verify):
                return False
            current[key] = {**_times(path), "sha256": recorded[key]["sha256"]}
        if current != recorded:  # the same content under new times: record them, so it is hashed once
            self._write_stamp(config, current)
        return True

    def _input_files(self, config: Config) -> list[Path]:
        return [p for p in self.inputs(config) if str(p) != STDIO]

    def _stamp_path(self, config: Config) -> Path:
        return config.stage_dir(self.name) / self.stamp_name(config)

    def _write_stamp(self, config: Config, inputs: dict[str, Any] | None = None) -> None:
        if not is_main_process():  # one writer per distributed job
            return
        if inputs is None:
            inputs = {
                _key(config, p): {**_times(p), "sha256": sha256_file(p)}
                for p in self._input_files(config)
                if p.is_file()
            }
        write_json(self._stamp_path(config), {"config": config.section_hash(*self.sections), "inputs": inputs})

    def _read_stamp(self, config: Config) -> dict[str, Any]:
        try:
            stamp = json.loads(self._stamp_path(config).read_text())
        except (OSError, ValueError):
            return {}
        return stamp if isinstance(stamp, dict) else {}


def _key(config: Config, path: Path) -> str:
    """An input's name in the stamp: relative to the run directory when inside it, so a copied or moved
    run stays up to date."""
    run_dir = config.stage_dir("prepare").parent
    try:
        return str(path.absolute().relative_to(run_dir.absolute()))
    except ValueError:
        return str(path.absolute())


def _times(path: Path) -> dict[str, int]:
    info = path.stat()
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns}


def _same_content(path: Path, recorded: dict[str, Any], verify: bool) -> bool:
    """Whether `path` still holds what the stamp recorded: equal size and times mean yes (ctime cannot
    be set back by hand), unless `verify`; otherwise the sha256 decides."""
    if not path.is_file():
        return False
    now = _times(path)
    if not verify and now == {k: recorded.get(k) for k in now}:
        return True
    return now["size"] == recorded.get("size") and sha256_file(path) == recorded.get("sha256")


def _in(stage: str, *names: str) -> Callable[[Config], list[Path]]:
    return lambda c: [c.stage_dir(stage) / n for n in names]


def _ckpt(ref_of: Callable[[Config], str]) -> Callable[[Config], list[Path]]:
    return lambda c: [c.checkpoint_path(ref_of(c)), *prepared_files(c)]


def _sources(config: Config) -> list[Path]:
    """prepare's inputs: the data file (globs are not tracked; use --force after adding files), and an
    imported model's files (its tokenizer is prepare's)."""
    path = config.data.path
    read = records.files_of(path) if path is not None and records.is_source(path) else []
    return [*read, *_pretrained_files(config)]


def _pretrained_files(config: Config) -> list[Path]:
    """What init.from names: a GGUF file, or a folder's config and tokenizer (weights are named by them)."""
    source = config.init.from_
    if source is None:
        return []
    if source.is_dir():
        return [p for p in (source / "config.json", source / "tokenizer.json") if p.exists()]
    return [source]


def _infer_inputs(config: Config) -> list[Path]:
    model = config.infer.model or config.stage_dir("export") / "model.onnx"
    if config.infer.input is not None:
        return [model, config.infer.input]
    test_split = family(config.model.family).test_split
    return [model, config.stage_dir("prepare") / test_split] if test_split else [model]


def _export_outputs(config: Config) -> list[Path]:
    folder = config.stage_dir("export")
    written = {
        "onnx": folder / "model.onnx",
        "hf": folder / "hf" / "model.safetensors",
        "genai": folder / "genai" / "genai_config.json",
        "gguf": folder / "model.gguf",
    }
    return [written[name] for name in config.export.formats]


def _eval_stamp(config: Config) -> str:
    """Evaluating another artifact (metrics.<name>.json) has its own stamp: it never makes the run's own
    evaluation look stale."""
    output = config.eval_output()
    return STAMP if output == config.stage_dir("eval") / "metrics.json" else f".stamp.{output.stem}.json"


_EVERYWHERE = ("seed", "threads")

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("prepare", ("data", "seed", "init.from_"), _sources, prepared_files),
        Stage(
            "init",
            ("data", "model", "init", "seed"),
            lambda c: [c.stage_dir("prepare") / "manifest.json", *_pretrained_files(c)],
            _in("init", "model.safetensors"),
        ),
        Stage(
            "train",
            ("model", "train", *_EVERYWHERE),
            lambda c: [c.stage_dir("init") / "model.safetensors", *prepared_files(c)],
            _in("train", "best.safetensors", "last.safetensors"),
        ),
        Stage("eval", ("eval",), _ckpt(lambda c: c.eval.checkpoint), lambda c: [c.eval_output()], _eval_stamp),
        Stage(
            "compress",
            ("compress", "export", "seed"),
            _ckpt(lambda c: c.compress.checkpoint),
            _in("compress", "report.json"),
        ),
        Stage("export", ("export",), _ckpt(lambda c: c.export.checkpoint), _export_outputs),
        Stage(
            "infer", ("infer", "seed", "threads"), _infer_inputs, lambda c: [c.infer.output or default_infer_output(c)]
        ),
    )
}
ORDER = list(STAGES)
