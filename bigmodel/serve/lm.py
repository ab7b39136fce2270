"""Language models over HTTP, the OpenAI way: /v1/completions, /v1/chat/completions, /v1/models; and vLLM's
/tokenize and /detokenize (the ids a completion of the prompt starts from; ids back to text).

What evaluation clients send works: a completion's prompt as text, token ids, or a list of either (a batch,
answered in order), `n` samples per prompt (sample j seeded with seed + j), `logprobs` (each token's
log-probability under the model's raw distribution and the N likeliest alternatives), `echo` (the prompt
returned, its tokens scored), and `max_tokens: 0` with `echo` to score a text without generating --
lm-evaluation-harness's `local-completions` loglikelihood requests. Chat takes `logprobs: true` and
`top_logprobs`.

Generation is infer's own (`infer.gpt.Generation`: the same sampling, stop strings, end-of-sequence and
chat template); requests that arrive together are decoded together in one batch by the scheduler's
thread (serve/batching.py), so the event loop keeps serving. With `"stream": true` the text goes out as
server-sent events (`data: {chunk}` ... `data: [DONE]`) as it is decoded; a client that disconnects
leaves the batch at the next token, streamed or not. At most serve.max_queue requests wait for a row;
then 503. A request must fit the model's context: prompt plus max_tokens (without max_tokens,
serve.max_tokens is capped to what fits); serve.context_shift lets it run on in a sliding window instead.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from bigmodel.config import InferConfig, ServeConfig
from bigmodel.infer.gpt import Decoder, Generation, Scored, encode_prompt, is_token_ids
from bigmodel.manifests import DecoderMetadata
from bigmodel.serve import app
from bigmodel.serve.app import Metrics, Queue, RequestError, json_body
from bigmodel.serve.batching import Request as Row
from bigmodel.serve.batching import Scheduler

FINISH = {"eos": "stop", "stop": "stop", "max_new_tokens": "length"}  # infer's stop_reason -> OpenAI's


MAX_LOGPROBS = 20  # alternatives per token (OpenAI's chat limit; vLLM's default max_logprobs)
MAX_CHOICES = 128  # completions (prompts x n) in one request


class _Sampling(BaseModel):
    """The fields both endpoints take (OpenAI's names; top_k is an extension). Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt, generate nothing
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's shape): a prompt, or a conversation rendered with the model's chat template."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's shape): token ids back to text."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


class Engine(app.Engine):
    """A decoder model loaded in ONNX Runtime, and its routes."""

    kind = "gpt"

    def __init__(self, session: Any, meta: DecoderMetadata, path: Path, name: str, settings: ServeConfig) -> None:
        self.decoder = Decoder.from_session(session, meta, path)
        self.name, self.max_tokens = name, settings.max_tokens
        self.max_batch, self.context_shift = settings.max_batch, settings.context_shift
        self.scheduler: Scheduler | None = None
        # No token spans more characters than the longest in the vocabulary, so a prompt with more than
        # twice that many per token of context cannot fit: refused without tokenising it.
        self.longest_prompt = 2 * self.decoder.block_size * max(1, self.decoder.tokenizer.longest_token)

    def warm_up(self) -> None:
        """One run of the graph (a prefill and a cached step) before the server says it is up; then the
        decoding thread starts."""
        _, cache = self.decoder.run(np.zeros((1, 1), dtype=np.int64), self.decoder.empty_cache(1))
        self.decoder.run(np.zeros((1, 1), dtype=np.int64), cache)
        self.scheduler = Scheduler(self.decoder, self.max_batch)

    def cut(self) -> int:
        assert self.scheduler is not None
        return self.scheduler.cut(
            RequestError(
                "the server is shutting down and its drain time ran out; retry", status=503, kind="server_shutting_down"
            )
        )

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()

    def gauges(self, queue: Queue) -> dict[str, tuple[str, float]]:
        """Live numbers for /metrics."""
        assert self.scheduler is not None
        return {
            "queue_depth": ("Requests waiting for a row in the batch.", self.scheduler.waiting),
            "batch_rows": ("Requests being decoded together now.", self.scheduler.rows),
        }

    def routes(self, queue: Queue, metrics: Metrics) -> list[tuple[str, list[str], Any]]:
        async def completions(request: Request) -> Response:
            body = _parse(CompletionRequest, await json_body(request))
            if body.max_tokens == 0 and not body.echo:
                raise RequestError(
                    "max_tokens: 0 generates nothing; with echo: true it scores the prompt", "max_tokens"
                )
            prompts = self._prompts(body.prompt)
            return await self._answer(
                request, prompts, body, body.max_tokens, False, queue, metrics, body.logprobs, body.echo
            )

        async def chat(request: Request) -> Response:
            raw = await json_body(request)
            if "echo" in raw:
                raise RequestError(
                    "echo: a chat completion does not echo the conversation; use /v1/completions", "echo"
                )
            body = _parse(ChatRequest, raw)
            if not self.decoder.chat_template:
                raise RequestError(
                    "this model has no chat template (imported models bring theirs); use /v1/completions", "messages"
                )
            if body.top_logprobs is not None and not body.logprobs:
                raise RequestError("top_logprobs: needs logprobs: true", "top_logprobs")
            messages = [{"role": m.role, "content": m.content} for m in body.messages]
            top = (body.top_logprobs or 0) if body.logprobs else None
            max_tokens = body.max_completion_tokens or body.max_tokens
            return await self._answer(request, [messages], body, max_tokens, True, queue, metrics, top)

        async def tokenize(request: Request) -> Response:
            body = _parse(TokenizeRequest, await json_body(request))
            if (body.prompt is None) == (body.messages is None):
                raise RequestError("give a prompt or messages (one of them)", "prompt")
            if body.messages is not None and not self.decoder.chat_template:
                raise RequestError("this model has no chat template (imported models bring theirs)", "messages")
            prompt: Any = (  # (messages as the chat route passes them to the template)
                body.prompt
                if body.messages is None
                else [{"role": m.role, "content": m.content} for m in body.messages]
            )
            settings = InferConfig(chat=body.messages is not None)  # the ids a completion of it would start from
            ids = await asyncio.to_thread(encode_prompt, self.decoder, prompt, settings)
            return JSONResponse({"count": len(ids), "max_model_len": self.decoder.block_size, "tokens": ids})

        async def detokenize(request: Request) -> Response:
            body = _parse(DetokenizeRequest, await json_body(request))
            self._check_token_ids(body.tokens, "tokens", "tokens")
            return JSONResponse({"prompt": self.decoder.tokenizer.decode(body.tokens)})

        return [
            ("/v1/completions", ["POST"], completions),
            ("/v1/chat/completions", ["POST"], chat),
            ("/tokenize", ["POST"], tokenize),
            ("/detokenize", ["POST"], detokenize),
        ]

    def _prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
        """A completion request's prompts: one text, token ids, or a list of either (a batch); token ids
        must be the model's."""
        prompts: list[str | list[int]]
        if isinstance(prompt, str):
            prompts = [prompt]
        elif is_token_ids(prompt):  # one prompt's ids ([]: no prompt)
            prompts = [prompt] if prompt else []
        else:
            prompts = [*prompt]
        if not prompts:
            raise RequestError("prompt: give a prompt (text or token ids), or a list of them", "prompt")
        for i, each in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            if not each:
                raise RequestError(f"{where}: empty; give at least one character or token", "prompt")
            if isinstance(each, list):
                self._check_token_ids(each, where, "prompt")
        return prompts

    def _check_token_ids(self, ids: list[int], where: str, param: str) -> None:
        """A 400 naming the first id outside the vocabulary, by its place (`where`.index)."""
        vocabulary = self.decoder.tokenizer.vocab_size
        outside = next((i for i, token in enumerate(ids) if not 0 <= token < vocabulary), None)
        if outside is not None:
            raise RequestError(
                f"{where}.{outside}: {ids[outside]} is not a token id of this model (0..{vocabulary - 1})", param
            )

    async def _answer(
        self,
        request: Request,
        prompts: list[Any],
        body: _Sampling,
        max_tokens: int | None,
        is_chat: bool,
        queue: Queue,
        metrics: Metrics,
        logprobs: int | None = None,
        echo: bool = False,
    ) -> Response:
        field = "messages" if is_chat else "prompt"
        if len(prompts) * body.n > MAX_CHOICES:
            raise RequestError(
                f"{len(prompts)} prompts x n {body.n} completions: at most {MAX_CHOICES} in one request", field
            )
        for prompt in prompts:
            if is_token_ids(prompt):  # (counted as they are)
                continue
            chars = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
            if chars > self.longest_prompt:
                raise RequestError(
                    f"the prompt has {chars:,} characters, more than the model's context of "
                    f"{self.decoder.block_size} tokens can hold: shorten it",
                    field,
                )
        settings = InferConfig(
            max_new_tokens=max_tokens or self.max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            chat=is_chat,
            stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        )
        seed = body.seed if body.seed is not None else secrets.randbits(31)

        def generations() -> list[Generation]:  # sample j of each prompt draws from seed + j
            return [Generation(self.decoder, p, settings, seed + j, logprobs) for p in prompts for j in range(body.n)]

        # Tokenising (and rendering a chat template) takes time on a long prompt: off the event loop.
        made = await asyncio.to_thread(generations)
        for generation in made:
            room = self._room(generation, max_tokens, field)
            generation.settings = settings.model_copy(update={"max_new_tokens": room})
        assert self.scheduler is not None
        queue.check_room(self.scheduler.waiting)
        outbox = _Outbox(asyncio.get_running_loop())
        choices = [_Choice(i, g, outbox, echo, self.decoder.tokenizer) for i, g in enumerate(made)]
        reply = _Reply(self.name, is_chat, body.stream_options or {}, logprobs, self.decoder.tokenizer)
        rows = [Row(c.generation, on_text=c.on_text, on_end=c.on_end, echo=echo) for c in choices]
        for row in rows:
            self.scheduler.submit(row)
        if body.stream:
            return StreamingResponse(
                self._stream(rows, choices, outbox, reply, metrics, body.n), media_type="text/event-stream"
            )
        # A client that hangs up before the answer frees its rows (a stream notices when it next writes).
        watcher = asyncio.create_task(_hang_up(request, rows, outbox))
        ended: dict[int, dict[str, Any]] = {}
        try:
            while len(ended) < len(rows):
                for index, item in await outbox.take():
                    if isinstance(item, (_HungUp, BaseException)):
                        raise item
                    if isinstance(item, dict):
                        ended[index] = item
        except _HungUp:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        finally:
            watcher.cancel()
            for row in rows:
                row.cancelled.set()  # we are done (or the client went away): free the rows
        results = [ended[i] for i in range(len(rows))]
        usage = _usage(results, body.n)
        _count(metrics, usage)
        return JSONResponse(reply.whole([(c, ended[c.index]) for c in choices], usage))

    def _room(self, generation: Generation, max_tokens: int | None, field: str) -> int:
        """New tokens for this request: max_tokens, which must fit in the context after the prompt (unless
        serve.context_shift), or serve.max_tokens capped to what fits."""
        prompt_tokens, context = len(generation.prompt_ids), self.decoder.block_size
        if prompt_tokens >= context:
            raise RequestError(
                f"the prompt has {prompt_tokens} tokens; the model's context is {context}: shorten it", field
            )
        room = context - prompt_tokens
        if max_tokens is None:
            return self.max_tokens if self.context_shift else min(self.max_tokens, room)
        if max_tokens > room and not self.context_shift:
            raise RequestError(
                f"max_tokens: {max_tokens} new tokens do not fit; the model's context is {context} "
                f"tokens and the prompt takes {prompt_tokens}, leaving {room}: ask for at most "
                f"{room} (or serve with serve.context_shift: true)",
                "max_tokens",
            )
        return max_tokens

    async def _stream(
        self, rows: list[Row], choices: list[_Choice], outbox: _Outbox, reply: _Reply, metrics: Metrics, n: int
    ) -> AsyncIterator[str]:
        results: dict[int, dict[str, Any]] = {}
        try:
            for choice in choices:
                yield reply.chunk(choice.index, _Piece("", []), first=True)
            while len(results) < len(rows):
                items = await outbox.take()
                pieces: dict[int, list[_Piece]] = {}
                for index, item in items:
                    if isinstance(item, _Piece):
                        pieces.setdefault(index, []).append(item)
                for index, found in pieces.items():
                    merged = _Piece("".join(p.text for p in found), [e for p in found for e in p.scored])
                    if merged.text or merged.scored:
                        yield reply.chunk(index, merged)
                failed = next((item for _, item in items if isinstance(item, BaseException)), None)
                if failed is not None:
                    yield _event(
                        {"error": {"message": str(failed), "type": "server_error", "param": None, "code": None}}
                    )
                    break
                for index, item in items:
                    if isinstance(item, dict):
                        results[index] = item
                        yield reply.chunk(index, _Piece("", []), finish=FINISH[item["stop_reason"]])
            else:
                usage = _usage([results[i] for i in range(len(rows))], n)
                _count(metrics, usage)
                if reply.include_usage:
                    yield reply.usage_chunk(usage)
            yield "data: [DONE]\n\n"
        finally:
            for row in rows:  # the client left (or we are done): its rows leave the batch at the next token
                row.cancelled.set()


class _HungUp(Exception):
    """The client of a non-streamed request disconnected."""


async def _hang_up(request: Request, rows: list[Row], outbox: _Outbox) -> None:
    """Wait until the client disconnects (the body was read: uvicorn's next message is the disconnect),
    then cancel its rows and wake the handler."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for row in rows:
        row.cancelled.set()
    outbox.put(-1, _HungUp())


@dataclass
class _Piece:
    """New text of one choice, and the scored tokens that came with it (with logprobs; echo's first
    piece starts with the prompt and its tokens, the first unscored: an int)."""

    text: str
    scored: list[Scored | int]


Item = _Piece | dict[str, Any] | BaseException


class _Outbox:
    """What the decoding thread hands one request (per choice: text pieces, then its result or error),
    taken by the event loop. The loop is woken once per batch of pieces and takes them all: under load a
    stream's chunks carry several tokens instead of costing a wake-up and an event each."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list[tuple[int, Item]] = []
        self.ready = asyncio.Event()
        self._lock = threading.Lock()
        self._woken = False

    def put(self, index: int, item: Item) -> None:
        """From the decoding thread."""
        with self._lock:
            self.items.append((index, item))
            if self._woken:
                return
            self._woken = True
        self.loop.call_soon_threadsafe(self.ready.set)

    async def take(self) -> list[tuple[int, Item]]:
        """Everything put since the last take (never empty), in order."""
        while True:
            await self.ready.wait()
            with self._lock:
                items, self.items, self._woken = self.items, [], False
                self.ready.clear()
            if items:
                return items


class _Choice:
    """One completion of a request (a prompt's sample): forwards the decoding thread's text and end to the
    request's outbox, with the tokens scored since the last piece (read in that thread, where they are
    written). With echo its first piece is the prompt."""

    def __init__(self, index: int, generation: Generation, outbox: _Outbox, echo: bool, tokenizer: Any) -> None:
        self.index, self.generation, self.outbox = index, generation, outbox
        self.echo_pending, self.tokenizer, self.sent = echo, tokenizer, 0

    def prompt_text(self) -> str:
        prompt = self.generation.prompt
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(self.generation.prompt_ids)

    def _piece(self, text: str, upto: int | None = None) -> _Piece:
        generation = self.generation
        end = len(generation.scored) if upto is None else upto
        scored: list[Scored | int] = list(generation.scored[self.sent : end])
        self.sent = max(self.sent, end)
        if self.echo_pending:
            self.echo_pending = False
            ids = generation.prompt_ids
            text = self.prompt_text() + text
            scored = [ids[0], *(generation.prompt_scored or []), *scored]
        return _Piece(text, scored)

    def on_text(self, text: str) -> None:
        self.outbox.put(self.index, self._piece(text))

    def on_end(self, result: dict[str, Any] | BaseException) -> None:
        if isinstance(result, dict):
            kept = self.kept()
            if self.echo_pending or self.sent < kept:
                self.outbox.put(self.index, self._piece("", kept))
            result = {**result, "prompt_text": self.prompt_text(), "scored_tokens": kept}
        self.outbox.put(self.index, result)

    def kept(self) -> int:
        """The scored new tokens the final text holds (a stop string cuts the text, and the tokens past it)."""
        generation, count = self.generation, 0
        while count < len(generation.scored) and len(self.tokenizer.decode(generation.new_ids[:count])) < len(
            generation.text
        ):
            count += 1
        return count


def _count(metrics: Metrics, usage: dict[str, int]) -> None:
    metrics.tokens["prompt"] += usage["prompt_tokens"]
    metrics.tokens["completion"] += usage["completion_tokens"]


class _Reply:
    """OpenAI's response objects for one request (text completion or chat completion), its choices in order."""

    def __init__(
        self, model: str, is_chat: bool, stream_options: dict[str, bool], logprobs: int | None, tokenizer: Any
    ) -> None:
        self.model, self.is_chat, self.logprobs, self.tokenizer = model, is_chat, logprobs, tokenizer
        self.id = ("chatcmpl-" if is_chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.include_usage = bool(stream_options.get("include_usage"))
        self.offsets: dict[int, int] = {}  # per choice: characters sent so far (text_offset)

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, ended: list[tuple[_Choice, dict[str, Any]]], usage: dict[str, int]) -> dict[str, Any]:
        choices = []
        for choice, result in ended:
            finish = FINISH[result["stop_reason"]]
            generation = choice.generation
            scored: list[Scored | int] = list(generation.scored[: result["scored_tokens"]])
            text = result["completion"]
            if generation.prompt_scored is not None:  # echo
                text = result["prompt_text"] + text
                scored = [generation.prompt_ids[0], *generation.prompt_scored, *scored]
            logprobs = self._logprobs(choice.index, scored)
            if self.is_chat:
                message = {"role": "assistant", "content": text}
                choices.append(
                    {"index": choice.index, "message": message, "finish_reason": finish, "logprobs": logprobs}
                )
            else:
                choices.append({"index": choice.index, "text": text, "finish_reason": finish, "logprobs": logprobs})
        obj = "chat.completion" if self.is_chat else "text_completion"
        return {**self._head(obj), "choices": choices, "usage": usage}

    def chunk(self, index: int, piece: _Piece, first: bool = False, finish: str | None = None) -> str:
        logprobs = self._logprobs(index, piece.scored) if piece.scored else None
        if self.is_chat:
            delta = (
                {"role": "assistant", "content": piece.text}
                if first
                else ({"content": piece.text} if piece.text else {})
            )
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            return _event({**self._head("chat.completion.chunk"), "choices": [choice]})
        choice = {"index": index, "text": piece.text, "finish_reason": finish, "logprobs": logprobs}
        return _event({**self._head("text_completion"), "choices": [choice]})

    def usage_chunk(self, usage: dict[str, int]) -> str:
        obj = "chat.completion.chunk" if self.is_chat else "text_completion"
        return _event({**self._head(obj), "choices": [], "usage": usage})

    def _logprobs(self, index: int, scored: list[Scored | int]) -> dict[str, Any] | None:
        """OpenAI's logprobs object for these tokens (None when not asked for): a completion's parallel
        lists (tokens, token_logprobs, top_logprobs as {token: logprob} with the chosen token in it,
        text_offset), chat's content list. A token is its own decoded text (a piece of a multi-byte
        character shows as U+FFFD)."""
        if self.logprobs is None:
            return None
        text = self.tokenizer.decode
        if self.is_chat:
            content = [
                {
                    **_token(text([s.token]), s.logprob),
                    "top_logprobs": [_token(text([i]), p) for i, p in s.top],
                }
                for s in scored
                if isinstance(s, Scored)
            ]
            return {"content": content, "refusal": None}
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        offsets: list[int] = []
        offset = self.offsets.get(index, 0)
        for s in scored:
            token = text([s if isinstance(s, int) else s.token])
            tokens.append(token)
            offsets.append(offset)
            offset += len(token)
            if isinstance(s, int):  # the prompt's first token: nothing before it to score it
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(s.logprob)
            top = {text([i]): p for i, p in s.top}
            top.setdefault(token, s.logprob)
            top_logprobs.append(top)
        self.offsets[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _usage(results: list[dict[str, Any]], n: int) -> dict[str, int]:
    """Each prompt's tokens counted once (its n samples share it), every sample's new tokens."""
    prompt = sum(result["prompt_tokens"] for result in results[::n])
    completion = sum(result["new_tokens"] for result in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    """The request validated; the first problem as a 400 naming its field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        # pydantic appends a union member's type to the location (prompt.str): the field is what clients wrote.
        loc = list(error["loc"])
        path = [
            str(part)
            for i, part in enumerate(loc)
            if isinstance(part, int) or part in _FIELDS or (error["type"] == "extra_forbidden" and i == len(loc) - 1)
        ]
        field = ".".join(path) or None
        problem = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
        raise RequestError(f"{field}: {problem}" if field else problem, path[0] if path else None) from None


_FIELDS = {
    *ChatRequest.model_fields,
    *CompletionRequest.model_fields,
    *Message.model_fields,
    *TokenizeRequest.model_fields,
    *DetokenizeRequest.model_fields,
}
