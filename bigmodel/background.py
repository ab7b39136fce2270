"""Work that overlaps the caller's: a function run in a daemon thread, its result (or its exception)
collected when asked.

The streaming stages are short of overlap, not of cores: hashing a multi-GB checkpoint, or the gate's
transformers reference reading its own files, can run while the main thread traces a graph or writes a
checkpoint (hashlib and PyTorch's kernels release the GIL). A daemon thread: an interrupted stage exits
without waiting for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Background(Generic[T]):
    """`work()` started now in a daemon thread; `result()` waits for it and returns its value or raises
    what it raised."""

    def __init__(self, work: Callable[[], T]) -> None:
        self._work = work
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._work()
        except BaseException as exc:  # handed to the thread that asks for the result
            self._error = exc

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # (set: the work returned)
