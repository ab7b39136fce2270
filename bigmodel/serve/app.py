"""The HTTP layer every served model shares: auth, errors, the bounded queue, /health and /metrics.

A family's engine (serve/lm.py, serve/tabular.py) contributes its /v1 routes; this module wraps them.
Errors follow the OpenAI shape, `{"error": {"message", "type", "param", "code"}}`, so clients that speak
that API show them as they would OpenAI's: 400 for a bad request (naming the field), 401 without the key,
404 for an unknown path, 503 with Retry-After when the queue is full. Nothing escapes as a 500 page with a
stack trace: an unexpected failure is a 500 JSON error with one line.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hmac
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from bigmodel.errors import UserError

Handler = Callable[[Request], Awaitable[Response]]


class RequestError(Exception):
    """A request the server refuses: its HTTP status and an OpenAI-style error naming the field."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.param, self.status, self.kind, self.headers = param, status, kind, headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ------------------------------------------------------------------------------------------- metrics

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Metrics:
    """Counters for GET /metrics, in Prometheus' text format (no client library needed)."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=lambda: {"prompt": 0, "completion": 0})
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def text(self, gauges: dict[str, tuple[str, float]]) -> str:
        """Counters, then the engine's live gauges ({name: (help, value)})."""
        lines = [
            "# HELP bigmodel_requests_total HTTP requests by path and status.",
            "# TYPE bigmodel_requests_total counter",
        ]
        lines += [
            f'bigmodel_requests_total{{path="{path}",status="{status}"}} {count}'
            for (path, status), count in sorted(self.requests.items())
        ]
        errors = sum(count for (_, status), count in self.requests.items() if status >= 400)
        lines += [
            "# HELP bigmodel_errors_total Requests answered with a 4xx or 5xx status.",
            "# TYPE bigmodel_errors_total counter",
            f"bigmodel_errors_total {errors}",
            "# HELP bigmodel_tokens_total Tokens read (prompt) and generated (completion).",
            "# TYPE bigmodel_tokens_total counter",
        ]
        lines += [f'bigmodel_tokens_total{{kind="{kind}"}} {count}' for kind, count in self.tokens.items()]
        lines += [
            "# HELP bigmodel_request_seconds Time from request to the last byte of its answer.",
            "# TYPE bigmodel_request_seconds histogram",
        ]
        cumulative = 0
        for bound, count in zip([*LATENCY_BUCKETS, float("inf")], self.latency_counts):
            cumulative += count
            lines.append(
                f'bigmodel_request_seconds_bucket{{le="{"+Inf" if bound == float("inf") else bound}"}} {cumulative}'
            )
        lines += [
            f"bigmodel_request_seconds_sum {self.latency_sum:.6f}",
            f"bigmodel_request_seconds_count {cumulative}",
        ]
        for name, (description, value) in gauges.items():
            lines += [
                f"# HELP bigmodel_{name} {description}",
                f"# TYPE bigmodel_{name} gauge",
                f"bigmodel_{name} {value}",
            ]
        return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- queue


class Queue:
    """At most `limit` requests wait; a full queue answers 503 at once rather than letting clients hang.
    `turn()` gives the model to one request at a time (ONNX Runtime already spreads one run over the
    cores); engines that batch (serve/batching.py) keep their own waiting line and only ask for room."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = asyncio.Lock()
        self.waiting = 0

    def check_room(self, waiting: int | None = None) -> None:
        """503 (with Retry-After) when `limit` requests are already waiting (here, or in the engine's own
        line when it says so); call before answering."""
        waiting = self.waiting if waiting is None else waiting
        if waiting >= self.limit:
            raise RequestError(
                f"the server is busy ({waiting} requests waiting); retry shortly",
                status=503,
                kind="server_busy",
                headers={"Retry-After": "1"},
            )

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait for the model (check_room first: a full queue refuses instead of growing)."""
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._lock.release()


# ------------------------------------------------------------------------------------------- engine


class Engine:
    """What every family's engine (serve/lm.py, encoder.py, tabular.py) shares; each adds warm_up(),
    gauges(queue) and routes(queue, metrics)."""

    kind: str
    name: str

    def card(self) -> dict[str, Any]:
        """The model as GET /v1/models lists it (OpenAI's model object)."""
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "bigmodel"}

    def cut(self) -> int:
        """End the requests still running when the drain ran out; how many there were."""
        return 0

    def close(self) -> None:
        """Stop the engine's threads (after the server stopped)."""


# ---------------------------------------------------------------------------------------------- app


def create_app(
    engine: Any,
    api_key: str | None,
    max_queue: int,
    max_body_bytes: int = 4 * 2**20,
    cors_origins: list[str] | None = None,
) -> Starlette:
    """The ASGI app around a loaded, warmed-up engine (its `routes(queue, metrics)` give the /v1 API)."""
    metrics = Metrics()
    queue = Queue(max_queue)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": engine.name, "kind": engine.kind})

    async def prometheus(request: Request) -> Response:
        return PlainTextResponse(metrics.text(engine.gauges(queue)), media_type="text/plain; version=0.0.4")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [engine.card()]})

    async def model(request: Request) -> Response:
        if request.path_params["model_id"] != engine.name:
            raise RequestError(
                f"no model {request.path_params['model_id']!r} here; this server serves {engine.name!r}",
                "model",
                status=404,
                kind="not_found_error",
            )
        return JSONResponse(engine.card())

    routes = [Route("/health", health), Route("/metrics", prometheus)]
    api = [
        *engine.routes(queue, metrics),
        ("/v1/models", ["GET"], models),
        ("/v1/models/{model_id:path}", ["GET"], model),
    ]
    routes += [Route(path, _guarded(handler, api_key), methods=methods) for path, methods, handler in api]
    app = Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_allowed})
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    app.add_middleware(_Observe, metrics=metrics)
    if cors_origins:  # browsers on these origins may call the API (the preflight OPTIONS needs no key)
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app


def _guarded(handler: Handler, api_key: str | None) -> Handler:
    """The key check, and every failure as an OpenAI-style JSON error."""

    async def guarded(request: Request) -> Response:
        try:
            if api_key is not None:
                given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                if not hmac.compare_digest(given.encode(), api_key.encode()):
                    raise RequestError(
                        "missing or wrong API key: send 'Authorization: Bearer KEY'",
                        status=401,
                        kind="authentication_error",
                    )
            return await handler(request)
        except RequestError as error:
            return error.response()
        except UserError as error:  # the model refused the input (a character not in its vocabulary, ...)
            return RequestError(str(error)).response()

    return guarded


async def _not_found(request: Request, exc: Exception) -> Response:
    return RequestError(
        f"no such route: {request.method} {request.url.path}", status=404, kind="not_found_error"
    ).response()


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return RequestError(f"{request.method} is not allowed on {request.url.path}", status=405).response()


class _Observe:
    """ASGI middleware: count every HTTP request and time it to the last byte of its answer."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def recording_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.observe(scope["path"], status, time.perf_counter() - start)


class _BodyLimit:
    """ASGI middleware: a body larger than `limit` bytes is a 413, at once when Content-Length says so
    (nothing is read), else as soon as the bytes received pass the limit."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self.too_large(int(declared)).response()(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise self.too_large(received)
            return message

        await self.app(scope, counting_receive, send)

    def too_large(self, size: int) -> RequestError:
        return RequestError(
            f"the body has {'more than ' if size <= self.limit else ''}{size:,} bytes; this server "
            f"takes at most {self.limit:,} (serve.max_body_bytes)",
            status=413,
            kind="request_too_large",
        )


class DrainingServer(uvicorn.Server):
    """On SIGTERM or Ctrl-C uvicorn stops accepting and lets in-flight requests finish; this gives them
    `drain_seconds`, then `cut()` ends the rest (streams get an error event, others a 503), and the
    process exits 0 -- a server that drained has done its job (uvicorn would re-raise the signal).
    cut() returns how many requests it ended; `cut_requests` keeps the count for the last log line."""

    def __init__(self, config: uvicorn.Config, drain_seconds: float, cut: Callable[[], int]) -> None:
        super().__init__(config)
        self.drain_seconds, self._cut = drain_seconds, cut
        self.cut_requests = 0
        self._timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()
        if self._timer is None:
            self._timer = threading.Timer(self.drain_seconds, self._drain_ran_out)
            self._timer.daemon = True
            self._timer.start()

    def _drain_ran_out(self) -> None:
        self.cut_requests += self._cut()

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, or a 400 that says what is wrong with it."""
    try:
        body = await request.json()
    except ValueError as exc:
        raise RequestError(f"the body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    return body
