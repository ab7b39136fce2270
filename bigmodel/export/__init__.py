"""export: a checkpoint -> a verified ONNX model. The model is published only if it passes the gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bigmodel.config import Config


def run(config: Config) -> dict[str, Any]:
    from bigmodel.registry import stage_checkpoint
    from bigmodel.runtime import setup_torch

    setup_torch(config)
    return export_checkpoint(
        config, stage_checkpoint(config, config.export.checkpoint, "export"), config.stage_dir("export")
    )


def export_checkpoint(config: Config, ckpt: Path, out_dir: Path, formats: str | None = None) -> dict[str, Any]:
    """The gated export of any checkpoint into any folder (compress uses it, ONNX only, before quantising)."""
    from bigmodel.families import family

    chosen = formats or config.export.format
    outputs: dict[str, Any] = {}
    if chosen in ("onnx", "both"):
        outputs.update(family(config.model.family).module("exporter").export_checkpoint(config, ckpt, out_dir))
    if chosen in ("hf", "both"):
        from bigmodel.export import hf

        outputs.update(hf.export_checkpoint(config, ckpt, out_dir))
    if config.export.peft and formats is None:
        from bigmodel.export import hf

        outputs.update(hf.export_peft(config, ckpt, out_dir))
    return outputs
