"""Tabular models over HTTP: POST /v1/predict with rows as JSON objects by column name.

The rows go through infer's own code (`infer.tabular.predict_records`): the same column checks, the same
numbers as `bigmodel infer` on the same rows. A row error (a missing column, a non-number) is a 400 that
names the row and the column.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bigmodel.config import ServeConfig
from bigmodel.errors import UserError
from bigmodel.infer.tabular import nest_probabilities, predict_records
from bigmodel.manifests import TabularMetadata
from bigmodel.serve import app
from bigmodel.serve.app import Metrics, Queue, RequestError, json_body


class Engine(app.Engine):
    """A tabular model loaded in ONNX Runtime, and its routes."""

    kind = "tabular"

    def __init__(self, session: Any, meta: TabularMetadata, path: Path, name: str, settings: ServeConfig) -> None:
        self.session, self.meta, self.name = session, meta, name

    def gauges(self, queue: Queue) -> dict[str, tuple[str, float]]:
        return {"queue_depth": ("Requests waiting for the model.", queue.waiting)}

    def warm_up(self) -> None:
        self.session.run(None, {"features": np.zeros((1, len(self.meta.features)), dtype=np.float32)})

    def routes(self, queue: Queue, metrics: Metrics) -> list[tuple[str, list[str], Any]]:
        async def predict(request: Request) -> Response:
            body = await json_body(request)
            unknown = sorted(set(body) - {"rows", "model"})
            if unknown:
                raise RequestError(f"{unknown[0]}: unknown field (give 'rows': [{{column: value}}, ...])", unknown[0])
            rows = body.get("rows")
            if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
                raise RequestError("rows: a non-empty list of JSON objects, one per row, by column name", "rows")
            records = [{None: i, **row} for i, row in enumerate(rows)]
            queue.check_room()
            async with queue.turn():
                try:
                    _, predicted, _ = await asyncio.to_thread(
                        predict_records, self.session, self.meta, records, "rows", 1024
                    )
                except UserError as exc:
                    raise RequestError(str(exc).replace("line ", "row "), "rows") from None
            return JSONResponse(
                {
                    "model": self.name,
                    "task": self.meta.task,
                    "predictions": [nest_probabilities(row) for row in predicted],
                }
            )

        return [("/v1/predict", ["POST"], predict)]

    def card(self) -> dict[str, Any]:
        return {**super().card(), "task": self.meta.task, "features": self.meta.features}
