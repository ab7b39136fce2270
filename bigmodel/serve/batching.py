"""Continuous batching for decoder models: requests that arrive together are decoded together.

One thread owns the ONNX session. Each turn of its loop it
1. admits waiting requests, up to `max_batch` rows: their prompts, padded to the longest, go
   through the graph in one run, and their caches join the batch's (the shorter side padded);
2. picks every row's next token with that request's own settings and random stream (infer's
   `Generation`: the same sampling, stop strings and end-of-sequence as `bigmodel infer`) and hands the
   new text to the request;
3. drops the rows that ended or whose client left, and the cache positions that are padding in every row;
4. runs one decode step for the rest: input_ids (B, 1), the cache, each row's padding (B,) -- the
graph's attention mask over it (decoder_graph.feeds).
Rows are padded in front, or at the end for a GroupQueryAttention graph (Decoder.right_padded), whose
operator writes each row's new keys and values after its own last token. The attention mask keeps
every row's numbers its own (export's gate checks padded rows). Such a graph on the CPU keeps the batch's
cache in slots it writes in place (`SlotRows`): nothing of the cache is copied per step, a request joins
by its own prefill into the next free slots, and one that leaves moves only the rows after it. Otherwise
each run returns the cache as new arrays (`ArrayRows`).
A request alone in the batch runs exactly as `bigmodel infer` would, bit for bit.

A row whose context is full (block_size tokens) re-reads its last block_size tokens each step, as infer
does; such rows need neither cache nor padding, so they run together in a batch of their own. A graph
exported before padding existed (neither attention_mask nor left_padding) cannot mix lengths: it decodes one request at a time.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from bigmodel import decoder_graph
from bigmodel.infer.gpt import Decoder, Generation, bind_past_and_present, cache_names, run_bound


@dataclass
class Request:
    """One request in the scheduler: its decoding state and where its text goes (called from the
    scheduler's thread: `on_text(piece)` as text becomes safe to show, then `on_end(result or error)`)."""

    generation: Generation
    on_text: Callable[[str], None]
    on_end: Callable[[dict[str, Any] | BaseException], None]
    echo: bool = False  # score the prompt's own tokens (generation.score_prompt) when it is read
    cancelled: threading.Event = field(default_factory=threading.Event)
    logits: np.ndarray | None = None  # (V,) at its last position: what the next token is picked from
    next_token: int = 0
    length: int = 0  # tokens in its context (in the cache, or in the window it re-reads)

    def window(self, block_size: int) -> list[int]:
        return (self.generation.prompt_ids + self.generation.new_ids)[-block_size:]


class CachedRows(Protocol):
    """The keys and values of the batch's rows, in the scheduler's row order."""

    def add(self, ids: np.ndarray, padding: np.ndarray) -> np.ndarray: ...  # new rows' prompts: (k, L, V)

    def step(self, ids: np.ndarray) -> np.ndarray: ...  # one token for every row (B, 1): (B, 1, V)

    def keep(self, rows: list[int]) -> None: ...  # only these rows (ascending), in this order

    def clear(self) -> None: ...


class ArrayRows:
    """The cache as arrays each run returns (ONNX's Attention: the present is the past plus the new
    positions), padded per row; rows join by padding the side with fewer positions."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.clear()

    def clear(self) -> None:
        self.cache, self.padding = self.decoder.empty_cache(0), np.zeros(0, np.int64)

    def add(self, ids: np.ndarray, padding: np.ndarray) -> np.ndarray:
        logits, cache = self.decoder.run(ids, self.decoder.empty_cache(len(ids)), padding)
        if not len(self.padding):
            self.cache, self.padding = cache, padding
            return logits
        width, right = max(self.cache.length, cache.length), self.decoder.right_padded
        old_pad, new_pad = self.padding + width - self.cache.length, padding + width - cache.length
        self.cache = self.cache.padded(width, right).joined(cache.padded(width, right))
        self.padding = np.concatenate([old_pad, new_pad])
        return logits

    def step(self, ids: np.ndarray) -> np.ndarray:
        logits, self.cache = self.decoder.run(ids, self.cache, self.padding)
        return logits

    def keep(self, rows: list[int]) -> None:
        self.cache, self.padding = self.cache.rows(rows), self.padding[rows]
        drop = int(self.padding.min()) if len(rows) else 0  # positions that are padding in every row
        if drop:
            self.cache = self.cache.trimmed(drop, self.decoder.right_padded)
            self.padding = self.padding - drop


class SlotRows:
    """A GroupQueryAttention graph's cache written in place: per layer one keys and one values buffer of
    (max_batch slots, kv heads, capacity positions, head size), the live rows in the first slots in the
    scheduler's order. Each run binds its rows' slots (a view: no copy) as both past and present, and the
    attention mask's ones say how long each row is -- the operator writes row b's new keys and values at
    its own length and attends over that. New rows are prefilled into the next free slots, right-padded
    (what lies past a row's length is never read: its next step overwrites it). The capacity doubles when
    a row needs more, up to block_size (one copy of what is cached, each time); the OS zeroes the buffers
    lazily, so slots never used take no memory."""

    def __init__(self, decoder: Decoder, slots: int, capacity: int = 256) -> None:
        self.decoder, self.slots = decoder, slots
        self.buffers: list[np.ndarray] = []  # keys, then values, layer by layer (cache_names)
        self.lengths = np.zeros(0, np.int64)  # each live row's cached positions
        self._grow(min(capacity, decoder.block_size))

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]

    def _grow(self, capacity: int) -> None:
        layout = self.decoder.cache
        shape = (self.slots, layout.n_kv_head, capacity, layout.head_size)
        used = int(self.lengths.max()) if len(self.lengths) else 0
        grown = [np.zeros(shape, decoder_graph.DTYPES[layout.dtype]) for _ in cache_names(layout)]
        for new, old in zip(grown, self.buffers):
            new[: len(self.lengths), :, :used] = old[: len(self.lengths), :, :used]
        self.buffers = grown

    def _room(self, positions: int) -> None:
        if positions > self.capacity:
            self._grow(min(self.decoder.block_size, max(positions, 2 * self.capacity)))

    def clear(self) -> None:
        self.lengths = np.zeros(0, np.int64)

    def add(self, ids: np.ndarray, padding: np.ndarray) -> np.ndarray:
        lengths = ids.shape[1] - padding
        start = len(self.lengths)
        if start + len(ids) > self.slots:
            raise ValueError(f"{start + len(ids)} rows exceed the {self.slots} slots")
        self._room(ids.shape[1])
        logits = self._run(ids, start, lengths)
        self.lengths = np.concatenate([self.lengths, lengths])
        return logits

    def step(self, ids: np.ndarray) -> np.ndarray:
        self._room(int(self.lengths.max()) + 1)
        logits = self._run(ids, 0, self.lengths + 1)
        self.lengths = self.lengths + 1
        return logits

    def keep(self, rows: list[int]) -> None:
        """Move each kept row down into the first free slot before it (rows ascend, so no source is
        overwritten before it is read): one copy of each row after a leaving one, once."""
        for slot, row in enumerate(rows):
            if row != slot:
                used = int(self.lengths[row])
                for buffer in self.buffers:
                    buffer[slot, :, :used] = buffer[row, :, :used]
        self.lengths = self.lengths[rows]

    def _run(self, ids: np.ndarray, start: int, lengths: np.ndarray) -> np.ndarray:
        """Logits (k, T, V) of `ids` for the rows in slots start .. start + k, each `lengths` long after it."""
        binding = self.decoder.session.io_binding()
        rows = slice(start, start + len(ids))  # (host memory: OrtValues over views of the buffers, no copy)
        bind_past_and_present(
            binding, self.decoder.cache, [ort.OrtValue.ortvalue_from_numpy(buffer[rows]) for buffer in self.buffers]
        )
        width = int(lengths.max())
        mask = decoder_graph.attention_mask(width, width - lengths, right=True)
        return run_bound(self.decoder.session, binding, ids, mask)


class Scheduler:
    """The decoding thread and its batch. `submit` from any thread; `waiting` and `rows` for metrics."""

    def __init__(self, decoder: Decoder, max_batch: int) -> None:
        self.decoder = decoder
        self.max_batch = max_batch if decoder.batches_padded_rows else 1
        self._waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._cut: BaseException | None = None  # set by cut(): every request ends with it at the next turn
        self.cached: list[Request] = []  # rows in the shared KV cache, in its batch order
        self.windowed: list[Request] = []  # rows whose context is full
        self._rows: CachedRows = (  # the cached rows' keys and values
            SlotRows(decoder, self.max_batch) if decoder.writes_in_place else ArrayRows(decoder)
        )
        self.steps = 0
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._loop, name="bigmodel-decoder", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def rows(self) -> int:
        return len(self.cached) + len(self.windowed)

    def submit(self, request: Request) -> None:
        with self._wake:
            self._waiting.append(request)
            self._wake.notify()

    def cut(self, error: BaseException) -> int:
        """End every request, waiting or decoding, with `error` at the decoding thread's next turn (a drain
        that ran out of time); returns how many there were."""
        with self._wake:
            self._cut = error
            self._wake.notify()
            return len(self._waiting) + self.rows

    def stop(self) -> None:
        """Stop the decoding thread and wait for it (ONNX Runtime must not be mid-run at interpreter exit)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    # -------------------------------------------------------------------------------- the loop

    def _loop(self) -> None:
        while self._admit():
            try:
                self._turn()
            except Exception as exc:  # noqa: BLE001 - every request in the batch learns of it; the server lives on
                for request in self.cached + self.windowed:
                    request.on_end(exc)
                self.cached, self.windowed = [], []
                self._rows.clear()

    def _admit(self) -> bool:
        """Wait for work; move waiting requests into the batch (prefilled). False when stopping."""
        with self._wake:
            while not self._stopping and not self._waiting and not self.rows:
                self._wake.wait()
            if self._stopping:
                return False
            if self._cut is not None:
                for request in [*self._waiting, *self.cached, *self.windowed]:
                    request.on_end(self._cut)
                self._waiting.clear()
                self.cached, self.windowed, self._cut = [], [], None
                self._rows.clear()
                return True
            new = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.max_batch - self.rows))]
        new = [r for r in new if not r.cancelled.is_set()]
        if new:
            try:
                self._prefill(new)
            except Exception as exc:  # noqa: BLE001 - those requests fail; the batch goes on
                for request in new:
                    request.cancelled.set()  # (it leaves the rows at the next turn, if it joined them)
                    request.on_end(exc)
        return True

    def _turn(self) -> None:
        """Pick every row's next token, retire the finished, and run one step for the rest."""
        for request in self.cached + self.windowed:
            if request.cancelled.is_set() or request.generation.stop_reason:
                continue
            generation = request.generation
            assert request.logits is not None  # every request in a batch has run at least one step
            request.next_token = generation.pick(request.logits)
            piece = generation.accept(request.next_token)
            if piece:
                request.on_text(piece)
            if generation.stop_reason:
                request.on_end(generation.result())
        self._retire()
        self.largest_batch = max(self.largest_batch, self.rows)
        if self.cached:
            self._step_cached()
        if self.windowed:
            self._step_windowed()
        self.steps += 1

    def _retire(self) -> None:
        """Drop rows that ended or were cancelled; rows whose context is now full leave the cache."""

        def live(request: Request) -> bool:
            return not request.cancelled.is_set() and request.generation.stop_reason is None

        keep = [i for i, r in enumerate(self.cached) if live(r) and r.length + 1 <= self.decoder.block_size]
        self.windowed = [r for r in self.windowed if live(r)]
        self.windowed += [r for r in self.cached if live(r) and r.length + 1 > self.decoder.block_size]
        if len(keep) < len(self.cached):
            self.cached = [self.cached[i] for i in keep]
            self._rows.keep(keep)

    def _prefill(self, new: list[Request]) -> None:
        lengths = [len(r.generation.prompt_ids) for r in new]
        longest = max(lengths)
        pad = np.array([longest - n for n in lengths], dtype=np.int64)
        right = self.decoder.right_padded
        ids = np.zeros((len(new), longest), dtype=np.int64)
        for row, (request, n) in enumerate(zip(new, lengths)):
            ids[row, slice(0, n) if right else slice(longest - n, longest)] = request.generation.prompt_ids
        logits = self._rows.add(ids, pad)  # (a run that fails leaves the rows as they were)
        self.cached += new  # (in the rows' order from here on: one that fails below is cancelled)
        for row, (request, n) in enumerate(zip(new, lengths)):
            real = logits[row, :n] if right else logits[row, longest - n :]  # (n, V): the prompt's positions
            request.logits, request.length = real[-1], n
            generation = request.generation
            if request.echo:
                generation.score_prompt(real[:-1])
            if generation.settings.max_new_tokens == 0:  # only the prompt was asked for: it ends here
                generation.stop_reason = "max_new_tokens"  # (its row leaves the batch at the next turn)
                request.on_end(generation.result())

    def _step_cached(self) -> None:
        ids = np.array([[r.next_token] for r in self.cached], dtype=np.int64)
        logits = self._rows.step(ids)
        for row, request in enumerate(self.cached):
            request.logits, request.length = logits[row, -1], request.length + 1

    def _step_windowed(self) -> None:
        block = self.decoder.block_size
        ids = np.array([r.window(block) for r in self.windowed], dtype=np.int64)
        logits, _ = self.decoder.run(ids, self.decoder.empty_cache(len(self.windowed)))
        for row, request in enumerate(self.windowed):
            request.logits = logits[row, -1]
