"""Concurrent streaming clients against `bigmodel serve`; prints JSON.

    python scripts/bench_serve.py --model runs/quickstart/export/model.onnx [--clients 1,4,16] [--tokens 64]

Starts the server (its own process, a free port), then for each client count N: N threads each send
`--requests` streaming /v1/completions requests (greedy, `--tokens` new tokens, distinct prompts) and
record time to first token and total latency per request. The baseline is the same requests sent one at
a time, measured in the same run. Reported per N: aggregate generated tokens/s, TTFT and latency p50/p95,
errors, and the throughput ratio against one-at-a-time (the issue's target: >= 3x at 16 clients, which
needs requests decoded together in one batch).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stream_one(base: str, prompt: str, tokens: int) -> tuple[float, float, int]:
    """(time to first token, total latency, tokens received) of one streaming request."""
    body = json.dumps({"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}).encode()
    request = urllib.request.Request(f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    start, first, pieces = time.perf_counter(), None, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                first = first or time.perf_counter() - start
                pieces += 1
    return first or 0.0, time.perf_counter() - start, pieces


def run_clients(base: str, clients: int, requests: int, tokens: int, prompts: list[str]) -> dict[str, object]:
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
    ttft = np.array([r[0] for r in results]) * 1000
    latency = np.array([r[1] for r in results]) * 1000
    return {"clients": clients, "requests": len(results), "errors": len(errors),
            "tokens_per_s": round(sum(r[2] for r in results) / wall, 1),
            "ttft_ms_p50": round(float(np.percentile(ttft, 50)), 1), "ttft_ms_p95": round(float(np.percentile(ttft, 95)), 1),
            "latency_ms_p50": round(float(np.percentile(latency, 50)), 1),
            "latency_ms_p95": round(float(np.percentile(latency, 95)), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bigmodel", "serve", "--model", str(args.model), "--port",
                               str(port), "-q"], stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        prompts = [f"def f{i}(x):\n    return " for i in range(64)]
        run_clients(base, 1, 2, args.tokens, prompts)  # warm-up, not counted
        baseline = run_clients(base, 1, max(4, args.requests), args.tokens, prompts)
        rows = [run_clients(base, n, args.requests, args.tokens, prompts) for n in map(int, args.clients.split(","))]
        for row in rows:
            row["vs_one_at_a_time"] = round(row["tokens_per_s"] / baseline["tokens_per_s"], 2)
        print(json.dumps({"model": str(args.model), "new_tokens": args.tokens, "one_at_a_time": baseline,
                          "concurrent": rows}, indent=2))
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
