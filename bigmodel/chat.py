"""Chat templates: a model's own Jinja template turns messages into the prompt it was trained on.

A template comes from a downloaded model, so it is untrusted input: it is rendered in jinja2's immutable
sandbox (as transformers does), where it can read the messages and call nothing but the helpers below.
No PyTorch here: `infer` uses this module.
"""

from __future__ import annotations

import functools
import re
import threading
import time
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


# A template is a program from the internet: its rendering is bounded in time and in the size of anything
# it builds, so a hostile or broken one ends in one line instead of a hang, an OverflowError or the OOM killer.
RENDER_SECONDS = 5.0
RENDER_CHARS = 16 * 2**20  # the rendered text, and any string, list or width a template builds on the way
PERCENT_WIDTH = r"%[-#0 +]*(\d+)"  # the width in a printf-style format
FIX = "set data.template: chatml (the built-in ChatML) to use a known template"


def render(
    template: str,
    messages: list[Message],
    special_tokens: dict[str, str | None],
    add_generation_prompt: bool = True,
    origin: str = "the model's chat template",
) -> str:
    """The prompt text for `messages`, ending with the assistant's turn opened (add_generation_prompt).
    origin names the template in errors."""
    import jinja2

    compiled = compile_template(template, origin)
    _limits.deadline = time.monotonic() + RENDER_SECONDS
    out: list[str] = []
    size = 0
    try:
        for piece in compiled.generate(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **{f"{name}_token": value or "" for name, value in special_tokens.items()},
        ):
            size += len(piece)
            if size > RENDER_CHARS:
                raise _TooBig(f"wrote more than {RENDER_CHARS:,} characters")
            _check_time()
            out.append(piece)
    except UserError:
        raise
    except _TooBig as exc:
        raise UserError(f"{origin} was stopped: it {exc}; {FIX}") from exc
    except jinja2.TemplateError as exc:
        raise UserError(f"{origin} cannot be rendered ({exc}); {FIX}") from exc
    except (MemoryError, RecursionError) as exc:
        raise UserError(f"{origin} was stopped: {type(exc).__name__} while rendering; {FIX}") from exc
    except Exception as exc:
        raise UserError(f"{origin} failed ({type(exc).__name__}: {exc}); {FIX}") from exc
    return "".join(out)


def compile_template(template: str, origin: str = "the model's chat template") -> Any:
    """The template compiled (once per text), or one line naming it, the jinja error and its line."""
    import jinja2

    try:
        return _compiled(template)
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"{origin} does not compile (line {exc.lineno}: {exc.message}); {FIX}") from exc
    except jinja2.TemplateError as exc:
        raise UserError(f"{origin} does not compile ({exc}); {FIX}") from exc


def token_texts(tokenizer: Any, special_tokens: dict[str, Any]) -> dict[str, str | None]:
    """The bos/eos token strings a template writes (`{{ bos_token }}`), from the model's special token ids."""
    ids = {"bos": special_tokens.get("bos"), "eos": (special_tokens.get("eos") or [None])[0]}
    return {name: None if i is None else tokenizer.id_to_token(i) for name, i in ids.items()}


class _TooBig(Exception):
    """A template went past RENDER_SECONDS or RENDER_CHARS."""


_limits = threading.local()  # this thread's deadline (serve renders in worker threads)


def _check_time() -> None:
    if time.monotonic() > getattr(_limits, "deadline", float("inf")):
        raise _TooBig(f"ran for more than {RENDER_SECONDS:g} s")


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)) and len(value) > RENDER_CHARS:
        raise _TooBig(f"built a value of more than {RENDER_CHARS:,} items")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        raise _TooBig("computed an integer of more than 256 bits")
    return value


def _check_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Widths and counts a call is given (center(10**10), '%*s', replace's growth) before it allocates."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > RENDER_CHARS:
            raise _TooBig(f"asked for a width or count of {value:,}")
    _check_time()


def _bounded_range(*args: int) -> Any:
    """range(), checked for size, and for time as it is iterated (nested loops multiply)."""
    numbers = range(*args)
    if len(numbers) > RENDER_CHARS:
        raise _TooBig(f"asked for a range of {len(numbers):,} numbers")
    for number in numbers:
        _check_time()
        yield number


def _bounded(name: str, function: Any) -> Any:
    """A filter, its arguments checked before and its result after (functools.wraps keeps jinja's
    pass_context/pass_environment marks)."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        values = [a for a in args if isinstance(a, (str, list, tuple, dict, int))]
        _check_args(tuple(values[1:]), kwargs)  # the filtered value itself is not a width
        if name == "format" and values and isinstance(values[0], str):
            _check_widths(values[0], PERCENT_WIDTH)
        return _check_size(function(*args, **kwargs))

    return call


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    """A template compiled once (fine-tuning data renders it for every example)."""
    import datetime
    import json

    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """jinja2's immutable sandbox, with every call, operator and loop bounded (RENDER_*)."""

        intercepted_binops = frozenset({"*", "**", "%", "+"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(right, int) and right > 256:
                raise _TooBig(f"raised a number to the power {right:,}")
            if operator == "%" and isinstance(left, str):
                _check_widths(left, PERCENT_WIDTH)
            if operator in ("*", "%"):
                operands = (left, right) if operator == "*" else right if isinstance(right, tuple) else (right,)
                _check_args(tuple(operands), {})
                counted = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
                if operator == "*" and isinstance(counted[1], int) and len(counted[0]) * counted[1] > RENDER_CHARS:
                    raise _TooBig(f"built a value of more than {RENDER_CHARS:,} items")
            return _check_size(super().call_binop(context, operator, left, right))

        def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
            _check_args(args, kwargs)
            method = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
            if getattr(method, "__name__", "") in ("replace", "format", "format_map") and isinstance(
                getattr(method, "__self__", None), str
            ):
                _check_str_method(method, args)
            return _check_size(super().call(context, obj, *args, **kwargs))

    def raise_exception(message: str) -> None:
        raise UserError(f"the model's chat template refused the messages: {message}")

    # The helpers templates on the hub rely on (the same set transformers offers), nothing more.
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.filters = {name: _bounded(name, function) for name, function in env.filters.items()}  # type: ignore[assignment]
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.globals["range"] = _bounded_range
    return env.from_string(template)


def _check_str_method(method: Any, args: tuple[Any, ...]) -> None:
    """str.replace's growth and str.format's widths, known before they allocate."""
    text: str = method.__self__
    if method.__name__ == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        grown = (
            len(text) + text.count(args[0]) * max(0, len(args[1]) - len(args[0]))
            if args[0]
            else len(text) * (len(args[1]) + 1)
        )
        if grown > RENDER_CHARS:
            raise _TooBig(f"built a value of more than {RENDER_CHARS:,} items")
    elif method.__name__ != "replace":
        _check_widths(text, r"\{[^{}]*:[^{}\d]*(\d+)")


def _check_widths(text: str, pattern: str) -> None:
    """The widths a format string asks for ('%100000000s', '{:>100000000}')."""
    for width in re.findall(pattern, text):
        if int(width) > RENDER_CHARS:
            raise _TooBig(f"asked for a format width of {int(width):,}")


def check_messages(messages: Any, origin: str) -> list[Message]:
    """A list of {"role": system|user|assistant, "content": str}, or a one-line error naming the problem."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f'{origin}: \'messages\' must be a non-empty list of {{"role", "content"}} objects')
    for number, message in enumerate(messages):
        valid = isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)
        if not valid:
            raise UserError(
                f'{origin}: message {number} must be {{"role": one of {", ".join(ROLES)}, "content": a string}}'
            )
    return [{"role": m["role"], "content": m["content"]} for m in messages]
