"""Encoders over HTTP: POST /v1/embeddings (OpenAI's shape) for an embedding model, POST /v1/predict (texts
-> labels and probabilities) for a classifier. Both go through infer's own code (`infer.encoder.run_texts`):
the same tokenization and the same numbers as `bigmodel infer` on the same texts.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bigmodel.config import ServeConfig
from bigmodel.infer.encoder import run_texts, tokenizer_of
from bigmodel.serve.app import Metrics, Queue, RequestError, json_body


class Engine:
    """An encoder loaded in ONNX Runtime, and the routes of its task."""

    kind = "encoder"

    def __init__(self, session: Any, meta: dict[str, Any], path: Path, name: str, settings: ServeConfig) -> None:
        self.session, self.meta, self.name = session, meta, name
        self.tok = tokenizer_of(meta)  # built once: a tokenizer.json is parsed in milliseconds, not per request
        self.pairs = bool(meta.get("text_pair")) and meta["task"] == "classification"

    def gauges(self, queue: Queue) -> dict[str, tuple[str, float]]:
        return {"queue_depth": ("Requests waiting for the model.", queue.waiting)}

    def warm_up(self) -> None:
        run_texts(self.session, self.meta, [["warm up"] * (2 if self.pairs else 1)], 1, self.tok)

    def routes(self, queue: Queue, metrics: Metrics) -> list[tuple[str, list[str], Any]]:
        async def texts_of(request: Request, field: str, allowed: set[str], pairs: bool = False) -> list[list[str]]:
            body = await json_body(request)
            unknown = sorted(set(body) - allowed)
            if unknown:
                raise RequestError(f"{unknown[0]}: unknown field", unknown[0])
            value = body.get(field)
            items = [value] if isinstance(value, str) or (pairs and _is_pair(value)) else value
            if pairs:  # a sentence-pair classifier reads [first, second] per item
                if not isinstance(items, list) or not items or not all(_is_pair(t) for t in items):
                    raise RequestError(f"{field}: a list of [text, text_pair] pairs of non-empty strings (this "
                                       "model classifies sentence pairs)", field)
                queue.check_room()
                return [list(t) for t in items]
            if not isinstance(items, list) or not items or not all(_is_text(t) for t in items):
                raise RequestError(f"{field}: a non-empty string or a list of non-empty strings", field)
            queue.check_room()
            return [[t] for t in items]

        async def embeddings(request: Request) -> Response:
            texts = await texts_of(request, "input", {"input", "model", "encoding_format", "user"})
            tokens: list[int] = []
            async with queue.turn():
                vectors = await asyncio.to_thread(run_texts, self.session, self.meta, texts, 64, self.tok, tokens)
            return JSONResponse({"object": "list", "model": self.name, "data": [
                {"object": "embedding", "index": i, "embedding": [float(v) for v in vector]}
                for i, vector in enumerate(vectors)],
                "usage": {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}})

        async def predict(request: Request) -> Response:
            texts = await texts_of(request, "texts", {"texts", "model"}, self.pairs)
            async with queue.turn():
                probs = await asyncio.to_thread(run_texts, self.session, self.meta, texts, 64, self.tok)
            labels = self.meta["labels"]
            return JSONResponse({"model": self.name, "task": "classification", "predictions": [
                {"prediction": labels[int(p.argmax())], "probabilities": dict(zip(labels, map(float, p)))}
                for p in probs]})

        async def models(request: Request) -> Response:
            return JSONResponse({"object": "list", "data": [
                {"id": self.name, "object": "model", "created": 0, "owned_by": "bigmodel", "task": self.meta["task"]}]})

        route = ("/v1/embeddings", ["POST"], embeddings) if self.meta["task"] == "embedding" else \
            ("/v1/predict", ["POST"], predict)
        return [route, ("/v1/models", ["GET"], models)]


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_text(v) for v in value)
