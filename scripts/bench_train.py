"""Training speed of `bigmodel train` on the shakespeare_char config. Prints one JSON object.

Measured in one run, on this machine:
- tokens/s of bigmodel's training loop vs a minimal hand-written PyTorch loop of the same model, batch
  and data (the overhead of checkpoints, logging, progress, sampling), for fp32 and each speed lever:
  bf16 autocast and torch.compile;
- model FLOPs utilisation against the fp32 and bf16 matmul peaks measured on the spot;
- the ratio to nanoGPT's reference speed on this machine (about 45 ms per iteration, ~17k tokens/s).
With --full, the fastest variant also trains the full 2000 steps and reports its val loss.

    python scripts/bench_train.py --data ../shared/data/tinyshakespeare/input.txt [--repeats 5] [--full]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bigmodel import console, registry
from bigmodel.config import load_config
from bigmodel.hardware import matmul_peak
from bigmodel.accounting import flops_per_token
from bigmodel.models.gpt import parameter_counts
from bigmodel.stages import STAGES

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "shakespeare_char.yaml"
NANOGPT_TOKENS_PER_S = 12 * 64 / 0.045  # nanoGPT baby GPT on this machine: ~45 ms per iteration


def handwritten_loop(config, steps: int, precision: str, compile_model: bool) -> float:
    """The same model, optimizer and batches, in the fewest lines that train: tokens/s."""
    model, _ = registry.load_model(config.checkpoint_path("init"))
    tc = config.train
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=tc.lr, betas=tc.betas)
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


def bigmodel_loop(config_path: Path, data: Path, run_dir: Path, steps: int, precision: str,
                  compile_model: bool) -> float:
    """`bigmodel train` itself (checkpoint at the end, progress, metrics.jsonl): tokens/s of its loop."""
    overrides = [f"data.path={data}", f"train.max_steps={steps + 10}", f"train.precision={precision}",
                 f"train.compile={str(compile_model).lower()}", "train.eval_batches=1",
                 f"train.eval_every={steps + 10}", "train.log_every=50"]
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
    args = parser.parse_args()
    console.set_quiet(True)
    data = args.data.absolute()

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
            full = load_config(CONFIG, [f"data.path={data}", f"train.precision={precision}",
                                        f"train.compile={str(flag == 'compile').lower()}"], Path(tmp) / "full")
            STAGES["prepare"].run(full)
            STAGES["init"].run(full)
            start = time.perf_counter()
            trained = STAGES["train"].run(full)
            report["full_run"] = {"variant": fastest, "steps": trained["steps"],
                                  "val_loss": round(trained["best_val_loss"], 4),
                                  "seconds": round(time.perf_counter() - start, 1),
                                  "tokens_per_s": round(trained["tokens_per_s"])}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
