"""Inference speed: ONNX Runtime vs PyTorch eager, same weights and inputs, one run. Prints JSON.

GPT decoding (greedy, prompt then new tokens inside one context window), tokens/s at batch 1 and 8:
  ort_kv      the exported graph (opset 23: RotaryEmbedding/Attention operators, a cache tensor per
              layer) with its KV cache, one reused session, plain run() -- what `bigmodel infer` does
  ort_kv_opset18  the same exported at opset 18 (attention written out as MatMul/Softmax nodes)
  torch_kv    the same model in PyTorch eager with the KV cache (bigmodel's GPT.forward)
  minimal_kv  the leanest eager loop of the same weights: nanoGPT-style blocks with a per-layer cache,
              no masks while decoding (one new token sees the whole cache), SDPA -- the baseline a user
              would write by hand
  torch_full  PyTorch eager without a cache (re-reads the whole context every token)
for the shakespeare_char model shape (4 layers, 128 wide) and a wider one (n_embd 512).
Classifier (the digits MLP): batch-1 latency and batch-256 throughput, ORT vs eager.
Speed does not depend on the weights' values, so models are freshly initialised (seeded).

    python scripts/bench_infer.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from bigmodel import console, decoder_graph, streaming
from bigmodel.arch import DecoderArch, TabularArch
from bigmodel.export.gpt import write_decoder
from bigmodel.export.onnx_file import export_dynamo
from bigmodel.models import gpt, mlp

GPTS = {
    "shakespeare_char": {"n_layer": 4, "n_head": 4, "n_embd": 128},
    "wide_512": {"n_layer": 4, "n_head": 8, "n_embd": 512},
}


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def decode_ort(sess: ort.InferenceSession, arch: dict, prompts: np.ndarray, new: int) -> float:
    b = len(prompts)
    cache = decoder_graph.CacheLayout(arch["n_layer"], arch["n_head"], arch["n_embd"] // arch["n_head"]).empty(b)
    start = time.perf_counter()
    logits, cache = decoder_graph.outputs(sess.run(None, decoder_graph.feeds(prompts, cache)))
    for _ in range(new):
        ids = logits[:, -1].argmax(-1).reshape(b, 1).astype(np.int64)
        logits, cache = decoder_graph.outputs(sess.run(None, decoder_graph.feeds(ids, cache)))
    return b * new / (time.perf_counter() - start)


@torch.no_grad()
def decode_torch(model: gpt.GPT, prompts: np.ndarray, new: int, cache: bool, tokens: list | None = None) -> float:
    ids = torch.from_numpy(prompts)
    start = time.perf_counter()
    logits, past = model(ids)
    for _ in range(new):
        next_ids = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_ids], dim=1)
        logits, past = model(next_ids, past) if cache else model(ids)
    rate = len(prompts) * new / (time.perf_counter() - start)
    if tokens is not None:
        tokens.extend(ids[:, prompts.shape[1] :].flatten().tolist())
    return rate


@torch.no_grad()
def decode_minimal(model: gpt.GPT, prompts: np.ndarray, new: int, tokens: list | None = None) -> float:
    """Greedy decoding with the fewest eager ops: the same weights, read directly (learned positions,
    LayerNorm, GELU, tied head: the shakespeare shapes)."""
    t, n_head = model.transformer, model.arch.n_head

    def forward(ids: torch.Tensor, cache: list, start: int) -> torch.Tensor:
        B, T = ids.shape
        x = t.wte(ids) + t.wpe(torch.arange(start, start + T))
        for i, block in enumerate(t.h):
            q, k, v = block.attn.c_attn(block.ln_1(x)).view(B, T, 3 * n_head, -1).transpose(1, 2).chunk(3, dim=1)
            if cache[i] is not None:
                k, v = torch.cat([cache[i][0], k], dim=2), torch.cat([cache[i][1], v], dim=2)
            cache[i] = (k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # one new token: no mask needed
            x = x + block.attn.c_proj(y.transpose(1, 2).reshape(B, T, -1))
            x = x + block.mlp(block.ln_2(x))
        return model.lm_head(t.ln_f(x[:, -1:]))

    ids = torch.from_numpy(prompts)
    start = time.perf_counter()
    cache: list = [None] * len(t.h)
    logits = forward(ids, cache, 0)
    picked = []
    for step in range(new):
        picked.append(logits[:, -1].argmax(-1, keepdim=True))
        logits = forward(picked[-1], cache, ids.size(1) + step)
    rate = len(prompts) * new / (time.perf_counter() - start)
    if tokens is not None:
        tokens.extend(torch.cat(picked, dim=1).flatten().tolist())
    return rate


def bench_gpt(name: str, shape: dict, threads: int, repeats: int, tmp: Path) -> dict:
    arch = {"family": "gpt", "task": "lm", "vocab_size": 65, "block_size": 64, "dropout": 0.0, "bias": False, **shape}
    torch.manual_seed(0)
    model = gpt.GPT(DecoderArch(**arch)).eval()
    gpt.init_weights(model, "gpt2", 0.02)
    sessions = {}
    for opset in (23, 18):
        path = tmp / f"{name}.{opset}.onnx"
        write_decoder(DecoderArch(**arch), streaming.StateDict(model, "model."), path, opset)
        sessions[opset] = session(path, threads)
    results = {}
    for batch in (1, 8):
        prompts = np.random.default_rng(batch).integers(0, 65, size=(batch, 16), dtype=np.int64)
        reference, lean = [], []  # the minimal loop must decode what the model decodes
        decode_torch(model, prompts, 48, cache=True, tokens=reference), decode_minimal(model, prompts, 48, lean)
        assert lean == reference, "the minimal loop decodes other tokens than the model"
        rates: dict[str, list[float]] = {
            "ort_kv": [],
            "ort_kv_opset18": [],
            "torch_kv": [],
            "minimal_kv": [],
            "torch_full": [],
        }
        for round_ in range(repeats + 1):  # round 0 warms up every path
            measured = {
                "ort_kv": decode_ort(sessions[23], arch, prompts, 48),
                "ort_kv_opset18": decode_ort(sessions[18], arch, prompts, 48),
                "torch_kv": decode_torch(model, prompts, 48, cache=True),
                "minimal_kv": decode_minimal(model, prompts, 48),
                "torch_full": decode_torch(model, prompts, 48, cache=False),
            }
            if round_:
                for key, value in measured.items():
                    rates[key].append(value)
        med = {k: statistics.median(v) for k, v in rates.items()}
        results[f"batch_{batch}"] = {
            **{f"{k}_tokens_per_s": round(v, 1) for k, v in med.items()},
            "ort_vs_torch_kv": round(med["ort_kv"] / med["torch_kv"], 2),
            "ort_vs_minimal_kv": round(med["ort_kv"] / med["minimal_kv"], 2),
            "opset23_vs_opset18": round(med["ort_kv"] / med["ort_kv_opset18"], 2),
            "torch_kv_vs_torch_full": round(med["torch_kv"] / med["torch_full"], 2),
        }
    return {"shape": shape, **results}


def bench_classifier(threads: int, repeats: int, tmp: Path) -> dict:
    arch = {
        "family": "mlp",
        "task": "classification",
        "n_inputs": 64,
        "n_outputs": 10,
        "hidden_sizes": [512],
        "activation": "relu",
        "dropout": 0.2,
    }
    torch.manual_seed(0)
    model = mlp.MLP(TabularArch(**arch)).eval()

    class Deployed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.model.predict(features)

    path = tmp / "mlp.onnx"
    export_dynamo(
        Deployed().eval(),
        (torch.zeros(4, 64),),
        path,
        ["features"],
        ["probabilities"],
        {"features": {0: torch.export.Dim("batch")}},
        23,
    )
    sess = session(path, threads)
    rows = np.random.default_rng(0).uniform(0, 16, size=(256, 64)).astype(np.float32)

    def time_per_call(fn, x, calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn(x)
        return (time.perf_counter() - start) / calls

    def ort_call(x):
        return sess.run(None, {"features": x})

    @torch.no_grad()
    def torch_call(x):
        return model.predict(torch.from_numpy(x))

    out: dict[str, list[float]] = {"ort_b1": [], "torch_b1": [], "ort_b256": [], "torch_b256": []}
    for round_ in range(repeats + 1):
        measured = {
            "ort_b1": time_per_call(ort_call, rows[:1], 500),
            "torch_b1": time_per_call(torch_call, rows[:1], 500),
            "ort_b256": time_per_call(ort_call, rows, 100),
            "torch_b256": time_per_call(torch_call, rows, 100),
        }
        if round_:
            for key, value in measured.items():
                out[key].append(value)
    med = {k: statistics.median(v) for k, v in out.items()}
    return {
        "batch_1_latency_us": {"ort": round(1e6 * med["ort_b1"], 1), "torch": round(1e6 * med["torch_b1"], 1)},
        "batch_1_ort_speedup": round(med["torch_b1"] / med["ort_b1"], 2),
        "batch_256_rows_per_s": {"ort": round(256 / med["ort_b256"]), "torch": round(256 / med["torch_b256"])},
        "batch_256_ort_speedup": round(med["torch_b256"] / med["ort_b256"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for both ORT and PyTorch")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    console.set_quiet(True)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        report = {
            "threads": args.threads,
            "prompt_tokens": 16,
            "new_tokens": 48,
            "gpt": {
                name: bench_gpt(name, shape, args.threads, args.repeats, Path(tmp)) for name, shape in GPTS.items()
            },
            "classifier": bench_classifier(args.threads, args.repeats, Path(tmp)),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
