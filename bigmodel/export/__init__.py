"""export: a checkpoint -> a verified ONNX model. The model is published only if it passes the gate."""

from __future__ import annotations

from typing import Any

from bigmodel.config import Config


def run(config: Config) -> dict[str, Any]:
    if config.model.family == "gpt":
        from bigmodel.export import gpt

        return gpt.run(config)
    from bigmodel.export import tabular

    return tabular.run(config)
