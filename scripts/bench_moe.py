"""A mixture of experts in ONNX Runtime, routed (what bigmodel exports) vs masked dense; prints JSON.

    python scripts/bench_moe.py [--hidden 1024] [--inner 3584] [--experts 8] [--top 2] [--threads 2]
    python scripts/bench_moe.py --model olmoe-1b-7b --layers 4 --work /tmp/moe [--dtype int4]

One layer (the default): a Mixtral-shaped layer (softmax router, top-k renormalised, SwiGLU experts) on random
weights, built by hand in the two forms bigmodel can export (`export.experts`): ONNX Runtime's routed kernels
that run only the picked experts (com.microsoft MoE, float, and QMoE, 4-bit blocks) and the masked-dense graph
that computes every expert on every token and weights the unpicked ones by exactly 0 (standard operators, any
runtime). Median milliseconds over interleaved rounds at decode (1 token) and prefill (64 tokens), and each
form's max abs difference from the float dense graph (the same model).

--model: a whole model through bigmodel itself. A random-weight folder of the published shape
(scripts/make_random_model.py, --layers cuts it down) is imported (`init`, gated against transformers),
exported twice from the same checkpoint (`export.experts` routed and dense, each through the export gate),
and both files decode greedily through bigmodel's Decoder at batch 1 (16-token prompt), interleaved: median
milliseconds per decode step and for the prompt, export seconds and peak RSS, file bytes, and the largest
logit difference between the two files on the prompt.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bigmodel.export.weightless import block_quantizer  # noqa: E402


def dense_graph(router: np.ndarray, gate_up: np.ndarray, down: np.ndarray, top: int, int4: bool) -> bytes:
    """x (T, C) -> every expert's SwiGLU output weighted by its renormalised top-k score (0 when unpicked),
    as bigmodel's exported graph computes it; int4: the expert matrices as MatMulNBits (block 32)."""
    experts, two_inner, hidden = gate_up.shape
    inner = two_inner // 2
    nodes = [
        helper.make_node("MatMul", ["x", "router"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["scores"], axis=-1),
        helper.make_node("TopK", ["scores", "k"], ["picked", "chosen"], axis=-1),
        helper.make_node("ReduceSum", ["picked", "last"], ["total"], keepdims=1),
        helper.make_node("Div", ["picked", "total"], ["normalized"]),
        helper.make_node("ScatterElements", ["zeros", "chosen", "normalized"], ["weights"], axis=-1),
    ]
    inits = [
        numpy_helper.from_array(router.T.copy(), "router"),
        numpy_helper.from_array(np.array([top], np.int64), "k"),
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
        numpy_helper.from_array(np.array([inner, inner], np.int64), "halves"),
    ]
    nodes.append(helper.make_node("Shape", ["scores"], ["score_shape"]))
    nodes.append(helper.make_node("ConstantOfShape", ["score_shape"], ["zeros"]))
    total = ""
    for e in range(experts):
        up_out, down_out = f"gate_up_{e}", f"down_{e}"
        nodes += linear("x", gate_up[e], up_out, f"w_gate_up_{e}", inits, int4)
        nodes.append(helper.make_node("Split", [up_out, "halves"], [f"g_{e}", f"u_{e}"], axis=-1))
        nodes.append(helper.make_node("Sigmoid", [f"g_{e}"], [f"sg_{e}"]))
        nodes.append(helper.make_node("Mul", [f"g_{e}", f"sg_{e}"], [f"silu_{e}"]))
        nodes.append(helper.make_node("Mul", [f"silu_{e}", f"u_{e}"], [f"h_{e}"]))
        nodes += linear(f"h_{e}", down[e], down_out, f"w_down_{e}", inits, int4)
        inits.append(numpy_helper.from_array(np.array([e], np.int64), f"index_{e}"))
        nodes.append(helper.make_node("Gather", ["weights", f"index_{e}"], [f"w_{e}"], axis=-1))
        nodes.append(helper.make_node("Mul", [down_out, f"w_{e}"], [f"weighted_{e}"]))
        if total:
            nodes.append(helper.make_node("Add", [total, f"weighted_{e}"], [f"sum_{e}"]))
            total = f"sum_{e}"
        else:
            total = f"weighted_{e}"
    nodes.append(helper.make_node("Identity", [total], ["y"]))
    return model(nodes, inits, hidden)


def linear(x: str, weight: np.ndarray, out: str, name: str, inits: list[Any], int4: bool) -> list[Any]:
    """x @ weight.T: a MatMul, or a MatMulNBits of 4-bit blocks of 32 (accuracy level 4, as export int4)."""
    if not int4:
        inits.append(numpy_helper.from_array(weight.T.copy(), name))
        return [helper.make_node("MatMul", [x, name], [out])]
    packed, scales, _ = block_quantizer(4, 32).qbits_block_quant(np.ascontiguousarray(weight.T))
    inits += [numpy_helper.from_array(packed, f"{name}_Q4"), numpy_helper.from_array(scales, f"{name}_scales")]
    n, k = weight.shape
    attrs = {"K": k, "N": n, "bits": 4, "block_size": 32, "accuracy_level": 4}
    return [
        helper.make_node("MatMulNBits", [x, f"{name}_Q4", f"{name}_scales"], [out], domain="com.microsoft", **attrs)
    ]


def routed_graph(router: np.ndarray, gate_up: np.ndarray, down: np.ndarray, top: int, int4: bool) -> bytes:
    """The same layer through ONNX Runtime's routed kernel: MoE (float) or QMoE (4-bit blocks of 32, the
    block quantizer's symmetric levels), SwiGLU with gate and up rows interleaved (swiglu_fusion 1: the
    only layout ONNX Runtime's CPU kernels take)."""
    experts, two_inner, hidden = gate_up.shape
    halves = gate_up.reshape(experts, 2, two_inner // 2, hidden)  # [gate; up] -> gate0, up0, gate1, up1, ...
    gate_up = np.ascontiguousarray(halves.transpose(0, 2, 1, 3).reshape(experts, two_inner, hidden))
    attrs = {
        "k": top,
        "activation_type": "swiglu",
        "swiglu_fusion": 1,
        "activation_alpha": 1.0,
        "activation_beta": 0.0,
        "normalize_routing_weights": 1,
    }
    inits = [numpy_helper.from_array(router.T.copy(), "router")]
    nodes = [helper.make_node("MatMul", ["x", "router"], ["logits"])]
    if not int4:
        inits += [numpy_helper.from_array(gate_up, "fc1"), numpy_helper.from_array(down, "fc2")]
        nodes.append(helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft", **attrs))
        return model(nodes, inits, hidden)
    fc1, fc1_scales = quantized_experts(gate_up)
    fc2, fc2_scales = quantized_experts(down)
    inits += [
        numpy_helper.from_array(a, n) for a, n in ((fc1, "fc1"), (fc1_scales, "s1"), (fc2, "fc2"), (fc2_scales, "s2"))
    ]
    attrs.update(expert_weight_bits=4, block_size=32, accuracy_level=4)
    inputs = ["x", "logits", "fc1", "s1", "", "fc2", "s2"]
    nodes.append(helper.make_node("QMoE", inputs, ["y"], domain="com.microsoft", **attrs))
    return model(nodes, inits, hidden)


def quantized_experts(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(E, N, K) float -> (E, N, K/2) uint8 levels (low nibble first, zero point 8) and (E, N, K/32) scales."""
    packed, scales = [], []
    for matrix in weights:
        levels, scale, _ = block_quantizer(4, 32).qbits_block_quant(np.ascontiguousarray(matrix.T))
        packed.append(levels.reshape(matrix.shape[0], -1))
        scales.append(scale.reshape(matrix.shape[0], -1))
    return np.stack(packed), np.stack(scales)


def model(nodes: list[Any], inits: list[Any], hidden: int) -> bytes:
    graph = helper.make_graph(
        nodes,
        "moe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", hidden])],
        inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def whole_model(args: argparse.Namespace) -> dict[str, Any]:
    """Import a random-weight mixture, export it routed and dense, decode both interleaved."""
    import numpy as np

    from bigmodel.infer.gpt import Decoder
    from bigmodel.infer.session import open_model
    from bigmodel.manifests import DecoderMetadata
    from bigmodel.memory import onnx_file_bytes
    from scripts.bench_big import bigmodel, cpu_name, random_model_run

    _, run, config = random_model_run(args.work, args.model, args.threads, 512, args.dtype, args.layers)
    report: dict[str, Any] = {"cpu": cpu_name(), "model": args.model, "layers": args.layers, "dtype": args.dtype}
    report["prepare"] = bigmodel("prepare", config=config)
    report["init"] = bigmodel("init", config=config)
    paths = {}
    for form in ("routed", "dense"):
        exported = bigmodel("export", "--set", f"export.experts={form}", config=config)
        target = args.work / f"export-{form}"
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(run / "export"), target)
        paths[form] = target / "model.onnx"
        report[f"export_{form}"] = {**exported, "file_bytes": onnx_file_bytes(paths[form])}
    decoders = {}
    for form, path in paths.items():
        session, meta = open_model(path, ["CPUExecutionProvider"], args.threads, DecoderMetadata)
        decoders[form] = Decoder.from_session(session, meta, path)
    prompt = np.random.default_rng(0).integers(10, 40000, size=(1, 16)).astype(np.int64)
    first = {form: d.run(prompt, d.empty_cache(1))[0] for form, d in decoders.items()}
    report["prompt_logits_max_abs_diff"] = float(np.abs(first["routed"] - first["dense"]).max())
    steps: dict[str, list[float]] = {form: [] for form in decoders}
    prefill: dict[str, list[float]] = {form: [] for form in decoders}
    for r in range(args.rounds):
        for form in list(decoders)[r % 2 :] + list(decoders)[: r % 2]:
            decoder = decoders[form]
            start = time.perf_counter()
            logits, cache = decoder.run(prompt, decoder.empty_cache(1))
            prefill[form].append(time.perf_counter() - start)
            for _ in range(args.new_tokens):
                token = np.array([[int(logits[0, -1].argmax())]], np.int64)
                start = time.perf_counter()
                logits, cache = decoder.run(token, cache)
                steps[form].append(time.perf_counter() - start)
    for form in decoders:
        report[f"decode_ms_{form}"] = round(statistics.median(steps[form]) * 1000, 2)
        report[f"prompt_ms_{form}"] = round(statistics.median(prefill[form]) * 1000, 1)
    report["decode_speedup_routed"] = round(report["decode_ms_dense"] / report["decode_ms_routed"], 2)
    report["prompt_speedup_routed"] = round(report["prompt_ms_dense"] / report["prompt_ms_routed"], 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inner", type=int, default=3584)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--model", default=None, help="a make_random_model.py shape: the whole-model comparison")
    parser.add_argument("--layers", type=int, default=None, help="--model: fewer layers than published")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_moe"), help="--model: working folder")
    parser.add_argument("--dtype", choices=["fp32", "int4"], default="int4", help="--model: export.dtype")
    parser.add_argument("--new-tokens", type=int, default=16, help="--model: decode steps per round")
    args = parser.parse_args()
    if args.model:
        print(json.dumps(whole_model(args), indent=2))
        return
    rng = np.random.default_rng(0)
    c, i, e = args.hidden, args.inner, args.experts
    router = rng.standard_normal((e, c)).astype(np.float32) * 0.05
    gate_up = rng.standard_normal((e, 2 * i, c)).astype(np.float32) * c**-0.5
    down = rng.standard_normal((e, c, i)).astype(np.float32) * i**-0.5
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    forms = {
        "masked_dense_fp32": dense_graph(router, gate_up, down, args.top, False),
        "routed_moe_fp32": routed_graph(router, gate_up, down, args.top, False),
        "masked_dense_int4": dense_graph(router, gate_up, down, args.top, True),
        "routed_qmoe_int4": routed_graph(router, gate_up, down, args.top, True),
    }
    sessions = {
        name: ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"]) for name, graph in forms.items()
    }
    results: dict[str, Any] = {}
    for tokens in (1, 64):
        x = rng.standard_normal((tokens, c)).astype(np.float32)
        outputs = {name: s.run(None, {"x": x})[0] for name, s in sessions.items()}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for r in range(args.rounds):
            names = list(sessions)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                steps = []
                for _ in range(20 if tokens == 1 else 5):
                    start = time.perf_counter()
                    sessions[name].run(None, {"x": x})
                    steps.append(time.perf_counter() - start)
                times[name].append(statistics.median(steps) * 1000)
        reference = outputs["masked_dense_fp32"]
        results[f"{tokens}_tokens"] = {
            name: {
                "ms_median": round(statistics.median(times[name]), 3),
                "max_abs_diff_from_dense_fp32": float(np.abs(outputs[name] - reference).max()),
            }
            for name in sessions
        }
    print(
        json.dumps(
            {
                "cpu": platform.processor() or platform.machine(),
                "shape": {"hidden": c, "inner": i, "experts": e, "top": args.top},
                "threads": args.threads,
                "onnxruntime": ort.__version__,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
