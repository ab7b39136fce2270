"""Distributed training throughput: tokens/s of `bigmodel train` at 1, 2, ... processes. Prints JSON.

Strong scaling at a fixed global batch: every process count trains on exactly the same batches (the
config's batch_size x grad_accum_steps, split across the ranks), so tokens/s are directly comparable.
Process counts are interleaved over the repeats and medians reported (machine speed drifts).

- 1 process is plain `bigmodel train`; N > 1 is `bigmodel train --nproc N` (torchrun, DDP or FSDP).
- On CPU each process gets cores / max(nprocs) threads (--threads to change), so `speedup` compares N
  processes with one process of the same per-process size; `one_process_all_cores` is the same
  hardware used by a single process instead, the number to beat on a laptop.
- On a GPU node each rank takes the GPU of its LOCAL_RANK and the backend is NCCL.

This machine (2 cores):
    python scripts/bench_scale.py --data ../shared/data/tinyshakespeare/input.txt
A GPU node (8 GPUs), the same JSON fields; a GPT-2-small-sized model to give the GPUs work:
    python scripts/bench_scale.py --data input.txt --device cuda --nprocs 1 2 4 8 --mode fsdp \\
        --set model.n_layer=12 --set model.n_head=12 --set model.n_embd=768 --set model.block_size=1024 \\
        --set train.batch_size=64 --set train.precision=bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bigmodel.config import load_config
from bigmodel.stages import STAGES

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "shakespeare_char.yaml"


def train_tokens_per_s(config: Path, run_dir: Path, nproc: int, overrides: list[str]) -> float:
    """One training run in a fresh process (as a user runs it); its own tokens/s report."""
    command = [sys.executable, "-m", "bigmodel", "train", "-c", str(config), "--run-dir", str(run_dir), "--json", "-q"]
    command += ["--nproc", str(nproc)] if nproc > 1 else []
    for override in overrides:
        command += ["--set", override]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"training with {nproc} process(es) failed:\n{done.stderr}")
    return float(json.loads(done.stdout)["tokens_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a text file (e.g. tinyshakespeare/input.txt)")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--mode", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="threads per process (CPU)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=["train.batch_size=64", "train.precision=fp32"],
        metavar="KEY=VALUE",
        help="config overrides, after the defaults train.batch_size=64 and "
        "train.precision=fp32 (the config's auto would pick bf16 on some CPUs)",
    )
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // max(args.nprocs))
    with tempfile.TemporaryDirectory() as tmp:
        common = [
            f"data.path={args.data.resolve()}",
            f"device={args.device}",
            f"train.max_steps={args.steps}",
            f"train.eval_every={args.steps}",
            "train.eval_batches=4",
            f"train.log_every={args.steps}",
            f"train.distributed={args.mode}",
            *args.overrides,
        ]
        run_dir = Path(tmp) / "run"
        config = load_config(args.config, common, run_dir)
        STAGES["prepare"].run(config)
        STAGES["init"].run(config)

        runs: dict[str, list[float]] = {str(n): [] for n in args.nprocs}
        all_cores: list[float] = []
        for _ in range(args.repeats):
            for n in args.nprocs:
                runs[str(n)].append(train_tokens_per_s(args.config, run_dir, n, [*common, f"threads={threads}"]))
            if args.device == "cpu" and threads < cores:
                all_cores.append(train_tokens_per_s(args.config, run_dir, 1, [*common, f"threads={cores}"]))

    median = {n: statistics.median(values) for n, values in runs.items()}
    smallest = min(args.nprocs)
    per_process = median[str(smallest)] / smallest  # the baseline rate of one process
    report = {
        "device": args.device,
        "mode": args.mode,
        "model_and_batch": args.overrides,
        "global_batch_tokens": config.train.batch_size * config.train.grad_accum_steps * config.model.block_size,
        "steps": args.steps,
        "threads_per_process": threads if args.device == "cpu" else None,
        "tokens_per_s": {n: round(v) for n, v in median.items()},
        "speedup": {n: round(v / median[str(smallest)], 3) for n, v in median.items()},
        "efficiency": {n: round(v / (per_process * int(n)), 3) for n, v in median.items()},
        "runs": {n: [round(v) for v in values] for n, values in runs.items()},
    }
    if all_cores:
        report["one_process_all_cores"] = {"threads": cores, "tokens_per_s": round(statistics.median(all_cores))}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
