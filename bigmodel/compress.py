"""compress: pruning, int8 quantisation and distillation. Not available yet for any model family."""

from __future__ import annotations

from typing import Any

from bigmodel.config import Config
from bigmodel.errors import UserError


def run(config: Config) -> dict[str, Any]:
    raise UserError(
        f"compress is not yet available for model family '{config.model.family}'; "
        "skip it ('bigmodel pipeline' does) and export the trained checkpoint directly"
    )
