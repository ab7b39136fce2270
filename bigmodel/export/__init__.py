"""export: a checkpoint -> a verified ONNX model. The model is published only if it passes the gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bigmodel.config import Config


def run(config: Config) -> dict[str, Any]:
    if config.model.family == "gpt":
        from bigmodel.export import gpt

        return gpt.run(config)
    from bigmodel.export import tabular

    return tabular.run(config)


def export_checkpoint(config: Config, ckpt: Path, out_dir: Path) -> dict[str, Any]:
    """The gated export of any checkpoint into any folder (compress uses it before quantising)."""
    if config.model.family == "gpt":
        from bigmodel.export import gpt

        return gpt.export_checkpoint(config, ckpt, out_dir)
    from bigmodel.export import tabular

    return tabular.export_checkpoint(config, ckpt, out_dir)
