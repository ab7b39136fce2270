"""`bigmodel infer`'s flags: how they combine with -c, --run-dir, --set and each other (cli.py parses
them and calls run_from_flags). A flag given on the command line wins over the config; a bad value is
refused naming the flag, with or without -c; --prompt typed here is answered on stdout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bigmodel.config import STDIO, load_config, section_sets
from bigmodel.errors import UserError
from bigmodel.record import config_path


def run_from_flags(
    given: dict[str, Any],
    sets: list[str] | None,
    config: Path | None,
    run_dir: str | None,
    json_out: bool,
    bench_settings: dict[str, int] | None,
) -> dict[str, Any]:
    """Run infer (or --bench) with the flags `given` (infer keys, as the flags set them), --set `sets`,
    and the config of -c or --run-dir, if any."""
    from bigmodel import infer

    check_infer_flags(given)  # the same message for a bad flag with or without -c
    explicit = set(given) | {
        item.partition("=")[0].removeprefix("infer.") for item in sets or [] if item.startswith("infer.")
    }
    if {"prompt", "input"} <= explicit:
        raise UserError("--prompt and --input both give prompts; use one of them")
    if config is None and run_dir is None:
        settings_given = {**section_sets(sets, "infer", "infer.top_k=50"), **given}
        if "model" not in settings_given:
            raise UserError("infer needs -c CONFIG, or --model FILE.onnx (with --input FILE/'-' or --prompt)")
        settings = check_infer_flags(settings_given, source="--set")
        refuse_stdout_clash(json_out, settings.output or Path(STDIO), bench_settings is not None)
        return infer.run_standalone(settings, bench_settings)
    # An explicit prompt or input replaces the config's (a config's infer.prompt must not hide -i).
    cleared = {"input": "prompt", "prompt": "input"}
    overrides = (
        list(sets or [])
        + [f"infer.{cleared[k]}=null" for k in cleared if k in explicit]
        + [f"infer.{k}={json.dumps(str(v) if isinstance(v, Path) else v)}" for k, v in given.items()]
    )
    if "prompt" in given and "output" not in explicit and not json_out and bench_settings is None:
        overrides.append(f"infer.output={json.dumps(STDIO)}")  # a prompt typed here is answered here
    loaded = load_config(config_path(config, run_dir), overrides, run_dir)
    refuse_stdout_clash(json_out, loaded.infer.output, bench_settings is not None)
    if bench_settings is not None:
        return infer.run(loaded, bench_settings)
    from bigmodel.stages import STAGES

    return STAGES["infer"].run(loaded)


INFER_FLAGS = {
    "model": "--model",
    "input": "--input",
    "output": "--output",
    "prompt": "--prompt",
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "seed": "--seed",
    "stop": "--stop",
    "chat": "--chat",
    "system": "--system",
    "providers": "--provider",
}


def check_infer_flags(values: dict[str, Any], source: str = "") -> Any:
    """InferConfig of the given values; a bad one is refused naming its flag (or its --set key)."""
    from pydantic import ValidationError

    from bigmodel.config import InferConfig, validation_problems

    try:
        return InferConfig.model_validate(values)
    except ValidationError as exc:
        problems = []
        for where, message in validation_problems(exc):
            key = where.split(".")[0]
            name = INFER_FLAGS.get(key, f"infer.{key}") if not source else f"--set infer.{key}"
            problems.append(message.replace(where, name, 1) if message.startswith(where) else f"{name}: {message}")
        raise UserError("; ".join(problems)) from exc


def refuse_stdout_clash(json_out: bool, output: Path | None, bench: bool) -> None:
    if json_out and not bench and output is not None and str(output) == STDIO:
        raise UserError("--json and predictions on stdout ('-') both need stdout; write predictions to a file")
