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


def export_checkpoint(config: Config, ckpt: Path, out_dir: Path, formats: list[str] | None = None) -> dict[str, Any]:
    """The gated export of any checkpoint into any folder (compress uses it, ONNX only, before quantising)."""
    from bigmodel.families import family

    chosen = formats or config.export.formats
    if "genai" in chosen or "gguf" in chosen:  # refused before the ONNX export or any file is written
        from bigmodel.checkpoint import read_manifest
        from bigmodel.export import genai, gguf_file

        manifest = read_manifest(ckpt)
        if "genai" in chosen:
            genai.check_ready(manifest.data.tokenizer, str(ckpt))
        if "gguf" in chosen:
            gguf_file.check_ready(
                manifest.architecture,  # type: ignore[arg-type]
                manifest.data.tokenizer,
                str(ckpt),
                config.export.gguf.dtype,
            )
    outputs: dict[str, Any] = {}
    if "onnx" in chosen:
        outputs.update(family(config.model.family).module("exporter").export_checkpoint(config, ckpt, out_dir))
    if "hf" in chosen:
        from bigmodel.export import hf

        outputs.update(hf.export_checkpoint(config, ckpt, out_dir))
    if "genai" in chosen:
        outputs.update(genai.export_folder(config, out_dir / "model.onnx", out_dir))
    if "gguf" in chosen:
        outputs.update(gguf_file.export_checkpoint(config, ckpt, out_dir))
    if config.export.peft and formats is None:
        from bigmodel.export import hf

        outputs.update(hf.export_peft(config, ckpt, out_dir))
        if "gguf" in chosen:  # the adapter for llama.cpp too, beside its base
            outputs.update(gguf_file.export_lora(config, ckpt, out_dir))
    return outputs
