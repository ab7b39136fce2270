"""Training on many processes with PyTorch's own engine: torch.distributed, launched by torchrun.

`bigmodel train` detects torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) and then runs as
one rank of a process group; outside torchrun nothing here does anything. The rules it keeps:

- Every rank draws the same global batch from the same seeded sampler and trains on its own disjoint,
  contiguous slice of it, so the global batch is the config's (batch_size x grad_accum_steps) at any
  world size, and a checkpoint resumes exactly under another world size.
- DDP replicates the model; FSDP2 (`fully_shard`, per block and at the root) shards parameters,
  gradients and optimizer state, and builds the model on the meta device first so that no rank ever
  holds more than its shards plus one full tensor while loading.
- Checkpoints are consolidated (full tensors, the single-process format): every rank takes part in
  gathering FSDP shards, rank 0 alone writes. Loading streams one tensor at a time into the shards.
- Rank 0 alone prints, logs and writes; the CLI silences the others (console.is_main_process).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bigmodel.arch import DecoderArch
from bigmodel.config import TrainConfig
from bigmodel.errors import UserError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank `rank` of `size`, training with `mode`."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp
    device: str = "cpu"  # where collectives' tensors live (NCCL reduces CUDA tensors only)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        """The average of `value` over all ranks (every rank gets it)."""
        return self.sum(value) / self.size

    def sum(self, value: float) -> float:
        if self.size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total.item())


SINGLE = World()


def start(tc: TrainConfig, device: torch.device) -> tuple[World, torch.device]:
    """Join the torchrun job (if any). Returns this rank's World and the device it trains on."""
    if not launched_by_torchrun():
        return SINGLE, device
    rank, size, local_rank = (int(os.environ[name]) for name in TORCHRUN_VARIABLES)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = tc.backend if tc.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise UserError("train.backend 'nccl' needs CUDA devices; use gloo (or auto) to train on CPU")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=tc.timeout_s))
    return World(rank, size, local_rank, tc.distributed, str(device)), device


def shutdown(exit_code: int) -> None:
    """End a distributed process cleanly and at once.

    gloo can abort in its own teardown after a run that succeeded (about one exit in three on CPU);
    destroying the group explicitly and leaving with os._exit, after flushing, avoids it.
    """
    if not dist.is_initialized():
        return
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


# ---- the model on many processes


def build_sharded(arch: DecoderArch, tc: TrainConfig, device: torch.device) -> nn.Module:
    """FSDP2 (GPT): build on the meta device (no memory), shard every block and the root, then allocate only
    this rank's shards on `device`. Their values are garbage until `load_weights` fills them."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from bigmodel import registry

    with torch.device("meta"):
        model = registry.build_model(arch)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    policy = MixedPrecisionPolicy(param_dtype=dtypes[tc.fsdp.param_dtype], reduce_dtype=dtypes[tc.fsdp.reduce_dtype])
    for block in model.transformer.h:  # type: ignore[union-attr]
        fully_shard(block, mp_policy=policy, reshard_after_forward=tc.fsdp.reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=tc.fsdp.reshard_after_forward)
    model.to_empty(device=device)
    # The GPT's blocks return their KV cache (views) next to the activations; FSDP warns about any view
    # output in case it is modified in place. Training never touches the cache, so the warning is noise.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return model


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, world: World, sync: bool) -> Iterator[None]:
    """Reduce gradients across ranks only on the last micro-step of an accumulation (the others only
    accumulate locally), as DDP's no_sync and FSDP2's set_requires_gradient_sync allow."""
    if world.mode == "ddp" and world.size > 1 and not sync:
        with model.no_sync():  # type: ignore[operator]
            yield
        return
    if world.mode == "fsdp" and world.size > 1:
        model.set_requires_gradient_sync(sync)  # type: ignore[operator]
    yield


# ---- consolidated tensors in, consolidated tensors out


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP shard (a collective: every rank must call it), else itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather(tensors: dict[str, torch.Tensor], world: World) -> dict[str, torch.Tensor]:
    """Full CPU copies of `tensors` on rank 0 (every rank takes part; the others get {})."""
    gathered = {}
    for name, tensor in tensors.items():
        full = full_tensor(tensor)
        if world.is_main:
            gathered[name] = full.detach().cpu()
    return gathered


def like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `reference` is: this rank's shard of it when reference is an FSDP shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=reference.device, dtype=reference.dtype)
    if isinstance(reference, DTensor):
        return distribute_tensor(full, reference.device_mesh, reference.placements)
    return full


@torch.no_grad()
def load_weights(model: nn.Module, source: Path, prefix: str = "model.") -> None:
    """Copy a checkpoint's tensors into the model's parameters and buffers, one tensor at a time
    (sharded ones receive only their shard). Every parameter and buffer must be in the checkpoint."""
    from torch.distributed.tensor import DTensor

    from bigmodel import lora
    from bigmodel.checkpoint import iter_tensors

    if lora.is_adapted(model):  # an adapted model's checkpoints hold its adapters only
        targets = lora.adapter_tensors(model)
    else:
        targets = dict(model.named_parameters())
        targets.update(model.named_buffers())
    seen = set()
    for name, full in iter_tensors(source, prefix):
        name = name.removeprefix(prefix)
        if name not in targets:
            continue  # tied aliases (stored once) and state beside the model
        target = targets[name]
        if tuple(full.shape) != tuple(target.shape):
            raise UserError(
                f"{source}: {name} has shape {tuple(full.shape)}, the model expects "
                f"{tuple(target.shape)}; re-create the checkpoint"
            )
        value = like(full, target)
        (target.to_local() if isinstance(target, DTensor) else target).copy_(
            value.to_local() if isinstance(value, DTensor) else value
        )
        seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing:
        raise UserError(f"{source} lacks {', '.join(missing[:5])}; re-create the checkpoint")


# ---- the single-node launcher behind `bigmodel train --nproc N`


def launch(nproc: int, child_args: list[str]) -> int:
    """Run `python -m bigmodel <child_args>` on `nproc` local processes through torchrun (in this
    process, so its outcome can be mapped to bigmodel's exit codes). Returns the code to exit with:
    rank 0's own code when it failed (2 for input errors, 1 for run failures), else the first failure's."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun would otherwise set 1 thread per worker and warn; share the cores instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # The workers report their own errors; torchrun's agent would repeat them as a long traceback.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "bigmodel", *child_args]
    )
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = min(exc.failures.items())
        if failure.exitcode < 0:  # killed by a signal: nobody else has said anything
            print(
                f"error: training process rank {rank} was killed by signal {-failure.exitcode}",
                file=sys.stderr,
                flush=True,
            )
            return 1
        return failure.exitcode
    return 0
