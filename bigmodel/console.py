"""Where output goes: humans read stderr, programs read stdout.

With --json a stage prints exactly one JSON object on stdout and nothing else there; every human line goes
to stderr. Progress is a rich bar on a terminal and plain periodic lines elsewhere (CI logs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def is_main_process() -> bool:
    """Rank 0 of a torchrun job (torchrun sets RANK), or not distributed: the process that speaks."""
    return int(os.environ.get("RANK", "0")) == 0


def info(message: str) -> None:
    """One human-readable line on stderr (suppressed by --quiet)."""
    if not _quiet:
        print(message, file=sys.stderr, flush=True)


def route_library_logs() -> None:
    """Libraries' Python log records reach stderr from WARNING up, as 'warning: LOGGER: message'. The
    handler on the root logger also makes a library's `logging.basicConfig(level=INFO)` a no-op:
    onnxruntime's MatMulNBits quantizer calls it on import and would then print a line per weight."""
    root = logging.getLogger()
    if any(isinstance(handler, _LibraryLogs) for handler in root.handlers):
        return
    handler = _LibraryLogs(sys.stderr)
    handler.setLevel(logging.WARNING)
    root.addHandler(handler)


class _LibraryLogs(logging.StreamHandler):  # type: ignore[type-arg]
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.name}: {record.getMessage()}"


def warn(message: str) -> None:
    """A warning is shown even with --quiet: it is about something the user should act on."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def emit_json(payload: dict[str, Any]) -> None:
    """The one machine-readable object of a --json run."""
    sys.stdout.write(json.dumps(payload, indent=None, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def is_tty() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Route third-party prints (the ONNX exporter's progress lines) away from the --json stdout."""
    with contextlib.redirect_stdout(sys.stderr if not _quiet else open(os.devnull, "w")):
        yield


class Progress:
    """A progress reporter for a loop of `total` steps.

    On a terminal: a rich bar with the fields given to update(). Elsewhere: one plain line every
    `every_s` seconds and at the end, so CI logs stay readable.
    """

    def __init__(self, description: str, total: int, every_s: float = 10.0) -> None:
        self.description = description
        self.total = total
        self.every_s = every_s
        self._bar: Any = None
        self._task: Any = None
        self._last_line = 0.0
        self._start = time.perf_counter()

    def __enter__(self) -> Progress:
        if not _quiet and is_tty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, status="")
        return self

    def update(self, completed: int, **fields: Any) -> None:
        status = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, status=status)
            return
        now = time.perf_counter()
        if completed >= self.total or completed == 1 or now - self._last_line >= self.every_s:
            self._last_line = now
            rate = completed / max(now - self._start, 1e-9)
            info(f"{self.description} {completed}/{self.total}  {status}  ({rate:.1f} steps/s)")

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_mapping(mapping: dict[str, Any], indent: str = "") -> None:
    """Human 'key  value' lines on stdout: a mapping of mappings (a run's stages) as an indented block,
    other values as compact JSON (true, null, [..]: never Python's True/None)."""
    width = max((len(str(k)) for k in mapping), default=0)
    for key, value in mapping.items():
        if not indent and isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            print(f"{key}")
            print_mapping(value, "  ")
            continue
        plain = isinstance(value, str) and value.isprintable() and value.strip() == value and value
        print(f"{indent}{key!s:<{width}}  {value if plain else json.dumps(value, default=str)}")
