"""prepare: raw data -> split, fitted, on-disk training data (one module per data format)."""

from __future__ import annotations

from typing import Any

from bigmodel.config import Config


def run(config: Config) -> dict[str, Any]:
    if config.data.format == "text":
        from bigmodel.prepare import text

        return text.run(config)
    from bigmodel.prepare import tabular

    return tabular.run(config)
