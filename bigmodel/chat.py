"""Chat templates: a model's own Jinja template turns messages into the prompt it was trained on.

A template comes from a downloaded model, so it is untrusted input: it is rendered in jinja2's immutable
sandbox (as transformers does), where it can read the messages and call nothing but the helpers below.
No PyTorch here: `infer` uses this module.
"""

from __future__ import annotations

import functools
from typing import Any

from bigmodel.errors import UserError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")

# ChatML (OpenAI; used by Qwen and SmolLM2), built in for models that bring no template of their own.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_END = "<|im_end|>"


def render(template: str, messages: list[Message], special_tokens: dict[str, str | None],
           add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages`, ending with the assistant's turn opened (add_generation_prompt)."""
    import jinja2

    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          **{f"{name}_token": value or "" for name, value in special_tokens.items()})
    except UserError:
        raise
    except jinja2.TemplateError as exc:
        raise UserError(f"the model's chat template cannot be rendered ({exc})") from exc


def token_texts(tokenizer: Any, special_tokens: dict[str, Any]) -> dict[str, str | None]:
    """The bos/eos token strings a template writes (`{{ bos_token }}`), from the model's special token ids."""
    ids = {"bos": special_tokens.get("bos"), "eos": (special_tokens.get("eos") or [None])[0]}
    return {name: None if i is None else tokenizer.id_to_token(i) for name, i in ids.items()}


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    """A template compiled once (fine-tuning data renders it for every example)."""
    import datetime
    import json

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise UserError(f"the model's chat template refused the messages: {message}")

    # The helpers templates on the hub rely on (the same set transformers offers), nothing more.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise UserError(f"the model's chat template cannot be compiled ({exc})") from exc


def check_messages(messages: Any, origin: str) -> list[Message]:
    """A list of {"role": system|user|assistant, "content": str}, or a one-line error naming the problem."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{origin}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for number, message in enumerate(messages):
        valid = isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)
        if not valid:
            raise UserError(f"{origin}: message {number} must be {{\"role\": one of {', '.join(ROLES)}, "
                            "\"content\": a string}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
