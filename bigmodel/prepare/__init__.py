"""prepare: raw data -> split, fitted, on-disk training data (one module per data format)."""

from __future__ import annotations

import importlib
from typing import Any

from bigmodel.config import Config

MODULES = {
    "text": "bigmodel.prepare.text",
    "sft": "bigmodel.prepare.sft",
    "tabular": "bigmodel.prepare.tabular",
    "text_classification": "bigmodel.prepare.text_classification",
}


def run(config: Config) -> dict[str, Any]:
    return importlib.import_module(MODULES[config.data.format]).run(config)
