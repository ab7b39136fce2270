"""The `bigmodel` command line. Thin on purpose: parse flags, load the config, call a stage's run().

Exit codes: 0 success; 1 a gate failed or the run broke; 2 the user's input is wrong (one line on
stderr naming the problem and the fix; --debug adds the traceback). With --json, stdout carries exactly
one JSON object and every human line goes to stderr.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x vendors its own click; before, it used the click package
    from typer import _click as click
except ImportError:  # pragma: no cover
    import click  # type: ignore[no-redef]

from bigmodel import __version__, console
from bigmodel.config import load_config, section_help
from bigmodel.errors import EXIT_FAILED, EXIT_USER, GateFailed, Interrupted, RunFailed, UserError
from bigmodel.record import config_path

_ARGV: list[str] = []  # this invocation's arguments (for the resume command after Ctrl-C)


class CommandLine(TyperGroup):
    """The root command: usage errors (a missing -c, an unknown flag) follow the same contract as every
    other mistake: one line on stderr, exit 2, and with --json exactly one JSON object on stdout."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
        _ARGV[:] = argv
        try:
            code = super().main(
                args=argv,
                prog_name=prog_name,
                complete_var=complete_var,
                standalone_mode=False,
                windows_expand_args=windows_expand_args,
                **extra,
            )
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `bigmodel`: the help, as before
            exc.show()
            code = exc.exit_code
        except click.exceptions.ClickException as exc:
            code = _usage_error(exc, argv)
        except typer.Abort:
            print("interrupted", file=sys.stderr)
            code = 130
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


def _usage_error(exc: click.exceptions.ClickException, argv: list[str]) -> int:
    context = getattr(exc, "ctx", None)
    command = context.command_path if context is not None else "bigmodel"
    problem = exc.format_message().rstrip(".")
    problem = f"{problem[:1].lower()}{problem[1:]} (see '{command} --help')"
    print(f"error: {problem}", file=sys.stderr, flush=True)
    if "--json" in argv:
        name = command.removeprefix("bigmodel").strip() or "bigmodel"
        console.emit_json({"ok": False, "command": name, "exit_code": exc.exit_code, "error": problem})
    return exc.exit_code


app = typer.Typer(
    name="bigmodel",
    cls=CommandLine,
    help="From raw data to a deployed, verified ONNX model, driven by YAML configs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Show, validate and describe experiment configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option(
        "-c",
        "--config",
        help="Experiment YAML file. Without it, --run-dir DIR of an existing run uses "
        "the config that run recorded (DIR/config.yaml).",
    ),
]


def _complete_keys(incomplete: str) -> list[str]:
    """Shell completion for --set: the config's key paths."""
    from bigmodel.config import config_keys

    return [f"{key}=" for key in config_keys() if key.startswith(incomplete)]


def _complete_stages(incomplete: str) -> list[str]:
    from bigmodel.pipeline import DEFAULT_STAGES

    return [name for name in DEFAULT_STAGES if name.startswith(incomplete)]


SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        autocompletion=_complete_keys,
        help="Override a config key, e.g. --set train.lr=0.001 (repeatable).",
    ),
]
RunDirOpt = Annotated[Optional[str], typer.Option("--run-dir", metavar="DIR", help="Override run_dir.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object (outputs, metrics) on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
DeviceOpt = Annotated[
    Optional[str],
    typer.Option(
        "--device",
        metavar="DEVICE",
        help="auto, cpu, cuda or mps: where PyTorch runs (the config's device); for infer, "
        "the ONNX Runtime provider (cpu or cuda).",
    ),
]

ProviderOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--provider",
        metavar="NAME",
        help="ONNX Runtime execution provider, in priority order "
        "(repeatable): cpu, cuda, tensorrt or a full provider name (infer.providers).",
    ),
]


def load(config: Path | None, overrides: list[str] | None, run_dir: str | None) -> Any:
    """The validated config of -c (or of --run-dir's record), with --set overrides."""
    return load_config(config_path(config, run_dir), overrides, run_dir)


def with_device(overrides: list[str] | None, device: str | None) -> list[str]:
    """--device is the config's top-level `device` key (validated with the config)."""
    return [*(overrides or []), *([f"device={device}"] if device is not None else [])]


def chosen_providers(device: str | None, provider: list[str] | None) -> list[str] | None:
    """infer.providers from --provider (validated with the config) or --device; None when neither."""
    if device is not None and provider:
        raise UserError("--device and --provider both choose where ONNX Runtime runs; give one of them")
    return list(provider) if provider else (device_providers(device) if device is not None else None)


def device_providers(device: str) -> list[str]:
    """ONNX Runtime execution providers for --device."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device!r}: ONNX Runtime runs on cpu or cuda (or auto)")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    import onnxruntime

    has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if device == "cuda" and not has_cuda:
        raise UserError(
            "--device cuda: this onnxruntime has no CUDA provider; install onnxruntime-gpu or use --device cpu"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if has_cuda else ["CPUExecutionProvider"]


def execute(name: str, action: Callable[[], dict[str, Any] | None], json_out: bool, quiet: bool, debug: bool) -> None:
    """Run `action`, map its failure to an exit code and one stderr line, print --json output (unless
    the action returns None: it reported itself). In a torchrun job only rank 0 speaks; every rank
    then leaves through distributed.shutdown."""
    main = console.is_main_process()
    console.set_quiet(quiet or not main)
    console.route_library_logs()
    exit_code = 0
    try:
        try:
            outputs = action()
        except UserError as exc:
            _fail(name, EXIT_USER, "error", str(exc), json_out, debug)
        except RunFailed as exc:
            outputs = exc.outputs if isinstance(exc, GateFailed) else {}
            _fail(name, EXIT_FAILED, "failed", str(exc), json_out, debug, outputs)
        except Interrupted as exc:
            _fail(
                name,
                130,
                "interrupted",
                f"{exc}" + (f"; resume with: {resume_command()}" if exc.resumable else ""),
                json_out,
                debug,
            )
        except KeyboardInterrupt:
            _fail(name, 130, "interrupted", "stopped by the user", json_out, debug)
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except Exception as exc:  # a bug or an environment failure: say so, keep the traceback for --debug
            if isinstance(exc, OSError) and exc.errno in USERS_PATH_ERRORS:  # a path the user chose
                _fail(name, EXIT_USER, "error", filesystem_problem(exc), json_out, debug)
            hint = "" if debug else " (re-run with --debug for the traceback)"
            _fail(name, EXIT_FAILED, "error", f"{type(exc).__name__}: {exc}{hint}", json_out, debug)
        if json_out and main and outputs is not None:
            console.emit_json({"ok": True, "command": name, **outputs})
    except typer.Exit as exit_:
        exit_code = exit_.exit_code
        raise
    finally:
        # Loaded only by distributed training: end its process group cleanly (and exit at once).
        distributed = sys.modules.get("bigmodel.distributed")
        if distributed is not None:
            distributed.shutdown(exit_code)


def resume_command() -> str:
    """The command line that was run, made to resume: --restart dropped, --resume added."""
    import shlex

    argv = [a for a in _ARGV if a != "--restart"]
    return shlex.join(["bigmodel", *argv, *([] if "--resume" in argv else ["--resume"])])


# A path the user chose that cannot be used (errno -> the fix): exit 2, not a crash.
USERS_PATH_ERRORS = {
    errno.EACCES: "fix its permissions or choose another --run-dir",
    errno.EPERM: "fix its permissions or choose another --run-dir",
    errno.EROFS: "the file system is read-only; choose another --run-dir",
    errno.ENOTDIR: "a file is in the way of a folder on that path; move it or choose another --run-dir",
    errno.EISDIR: "a folder is where a file should be; move it or choose another path",
    errno.EEXIST: "a file is where a folder should be; move it or choose another --run-dir",
    errno.ENOSPC: "the disk is full; free space or choose another --run-dir",
    errno.EDQUOT: "the disk quota is used up; free space or choose another --run-dir",
    errno.EFBIG: "the file outgrew the size this process may write (ulimit -f); raise it or write less",
}


def filesystem_problem(exc: OSError) -> str:
    """The one line for a path the run cannot use: which path, what is wrong, what to do."""
    path = exc.filename or "a path"
    fix = USERS_PATH_ERRORS.get(exc.errno or 0, "check the path")
    return f"{path}: {(exc.strerror or str(exc)).lower()}; {fix}"


ANSI_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _fail(
    name: str, code: int, prefix: str, problem: str, json_out: bool, debug: bool, outputs: dict[str, Any] | None = None
) -> None:
    """One line on stderr ('<prefix>: <problem>'); with --json also the one object, whose `error` is
    the problem alone."""
    problem = ANSI_CODES.sub("", problem)  # a library's coloured message must not colour a log or a pipe
    message = f"{prefix}: {problem}"
    rank = os.environ.get("RANK", "0")
    if rank != "0":
        # The other ranks stay quiet about input errors (rank 0 reports the same one); anything else
        # may be theirs alone, so it is printed, marked with the rank.
        if code != EXIT_USER:
            if debug:
                traceback.print_exc()
            print(f"[rank {rank}] {message}".replace("\n", " "), file=sys.stderr, flush=True)
        raise typer.Exit(code)
    if debug:
        traceback.print_exc()
    print(message.replace("\n", " "), file=sys.stderr, flush=True)
    if json_out:
        console.emit_json(
            {**(outputs or {}), "ok": False, "command": name, "exit_code": code, "error": problem.replace("\n", " ")}
        )
    raise typer.Exit(code)


def _stage_command(name: str, summary: str) -> None:
    """Register `bigmodel <name> -c CONFIG ...` for a stage that needs nothing but the config."""

    def command(
        config: ConfigOpt = None,
        set_: SetOpt = None,
        device: DeviceOpt = None,
        run_dir: RunDirOpt = None,
        json_out: JsonOpt = False,
        quiet: QuietOpt = False,
        debug: DebugOpt = False,
    ) -> None:
        from bigmodel.stages import STAGES

        execute(
            name, lambda: STAGES[name].run(load(config, with_device(set_, device), run_dir)), json_out, quiet, debug
        )

    app.command(name, help=summary, epilog=section_help(name) or None)(command)


_stage_command("prepare", "Read raw data, split it (seeded) and fit statistics on the training split.")
_stage_command("init", "Build the model from the config and write a seeded initial checkpoint.")
_stage_command("compress", "Quantise a trained model to int8 and measure it with the eval code (compress.steps).")
_stage_command("export", "Export a checkpoint to ONNX; publish it only if it matches PyTorch (parity gate).")


@app.command("train", epilog=section_help("train"))
def train_command(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from train/last.safetensors, bitwise as if never stopped.")
    ] = False,
    until_step: Annotated[
        Optional[int],
        typer.Option(
            "--until-step",
            min=1,
            help="Stop after this step (schedule unchanged, resumable "
            "checkpoint written); continue later with --resume. For time-limited jobs.",
        ),
    ] = None,
    restart: Annotated[
        bool, typer.Option("--restart", help="Discard an unfinished run in train/ and start over.")
    ] = False,
    allow_changes: Annotated[
        bool,
        typer.Option(
            "--allow-changes",
            help="--resume even though training settings changed (the changed keys are recorded in the checkpoints).",
        ),
    ] = False,
    nproc: Annotated[
        Optional[int],
        typer.Option(
            "--nproc",
            min=1,
            help="Train on N processes on this machine: launches torchrun "
            "(train.distributed picks DDP or FSDP). Multi-node: run torchrun yourself (README).",
        ),
    ] = None,
    device: DeviceOpt = None,
    run_dir: RunDirOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train from the initial checkpoint; write best/last checkpoints and metrics.jsonl."""
    from bigmodel.stages import STAGES

    set_ = with_device(set_, device)
    if nproc is None:
        execute(
            "train",
            lambda: STAGES["train"].run(
                load(config, set_, run_dir),
                resume=resume,
                until_step=until_step,
                restart=restart,
                allow_changes=allow_changes,
            ),
            json_out,
            quiet,
            debug,
        )
        return
    exit_code = 0

    def launch() -> None:  # the workers print the outputs
        nonlocal exit_code
        from bigmodel.train.launch import train_on_processes

        exit_code = train_on_processes(
            nproc,
            config_path(config, run_dir),
            list(set_ or []),
            run_dir,
            resume=resume,
            until_step=until_step,
            json_out=json_out,
            quiet=quiet,
            debug=debug,
            restart=restart,
            allow_changes=allow_changes,
        )

    execute("train", launch, json_out, quiet, debug)
    if exit_code:
        raise typer.Exit(exit_code)


@app.command("eval", epilog=section_help("eval"))
def eval_command(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    fail_under: Annotated[
        Optional[list[str]],
        typer.Option("--fail-under", metavar="METRIC=VALUE", help="Exit 1 when METRIC < VALUE (repeatable)."),
    ] = None,
    checkpoint: Annotated[
        Optional[str],
        typer.Option("--checkpoint", help="best, last, init, or a .safetensors/.onnx file (eval.checkpoint)."),
    ] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Metrics file (eval.output).")] = None,
    device: DeviceOpt = None,
    run_dir: RunDirOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Score a checkpoint on the val or test split; write metrics.json (metrics.<name>.json for another
    artifact than the best checkpoint)."""
    from bigmodel.stages import STAGES

    def action() -> dict[str, Any]:
        overrides = with_device(set_, device)
        for key, value in (("checkpoint", checkpoint), ("output", output)):
            if value is not None:
                overrides.append(f"eval.{key}={json.dumps(str(value))}")
        for gate in fail_under or []:
            metric, sep, value = gate.partition("=")
            if not sep or not metric:
                raise UserError(f"--fail-under {gate!r}: expected METRIC=VALUE, e.g. --fail-under accuracy=0.97")
            overrides.append(f"eval.fail_under.{metric}={value}")
        return STAGES["eval"].run(load(config, overrides, run_dir))

    execute("eval", action, json_out, quiet, debug)


@app.command("infer", epilog=section_help("infer"))
def infer_command(
    config: Annotated[Optional[Path], typer.Option("-c", "--config", help="Experiment YAML file.")] = None,
    set_: SetOpt = None,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="ONNX model (infer.model).")] = None,
    input_: Annotated[
        Optional[str], typer.Option("--input", "-i", help="Rows to predict or prompts, '-' for stdin.")
    ] = None,
    output: Annotated[
        Optional[str], typer.Option("--output", "-o", help="Where predictions go, '-' for stdout.")
    ] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="gpt: the prompt to continue.")] = None,
    max_new_tokens: Annotated[
        Optional[int], typer.Option("--max-new-tokens", "-n", help="gpt: tokens to generate.")
    ] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", "-t", help="gpt: 0 is greedy.")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="gpt: sample among the k likeliest tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="gpt: nucleus sampling probability mass.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="gpt: sampling seed.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="gpt: stop at this string (repeatable).")] = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="gpt: prompts are user messages in the model's chat template.")
    ] = False,
    system: Annotated[Optional[str], typer.Option("--system", help="gpt, --chat: a system message.")] = None,
    bench: Annotated[bool, typer.Option("--bench", help="gpt: measure prefill and per-token latency instead.")] = False,
    batch: Annotated[int, typer.Option("--batch", min=1, help="--bench: sequences decoded together.")] = 1,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", min=1, help="--bench: prompt length.")] = 16,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="--bench: tokens decoded per repeat.")] = 32,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="--bench: timed repeats (after one warm-up).")] = 5,
    provider: ProviderOpt = None,
    device: DeviceOpt = None,
    run_dir: RunDirOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Predict or generate with the exported ONNX model (ONNX Runtime only). Without -c, --model and
    --input (or --prompt) suffice; --set infer.KEY=VALUE sets any other infer key."""

    def action() -> dict[str, Any]:
        from bigmodel.infer.command import run_from_flags

        given = {
            "model": model,
            "input": input_,
            "output": output,
            "prompt": prompt,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "seed": seed,
            "stop": stop or None,
            "chat": chat or None,
            "system": system,
            "providers": chosen_providers(device, provider),
        }
        bench_settings = (
            {"batch": batch, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats}
            if bench
            else None
        )
        return run_from_flags(
            {k: v for k, v in given.items() if v is not None}, set_, config, run_dir, json_out, bench_settings
        )

    execute("infer", action, json_out, quiet, debug)


@app.command("serve", epilog=section_help("serve"))
def serve_command(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="ONNX model (serve.model).")] = None,
    host: Annotated[Optional[str], typer.Option("--host", help="Address to listen on (serve.host).")] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="TCP port (serve.port).")] = None,
    api_key: Annotated[
        Optional[str], typer.Option("--api-key", help="Require this bearer token (serve.api_key; or BIGMODEL_API_KEY).")
    ] = None,
    max_batch: Annotated[
        Optional[int], typer.Option("--max-batch", min=1, help="Requests decoded together (serve.max_batch).")
    ] = None,
    max_queue: Annotated[
        Optional[int], typer.Option("--max-queue", min=1, help="Requests allowed to wait; then 503 (serve.max_queue).")
    ] = None,
    provider: ProviderOpt = None,
    device: DeviceOpt = None,
    run_dir: RunDirOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Serve the exported ONNX model over HTTP: OpenAI's /v1/completions and /v1/chat/completions
    (streaming) for language models, /v1/predict for tabular ones; /health and /metrics. Without -c,
    --model suffices."""

    def action() -> dict[str, Any]:
        from bigmodel import serve
        from bigmodel.config import ServeConfig, section_sets

        given = {
            k: v
            for k, v in (
                ("model", model),
                ("host", host),
                ("port", port),
                ("api_key", api_key),
                ("max_batch", max_batch),
                ("max_queue", max_queue),
            )
            if v is not None
        }
        providers = chosen_providers(device, provider)
        if providers is not None:
            from bigmodel.infer.command import check_infer_flags

            providers = check_infer_flags({"providers": providers}).providers
        if config is None and run_dir is None:
            if model is None:
                raise UserError("serve needs -c CONFIG, or --model FILE.onnx")
            settings = _validated(ServeConfig, {**section_sets(set_, "serve", "serve.max_tokens=64"), **given}, "serve")
            return serve.serve(model, settings, providers or ["CPUExecutionProvider"], None)
        overrides = list(set_ or []) + [
            f"serve.{k}={json.dumps(str(v) if isinstance(v, Path) else v)}" for k, v in given.items()
        ]
        if providers is not None:
            overrides.append(f"infer.providers={json.dumps(providers)}")
        return serve.run(load(config, overrides, run_dir))

    execute("serve", action, False, quiet, debug)


def _validated(section: Any, values: dict[str, Any], prefix: str) -> Any:
    """A config section from flags, its problems named by the flags' keys."""
    from pydantic import ValidationError

    from bigmodel.config import format_validation_error

    try:
        return section.model_validate(values)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, (prefix,))) from exc


@app.command("plan", epilog=section_help("plan"))
def plan_command(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    tokens: Annotated[Optional[int], typer.Option("--tokens", min=1, help="Training tokens (plan.tokens).")] = None,
    hardware: Annotated[
        Optional[str], typer.Option("--hardware", help="Accelerator profile or 'local' (plan.hardware).")
    ] = None,
    devices: Annotated[Optional[int], typer.Option("--devices", min=1, help="Devices (plan.devices).")] = None,
    days: Annotated[
        Optional[float], typer.Option("--days", min=0.0, help="Devices needed to finish in this many days (plan.days).")
    ] = None,
    price: Annotated[
        Optional[float], typer.Option("--price", min=0.0, help="USD per device-hour (plan.price).")
    ] = None,
    run_dir: RunDirOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Estimate parameters, FLOPs, memory per device, storage, communication, devices needed, time, energy and
    cost; nothing is run."""

    def action() -> dict[str, Any]:
        from bigmodel import plan

        overrides = list(set_ or [])
        for key, value in (
            ("tokens", tokens),
            ("hardware", hardware),
            ("devices", devices),
            ("days", days),
            ("price", price),
        ):
            if value is not None:
                overrides.append(f"plan.{key}={value}")
        report = plan.run(load(config, overrides, run_dir))
        if not json_out:
            plan.render(report)
        return report

    execute("plan", action, json_out, quiet, debug)


@app.command("explain", epilog=section_help("explain"))
def explain_command(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    input_: Annotated[
        Optional[Path],
        typer.Option("--input", "-i", help="Rows, texts or prompts to explain (explain.input)."),
    ] = None,
    checkpoint: Annotated[
        Optional[str],
        typer.Option("--checkpoint", help="best, last, init, or a .safetensors file (explain.checkpoint)."),
    ] = None,
    rows: Annotated[Optional[int], typer.Option("--rows", "-n", min=1, help="How many inputs (explain.rows).")] = None,
    device: DeviceOpt = None,
    run_dir: RunDirOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Which inputs drive the model's outputs: Captum's attributions on a checkpoint, per feature, token or
    prompt token (<run_dir>/explain/attributions.json; the report renders them)."""
    from bigmodel import explain

    def action() -> dict[str, Any]:
        overrides = with_device(set_, device)
        for key, value in (("input", input_), ("checkpoint", checkpoint), ("rows", rows)):
            if value is not None:
                overrides.append(f"explain.{key}={json.dumps(value if key == 'rows' else str(value))}")
        return explain.run(load(config, overrides, run_dir))

    execute("explain", action, json_out, quiet, debug)


@app.command("report")
def report_command(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Plots and a one-page HTML report of a run, from its artifacts (<run_dir>/report/index.html)."""
    from bigmodel import report

    execute("report", lambda: report.run(load(config, set_, run_dir)), json_out, quiet, debug)


@app.command("pipeline")
def pipeline_command(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    start: Annotated[
        Optional[str], typer.Option("--from", help="First stage to run.", autocompletion=_complete_stages)
    ] = None,
    stop: Annotated[
        Optional[str], typer.Option("--to", help="Last stage to run.", autocompletion=_complete_stages)
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Run stages even when up to date.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an unfinished train run.")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Discard an unfinished train run, start over.")] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Hash every input to decide what is up to date (not only sizes and times).")
    ] = False,
    device: DeviceOpt = None,
    run_dir: RunDirOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run prepare -> init -> train -> eval -> export -> infer, skipping stages that are up to date."""
    from bigmodel import pipeline

    execute(
        "pipeline",
        lambda: pipeline.run(
            load(config, with_device(set_, device), run_dir),
            start,
            stop,
            force,
            resume=resume,
            restart=restart,
            verify=verify,
        ),
        json_out,
        quiet,
        debug,
    )


@app.command("inspect")
def inspect_command(
    path: Annotated[Path, typer.Argument(help="A checkpoint, ONNX model, manifest or stage folder.")],
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Say what an artifact is: kind, architecture, parameters, step, metrics, lineage."""
    from bigmodel import inspect

    def action() -> dict[str, Any]:
        info = inspect.run(path)
        if not json_out:
            console.print_mapping(info)
        return info

    execute("inspect", action, json_out, False, debug)


@app.command("runs")
def runs_command(
    folder: Annotated[Path, typer.Argument(help="Where to look for runs (folders with a config.yaml record).")] = Path(
        "runs"
    ),
    compare: Annotated[
        Optional[tuple[Path, Path]],
        typer.Option("--compare", metavar="RUN_A RUN_B", help="Config keys that differ and metrics side by side."),
    ] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List runs (path, family, last stage, step, main metric, when), or compare two."""
    from bigmodel import runs

    def action() -> dict[str, Any]:
        if compare is not None:
            result = runs.compare(*compare)
            if not json_out:
                print_comparison(result)
            return result
        rows = [runs.summary(run) for run in runs.find_runs(folder)]
        if not json_out:
            print_runs(rows, folder)
        return {"runs": rows}

    execute("runs", action, json_out, False, debug)


def print_runs(rows: list[dict[str, Any]], folder: Path) -> None:
    if not rows:
        console.info(f"no runs under {folder} (a run is a folder with the config.yaml its stages write)")
        return
    table = [["run", "family", "last stage", "step", "metric", "when"]]
    for row in rows:
        metric = ", ".join(f"{k} {v:.4g}" for k, v in list(row["metric"].items())[:2]) or "-"
        table.append(
            [row["path"], row["family"], row["last_stage"], str(row["step"] or "-"), metric, row["when"] or "-"]
        )
    print_table(table)


def print_comparison(result: dict[str, Any]) -> None:
    if not result["config_differences"]:
        print("configs: the same (apart from run_dir)")
    table = [["", *result["runs"]]]
    table += [[key, json.dumps(a), json.dumps(b)] for key, (a, b) in result["config_differences"].items()]
    table += [[""] * 3]
    table += [[key, _number(a), _number(b)] for key, (a, b) in result["metrics"].items()]
    print_table(table)


def print_table(table: list[list[str]]) -> None:
    """Rows of cells on stdout, each column padded to its widest cell."""
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else json.dumps(value)


@config_app.command("show")
def config_show(
    config: ConfigOpt = None, set_: SetOpt = None, run_dir: RunDirOpt = None, debug: DebugOpt = False
) -> None:
    """Print the fully resolved config (defaults filled in, paths absolute) as YAML."""
    from bigmodel.config import dump_yaml

    def action() -> dict[str, Any]:
        sys.stdout.write(dump_yaml(load(config, set_, run_dir)))
        return {}

    execute("config show", action, False, False, debug)


@config_app.command("validate")
def config_validate(
    config: ConfigOpt = None, set_: SetOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False
) -> None:
    """Check a config without running anything: keys, types, ranges, cross-field rules, input files."""

    def action() -> dict[str, Any]:
        loaded = load_config(config_path(config, None), set_)
        if loaded.data.format == "text":
            from bigmodel.prepare.text import source_files

            source_files(loaded.data)  # raises when a file or glob finds nothing
        elif loaded.data.format == "sft" and loaded.data.val_path is not None and not loaded.data.val_path.is_file():
            raise UserError(f"data.val_path: file not found: {loaded.data.val_path}")
        elif not loaded.data.path.is_file():
            raise UserError(f"data.path: file not found: {loaded.data.path}")
        console.info(f"{config}: ok")
        return {"config": str(config), "valid": True}

    execute("config validate", action, json_out, False, debug)


@config_app.command("reference")
def config_reference() -> None:
    """Print the config key reference as Markdown (docs/config-reference.md is this output)."""
    from bigmodel.config import key_reference

    sys.stdout.write(key_reference())


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of the config (point your editor's YAML language server at it)."""
    import json

    from bigmodel.config import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


def _version(value: bool) -> None:
    if value:
        print(f"bigmodel {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """From raw data to a deployed, verified ONNX model, driven by YAML configs."""


def main() -> None:
    app()
