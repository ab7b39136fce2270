"""pipeline: run the stages in order, exactly as if called one by one, skipping up-to-date ones."""

from __future__ import annotations

from typing import Any

from bigmodel import console
from bigmodel.config import Config
from bigmodel.errors import GateFailed, UserError
from bigmodel.stages import ORDER, STAGES

# Stages a pipeline runs. compress runs when the config lists compress.steps (else it is skipped).
DEFAULT_STAGES = ORDER


def run(
    config: Config,
    start: str | None = None,
    stop: str | None = None,
    force: bool = False,
    resume: bool = False,
    restart: bool = False,
    verify: bool = False,
) -> dict[str, Any]:
    """resume/restart: what to do with an unfinished train run (without either it is refused);
    verify: compare every input's sha256 with its stamp, not only sizes and times."""
    names = _select(start, stop)
    results: dict[str, Any] = {}
    for name in names:
        stage = STAGES[name]
        if name == "compress" and not config.compress.steps:
            continue
        if not force and stage.is_up_to_date(config, verify):
            console.info(f"pipeline: {name} is up to date, skipped")
            results[name] = {"skipped": True}
            continue
        console.info(f"pipeline: {name}")
        try:
            results[name] = stage.run(config, **_options(name, config, resume, restart))
        except GateFailed as gate:  # --json still reports every stage so far, the failing one included
            gate.outputs = {"stages": {**results, name: gate.outputs}}
            raise
    return {"stages": results}


def _options(name: str, config: Config, resume: bool, restart: bool) -> dict[str, Any]:
    """train continues an unfinished run with --resume (a finished or absent one starts anew)."""
    if name != "train":
        return {}
    from bigmodel.train.state import previous_run

    previous = previous_run(config.stage_dir("train"))
    return {"resume": resume and previous is not None and not previous.finished, "restart": restart}


def _select(start: str | None, stop: str | None) -> list[str]:
    for flag, value in (("--from", start), ("--to", stop)):
        if value is not None and value not in DEFAULT_STAGES:
            raise UserError(f"{flag} {value!r}: not a pipeline stage; stages: {', '.join(DEFAULT_STAGES)}")
    first = DEFAULT_STAGES.index(start) if start else 0
    last = DEFAULT_STAGES.index(stop) if stop else len(DEFAULT_STAGES) - 1
    if first > last:
        raise UserError(
            f"--from {start} comes after --to {stop}; stages run in the order {' -> '.join(DEFAULT_STAGES)}"
        )
    return DEFAULT_STAGES[first : last + 1]
