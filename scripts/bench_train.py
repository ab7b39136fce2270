"""Training speed of `bigmodel train` on the shakespeare_char config. Prints one JSON object.

Measured in one run, on this machine:
- tokens/s of bigmodel's training loop vs a minimal hand-written PyTorch loop of the same model, batch
  and data (the overhead of checkpoints, logging, progress, sampling), for fp32 and each speed lever:
  bf16 autocast and torch.compile;
- model FLOPs utilisation against the fp32 and bf16 matmul peaks measured on the spot;
- the ratio to nanoGPT's reference speed on this machine (about 45 ms per iteration, ~17k tokens/s).
With --full, the fastest variant also trains the full 2000 steps and reports its val loss.

With --stage, the whole train stage as a user runs it instead: `bigmodel train -c
configs/shakespeare_char.yaml` (2000 steps, evaluations, checkpoints), wall clock from command to exit,
against a minimal hand-written script of the same recipe run the same way (a fresh interpreter: imports
included; nanoGPT's evaluation budget of 20 random val batches every 250 steps; the best weights saved
when val improves), interleaved; and both final models' loss on the whole val split, scored alike.

    python scripts/bench_train.py --data ../shared/data/tinyshakespeare/input.txt [--repeats 5] [--full]
    python scripts/bench_train.py --data ../shared/data/tinyshakespeare/input.txt --stage [--repeats 3] \
        [--variant fp32:train.precision=fp32 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bigmodel import console, registry
from bigmodel.accounting import flops_per_token
from bigmodel.config import load_config
from bigmodel.hardware import matmul_peak
from bigmodel.models.gpt import parameter_counts
from bigmodel.stages import STAGES

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "shakespeare_char.yaml"
NANOGPT_TOKENS_PER_S = 12 * 64 / 0.045  # nanoGPT baby GPT on this machine: ~45 ms per iteration


def adamw(model: torch.nn.Module, tc) -> torch.optim.AdamW:
    """The recipe's optimizer as a script writes it: AdamW, no weight decay on gains and biases."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=tc.lr,
        betas=tc.betas,
    )


def handwritten_loop(config, steps: int, precision: str, compile_model: bool) -> float:
    """The same model, optimizer and batches, in the fewest lines that train: tokens/s."""
    model, _ = registry.load_model(config.checkpoint_path("init"))
    tc = config.train
    opt = adamw(model, tc)
    data = np.memmap(config.stage_dir("prepare") / "train.bin", dtype=np.uint16, mode="r")
    step_model = torch.compile(model) if compile_model else model
    block, batch = model.block_size, tc.batch_size
    gen = torch.Generator().manual_seed(config.seed)
    model.train()

    def step() -> None:
        starts = torch.randint(len(data) - block - 1, (batch,), generator=gen).numpy()
        w = torch.from_numpy(np.stack([data[s : s + block + 1] for s in starts]).astype(np.int64))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits, _ = step_model(w[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(10):  # warm-up (and compilation) outside the timing
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch * block / (time.perf_counter() - start)


def hand_written_stage(run_dir: Path, out: Path, overrides: list[str], eval_batches: int = 20) -> None:
    """The shakespeare_char recipe as a short script would write it (nanoGPT's train.py, minus what this
    model does not need): random windows, AdamW (no decay on gains), warmup then cosine to min_lr, clip
    1.0, an estimate of val loss on `eval_batches` random batches every eval_every steps, and the best
    weights saved (safetensors) when it improves."""
    from safetensors.torch import save_file

    config = load_config(CONFIG, overrides, run_dir)
    tc = config.train
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    model, _ = registry.load_model(config.checkpoint_path("init"))
    opt = adamw(model, tc)
    train = np.memmap(run_dir / "prepare" / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(run_dir / "prepare" / "val.bin", dtype=np.uint16, mode="r")
    block, batch = model.block_size, tc.batch_size

    def get_batch(split: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(split) - block - 1, (batch,)).numpy()
        w = torch.from_numpy(np.stack([split[s : s + block + 1] for s in starts]).astype(np.int64))
        return w[:, :-1], w[:, 1:]

    def lr_at(step: int) -> float:
        if step < tc.warmup_steps:
            return tc.lr * (step + 1) / tc.warmup_steps
        progress = (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps)
        return tc.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)

    @torch.no_grad()
    def val_estimate() -> float:
        model.eval()
        losses = [
            F.cross_entropy(model(x)[0].reshape(-1, model.arch.vocab_size), y.reshape(-1)).item()
            for x, y in (get_batch(val) for _ in range(eval_batches))
        ]
        model.train()
        return float(np.mean(losses))

    best = float("inf")
    model.train()
    for step in range(tc.max_steps + 1):
        if step % tc.eval_every == 0 or step == tc.max_steps:
            loss = val_estimate()
            if loss < best:
                best = loss
                save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(out))
        if step == tc.max_steps:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x, y = get_batch(train)
        logits, _ = model(x)
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def hand_written_model(run_dir: Path, weights: Path) -> torch.nn.Module:
    """The hand-written script's saved weights in the model they came from (the tied head is stored once)."""
    from safetensors.torch import load_file

    model, _ = registry.load_model(run_dir / "init" / "model.safetensors")
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    return model


def whole_split_loss(run_dir: Path, model: torch.nn.Module) -> float:
    """A model's mean loss over every val token once (block-size windows tiling the split)."""
    from bigmodel.train.batches import fixed_windows

    model.eval()
    val = np.memmap(run_dir / "prepare" / "val.bin", dtype=np.uint16, mode="r")
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in fixed_windows(val, len(val), 64, model.block_size):
            logits, _ = model(x)
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
            count += y.numel()
    return total / count


def stage_comparison(overrides: list[str], variants: dict[str, list[str]], repeats: int, tmp: Path) -> dict:
    """Wall clock of `bigmodel train` (the shipped config, and each variant's extra --set) and of the
    hand-written script, command to exit, interleaved."""
    base = tmp / "base"
    config = load_config(CONFIG, overrides, base)
    STAGES["prepare"].run(config)
    STAGES["init"].run(config)
    sides = {"hand_written": [], **{f"bigmodel {name}".strip(): sets for name, sets in variants.items()}}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    losses: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(repeats):
        for n, (name, sets) in enumerate(sides.items()):
            run = tmp / f"side{n}_{i}"
            shutil.copytree(base, run)
            weights = run / "hand_written.safetensors"
            command = (
                [sys.executable, __file__, "--data", "-", "--hand-written", str(run), "--out", str(weights)]
                if name == "hand_written"
                else [sys.executable, "-m", "bigmodel", "train", "-c", str(CONFIG), "--run-dir", str(run), "-q"]
            )
            start = time.perf_counter()
            subprocess.run(
                [*command, *(f"--set={o}" for o in [*overrides, *sets])], check=True, stdout=subprocess.DEVNULL
            )
            seconds[name].append(time.perf_counter() - start)
            model = (
                hand_written_model(run, weights)
                if name == "hand_written"
                else registry.load_model(run / "train" / "best.safetensors")[0]
            )
            losses[name].append(whole_split_loss(run, model))
    med = {name: statistics.median(v) for name, v in seconds.items()}
    return {
        "repeats": repeats,
        "variants": variants,
        "seconds": {k: [round(x, 1) for x in v] for k, v in seconds.items()},
        "median_seconds": {k: round(v, 1) for k, v in med.items()},
        "stage_speedup_vs_hand_written": {
            k: round(med["hand_written"] / v, 3) for k, v in med.items() if k != "hand_written"
        },
        "whole_split_val_loss": {k: [round(x, 4) for x in v] for k, v in losses.items()},
    }


def bigmodel_loop(
    config_path: Path, data: Path, run_dir: Path, steps: int, precision: str, compile_model: bool
) -> float:
    """`bigmodel train` itself (checkpoint at the end, progress, metrics.jsonl): tokens/s of its loop."""
    overrides = [
        f"data.path={data}",
        f"train.max_steps={steps + 10}",
        f"train.precision={precision}",
        f"train.compile={str(compile_model).lower()}",
        "train.eval_batches=1",
        f"train.eval_every={steps + 10}",
        "train.log_every=50",
    ]
    config = load_config(config_path, overrides, run_dir)
    STAGES["train"].run(config)
    # metrics.jsonl logs the rate of each 50-step window; the first holds warm-up (and compilation),
    # which the baseline also leaves out. The last window includes the final eval and checkpoint.
    log = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    windows = [r["tokens_per_s"] for r in log if "tokens_per_s" in r][1:]
    return float(statistics.median(windows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="tinyshakespeare input.txt")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=["fp32", "bf16", "fp32+compile", "bf16+compile"])
    parser.add_argument("--full", action="store_true", help="also train the fastest variant for 2000 steps")
    parser.add_argument(
        "--stage",
        action="store_true",
        help="time the whole train stage against a hand-written script of the same recipe, command to exit",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="--stage: config overrides for both sides (e.g. train.max_steps=100 for a quick look)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="--stage: also time bigmodel with these extra overrides (repeatable), e.g. fp32:train.precision=fp32",
    )
    parser.add_argument("--hand-written", type=Path, help=argparse.SUPPRESS)  # --stage's subprocess: RUN_DIR
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hand_written:
        hand_written_stage(args.hand_written, args.out, args.set)
        return
    console.set_quiet(True)
    data = args.data.absolute()
    if args.stage:
        with tempfile.TemporaryDirectory() as tmp:
            variants = {"": [], **{name: sets.split(",") for name, _, sets in (v.partition(":") for v in args.variant)}}
            comparison = stage_comparison([f"data.path={data}", *args.set], variants, args.repeats, Path(tmp))
            print(json.dumps({"config": str(CONFIG), "overrides": args.set, **comparison}, indent=2))
        return

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        config = load_config(CONFIG, [f"data.path={data}"], run_dir)
        torch.set_num_threads(config.threads or torch.get_num_threads())
        STAGES["prepare"].run(config)
        STAGES["init"].run(config)
        model, _ = registry.load_model(config.checkpoint_path("init"))
        flops = flops_per_token(model.arch, parameter_counts(model)["without_position_embeddings"])
        peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}

        # This machine's speed drifts by tens of percent: every repeat runs every variant, ours and the
        # baseline back to back, and the medians are compared.
        ours: dict[str, list[float]] = {v: [] for v in args.variants}
        theirs: dict[str, list[float]] = {v: [] for v in args.variants}
        for _ in range(args.repeats):
            for variant in args.variants:
                precision, _, flag = variant.partition("+")
                compile_model = flag == "compile"
                theirs[variant].append(handwritten_loop(config, args.steps, precision, compile_model))
                ours[variant].append(bigmodel_loop(CONFIG, data, run_dir, args.steps, precision, compile_model))
        results = {}
        for variant in args.variants:
            precision = variant.partition("+")[0]
            tps, base = statistics.median(ours[variant]), statistics.median(theirs[variant])
            results[variant] = {
                "bigmodel_tokens_per_s": round(tps),
                "handwritten_tokens_per_s": round(base),
                "overhead": round(1 - tps / base, 4),
                "ms_per_iteration": round(1000 * 12 * 64 / tps, 2),
                "vs_nanogpt": round(tps / NANOGPT_TOKENS_PER_S, 3),
                "mfu": round(flops * tps / peaks[precision], 4),
            }
        fastest = max(results, key=lambda v: results[v]["bigmodel_tokens_per_s"])
        report = {
            "config": str(CONFIG),
            "threads": config.threads,
            "steps_timed": args.steps,
            "flops_per_token": flops,
            "matmul_peak_flops": {k: round(v) for k, v in peaks.items()},
            "nanogpt_reference_tokens_per_s": round(NANOGPT_TOKENS_PER_S),
            "variants": results,
            "fastest": fastest,
        }
        if args.full:
            precision, _, flag = fastest.partition("+")
            full = load_config(
                CONFIG,
                [
                    f"data.path={data}",
                    f"train.precision={precision}",
                    f"train.compile={str(flag == 'compile').lower()}",
                ],
                Path(tmp) / "full",
            )
            STAGES["prepare"].run(full)
            STAGES["init"].run(full)
            start = time.perf_counter()
            trained = STAGES["train"].run(full)
            report["full_run"] = {
                "variant": fastest,
                "steps": trained["steps"],
                "val_loss": round(trained["best_val_loss"], 4),
                "seconds": round(time.perf_counter() - start, 1),
                "tokens_per_s": round(trained["tokens_per_s"]),
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
