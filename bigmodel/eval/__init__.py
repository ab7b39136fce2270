"""eval: a checkpoint + a held-out split -> metrics.json; `fail_under` turns it into a CI gate."""

from __future__ import annotations

from typing import Any

from bigmodel.config import Config


def run(config: Config) -> dict[str, Any]:
    from bigmodel.eval import tabular

    return tabular.run(config)
