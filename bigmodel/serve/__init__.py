"""serve: an exported ONNX model behind an HTTP API (OpenAI-compatible for language models).

ONNX Runtime does the numerics; PyTorch is never imported (tested). The address is bound first (a port
in use is refused before any loading), then the model is loaded and run once before the server listens,
so /health answers only for a model that works. uvicorn serves the ASGI app
(serve/app.py) and, on SIGTERM or Ctrl-C, stops accepting, gives in-flight requests serve.drain_seconds
to finish, cuts what is left (saying how many), and exits 0.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

from bigmodel import console
from bigmodel.config import Config, ServeConfig
from bigmodel.errors import UserError


def run(config: Config) -> dict[str, Any]:
    """`bigmodel serve -c CONFIG`: the run's exported model (or serve.model)."""
    settings = config.serve
    model = settings.model or config.infer.model or config.stage_dir("export") / "model.onnx"
    name = settings.name or config.stage_dir("export").parent.name
    return serve(
        Path(model), settings, config.infer.providers, config.infer.threads or config.threads, name, config.memory_limit
    )


def serve(
    model: Path,
    settings: ServeConfig,
    providers: list[str],
    threads: int | None,
    name: str | None = None,
    memory_limit: int | None = None,
) -> dict[str, Any]:
    import uvicorn

    from bigmodel.serve.app import DrainingServer

    listening = listen(settings.host, settings.port)  # before the model loads: a taken port costs nothing
    try:
        app, engine = build(model, settings, providers, threads, name, memory_limit)
    except BaseException:
        listening.close()
        raise
    console.info(
        f"serve: {engine.kind} model '{engine.name}' from {model} on http://{settings.host}:{settings.port} "
        f"(/v1, /health, /metrics{'; API key required' if api_key(settings) else ''})"
    )
    # uvicorn's own graceful timeout is only a backstop: the drain ends by cutting requests cleanly first.
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=int(settings.drain_seconds) + 10,
        ),
        settings.drain_seconds,
        engine.cut,
    )
    try:
        server.run(sockets=[listening])
    finally:
        server.stop_timer()
        engine.close()  # the decoding thread stops before the interpreter does (ONNX Runtime mid-run aborts)
    if server.cut_requests:
        console.warn(
            f"serve: stopped; {server.cut_requests} request(s) still running after the "
            f"{settings.drain_seconds:g} s drain were cut (serve.drain_seconds)"
        )
    else:
        console.info("serve: stopped (in-flight requests finished)")
    return {"model": str(model), "stopped": True, "cut_requests": server.cut_requests}


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, held from here until uvicorn serves on it (no race with another
    process); a host that does not resolve or a port in use is one line naming the setting."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise UserError(
            f"serve.host {host!r} does not resolve ({exc.strerror}); give an address such as "
            "127.0.0.1 or 0.0.0.0 (--host)"
        ) from exc
    listening = socket.socket(family, kind, proto)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as uvicorn does: restarts reuse the port)
    try:
        listening.bind(address)
    except OSError as exc:
        listening.close()
        taken = exc.errno == errno.EADDRINUSE
        raise UserError(
            f"serve.port {port} on {host} {'is in use (another server?)' if taken else exc.strerror}; "
            f"{'choose another --port' if taken else 'choose another --host or --port'}"
        ) from exc
    return listening


def build(
    model: Path,
    settings: ServeConfig,
    providers: list[str],
    threads: int | None,
    name: str | None = None,
    memory_limit: int | None = None,
) -> tuple[Any, Any]:
    """The ASGI app and its warmed-up engine (tests drive the app directly)."""
    from bigmodel.families import family_of_onnx_kind
    from bigmodel.infer import PROMPT_ROOM
    from bigmodel.infer.session import Workload, open_model
    from bigmodel.serve.app import create_app

    # ORT's idle threads would spin between runs, taking the cycles the event loop needs to stream
    # (bench_serve, 16 clients on 2 cores: 1.7x -> 2.3x one-at-a-time when they sleep instead).
    workload = Workload("serve", settings.max_batch, settings.max_tokens + PROMPT_ROOM, memory_limit)
    session, meta = open_model(model, providers, threads, spin=False, workload=workload)
    server = family_of_onnx_kind(meta.kind, model).module("server")
    engine = server.Engine(session, meta, model, name or default_name(model), settings)
    engine.warm_up()
    return create_app(
        engine, api_key(settings), settings.max_queue, settings.max_body_bytes, settings.cors_origins
    ), engine


def default_name(model: Path) -> str:
    """runs/<name>/export/model.onnx is '<name>'; any other file is its stem."""
    return model.parent.parent.name if model.parent.name == "export" and model.parent.parent.name else model.stem


def api_key(settings: ServeConfig) -> str | None:
    return settings.api_key or os.environ.get("BIGMODEL_API_KEY") or None
