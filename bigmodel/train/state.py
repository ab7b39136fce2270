"""Everything exact resume needs, saved in one checkpoint file and restored bitwise.

A resumable checkpoint holds, besides the model: the optimizer state (tensors under `optim.`), the
global torch RNG (dropout), the data sampler's generator, the CUDA RNGs when present, and the loop's
counters (step, best score, evaluations since the best). torch.load is never used: RNG states are
uint8 tensors in safetensors, scalars are JSON. Distributed runs write the same consolidated file
(rank 0 writes, FSDP shards are gathered first), so any world size can resume any other's.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bigmodel import console, registry
from bigmodel.arch import TabularArch
from bigmodel.checkpoint import iter_tensors, model_tensors, read_manifest, save_checkpoint
from bigmodel.config import Config, flatten
from bigmodel.datasets import data_manifest
from bigmodel.distributed import SINGLE, World, gather, like, load_weights
from bigmodel.errors import UserError
from bigmodel.io import atomic_open
from bigmodel.manifests import AdapterRecord, CheckpointManifest, PrivacyRecord, ResumeRecord


@dataclass
class LoopState:
    step: int = 0
    best_score: float = float("inf")
    best_step: int | None = None
    evals_since_best: int = 0
    tokens_seen: int = 0
    total_steps: int | None = None  # the schedule's length (None: a checkpoint from before it was kept)
    finished: bool = False  # the schedule ran to its end, or stopped early: nothing is left to do
    # Each resume that was allowed to change settings (--allow-changes): {"step", "changes"}.
    resumed_with_changes: list[dict[str, Any]] = field(default_factory=list)

    def scored(self, score: float) -> bool:
        """Record an evaluation's score (lower is better); True when it is the best so far."""
        if score < self.best_score:
            self.best_score, self.best_step, self.evals_since_best = score, self.step, 0
            return True
        self.evals_since_best += 1
        return False

    def best_note(self, first_eval_step: int) -> str:
        """What to say when the best came at the first evaluation and every later one was worse: the
        schedule (too many epochs, too high a rate) did the model no good."""
        if self.best_step is None or self.best_step > first_eval_step or not self.evals_since_best:
            return ""
        return (
            f" -- the first evaluation; the {self.evals_since_best} after it were all worse (try a lower "
            "train.lr or fewer train.epochs)"
        )

    def out_of_patience(self, patience: int | None) -> bool:
        """Early stopping: `patience` evaluations in a row without a better score (said on the console)."""
        if patience is None or self.evals_since_best < patience:
            return False
        console.info(f"train: early stop at step {self.step} (no val improvement in {patience} evaluations)")
        return True

    def mark(self, total_steps: int, stopped_early: bool = False) -> None:
        """Record where the schedule stands, just before a checkpoint is written."""
        self.total_steps = total_steps
        self.finished = stopped_early or self.step >= total_steps


def save_model(path: Path, model: torch.nn.Module, manifest: CheckpointManifest, world: World = SINGLE) -> None:
    """A weights-only checkpoint (best.safetensors). Under FSDP every rank must call it (it gathers)."""
    tensors = gather(model_tensors(model), world)
    if world.is_main:
        save_checkpoint(path, tensors, manifest)


def save_training_state(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: torch.Generator,
    loop: LoopState,
    manifest: CheckpointManifest,
    world: World = SINGLE,
) -> None:
    """The resumable checkpoint, consolidated: the same file whatever the world size that wrote it.
    Under FSDP every rank must call it (it gathers the shards); rank 0 writes."""
    tensors = model_tensors(model)
    optim = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in optim["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    tensors = gather(tensors, world)
    if not world.is_main:
        return
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.sampler"] = sampler.get_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    resume = ResumeRecord(loop=asdict(loop), param_groups=optim["param_groups"], optimizer_scalars=scalars)
    save_checkpoint(path, tensors, manifest.model_copy(update={"resume": resume}))


def restore_training_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, sampler: torch.Generator
) -> LoopState:
    """Load a resumable checkpoint into the live objects; returns the loop counters.

    Works at any world size: tensors are read one at a time and each rank keeps its shard of them."""
    resume = read_manifest(path).resume
    if resume is None:
        raise UserError(f"{path} has no training state to resume from; start without --resume")
    load_weights(model, path)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, value in iter_tensors(path, "optim."):
        _, pid, name = key.split(".", 2)
        param = params[int(pid)]
        state.setdefault(int(pid), {})[name] = value if name == "step" else like(value, param)
    for pid, entries in resume.optimizer_scalars.items():
        state.setdefault(int(pid), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": resume.param_groups})
    rng = dict(iter_tensors(path, "rng."))
    torch.set_rng_state(rng["rng.torch"])
    sampler.set_state(rng["rng.sampler"])
    cuda_states = [rng[k] for k in sorted(rng) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return LoopState(**resume.loop)


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Refuse a second `train` on the same run directory while one is running.

    An advisory flock: the kernel drops it when the process dies, even by kill -9, so a crashed run
    never leaves a stale lock behind.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / ".lock"
    handle = open(lock_path, "a+")
    try:
        import fcntl

        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise UserError(
                f"{folder} is being trained by another process (pid {holder}); wait for it to finish "
                "or use another --run-dir"
            ) from None
    except ImportError:  # no fcntl (Windows): no lock
        pass
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    # Temporary files in a locked folder can only be leftovers of a killed run.
    for leftover in folder.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)
    try:
        yield
    finally:
        handle.close()


# What a new run replaces: every artifact an old run of this folder may have left behind.
# (train/mlflow.json is not among them: a new run's MLflow record replaces it before this runs)
RUN_ARTIFACTS = ("best.safetensors", "last.safetensors", "metrics.jsonl", "tensorboard")


def previous_run(out_dir: Path) -> LoopState | None:
    """The loop state saved in out_dir's last.safetensors, or None when there is no previous run."""
    last_path = out_dir / "last.safetensors"
    if not last_path.is_file():
        return None
    resume = read_manifest(last_path).resume
    return LoopState(**resume.loop) if resume is not None else None


def clear_run(out_dir: Path) -> None:
    """Remove an old run's artifacts when a new run starts (its inputs checked, its loop about to
    begin), so no leftover of it (a best checkpoint, log lines) can be mistaken for the new run's."""
    import shutil

    previous = previous_run(out_dir)
    if previous is not None:
        console.info(
            f"train: replacing the {'finished' if previous.finished else 'unfinished'} run in {out_dir} "
            f"(step {previous.step})"
        )
    for name in RUN_ARTIFACTS:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


# Settings that may change between a run and its resume without changing what it computes: logging,
# checkpoint frequency, and how the work is spread (checkpoints are consolidated; any world size and
# sharding resumes any other's).
RESUME_NEUTRAL = (
    "train.log_every",
    "train.tensorboard",
    "train.mlflow",
    "train.save_every",
    "train.distributed",
    "train.activation_checkpointing",
    "train.fsdp.",
)
RESUME_SECTIONS = ("seed", "data", "model", "init", "train")


def config_changes(saved: dict[str, Any], config: Config) -> dict[str, list[Any]]:
    """Keys whose values differ between the config a checkpoint was trained with and `config`:
    {"train.lr": [saved, now], ...}, leaving out the RESUME_NEUTRAL ones."""
    now = config.model_dump(mode="json", by_alias=True)
    before, after = (flatten({k: c.get(k) for k in RESUME_SECTIONS}) for c in (saved, now))
    return {
        key: [before.get(key), after.get(key)]
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key) and not key.startswith(RESUME_NEUTRAL)
    }


def truncate_log(path: Path, step: int) -> None:
    """Drop metrics.jsonl lines written after the checkpoint being resumed (they will be written again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    with atomic_open(path) as handle:
        handle.write("".join(line + "\n" for line in kept))


def check_matches_config(config: Config, init_manifest: CheckpointManifest) -> None:
    """The init checkpoint must be the model the config describes (else: re-run init). An imported model
    is described by its source (init.from): the keys the config sets must agree with it."""
    if config.init.from_ is not None:
        _check_matches_import(config, init_manifest)
        return
    expected = registry.architecture(config.model, data_manifest(config)).to_dict()
    found = init_manifest.architecture.to_dict()
    if found != expected:
        diff = ", ".join(f"{k} {found.get(k)!r} vs config {v!r}" for k, v in expected.items() if found.get(k) != v)
        raise UserError(f"the init checkpoint does not match the config ({diff}); re-run 'bigmodel init'")


def _check_matches_import(config: Config, init_manifest: CheckpointManifest) -> None:
    from bigmodel import pretrained

    source = init_manifest.import_.source if init_manifest.import_ is not None else None
    if source != str(config.init.from_):
        raise UserError(
            f"the init checkpoint was not imported from {config.init.from_} (it came from "
            f"{source or 'bigmodel init'}); re-run 'bigmodel init'"
        )
    arch = init_manifest.architecture
    assert not isinstance(arch, TabularArch)  # (an import is a decoder or an encoder)
    pretrained.check_config(config.model, arch, Path(source))
    changed = [
        key
        for key in ("block_size", "dropout")
        if key in config.model.model_fields_set and getattr(config.model, key) != getattr(arch, key)
    ]
    if changed:
        raise UserError(
            f"model.{changed[0]} changed since the import ({getattr(arch, changed[0])!r} in the init "
            "checkpoint); re-run 'bigmodel init'"
        )


def start_or_resume(
    out_dir: Path,
    resume: bool,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: torch.Generator,
    patience: int | None,
    world: World = SINGLE,
    config: Config | None = None,
    allow_changes: bool = False,
) -> tuple[LoopState, bool]:
    """A fresh loop (the old run's artifacts cleared), or the state of last.safetensors with the log cut back
    to its step. Also says whether that run had already stopped early (nothing is left to do then).
    A resume whose config changed is refused (naming the keys) unless `allow_changes`; allowed changes
    are recorded in the loop state, so every later checkpoint says so."""
    metrics_path, last_path = out_dir / "metrics.jsonl", out_dir / "last.safetensors"
    if not resume:
        if world.is_main:
            clear_run(out_dir)
        return LoopState(), False
    if not last_path.is_file():
        raise UserError(f"--resume: no checkpoint to resume from at {last_path}; start without --resume")
    changes = config_changes(read_manifest(last_path).config, config) if config is not None else {}
    if changes and not allow_changes:
        listed = ", ".join(f"{key} ({old!r} -> {new!r})" for key, (old, new) in changes.items())
        raise UserError(
            f"--resume: the config changed since {last_path.name} was written: {listed}; undo the "
            "changes, or add --allow-changes to resume with them (recorded in the checkpoints)"
        )
    loop = restore_training_state(last_path, model, optimizer, sampler)
    if changes:
        loop.resumed_with_changes.append({"step": loop.step, "changes": changes})
        console.warn(f"train: resuming with changed settings: {', '.join(changes)}")
    if world.is_main:
        truncate_log(metrics_path, loop.step)
    console.info(f"train: resuming from step {loop.step} ({last_path})")
    return loop, patience is not None and loop.evals_since_best >= patience


def stop_step(total_steps: int, until_step: int | None, step: int) -> int:
    """Where this process stops: the schedule's end, or until_step (never before the step it resumed
    at); the schedule itself always spans total_steps, so a later --resume continues it unchanged."""
    return total_steps if until_step is None else min(total_steps, max(until_step, step))


def checkpoint_manifest(
    init_manifest: CheckpointManifest,
    config: Config,
    loop: LoopState,
    metrics: dict[str, float],
    lineage: dict[str, str],
    adapter: AdapterRecord | None = None,
    precision: str | None = None,
    privacy: PrivacyRecord | None = None,
) -> CheckpointManifest:
    """What every checkpoint of a training run says about itself (a LoRA run's: its adapter and base)."""
    return CheckpointManifest(
        family=init_manifest.family,
        architecture=init_manifest.architecture,
        data=init_manifest.data,
        config=config.model_dump(mode="json", by_alias=True),
        step=loop.step,
        metrics=metrics,
        lineage=lineage,
        adapter=adapter,
        resumed_with_changes=loop.resumed_with_changes or None,
        precision=precision,
        privacy=privacy,
    )
