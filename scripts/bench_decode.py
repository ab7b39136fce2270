"""Decode speed of two int4 files of the same weights, in one process, interleaved; prints JSON.

    python scripts/bench_decode.py --ours RUN/export/model.onnx --builder BUILDER_DIR [--rounds 5]
        [--prompt-tokens 16] [--ours-genai RUN/export/genai]

Per decode step at batch 1 (a --prompt-tokens prompt, then --new-tokens greedy steps), median milliseconds of:
  ours            bigmodel's file through bigmodel's own Decoder (what `bigmodel infer` runs)
  builder_plain   the onnxruntime-genai builder's file in a plain session.run loop (its cache fed back)
  builder_genai   the builder's file through onnxruntime-genai's own Generator (its runtime)
  ours_genai      with --ours-genai: bigmodel's file as onnxruntime-genai's folder (export.format genai)
                  through the same Generator: the two files in one runtime
Rounds alternate the ways (in a rotating order), because this machine's speed drifts by tens of percent
between runs; compare within a round. scripts/bench_big.py makes both files (and measures each in its own process).
--profile adds ONNX Runtime's own profile of the two plain loops: kernel microseconds per step by operator
type, and MatMulNBits by (bits, K, N): where a step's time goes in each graph.
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
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bigmodel.infer.gpt import Decoder  # noqa: E402
from bigmodel.infer.session import open_model  # noqa: E402
from bigmodel.manifests import DecoderMetadata  # noqa: E402


def prompt_ids(tokens: int) -> np.ndarray:
    """The same random prompt (1, tokens) for every way."""
    return np.random.default_rng(0).integers(10, 40000, size=(1, tokens)).astype(np.int64)


def ours(decoder: Decoder, prompt: np.ndarray, steps: int) -> list[float]:
    """Per-step seconds of bigmodel's loop as `bigmodel infer` runs it (Decoder.sequences: buffers written in
    place for a GroupQueryAttention file, new arrays each step for an ONNX Attention one)."""
    cache = decoder.sequences(1, prompt.shape[1] + steps)
    logits = cache.run(prompt)
    times = []
    for _ in range(steps):
        token = np.array([[int(logits[0, -1].argmax())]], np.int64)
        start = time.perf_counter()
        logits = cache.run(token)
        times.append(time.perf_counter() - start)
    return times


def builder_plain(
    session: ort.InferenceSession, layers: int, kv_heads: int, head: int, prompt: np.ndarray, steps: int
) -> list[float]:
    names = [o.name for o in session.get_outputs()]
    feeds = {"input_ids": prompt, "attention_mask": np.ones((1, prompt.shape[1]), np.int64)}
    for i in range(layers):
        for part in ("key", "value"):
            feeds[f"past_key_values.{i}.{part}"] = np.zeros((1, kv_heads, 0, head), np.float32)
    out = dict(zip(names, session.run(None, feeds)))
    total, times = prompt.shape[1], []
    for _ in range(steps):
        total += 1
        feeds = {
            "input_ids": np.array([[int(out["logits"][0, -1].argmax())]], np.int64),
            "attention_mask": np.ones((1, total), np.int64),
        }
        for i in range(layers):
            for part in ("key", "value"):
                feeds[f"past_key_values.{i}.{part}"] = out[f"present.{i}.{part}"]
        start = time.perf_counter()
        out = dict(zip(names, session.run(None, feeds)))
        times.append(time.perf_counter() - start)
    return times


def builder_genai(model: object, prompt: np.ndarray, steps: int) -> list[float]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + steps + 1, do_sample=False, batch_size=1)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.astype(np.int32))  # runs the prompt
    generator.generate_next_token()  # only picks from the prompt's logits: not a decode step
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        generator.generate_next_token()
        times.append(time.perf_counter() - start)
    return times


def genai_config(folder: Path, threads: int) -> Any:
    """onnxruntime-genai's config of `folder` on the CPU with `threads` threads."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return config


def kernel_profile(session_of: Any, loop: Any) -> dict[str, Any]:
    """ONNX Runtime's profile of `loop` over a fresh profiling session: kernel us per run, by op type and
    by MatMulNBits shape."""
    import collections

    import onnx

    session, path = session_of()
    loop(session)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    runs = max(1, sum(e.get("name") == "model_run" for e in events))
    shapes = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
            shapes[node.name] = f"bits {a['bits']} K {a['K']} N {a['N']}"
    by_op: collections.Counter[str] = collections.Counter()
    by_shape: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"].get("op_name", "?")] += e["dur"]
            if e["args"].get("op_name") == "MatMulNBits":
                by_shape[shapes.get(e["name"][: -len("_kernel_time")], "?")] += e["dur"]
    trace.unlink(missing_ok=True)
    return {
        "kernel_us_per_run": round(sum(by_op.values()) / runs),
        "by_op": {k: round(v / runs) for k, v in by_op.most_common()},
        "matmulnbits_by_shape": {k: round(v / runs) for k, v in by_shape.most_common()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ours", type=Path, required=True)
    parser.add_argument("--builder", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16, help="the context before the timed steps")
    parser.add_argument("--ours-genai", type=Path, help="bigmodel's export.format genai folder of --ours")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also ONNX Runtime's per-operator profile")
    args = parser.parse_args()
    import onnxruntime_genai as og

    session, meta = open_model(args.ours, ["CPUExecutionProvider"], args.threads, DecoderMetadata)
    decoder = Decoder.from_session(session, meta, args.ours)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    theirs = ort.InferenceSession(str(args.builder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    shape = json.loads((args.builder / "genai_config.json").read_text())["model"]["decoder"]
    genai_model = og.Model(genai_config(args.builder, args.threads))
    prompt = prompt_ids(args.prompt_tokens)
    runs = {
        "ours": lambda: ours(decoder, prompt, args.new_tokens),
        "builder_plain": lambda: builder_plain(
            theirs,
            shape["num_hidden_layers"],
            shape["num_key_value_heads"],
            shape["head_size"],
            prompt,
            args.new_tokens,
        ),
        "builder_genai": lambda: builder_genai(genai_model, prompt, args.new_tokens),
    }
    if args.ours_genai:
        ours_genai = og.Model(genai_config(args.ours_genai, args.threads))
        runs["ours_genai"] = lambda: builder_genai(ours_genai, prompt, args.new_tokens)
    for run in runs.values():  # warm-up
        run()
    rounds: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for number in range(args.rounds):  # the order rotates: no file is always first after the other's run
        for name in names[number % len(names) :] + names[: number % len(names)]:
            rounds[name].append(round(1000 * statistics.median(runs[name]()), 2))
    profiles = {}
    if args.profile:

        def profiled(path: Path) -> Any:
            def make() -> tuple[ort.InferenceSession, Path]:
                options = ort.SessionOptions()
                options.intra_op_num_threads, options.enable_profiling = args.threads, True
                options.profile_file_prefix = str(Path("/tmp") / f"bench_decode_{path.parent.name}")
                return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), path

            return make

        profiles = {
            "ours": kernel_profile(
                profiled(args.ours),
                lambda session: ours(Decoder.from_session(session, meta, args.ours), prompt, args.new_tokens),
            ),
            "builder_plain": kernel_profile(
                profiled(args.builder / "model.onnx"),
                lambda session: builder_plain(
                    session,
                    shape["num_hidden_layers"],
                    shape["num_key_value_heads"],
                    shape["head_size"],
                    prompt,
                    args.new_tokens,
                ),
            ),
        }
    print(
        json.dumps(
            {
                "profile": profiles,
                "ms_per_step": {name: {"median": statistics.median(v), "rounds": v} for name, v in rounds.items()},
                "ours_over_genai_per_round": [round(a / b, 3) for a, b in zip(rounds["ours"], rounds["builder_genai"])],
                "ours_over_builder_plain_per_round": [
                    round(a / b, 3) for a, b in zip(rounds["ours"], rounds["builder_plain"])
                ],
                "threads": args.threads,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
