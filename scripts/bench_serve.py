"""Concurrent streaming clients against `bigmodel serve`; prints JSON.

    python scripts/bench_serve.py --model runs/quickstart/export/model.onnx [--clients 1,4,16] [--tokens 64]

Starts the server (its own process, a free port: `bigmodel serve --max-batch`), then for --rounds rounds:
the baseline -- the requests of the largest client count sent one at a time -- and, for each client count
N, N threads each sending `--requests` streaming /v1/completions requests (greedy, `--tokens` new tokens,
distinct prompts; the count comes from the usage chunk). Rounds interleave the variants because this
machine's speed drifts; reported per N: the median over rounds of aggregate generated tokens/s, TTFT and
latency p50/p95 over all rounds' requests, errors, and the throughput ratio of the medians against
one-at-a-time (the issue's target: >= 3x at 16 clients, no error). The clients run on the same cores.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stream_one(base: str, prompt: str, tokens: int) -> tuple[float, float, int]:
    """(time to first token, total latency, tokens generated) of one streaming request; the count comes
    from the usage chunk (under load one chunk may carry several tokens)."""
    body = json.dumps(
        {
            "prompt": prompt,
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    request = urllib.request.Request(f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    start, first, generated = time.perf_counter(), None, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                first = first or time.perf_counter() - start
            if chunk.get("usage"):
                generated = chunk["usage"]["completion_tokens"]
    return first or 0.0, time.perf_counter() - start, generated


def run_clients(base: str, clients: int, requests: int, tokens: int, prompts: list[str]) -> dict[str, Any]:
    """N client threads, each sending its requests in turn: wall time, per-request numbers, errors."""
    results: list[tuple[float, float, int]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for r in range(requests):
            try:
                outcome = stream_one(base, prompts[(index * requests + r) % len(prompts)], tokens)
            except Exception as exc:  # noqa: BLE001 - counted, reported
                with lock:
                    errors.append(str(exc))
                continue
            with lock:
                results.append(outcome)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {"tokens_per_s": sum(r[2] for r in results) / wall, "results": results, "errors": errors}


def summary(clients: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    results = [r for one in rounds for r in one["results"]]
    ttft = np.array([r[0] for r in results]) * 1000
    latency = np.array([r[1] for r in results]) * 1000
    return {
        "clients": clients,
        "requests": len(results),
        "errors": sum(len(one["errors"]) for one in rounds),
        "tokens_per_s": round(statistics.median(one["tokens_per_s"] for one in rounds), 1),
        "tokens_per_s_rounds": [round(one["tokens_per_s"], 1) for one in rounds],
        "ttft_ms_p50": round(float(np.percentile(ttft, 50)), 1),
        "ttft_ms_p95": round(float(np.percentile(ttft, 95)), 1),
        "latency_ms_p50": round(float(np.percentile(latency, 50)), 1),
        "latency_ms_p95": round(float(np.percentile(latency, 95)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    args = parser.parse_args()
    counts = [int(n) for n in args.clients.split(",")]
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bigmodel",
            "serve",
            "--model",
            str(args.model),
            "--port",
            str(port),
            "--max-batch",
            str(args.max_batch),
            "-q",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        prompts = [f"def f{i}(x):\n    return " for i in range(64)]
        run_clients(base, max(counts), 2, args.tokens, prompts)  # warm-up, not counted
        baseline: list[dict[str, Any]] = []
        concurrent: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
        for _ in range(args.rounds):
            baseline.append(run_clients(base, 1, max(counts) * args.requests, args.tokens, prompts))
            for n in counts:
                concurrent[n].append(run_clients(base, n, args.requests, args.tokens, prompts))
        one = summary(1, baseline)
        rows = [summary(n, concurrent[n]) for n in counts]
        for row in rows:
            row["vs_one_at_a_time"] = round(row["tokens_per_s"] / one["tokens_per_s"], 2)
        print(
            json.dumps(
                {
                    "model": str(args.model),
                    "new_tokens": args.tokens,
                    "max_batch": args.max_batch,
                    "rounds": args.rounds,
                    "one_at_a_time": one,
                    "concurrent": rows,
                },
                indent=2,
            )
        )
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
