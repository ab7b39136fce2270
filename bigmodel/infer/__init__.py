"""infer: an ONNX model + inputs -> predictions or generations, with ONNX Runtime alone.

PyTorch is never imported on this path. What kind of model a file holds (tabular or gpt) is read from
its own metadata, so `bigmodel infer --model FILE.onnx` needs no config at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bigmodel.config import STDIO, Config, InferConfig
from bigmodel.families import family, family_of_onnx_kind

PROMPT_ROOM = 2048  # tokens of prompt the memory guard makes room for in the KV cache


def default_output(config: Config) -> Path:
    return config.stage_dir("infer") / family(config.model.family).infer_output


def run(config: Config, bench: dict[str, int] | None = None) -> dict[str, Any]:
    settings = config.infer
    model = settings.model or config.stage_dir("export") / "model.onnx"
    test_split = family(config.model.family).test_split
    default_input = config.stage_dir("prepare") / test_split if test_split else None
    seed = settings.seed if settings.seed is not None else config.seed
    return predict(
        model,
        settings,
        settings.input or default_input,
        settings.output or default_output(config),
        settings.threads or config.threads,
        seed,
        bench,
        config.memory_limit,
    )


def run_standalone(settings: InferConfig, bench: dict[str, int] | None = None) -> dict[str, Any]:
    """`bigmodel infer --model M ...` without an experiment config: the ONNX file is all it needs."""
    assert settings.model is not None
    return predict(
        settings.model,
        settings,
        settings.input,
        settings.output or Path(STDIO),
        settings.threads,
        settings.seed or 0,
        bench,
    )


def predict(
    model: Path,
    settings: InferConfig,
    source: Path | None,
    dest: Path,
    threads: int | None,
    seed: int,
    bench: dict[str, int] | None,
    memory_limit: int | None = None,
) -> dict[str, Any]:
    from bigmodel.infer.session import Workload, open_model

    # A decoder's cache holds the prompt and the new tokens (a prompt of up to PROMPT_ROOM assumed here)
    workload = (
        Workload("infer --bench", bench["batch"], bench["prompt_tokens"] + bench["new_tokens"], memory_limit)
        if bench
        else Workload("infer", 1, settings.max_new_tokens + PROMPT_ROOM, memory_limit)
    )
    session, meta = open_model(Path(model), settings.providers, threads, workload=workload)
    inferer = family_of_onnx_kind(meta.kind, Path(model)).module("inferer")
    return inferer.run_model(session, meta, Path(model), settings, source, Path(dest), seed, bench)
