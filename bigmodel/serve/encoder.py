"""Encoders over HTTP: POST /v1/embeddings (OpenAI's shape) for an embedding model, POST /v1/predict (texts
-> labels and probabilities) for a classifier. Both go through infer's own code (`infer.encoder`): the same
tokenization and the same numbers as `bigmodel infer` on the same texts. A text longer than the model's
context is refused (400, naming it), as the language-model routes refuse a long prompt, unless the request
says `"truncate": true` (the name text-embeddings-inference uses); the response then lists the cut ones.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bigmodel.config import ServeConfig
from bigmodel.infer.encoder import cut_texts, encode_texts, run_encodings, run_texts, tokenizer_of
from bigmodel.manifests import EncoderMetadata
from bigmodel.serve import app
from bigmodel.serve.app import Metrics, Queue, RequestError, json_body


class Engine(app.Engine):
    """An encoder loaded in ONNX Runtime, and the routes of its task."""

    kind = "encoder"

    def __init__(self, session: Any, meta: EncoderMetadata, path: Path, name: str, settings: ServeConfig) -> None:
        self.session, self.meta, self.name = session, meta, name
        self.tok = tokenizer_of(meta)  # built once: a tokenizer.json is parsed in milliseconds, not per request
        self.pairs = bool(meta.text_pair) and meta.task == "classification"
        self.context = meta.architecture.block_size

    def gauges(self, queue: Queue) -> dict[str, tuple[str, float]]:
        return {"queue_depth": ("Requests waiting for the model.", queue.waiting)}

    def warm_up(self) -> None:
        run_texts(self.session, self.meta, [["warm up"] * (2 if self.pairs else 1)], 1, self.tok)

    def card(self) -> dict[str, Any]:
        return {**super().card(), "task": self.meta.task}

    def routes(self, queue: Queue, metrics: Metrics) -> list[tuple[str, list[str], Any]]:
        async def encoded(
            request: Request, field: str, allowed: set[str], pairs: bool = False
        ) -> tuple[list[Any], list[int]]:
            """The texts' encodings (tokenised off the event loop) and which were cut to the context."""
            body = await json_body(request)
            unknown = sorted(set(body) - allowed - {"model", "truncate"})
            if unknown:
                raise RequestError(f"{unknown[0]}: unknown field", unknown[0])
            if not isinstance(body.get("truncate", False), bool):
                raise RequestError("truncate: true or false", "truncate")
            value = body.get(field)
            items = [value] if isinstance(value, str) or (pairs and _is_pair(value)) else value
            if pairs:  # a sentence-pair classifier reads [first, second] per item
                if not isinstance(items, list) or not items or not all(_is_pair(t) for t in items):
                    raise RequestError(
                        f"{field}: a list of [text, text_pair] pairs of non-empty strings (this "
                        "model classifies sentence pairs)",
                        field,
                    )
                texts = [list(t) for t in items]
            elif not isinstance(items, list) or not items or not all(_is_text(t) for t in items):
                raise RequestError(f"{field}: a non-empty string or a list of non-empty strings", field)
            else:
                texts = [[t] for t in items]
            queue.check_room()
            encodings = await asyncio.to_thread(encode_texts, self.tok, texts)
            cut = cut_texts(encodings)
            if cut and not body.get("truncate", False):  # the rule of every route: too long is refused unless asked
                raise RequestError(
                    f"{field}[{cut[0]}]: longer than the model's context of {self.context} tokens "
                    f'({len(cut)} of {len(texts)} items are); shorten it, or send "truncate": true '
                    "to cut each to the context",
                    field,
                )
            return encodings, cut

        async def run(encodings: list[Any]) -> np.ndarray:
            async with queue.turn():
                return await asyncio.to_thread(
                    lambda: np.concatenate(
                        [
                            run_encodings(self.session, self.meta, encodings[i : i + BATCH])
                            for i in range(0, len(encodings), BATCH)
                        ]
                    )
                )

        async def embeddings(request: Request) -> Response:
            encodings, cut = await encoded(request, "input", {"input", "encoding_format", "user"})
            vectors = await run(encodings)
            tokens = sum(len(e.ids) for e in encodings)
            return JSONResponse(
                {
                    "object": "list",
                    "model": self.name,
                    "data": [
                        {"object": "embedding", "index": i, "embedding": [float(v) for v in vector]}
                        for i, vector in enumerate(vectors)
                    ],
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                    **({"truncated": cut} if cut else {}),
                }
            )

        async def predict(request: Request) -> Response:
            encodings, cut = await encoded(request, "texts", {"texts"}, self.pairs)
            probs = await run(encodings)
            labels = self.meta.labels or []
            return JSONResponse(
                {
                    "model": self.name,
                    "task": "classification",
                    "predictions": [
                        {"prediction": labels[int(p.argmax())], "probabilities": dict(zip(labels, map(float, p)))}
                        for p in probs
                    ],
                    **({"truncated": cut} if cut else {}),
                }
            )

        route = (
            ("/v1/embeddings", ["POST"], embeddings)
            if self.meta.task == "embedding"
            else ("/v1/predict", ["POST"], predict)
        )
        return [route]


BATCH = 64  # texts per ONNX Runtime run


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_text(v) for v in value)
