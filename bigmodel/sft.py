"""Fine-tuning examples: a JSONL record -> a conversation -> token ids, each marked trained or not.

Three record shapes are read: {"prompt", "completion"}; Alpaca {"instruction", "input", "output"}; chat
{"messages": [{"role", "content"}, ...]}. A chat template (the model's own, or the built-in ChatML)
renders the conversation exactly as transformers' `apply_chat_template` does, and the whole text is
tokenized at once (so the ids are the ones the model sees at inference). Which characters belong to
assistant turns is found by rendering the conversation prefix by prefix: the assistant's text is what
`messages[:i + 1]` adds to `messages[:i]` with the generation prompt; its tokens are the trained ones.
The plain template writes prompt + completion + EOS, with Alpaca's own prompt for Alpaca records.

No PyTorch here: `prepare` and `inspect` use this module.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from bigmodel import chat
from bigmodel.errors import UserError

# Alpaca's prompts (Taori et al. 2023, stanford_alpaca's train.py), with and without an input.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
SHAPES = '{"prompt", "completion"}, {"instruction", "input", "output"} (Alpaca) or {"messages": [...]} (chat)'


@dataclass
class Example:
    ids: list[int]
    trained: list[bool]  # per token: does the loss predict it
    text: str  # the rendered text the ids encode (without an appended EOS)


@dataclass
class Record:
    """One example as its parts: the conversation, and (single-turn records) the prompt and completion."""

    messages: list[chat.Message]
    shape: str  # "prompt_completion", "alpaca" or "chat"
    plain: tuple[str, str] | None  # plain template: (prompt, completion)


def read_record(record: dict[str, Any], where: str) -> Record:
    """A JSONL object as a conversation; `where` ("file: line N") starts every error."""
    if "messages" in record:
        messages = chat.check_messages(record["messages"], where)
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistant:
            raise UserError(f"{where}: the conversation has no assistant message to learn; add one")
        empty = [i for i in assistant if not messages[i]["content"].strip()]
        if empty:
            raise UserError(f"{where}: message {empty[0]} (assistant) is empty; give the answer to learn")
        return Record(messages, "chat", None)
    if "instruction" in record or "output" in record:
        instruction = _text(record, "instruction", where)
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise UserError(f"{where}: 'input' must be a string")
        output = _text(record, "output", where)
        user = instruction + (f"\n\n{extra}" if extra else "")
        prompt = (ALPACA_WITH_INPUT if extra else ALPACA).format(instruction=instruction, input=extra)
        return Record(
            [{"role": "user", "content": user}, {"role": "assistant", "content": output}], "alpaca", (prompt, output)
        )
    if "prompt" in record or "completion" in record:
        asked = record.get("prompt")
        if not isinstance(asked, str):
            raise UserError(f"{where}: 'prompt' must be a string")
        completion = _text(record, "completion", where)
        return Record(
            [{"role": "user", "content": asked}, {"role": "assistant", "content": completion}],
            "prompt_completion",
            (asked, completion),
        )
    raise UserError(f"{where}: not an example; each line must be one of {SHAPES}")


def _text(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if key not in record:
        raise UserError(f"{where}: '{key}' is missing")
    if not isinstance(value, str):
        raise UserError(f"{where}: '{key}' must be a string, not {type(value).__name__}")
    if not value.strip():
        raise UserError(f"{where}: '{key}' is empty; give the text to learn")
    return value


class Renderer:
    """Records -> Examples for one tokenizer, template and loss mask (data.train_on)."""

    def __init__(
        self,
        tokenizer: Any,
        template: str | None,
        special_tokens: dict[str, Any],
        train_on: str,
        eos_id: int | None,
        origin: str = "the model's chat template",
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template  # a Jinja chat template; None: plain
        self.origin = origin  # names the template in errors
        if template is not None:
            chat.compile_template(template, origin)  # a broken template is its own error, not the first record's
        self.token_texts = chat.token_texts(tokenizer, special_tokens) if template else {}
        self.train_on = train_on
        self.eos_id = eos_id

    def example(self, record: Record, where: str) -> Example:
        if self.template is None:
            text, spans = self._plain(record, where)
        else:
            text, spans = self._templated(record.messages, where)
        if self.train_on == "last_turn":
            spans = spans[-1:]
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        if self.train_on == "all":
            trained = [True] * len(ids)
        else:
            trained = [any(a <= start < b for a, b in spans) for start, _ in offsets]
        if self.template is None and self.eos_id is not None:  # the model learns to stop after the completion
            ids, trained = [*ids, self.eos_id], [*trained, True]
        return Example(ids, trained, text)

    def _plain(self, record: Record, where: str) -> tuple[str, list[tuple[int, int]]]:
        if record.plain is None:
            raise UserError(
                f"{where}: data.template 'plain' writes single-turn records (prompt/completion or "
                "Alpaca); a chat record needs a chat template: set data.template to chatml or model"
            )
        prompt, completion = record.plain
        return prompt + completion, [(len(prompt), len(prompt) + len(completion))]

    def _templated(self, messages: list[chat.Message], where: str) -> tuple[str, list[tuple[int, int]]]:
        try:
            full = self._render(messages, add_generation_prompt=False)
            spans = []
            for i, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                before = self._render(messages[:i], add_generation_prompt=True)
                upto = self._render(messages[: i + 1], add_generation_prompt=False)
                if not (full.startswith(upto) and upto.startswith(before)):
                    raise UserError(
                        "the chat template does not render a conversation prefix by prefix, so its "
                        "assistant turns cannot be located; set data.template: chatml"
                    )
                spans.append((len(before), len(upto)))
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from exc
        return full, spans

    def _render(self, messages: list[chat.Message], add_generation_prompt: bool) -> str:
        assert self.template is not None
        return chat.render(self.template, messages, self.token_texts, add_generation_prompt, self.origin)


def marked(example: Example, tokenizer: Any, open_mark: str = "[[", close_mark: str = "]]") -> str:
    """The example's text with each run of trained tokens between marks (for `inspect`)."""
    parts = []
    for trained, run in itertools.groupby(zip(example.ids, example.trained), key=lambda pair: pair[1]):
        text = tokenizer.decode([token for token, _ in run])
        parts.append(f"{open_mark}{text}{close_mark}" if trained else text)
    return "".join(parts)
