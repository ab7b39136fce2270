"""Language models over HTTP, the OpenAI way: /v1/completions, /v1/chat/completions, /v1/models; and vLLM's
/tokenize and /detokenize (the ids a completion of the prompt starts from; ids back to text).

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
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from bigmodel.config import InferConfig, ServeConfig
from bigmodel.infer.gpt import Decoder, Generation, encode_prompt
from bigmodel.manifests import DecoderMetadata
from bigmodel.serve import app
from bigmodel.serve.app import Metrics, Queue, RequestError, json_body
from bigmodel.serve.batching import Request as Row
from bigmodel.serve.batching import Scheduler

FINISH = {"eos": "stop", "stop": "stop", "max_new_tokens": "length"}  # infer's stop_reason -> OpenAI's


class _Sampling(BaseModel):
    """The fields both endpoints take (OpenAI's names; top_k is an extension). Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str | None = None
    max_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)


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
            if isinstance(body.prompt, list) and len(body.prompt) != 1:
                raise RequestError("prompt: one prompt per request (n = 1)", "prompt")
            prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
            return await self._answer(request, prompt, body, body.max_tokens, False, queue, metrics)

        async def chat(request: Request) -> Response:
            body = _parse(ChatRequest, await json_body(request))
            if not self.decoder.chat_template:
                raise RequestError(
                    "this model has no chat template (imported models bring theirs); use /v1/completions", "messages"
                )
            messages = [{"role": m.role, "content": m.content} for m in body.messages]
            return await self._answer(
                request, messages, body, body.max_completion_tokens or body.max_tokens, True, queue, metrics
            )

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
            vocabulary = self.decoder.tokenizer.vocab_size
            outside = next((i for i, token in enumerate(body.tokens) if not 0 <= token < vocabulary), None)
            if outside is not None:
                raise RequestError(
                    f"tokens.{outside}: {body.tokens[outside]} is not a token id of this model (0..{vocabulary - 1})",
                    "tokens",
                )
            return JSONResponse({"prompt": self.decoder.tokenizer.decode(body.tokens)})

        return [
            ("/v1/completions", ["POST"], completions),
            ("/v1/chat/completions", ["POST"], chat),
            ("/tokenize", ["POST"], tokenize),
            ("/detokenize", ["POST"], detokenize),
        ]

    async def _answer(
        self,
        request: Request,
        prompt: Any,
        body: _Sampling,
        max_tokens: int | None,
        is_chat: bool,
        queue: Queue,
        metrics: Metrics,
    ) -> Response:
        field = "messages" if is_chat else "prompt"
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
        # Tokenising (and rendering a chat template) takes time on a long prompt: off the event loop.
        generation = await asyncio.to_thread(Generation, self.decoder, prompt, settings, seed)
        generation.settings = settings.model_copy(update={"max_new_tokens": self._room(generation, max_tokens, field)})
        assert self.scheduler is not None
        queue.check_room(self.scheduler.waiting)
        reply = _Reply(self.name, is_chat, body.stream_options or {})
        outbox = _Outbox(asyncio.get_running_loop())
        row = Row(generation, on_text=outbox.put, on_end=outbox.put)
        self.scheduler.submit(row)
        if body.stream:
            return StreamingResponse(self._stream(row, outbox, reply, metrics), media_type="text/event-stream")
        # A client that hangs up before the answer frees its row (a stream notices when it next writes).
        watcher = asyncio.create_task(_hang_up(request, row, outbox))
        try:
            while not isinstance(outcome := (await outbox.take())[-1], (dict, BaseException)):
                pass
        finally:
            watcher.cancel()
            row.cancelled.set()  # we are done (or the client went away): free its row
        if isinstance(outcome, _HungUp):
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        if isinstance(outcome, BaseException):
            raise outcome
        _count(metrics, outcome)
        return JSONResponse(reply.whole(outcome))

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

    async def _stream(self, row: Row, outbox: _Outbox, reply: _Reply, metrics: Metrics) -> AsyncIterator[str]:
        try:
            yield reply.chunk("", first=True)
            while True:
                items = await outbox.take()
                text = "".join(item for item in items if isinstance(item, str))
                if text:
                    yield reply.chunk(text)
                end = items[-1]
                if isinstance(end, str):
                    continue
                if isinstance(end, BaseException):
                    yield _event({"error": {"message": str(end), "type": "server_error", "param": None, "code": None}})
                    break
                _count(metrics, end)
                yield reply.chunk("", finish=FINISH[end["stop_reason"]])
                if reply.include_usage:
                    yield reply.usage_chunk(end)
                break
            yield "data: [DONE]\n\n"
        finally:
            row.cancelled.set()  # the client left (or we are done): its row leaves the batch at the next token


class _HungUp(Exception):
    """The client of a non-streamed request disconnected."""


async def _hang_up(request: Request, row: Row, outbox: _Outbox) -> None:
    """Wait until the client disconnects (the body was read: uvicorn's next message is the disconnect),
    then cancel its row and wake the handler."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    row.cancelled.set()
    outbox.put(_HungUp())


class _Outbox:
    """What the decoding thread hands one request (text pieces, then its result or error), taken by the
    event loop. The loop is woken once per batch of pieces and takes them all: under load a stream's
    chunks carry several tokens instead of costing a wake-up and an event each."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list[str | dict[str, Any] | BaseException] = []
        self.ready = asyncio.Event()
        self._lock = threading.Lock()
        self._woken = False

    def put(self, item: str | dict[str, Any] | BaseException) -> None:
        """From the decoding thread."""
        with self._lock:
            self.items.append(item)
            if self._woken:
                return
            self._woken = True
        self.loop.call_soon_threadsafe(self.ready.set)

    async def take(self) -> list[str | dict[str, Any] | BaseException]:
        """Everything put since the last take (never empty); the end, if there, is the last item."""
        while True:
            await self.ready.wait()
            with self._lock:
                items, self.items, self._woken = self.items, [], False
                self.ready.clear()
            if items:
                return items


def _count(metrics: Metrics, result: dict[str, Any]) -> None:
    metrics.tokens["prompt"] += result["prompt_tokens"]
    metrics.tokens["completion"] += result["new_tokens"]


class _Reply:
    """OpenAI's response objects for one request (text completion or chat completion)."""

    def __init__(self, model: str, is_chat: bool, stream_options: dict[str, bool]) -> None:
        self.model, self.is_chat = model, is_chat
        self.id = ("chatcmpl-" if is_chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.include_usage = bool(stream_options.get("include_usage"))

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, result: dict[str, Any]) -> dict[str, Any]:
        finish = FINISH[result["stop_reason"]]
        if self.is_chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": result["completion"]},
                "finish_reason": finish,
                "logprobs": None,
            }
            return {**self._head("chat.completion"), "choices": [choice], "usage": _usage(result)}
        choice = {"index": 0, "text": result["completion"], "finish_reason": finish, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice], "usage": _usage(result)}

    def chunk(self, text: str, first: bool = False, finish: str | None = None) -> str:
        if self.is_chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return _event({**self._head("chat.completion.chunk"), "choices": [choice]})
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return _event({**self._head("text_completion"), "choices": [choice]})

    def usage_chunk(self, result: dict[str, Any]) -> str:
        obj = "chat.completion.chunk" if self.is_chat else "text_completion"
        return _event({**self._head(obj), "choices": [], "usage": _usage(result)})


def _usage(result: dict[str, Any]) -> dict[str, int]:
    return {
        "prompt_tokens": result["prompt_tokens"],
        "completion_tokens": result["new_tokens"],
        "total_tokens": result["prompt_tokens"] + result["new_tokens"],
    }


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
