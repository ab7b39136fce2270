"""The output head of an int4 file, alone: one MatMulNBits node (a (1, 1, K) x (K, N) product, the decode
step's largest matrix) in each block format, timed in the same run, interleaved, with its output's max
error against fp32. What chose the 8-bit head's default block width (docs/big-models.md).

    python scripts/bench_head.py [--k 2048] [--n 49152] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bigmodel.export.weightless import block_quantizer

FORMATS = [(8, 32), (8, 128), (8, 256), (4, 32), (4, 128)]  # (bits, block size)


def head_model(weight: np.ndarray, bits: int, block: int, accuracy_level: int) -> bytes:
    K, N = weight.shape
    packed, scales, _ = block_quantizer(bits, block).qbits_block_quant(weight)
    node = helper.make_node(
        "MatMulNBits",
        ["x", "B", "S"],
        ["y"],
        domain="com.microsoft",
        K=K,
        N=N,
        bits=bits,
        block_size=block,
        accuracy_level=accuracy_level,
    )
    graph = helper.make_graph(
        [node],
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, N])],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--n", type=int, default=49152)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((args.k, args.n)) * 0.02).astype(np.float32)
    x = rng.standard_normal((1, 1, args.k)).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = {
        f"int{bits} block {block}": ort.InferenceSession(
            head_model(weight, bits, block, 4), options, providers=["CPUExecutionProvider"]
        )
        for bits, block in FORMATS
    }
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.rounds):  # interleaved: this machine's speed drifts
        for name, session in sessions.items():
            session.run(None, {"x": x})
            start = time.perf_counter()
            for _ in range(50):
                session.run(None, {"x": x})
            times[name].append((time.perf_counter() - start) / 50 * 1e3)
    exact = x[0] @ weight
    print(
        json.dumps(
            {
                "K": args.k,
                "N": args.n,
                "threads": args.threads,
                "formats": {
                    name: {
                        "ms_median": round(statistics.median(times[name]), 3),
                        "max_abs_error": round(float(np.abs(session.run(None, {"x": x})[0][0] - exact).max()), 4),
                    }
                    for name, session in sessions.items()
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
