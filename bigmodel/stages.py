"""The stages, in pipeline order, with what each reads and writes.

Each stage module exposes `run(config) -> outputs`. After a successful run a stamp records the hash of
the config sections the stage depends on; `pipeline` skips a stage when its outputs exist, are newer than
its inputs, and the stamp matches the current config (the same rule as make, plus the config).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigmodel.config import STDIO, Config
from bigmodel.console import is_main_process
from bigmodel.datasets import TEST_CSV, prepared_files
from bigmodel.families import family
from bigmodel.infer import default_output as default_infer_output
from bigmodel.io import write_json

STAMP = ".stamp.json"


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]
    inputs: Callable[[Config], list[Path]]
    outputs: Callable[[Config], list[Path]]

    def run(self, config: Config, **options: Any) -> dict[str, Any]:
        module = importlib.import_module(f"bigmodel.{self.name}")
        outputs = module.run(config, **options)
        self._write_stamp(config)
        return outputs

    def is_up_to_date(self, config: Config) -> bool:
        outputs = self.outputs(config)
        inputs = [p for p in self.inputs(config) if str(p) != STDIO]
        if not outputs or any(str(p) == STDIO or not p.exists() for p in outputs):
            return False
        if any(not p.exists() for p in inputs):
            return False
        if inputs and min(p.stat().st_mtime for p in outputs) < max(p.stat().st_mtime for p in inputs):
            return False
        return self._read_stamp(config) == config.section_hash(*self.sections)

    def _stamp_path(self, config: Config) -> Path:
        return config.stage_dir(self.name) / STAMP

    def _write_stamp(self, config: Config) -> None:
        if not is_main_process():  # one writer per distributed job
            return
        write_json(self._stamp_path(config), {"config": config.section_hash(*self.sections)})

    def _read_stamp(self, config: Config) -> str | None:
        try:
            return json.loads(self._stamp_path(config).read_text())["config"]
        except (OSError, ValueError, KeyError):
            return None


def _in(stage: str, *names: str) -> Callable[[Config], list[Path]]:
    return lambda c: [c.stage_dir(stage) / n for n in names]


def _ckpt(ref_of: Callable[[Config], str]) -> Callable[[Config], list[Path]]:
    return lambda c: [c.checkpoint_path(ref_of(c)), *prepared_files(c)]


def _sources(config: Config) -> list[Path]:
    """prepare's inputs: the data file (globs are not tracked; use --force after adding files), and an
    imported model's files (its tokenizer is prepare's)."""
    path = config.data.path
    return [*([path] if path is not None and path.is_file() else []), *_pretrained_files(config)]


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
    test_split = config.stage_dir("prepare") / TEST_CSV
    return [model, test_split] if family(config.model.family).infer_reads_test_split else [model]


def _export_outputs(config: Config) -> list[Path]:
    folder = config.stage_dir("export")
    onnx, hf = folder / "model.onnx", folder / "hf" / "model.safetensors"
    return {"onnx": [onnx], "hf": [hf], "both": [onnx, hf]}[config.export.format]


_EVERYWHERE = ("seed", "threads")

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("prepare", ("data", "seed", "init.from_"), _sources, prepared_files),
        Stage("init", ("data", "model", "init", "seed"),
              lambda c: [c.stage_dir("prepare") / "manifest.json", *_pretrained_files(c)],
              _in("init", "model.safetensors")),
        Stage("train", ("model", "train", *_EVERYWHERE),
              lambda c: [c.stage_dir("init") / "model.safetensors", *prepared_files(c)],
              _in("train", "best.safetensors", "last.safetensors")),
        Stage("eval", ("eval",), _ckpt(lambda c: c.eval.checkpoint), _in("eval", "metrics.json")),
        Stage("compress", ("compress", "export", "seed"), _ckpt(lambda c: c.compress.checkpoint),
              _in("compress", "report.json")),
        Stage("export", ("export",), _ckpt(lambda c: c.export.checkpoint), _export_outputs),
        Stage("infer", ("infer", "seed", "threads"), _infer_inputs,
              lambda c: [c.infer.output or default_infer_output(c)]),
    )
}
ORDER = list(STAGES)
