"""Decoding with the KV cache written in place: the design measured before export wrote it; prints JSON.

    python scripts/bench_shared_cache.py --ours RUN/export/model.onnx --builder BUILDER_DIR --out DIR
        [--prompt-tokens 16 1024] [--rounds 8]

(Session 24. Export now writes GroupQueryAttention itself -- export.attention auto -- and `bigmodel infer`
binds the buffers; this script rewrites a file exported with export.attention onnx, the graph of then.)
That graph attends with ONNX's Attention (opset 23), whose present cache is the past one plus the new
token: every step copies the whole cache inside ONNX Runtime, and `bigmodel infer` copies it again into numpy
and back. onnxruntime-genai runs the builder's file with buffers of the whole length bound as both past and
present, which its GroupQueryAttention writes in place. This script rewrites a copy of bigmodel's graph
(the weights file is hard-linked into --out, not copied; --out must be on the same file system) the same
way: each layer's Split, RotaryEmbedding, Split and Attention become one com.microsoft GroupQueryAttention
on the packed q/k/v product (rotary inside, its cos/sin tables from the graph's own inverse frequencies;
the mask and position nodes fall away), and decodes it with the buffers bound through IOBinding.

Per decode step at batch 1 (a --prompt-tokens prompt, then --new-tokens greedy steps), median milliseconds,
rounds interleaved in a rotating order (this machine drifts), for each context length:
  shared          the rewritten graph, KV buffers shared between steps
  ours            bigmodel's file through bigmodel's Decoder today (what `bigmodel infer` runs)
  builder_genai   the builder's file through onnxruntime-genai's Generator
and the rewritten graph's logits against today's on the prompt and 4 steps (int8 activations of
MatMulNBits' accuracy level 4 round a little differently when the inputs differ in the last bit).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_decode import builder_genai, genai_config, ours, prompt_ids  # noqa: E402

from bigmodel.infer.gpt import Decoder  # noqa: E402
from bigmodel.infer.session import open_model  # noqa: E402
from bigmodel.manifests import DecoderMetadata  # noqa: E402

MAX_POSITIONS = 8192  # rows of the rotary tables


def inverse_frequencies(graph: onnx.GraphProto, head_size: int) -> np.ndarray:
    """The rotary inverse frequencies (head_size / 2,): the 1-D constant the positions are multiplied by on
    the way to the graph's Cos node."""
    producer = {output: node for node in graph.node for output in node.output}
    constants = {init.name: init for init in graph.initializer}
    cos = next(node for node in graph.node if node.op_type == "Cos")
    pending, seen = [cos.input[0]], set()
    while pending:
        name = pending.pop()
        node = producer.get(name)
        if node is None or name in seen:
            continue
        seen.add(name)
        if node.op_type == "Mul":
            for operand in node.input:
                if operand in constants:
                    values = numpy_helper.to_array(constants[operand])
                    if values.ndim == 1 and values.shape[0] == head_size // 2:
                        return values.astype(np.float64)
        pending.extend(node.input)
    raise SystemExit("no rotary inverse frequencies found in the graph")


def rewrite(source: Path, out: Path) -> dict[str, int]:
    """Write out/model.onnx: `source`'s graph with GroupQueryAttention and shared-buffer inputs."""
    model = onnx.load(str(source), load_external_data=False)
    graph = model.graph
    producer = {output: node for node in graph.node for output in node.output}
    attention = [node for node in graph.node if node.op_type == "Attention"]
    attrs = {a.name: helper.get_attribute_value(a) for a in attention[0].attribute}
    past = next(i for i in graph.input if i.name == attention[0].input[4])
    head_size = past.type.tensor_type.shape.dim[3].dim_value
    angles = np.outer(np.arange(MAX_POSITIONS), inverse_frequencies(graph, head_size))
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.cos(angles).astype(np.float32), "shared_cache.cos"),
            numpy_helper.from_array(np.sin(angles).astype(np.float32), "shared_cache.sin"),
        ]
    )
    replaced, dropped = {}, set()
    for node in attention:
        q, _, _, _, past_key, past_value = node.input[:6]
        split_qk = producer[q]
        rotary = producer[split_qk.input[0]]
        split_qkv = producer[rotary.input[0]]
        assert (split_qk.op_type, rotary.op_type, split_qkv.op_type) == ("Split", "RotaryEmbedding", "Split")
        replaced[id(node)] = helper.make_node(
            "GroupQueryAttention",
            [split_qkv.input[0], "", "", past_key, past_value, "seqlens_k", "total_sequence_length"]
            + ["shared_cache.cos", "shared_cache.sin"],
            list(node.output),
            domain="com.microsoft",
            name=f"{node.name}_gqa",
            num_heads=attrs["q_num_heads"],
            kv_num_heads=attrs["kv_num_heads"],
            do_rotary=1,
        )
        dropped |= {id(split_qk), id(rotary), id(split_qkv)}
    nodes = [replaced.get(id(n), n) for n in graph.node if id(n) not in dropped]
    outputs = {o.name for o in graph.output}
    while True:  # the mask and position nodes no GroupQueryAttention reads
        used = {name for n in nodes for name in n.input} | outputs
        kept = [n for n in nodes if any(o in used for o in n.output if o)]
        if len(kept) == len(nodes):
            break
        nodes = kept
    used = {name for n in nodes for name in n.input}
    inputs = [i for i in graph.input if i.name in used]
    inputs += [
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    initializers = [i for i in graph.initializer if i.name in used]
    for field, values in ((graph.node, nodes), (graph.input, inputs), (graph.initializer, initializers)):
        del field[:]
        field.extend(values)
    for output in graph.output:
        if output.name.startswith("present"):
            output.type.tensor_type.shape.dim[2].dim_param = "capacity"
    out.mkdir(parents=True, exist_ok=True)
    data = out / "model.onnx.data"
    if not data.exists():
        os.link(source.with_name("model.onnx.data"), data)
    onnx.save(model, str(out / "model.onnx"))
    return {"layers": len(attention), "kv_heads": attrs["kv_num_heads"], "head_size": head_size}


def shared_steps(
    session: ort.InferenceSession,
    shape: dict[str, int],
    prompt: np.ndarray,
    steps: int,
    logits_seen: list[np.ndarray] | None = None,
) -> list[float]:
    """Per-step seconds of greedy decoding with the KV buffers bound as both past and present; each run's
    logits are appended to `logits_seen` when given (the check; the timed rounds keep none)."""
    capacity = prompt.shape[1] + steps + 1
    binding = session.io_binding()
    for layer in range(shape["layers"]):
        for part in ("keys", "values"):
            buffer = ort.OrtValue.ortvalue_from_shape_and_type(
                [1, shape["kv_heads"], capacity, shape["head_size"]], np.float32
            )
            binding.bind_ortvalue_input(f"past_{part}.{layer}", buffer)
            binding.bind_ortvalue_output(f"present_{part}.{layer}", buffer)

    def run(ids: np.ndarray, total: int) -> np.ndarray:
        binding.bind_output("logits")  # (its shape changes between the prompt and the steps)
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        session.run_with_iobinding(binding)
        return next(o for o in binding.get_outputs() if len(o.shape()) == 3).numpy()  # (the caches are 4-D)

    total = prompt.shape[1]
    logits = run(prompt, total)
    times = []
    if logits_seen is not None:
        logits_seen.append(logits)
    for _ in range(steps):
        token = np.array([[int(logits[0, -1].argmax())]], np.int64)
        start = time.perf_counter()
        total += 1
        logits = run(token, total)
        times.append(time.perf_counter() - start)
        if logits_seen is not None:
            logits_seen.append(logits)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ours", type=Path, required=True, help="bigmodel's int4 export/model.onnx")
    parser.add_argument("--builder", type=Path, required=True, help="the onnxruntime-genai builder's folder")
    parser.add_argument("--out", type=Path, required=True, help="where the rewritten graph goes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[16, 1024])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    import onnxruntime_genai as og

    shape = rewrite(args.ours, args.out)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    shared = ort.InferenceSession(str(args.out / "model.onnx"), options, providers=["CPUExecutionProvider"])
    session, meta = open_model(args.ours, ["CPUExecutionProvider"], args.threads, DecoderMetadata)
    decoder = Decoder.from_session(session, meta, args.ours)
    builder = og.Model(genai_config(args.builder, args.threads))

    check = prompt_ids(16)
    got: list[np.ndarray] = []
    shared_steps(shared, shape, check, 4, got)
    logits, cache = decoder.run(check, decoder.empty_cache(1))
    expected = [logits]
    for _ in range(4):
        logits, cache = decoder.run(np.array([[int(logits[0, -1].argmax())]], np.int64), cache)
        expected.append(logits)
    report: dict[str, object] = {
        "against_todays_graph": {
            "max_abs_diff": round(max(float(np.abs(a - b).max()) for a, b in zip(got, expected)), 4),
            "max_abs_logit": round(max(float(np.abs(b).max()) for b in expected), 3),
            "same_greedy_tokens": all(int(a[0, -1].argmax()) == int(b[0, -1].argmax()) for a, b in zip(got, expected)),
        },
        "threads": args.threads,
        "new_tokens": args.new_tokens,
    }
    for tokens in args.prompt_tokens:
        prompt = prompt_ids(tokens)
        ways: dict[str, Callable[[], list[float]]] = {
            "shared": lambda prompt=prompt: shared_steps(shared, shape, prompt, args.new_tokens),
            "ours": lambda prompt=prompt: ours(decoder, prompt, args.new_tokens),
            "builder_genai": lambda prompt=prompt: builder_genai(builder, prompt, args.new_tokens),
        }
        for way in ways.values():  # warm-up
            way()
        rounds: dict[str, list[float]] = {name: [] for name in ways}
        names = list(ways)
        for number in range(args.rounds):
            for name in names[number % len(names) :] + names[: number % len(names)]:
                rounds[name].append(round(1000 * statistics.median(ways[name]()), 2))
        report[f"context_{tokens}"] = {
            "ms_per_step": {name: statistics.median(values) for name, values in rounds.items()},
            "rounds": rounds,
            "over_builder_genai_per_round_median": {
                name: round(statistics.median(a / b for a, b in zip(values, rounds["builder_genai"])), 3)
                for name, values in rounds.items()
                if name != "builder_genai"
            },
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
