"""infer: an ONNX model + rows -> predictions, with ONNX Runtime alone (PyTorch is never imported)."""

from __future__ import annotations

from typing import Any

from bigmodel.config import Config, InferConfig


def run(config: Config) -> dict[str, Any]:
    from bigmodel.infer import tabular

    return tabular.predict_file(
        model=config.infer.model or config.stage_dir("export") / "model.onnx",
        source=config.infer.input or config.stage_dir("prepare") / "test.csv",
        dest=config.infer.output or config.stage_dir("infer") / "predictions.csv",
        settings=config.infer,
        threads=config.infer.threads or config.threads,
    )


def run_standalone(settings: InferConfig) -> dict[str, Any]:
    """`bigmodel infer --model M --input I`: no experiment config, the ONNX file is all it needs."""
    from bigmodel.infer import tabular

    assert settings.model is not None and settings.input is not None
    return tabular.predict_file(
        model=settings.model,
        source=settings.input,
        dest=settings.output or "-",
        settings=settings,
        threads=settings.threads,
    )
