"""Generate text with an exported GPT through ONNX Runtime (no PyTorch).

Decoding: greedy (temperature 0) or sampling with temperature, top-k and top-p; stop strings; a seed.
The context never exceeds block_size: a longer prompt keeps its last block_size tokens, and once the
window is full each step re-reads the last block_size tokens (the same policy as the PyTorch model's
`generate`, so greedy output matches it token for token).

Prompts are processed one at a time, so each prompt's output is exactly what it would be alone (the
random stream of a prompt depends only on the seed and the prompt). `Generation` is one prompt's
decoding state apart from the graph: `bigmodel serve` drives many of them through one padded batch
(serve/batching.py). The graph takes any batch size (see `bench`). A GroupQueryAttention file
(export.attention ort) decodes into cache buffers it writes in place (`SharedCache`); other files get
their cache back as new arrays each step (`ArrayCache`).
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
from typing_extensions import TypeIs

from bigmodel import chat, console, decoder_graph
from bigmodel import tokenizer as tokenizers
from bigmodel.config import STDIO, InferConfig
from bigmodel.decoder_graph import CacheLayout, KVCache
from bigmodel.errors import UserError
from bigmodel.io import atomic_open, jsonl_objects
from bigmodel.manifests import DecoderMetadata
from bigmodel.tabular_io import read_text


@dataclass
class Decoder:
    """One ONNX session and what its metadata says about the model."""

    session: ort.InferenceSession
    tokenizer: tokenizers.Tokenizer
    block_size: int
    cache: CacheLayout
    eos_ids: frozenset[int] = frozenset()  # generation ends when one of these is produced
    chat_template: str | None = None
    special_tokens: dict[str, Any] = field(default_factory=dict)  # bos/eos/pad ids
    inputs: tuple[str, ...] | None = None  # the graph's input names (older files: a stacked cache, no left_padding)
    right_padded: bool = False  # a GroupQueryAttention graph: rows padded at the end, its cache writable in place

    @classmethod
    def from_session(cls, session: ort.InferenceSession, meta: DecoderMetadata, path: Path) -> Decoder:
        tok = tokenizers.from_json(meta.tokenizer, f"{path} (tokenizer)")
        special = meta.special_tokens
        return cls(
            session,
            tok,
            meta.block_size,
            CacheLayout.from_metadata(meta),
            frozenset(special.get("eos") or []),
            meta.chat_template,
            special,
            decoder_graph.session_inputs(session),
            meta.attention == "group_query",
        )

    @property
    def batches_padded_rows(self) -> bool:
        """Whether rows of different lengths can share a batch (the graph takes left_padding)."""
        return self.inputs is None or "left_padding" in self.inputs or "attention_mask" in self.inputs

    def chat_prompt(self, messages: list[chat.Message]) -> str:
        """The conversation rendered with the model's own chat template, the assistant's turn opened."""
        if not self.chat_template:
            raise UserError(
                "--chat: this model has no chat template (imported models bring theirs); give plain prompts instead"
            )
        return chat.render(self.chat_template, messages, chat.token_texts(self.tokenizer, self.special_tokens))

    def empty_cache(self, batch: int) -> KVCache:
        return self.cache.empty(batch)

    def run(self, ids: np.ndarray, cache: KVCache, padding: np.ndarray | None = None) -> tuple[np.ndarray, KVCache]:
        """Logits (B, T, V) for `ids` after what `cache` holds, and the cache with them; `padding` (B,):
        each row's padding positions (in front; at the end for a right_padded graph)."""
        named = decoder_graph.feeds(ids, cache, padding, self.inputs, self.right_padded)
        return decoder_graph.outputs(self.session.run(None, named))

    @property
    def writes_in_place(self) -> bool:
        """Whether the graph can write each run's keys and values into buffers bound as both its past and
        its present (GroupQueryAttention, on the CPU: the buffers are host memory)."""
        return self.right_padded and self.session.get_providers()[0] == "CPUExecutionProvider"

    def sequences(self, batch: int, capacity: int) -> Sequences:
        """`batch` sequences decoded together, up to `capacity` positions each: in buffers the graph writes
        in place where it can (writes_in_place), else in arrays each run returns."""
        if self.writes_in_place:
            return SharedCache(self, batch, capacity)
        return ArrayCache(self, batch)

    def tokens(self, prompt_ids: list[int], settings: InferConfig, rng: np.random.Generator) -> Iterator[int]:
        """New token ids after the prompt, one at a time."""
        ids = list(prompt_ids[-self.block_size :])
        cache = self.sequences(1, min(self.block_size, len(ids) + settings.max_new_tokens))
        logits = cache.run(np.array([ids], dtype=np.int64))
        for _ in range(settings.max_new_tokens):
            next_id = pick(logits[0, -1], settings, rng)
            yield next_id
            ids.append(next_id)
            if cache.length + 1 > self.block_size:  # window full: re-read the last block_size tokens
                cache.clear()
                logits = cache.run(np.array([ids[-self.block_size :]], dtype=np.int64))
            else:
                logits = cache.run(np.array([[next_id]], dtype=np.int64))


class Sequences(Protocol):
    """Sequences of one length decoded together: each run appends `ids` (B, T) and returns their logits."""

    @property
    def length(self) -> int: ...  # positions cached

    def run(self, ids: np.ndarray) -> np.ndarray: ...  # (B, T, V)

    def clear(self) -> None: ...  # back to no positions


class ArrayCache:
    """The cache as arrays: each run feeds them and gets new ones back (the graph's present = past + new)."""

    def __init__(self, decoder: Decoder, batch: int) -> None:
        self.decoder, self.batch = decoder, batch
        self.cache = decoder.empty_cache(batch)

    @property
    def length(self) -> int:
        return self.cache.length

    def run(self, ids: np.ndarray) -> np.ndarray:
        logits, self.cache = self.decoder.run(ids, self.cache)
        return logits

    def clear(self) -> None:
        self.cache = self.decoder.empty_cache(self.batch)


class SharedCache:
    """One buffer of `capacity` positions per layer for the keys and one for the values, bound through
    ONNX Runtime's IOBinding as both the past and the present of every run: a GroupQueryAttention graph
    writes each step's keys and values into them in place, so a step copies nothing of the cache
    (onnxruntime-genai runs the builder's graphs so). The buffers' positions past `length` hold no data
    that is ever read: the attention mask's width tells the graph where each row ends."""

    def __init__(self, decoder: Decoder, batch: int, capacity: int) -> None:
        self.decoder, self.batch, self.capacity = decoder, batch, capacity
        self.length = 0
        layout = decoder.cache
        self.binding = decoder.session.io_binding()
        shape = [batch, layout.n_kv_head, capacity, layout.head_size]
        dtype = decoder_graph.DTYPES[layout.dtype]
        self.buffers = [ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype) for _ in cache_names(layout)]
        bind_past_and_present(self.binding, layout, self.buffers)

    def run(self, ids: np.ndarray) -> np.ndarray:
        width = self.length + ids.shape[1]
        if width > self.capacity:
            raise ValueError(f"{width} positions exceed the cache's {self.capacity}")
        logits = run_bound(self.decoder.session, self.binding, ids, np.ones((self.batch, width), np.int64))
        self.length = width
        return logits

    def clear(self) -> None:
        self.length = 0


def cache_names(layout: CacheLayout) -> tuple[str, ...]:
    """The graph's cache inputs: keys, then values, layer by layer (decoder_graph.input_names)."""
    return decoder_graph.input_names(layout.n_layer)[1:-1]


def bind_past_and_present(binding: Any, layout: CacheLayout, values: list[ort.OrtValue]) -> None:
    """Bind each of `values` (in cache_names' order) as both its layer's past and its present: a
    GroupQueryAttention graph then writes the run's keys and values into it."""
    for name, value in zip(cache_names(layout), values, strict=True):
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(name.replace("past_", "present_"), value)


def run_bound(session: ort.InferenceSession, binding: Any, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Run `binding` (its cache bound) on `ids` and the attention `mask`; the logits (B, T, V)."""
    binding.bind_cpu_input("input_ids", ids)
    binding.bind_cpu_input("attention_mask", mask)
    binding.bind_output("logits")  # (its shape changes between the prompt and the steps)
    session.run_with_iobinding(binding)
    return next(o for o in binding.get_outputs() if len(o.shape()) == 3).numpy()  # (the caches: 4-D)


def pick(logits: np.ndarray, settings: InferConfig, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise sample after temperature, top-k and top-p (nucleus)."""
    if settings.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / settings.temperature
    if settings.top_k is not None and settings.top_k < len(scaled):
        kth = np.partition(scaled, -settings.top_k)[-settings.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if settings.top_p is not None and settings.top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, settings.top_p)) + 1]  # smallest set >= top_p
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(len(probs), p=probs))


@dataclass
class Scored:
    """A token's log-probability under the model (its raw distribution: before temperature, top-k and
    top-p) and the likeliest tokens at its position, best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def score(logits: np.ndarray, tokens: list[int], top: int) -> list[Scored]:
    """For (T, V) logits and the T tokens that followed each position: each token's log-probability (log
    softmax in float64) and the `top` likeliest at its position."""
    values = logits.astype(np.float64)
    peak = values.max(-1, keepdims=True)
    log_probs = values - peak - np.log(np.exp(values - peak).sum(-1, keepdims=True))
    return [Scored(int(token), float(row[token]), _likeliest(row, top)) for row, token in zip(log_probs, tokens)]


def _likeliest(row: np.ndarray, top: int) -> list[tuple[int, float]]:
    """The `top` largest entries of a (V,) row, best first, equal values by index (as a stable sort of the
    whole row ranks them): a partition finds the top-th value, and only the entries at or above it are
    sorted -- not all V of them for every scored position of an echoed prompt."""
    top = min(top, len(row))
    if not top:
        return []
    kth = np.partition(row, len(row) - top)[len(row) - top]
    candidates = np.flatnonzero(row >= kth)
    ranked = candidates[np.argsort(-row[candidates], kind="stable")][:top]
    return [(int(i), float(row[i])) for i in ranked]


def is_token_ids(prompt: object) -> TypeIs[list[int]]:
    return isinstance(prompt, list) and all(isinstance(item, int) and not isinstance(item, bool) for item in prompt)


def prompt_rng(seed: int, prompt: str) -> np.random.Generator:
    """A prompt's random stream depends on the seed and the prompt alone, not on its position."""
    return np.random.default_rng([seed, zlib.crc32(prompt.encode("utf-8"))])


Prompt = str | list[chat.Message]  # plain text, or a conversation (chat)


class Generation:
    """One prompt's decoding, token by token: its random stream, the text so far, what may be shown of
    it yet, and why it ended (max_new_tokens, a stop string, or the model's end-of-sequence token)."""

    def __init__(
        self,
        decoder: Decoder,
        prompt: Prompt | list[int],
        settings: InferConfig,
        seed: int,
        logprobs: int | None = None,
    ) -> None:
        """`prompt`: text, a conversation (settings.chat) or token ids as they are. `logprobs`: record each
        new token's log-probability and the `logprobs` likeliest alternatives (`scored`)."""
        self.decoder, self.prompt, self.settings = decoder, prompt, settings
        self.prompt_ids = list(prompt) if is_token_ids(prompt) else encode_prompt(decoder, prompt, settings)
        self.rng = prompt_rng(seed, prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True))
        self.new_ids: list[int] = []
        self.text, self.shown = "", 0
        self.stop_reason: str | None = None  # set once it ended
        self.logprobs = logprobs
        self.scored: list[Scored] = []  # the new tokens' log-probabilities, with `logprobs`
        self.prompt_scored: list[Scored] | None = None  # the prompt's, once `score_prompt` ran

    def pick(self, logits: np.ndarray) -> int:
        """The next token from the last position's logits (V,), with this prompt's settings and stream."""
        token = pick(logits, self.settings, self.rng)
        if self.logprobs is not None and token not in self.decoder.eos_ids:  # (the end is not in the text)
            self.scored += score(logits[None], [token], self.logprobs)
        return token

    def score_prompt(self, logits: np.ndarray) -> None:
        """The prompt's tokens after the first, scored by the logits of the positions before them
        ((len(prompt) - 1, V)): what an echo of the prompt reports."""
        self.prompt_scored = score(logits, self.prompt_ids[1:], self.logprobs or 0)

    def accept(self, token: int) -> str:
        """Take the next token; return the new text that is safe to show (held back: what could still
        become a stop string, half a UTF-8 character)."""
        if token in self.decoder.eos_ids:
            self.stop_reason = "eos"
            return self.rest()
        self.new_ids.append(token)
        self.text = self.decoder.tokenizer.decode(self.new_ids)
        stop_at = _first_stop(self.text, self.settings.stop)
        if stop_at is not None:
            self.text, self.stop_reason = self.text[:stop_at], "stop"
            return self.rest()
        if len(self.new_ids) >= self.settings.max_new_tokens:
            self.stop_reason = "max_new_tokens"
            return self.rest()
        safe = len(self.text) - _holdback(self.text, self.settings.stop)
        return self._show(safe)

    def rest(self) -> str:
        """All the text not shown yet."""
        return self._show(len(self.text))

    def _show(self, upto: int) -> str:
        piece = self.text[self.shown : upto] if upto > self.shown else ""
        self.shown = max(self.shown, upto)
        return piece

    def result(self) -> dict[str, Any]:
        reason = self.stop_reason or "max_new_tokens"
        return {
            "prompt": self.prompt,
            "completion": self.text,
            "new_tokens": len(self.new_ids) + (reason == "eos"),
            "stop_reason": reason,
            "prompt_tokens": len(self.prompt_ids),
            "cropped": len(self.prompt_ids) > self.decoder.block_size,
            **({"chat": True} if self.settings.chat else {}),
        }


def complete(decoder: Decoder, prompt: Prompt, settings: InferConfig, seed: int, stream: Any = None) -> dict[str, Any]:
    """Generate for one prompt; stream the new text to `stream` as it is decoded, if given. With
    settings.chat the prompt is a user message (or a whole conversation) in the model's chat template."""
    generation = Generation(decoder, prompt, settings, seed)
    for token in decoder.tokens(generation.prompt_ids, settings, generation.rng):
        piece = generation.accept(token)
        if stream is not None and piece:
            stream.write(piece)
            stream.flush()
        if generation.stop_reason:
            break
    return generation.result()


def encode_prompt(decoder: Decoder, prompt: Prompt, settings: InferConfig) -> list[int]:
    """The prompt's token ids (with settings.chat: the conversation in the model's chat template)."""
    text_in = _prompt_text(decoder, prompt, settings)
    if not text_in:
        raise UserError("empty prompt: give at least one character to continue from")
    # A chat template writes its own special tokens (BOS included): encode it as written, as transformers'
    # apply_chat_template does and as fine-tuning data was encoded.
    return decoder.tokenizer.encode_with_offsets(text_in)[0] if settings.chat else decoder.tokenizer.encode(text_in)


def _prompt_text(decoder: Decoder, prompt: Prompt, settings: InferConfig) -> str:
    if not settings.chat:
        if not isinstance(prompt, str):
            raise UserError('a {"messages": [...]} prompt is a conversation: give --chat (infer.chat: true)')
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if settings.system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": settings.system})
    return decoder.chat_prompt(messages)


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _holdback(text: str, stops: list[str]) -> int:
    longest = 1 if text.endswith("\ufffd") else 0  # half a UTF-8 character from byte-level BPE
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if stop.startswith(text[-n:]):
                longest = max(longest, n)
                break
    return longest


# ------------------------------------------------------------------------------------- the stage


def run_model(
    session: ort.InferenceSession,
    meta: DecoderMetadata,
    path: Path,
    settings: InferConfig,
    source: Path | None,
    dest: Path,
    seed: int,
    bench_settings: dict[str, int] | None,
) -> dict[str, Any]:
    """infer's entry for decoder models: generate, or measure decoding with --bench."""
    decoder = Decoder.from_session(session, meta, path)
    if bench_settings is not None:
        measured = bench(decoder, seed=seed, **bench_settings)
        console.info(
            f"infer: batch {measured['batch']}, {measured['prompt_tokens']}-token prompt + "
            f"{measured['new_tokens']} new tokens: prefill {measured['prefill_ms']} ms, per token "
            f"{measured['per_token_ms_p50']} ms (p95 {measured['per_token_ms_p95']}), "
            f"{measured['tokens_per_s']:,} tokens/s"
        )
        return measured
    return generate(decoder, settings, source, dest, seed)


def read_prompts(settings: InferConfig, source: Path | None) -> list[Prompt]:
    """--prompt, else a text file (one prompt per line), a JSONL file ({"prompt": ...} or, with --chat,
    {"messages": [...]}) or stdin."""
    if settings.prompt is not None:
        return [settings.prompt]
    if source is None:
        raise UserError("no prompt: give --prompt TEXT, or --input FILE (.txt one per line, .jsonl) or '-'")
    text = sys.stdin.read() if str(source) == STDIO else read_text(_existing(source))
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and (source.suffix == ".jsonl" or (str(source) == STDIO and lines[0].lstrip().startswith("{"))):
        prompts: list[Prompt] = []
        for number, record in jsonl_objects(lines, source):
            if "messages" in record:
                prompts.append(chat.check_messages(record["messages"], f"{source}: line {number}"))
            elif isinstance(record.get("prompt"), str):
                prompts.append(record["prompt"])
            else:
                raise UserError(f"{source}: line {number} needs a string field 'prompt' (or 'messages' with --chat)")
        return prompts
    if not lines:
        raise UserError(f"{source}: no prompts (one prompt per line expected)")
    return lines


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"input file not found: {path} (set infer.input or --input)")
    return path


def generate(decoder: Decoder, settings: InferConfig, source: Path | None, dest: Path, seed: int) -> dict[str, Any]:
    prompts = read_prompts(settings, source)
    to_stdout = str(dest) == STDIO
    fmt = "jsonl" if settings.format == "jsonl" or (settings.format == "auto" and dest.suffix == ".jsonl") else "text"
    stream = sys.stdout if to_stdout and fmt == "text" and sys.stdout.isatty() else None
    results = []
    for prompt in prompts:
        if stream is not None and not settings.chat:
            stream.write(prompt if isinstance(prompt, str) else "")
        results.append(complete(decoder, prompt, settings, seed, stream))
        if stream is not None:
            stream.write("\n")
    if stream is None:
        _write(results, dest, fmt)
    new_tokens = sum(r["new_tokens"] for r in results)
    console.info(f"infer: {len(results)} prompt(s), {new_tokens} new tokens -> {'stdout' if to_stdout else dest}")
    past = sum(r["prompt_tokens"] + r["new_tokens"] > decoder.block_size for r in results)
    if past:  # serve refuses this (unless serve.context_shift); infer slides, and says so
        console.warn(
            f"infer: {past} of {len(results)} generation(s) ran past the model's context of "
            f"{decoder.block_size} tokens: from there each token was predicted from the last "
            f"{decoder.block_size} alone (a sliding window), so quality may drop; lower --max-new-tokens"
        )
    return {
        "generations": str(dest),
        "prompts": len(results),
        "new_tokens": new_tokens,
        "results": results if len(results) <= 16 else results[:16],
    }


def _write(results: list[dict[str, Any]], dest: Path, fmt: str) -> None:
    lines = (
        [json.dumps(r, ensure_ascii=False) + "\n" for r in results]
        if fmt == "jsonl"
        else [
            (r["prompt"] if isinstance(r["prompt"], str) and not r.get("chat") else "") + r["completion"] + "\n"
            for r in results
        ]
    )
    if str(dest) == STDIO:
        sys.stdout.write("".join(lines))
        sys.stdout.flush()
        return
    with atomic_open(dest) as handle:
        handle.write("".join(lines))


# ------------------------------------------------------------------------------------------ bench


def bench(decoder: Decoder, batch: int, prompt_tokens: int, new_tokens: int, repeats: int, seed: int) -> dict[str, Any]:
    """Prefill latency, per-token decode latency (p50, p95) and tokens/s on random prompts."""
    if prompt_tokens + new_tokens > decoder.block_size:
        raise UserError(
            f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} exceed the block size "
            f"{decoder.block_size}; the benchmark measures cached decoding inside one window"
        )
    rng = np.random.default_rng(seed)
    vocab = decoder.tokenizer.vocab_size
    prefill, per_token, rates = [], [], []
    for _ in range(repeats + 1):  # the first round warms up and is not counted
        ids = rng.integers(0, vocab, size=(batch, prompt_tokens), dtype=np.int64)
        cache = decoder.sequences(batch, prompt_tokens + new_tokens)
        start = time.perf_counter()
        logits = cache.run(ids)
        first = time.perf_counter() - start
        steps = []
        decode_start = time.perf_counter()
        for _ in range(new_tokens):
            step_start = time.perf_counter()
            next_ids = logits[:, -1].argmax(-1).reshape(batch, 1).astype(np.int64)
            logits = cache.run(next_ids)
            steps.append(time.perf_counter() - step_start)
        decode = time.perf_counter() - decode_start
        prefill.append(first)
        per_token.extend(steps)
        rates.append(batch * new_tokens / decode)
    counted = per_token[new_tokens:]
    return {
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prefill_ms": round(1000 * float(np.median(prefill[1:])), 3),
        "per_token_ms_p50": round(1000 * float(np.percentile(counted, 50)), 3),
        "per_token_ms_p95": round(1000 * float(np.percentile(counted, 95)), 3),
        "tokens_per_s": round(float(np.median(rates[1:])), 1),
    }
