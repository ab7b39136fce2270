"""serve's batch cache two ways on one GroupQueryAttention file, in one process, interleaved; prints JSON.

    python scripts/bench_serve_rows.py --model RUN/export/model.onnx [--batch 4] [--contexts 128 1024]
        [--steps 32] [--rounds 5] [--threads 2]

Per decode step of --batch rows, each with a context of N tokens cached, median milliseconds of:
  slots   SlotRows: the graph writes each step's keys and values into the batch's buffers in place (what
          `bigmodel serve` keeps a GroupQueryAttention file's batch in, on the CPU)
  arrays  ArrayRows: each run takes the cache as arrays and returns it as new ones, a position longer
          (what serve did before, and still does for an ONNX Attention file)
Rounds alternate the two (in a rotating order): this machine's speed drifts between runs; compare within a
round. Both start each round from the same cached context (the prefill is not timed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bigmodel.infer.gpt import Decoder  # noqa: E402
from bigmodel.infer.session import open_model  # noqa: E402
from bigmodel.serve.batching import ArrayRows, SlotRows  # noqa: E402


def timed_steps(rows: SlotRows | ArrayRows, batch: int, steps: int) -> float:
    """Median ms of `steps` decode steps from the rows' current state, which is then put back."""
    saved = (rows.lengths.copy(),) if isinstance(rows, SlotRows) else (rows.cache, rows.padding)
    ids = np.ones((batch, 1), np.int64)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        rows.step(ids)
        times.append((time.perf_counter() - start) * 1e3)
    if isinstance(rows, SlotRows):  # (positions past a row's length are never read: rewinding is enough)
        rows.lengths = saved[0]
    else:
        rows.cache, rows.padding = saved
    return statistics.median(times)


def measure(decoder: Decoder, batch: int, context: int, steps: int, rounds: int) -> dict[str, Any]:
    prompt = np.random.default_rng(0).integers(10, 1000, (batch, context))
    ways: dict[str, SlotRows | ArrayRows] = {"slots": SlotRows(decoder, batch), "arrays": ArrayRows(decoder)}
    for rows in ways.values():
        rows.add(prompt, np.zeros(batch, np.int64))
    names = list(ways)
    found: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(rounds):
        for name in names[round_number % 2 :] + names[: round_number % 2]:
            found[name].append(timed_steps(ways[name], batch, steps))
    ratios = [slots / arrays for slots, arrays in zip(found["slots"], found["arrays"], strict=True)]
    return {
        "ms_per_step": {name: round(statistics.median(values), 2) for name, values in found.items()},
        "slots_over_arrays_per_round": [round(ratio, 3) for ratio in ratios],
        "slots_over_arrays": round(statistics.median(ratios), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    session, meta = open_model(args.model, ["CPUExecutionProvider"], args.threads)
    decoder = Decoder.from_session(session, meta, args.model)
    if not decoder.writes_in_place:
        sys.exit(f"{args.model} is not a GroupQueryAttention file (export.attention auto or ort writes one)")
    report: dict[str, Any] = {"model": str(args.model), "batch": args.batch, "threads": args.threads}
    for context in args.contexts:
        report[f"context_{context}"] = measure(decoder, args.batch, context, args.steps, args.rounds)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
