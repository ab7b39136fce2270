"""Keep a 4-bit grid the weights already have, instead of rounding them onto another one.

A model imported from a Q4_0/Q4_1 GGUF file holds weights that are exactly `m + d * k` with k in
0..15, per block of 32 consecutive inputs (one scale d and one minimum m per block). Quantizing those
fp32 values again with round-to-nearest onto MatMulNBits' own grid adds a second rounding error as large
as the first one: on SmolLM2-135M (Q4_1) perplexity rose 30% where llama.cpp, running the file's own
grid, loses nothing. MatMulNBits can hold the grid exactly: its symmetric blocks compute
`d * (k - 8)`, so

    x . w = sum over blocks b of [ d_b * sum_i x_i (k_i - 8) ] + sum over blocks b of (m_b + 8 d_b) * sum_i x_i

i.e. MatMulNBits(x, k, d) plus a small fp32 correction: the block sums of x (Reshape + ReduceSum, once
per input) times the per-block offsets (m_b + 8 d_b), a (K/32, N) matrix -- how llama.cpp itself computes
Q4_1.
Q4_0 blocks (d * (k - 8)) are the same form with other offsets. A Q8_0 matrix (d * k, k in -127..127,
as GGUF files often store the token embedding that a tied output head reuses) is already MatMulNBits'
symmetric 8-bit form, d * (u - 128) with u = k + 128: it is kept exactly with no correction
(`keep_grid8`). Weights that are not on such a grid (any model trained in fp32) are left to the ordinary
quantizer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bigmodel.export.onnx_file import value_rank

BLOCK = 32  # GGUF's Q4_0 / Q4_1 block
LEVELS = 16


def on_grid(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(k (N, K) uint8, d (N, K/32), m (N, K/32)) when the (K, N) weight is exactly m + d k per block of 32
    inputs, else None."""
    K, N = weight.shape
    if K % BLOCK:
        return None
    blocks = np.sort(weight.T.reshape(N, K // BLOCK, BLOCK).astype(np.float64), axis=-1)
    low, high = blocks[..., 0], blocks[..., -1]
    # The step is the smallest gap between distinct values (a block need not use every level: Q4_0 often
    # leaves the top one unused); gaps below 1e-4 of the block's range are float noise, not levels.
    gaps = np.diff(blocks, axis=-1)
    gaps = np.where(gaps > 1e-4 * (high - low)[..., None], gaps, np.inf).min(-1)
    step = np.where(np.isfinite(gaps), gaps, 1.0)
    levels = (weight.T.reshape(N, K // BLOCK, BLOCK) - low[..., None]) / step[..., None]
    k = np.rint(levels)
    if np.abs(levels - k).max() > 1e-3 or k.max() > LEVELS - 1:
        return None
    return k.reshape(N, K).astype(np.uint8), step.astype(np.float32), low.astype(np.float32)


def keep_grids(model: onnx.ModelProto, accuracy_level: int | None, exclude: set[str]) -> tuple[int, set[str]]:
    """Replace every MatMul whose constant weight is on a 4-bit grid with the exact MatMulNBits form
    (in place). Returns how many were replaced, and the correction MatMuls (fp32 on purpose: the
    quantizer that runs next must leave them alone)."""
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    replaced, nodes, corrections = 0, [], set()
    block_sums: dict[str, str] = {}  # input -> its block sums
    for node in graph.node:
        found = None
        if node.op_type == "MatMul" and node.name not in exclude and node.input[1] in weights:
            weight = numpy_helper.to_array(weights[node.input[1]])
            found = on_grid(weight) if weight.ndim == 2 else None
        if found is None:
            nodes.append(node)
            continue
        exact = _exact_nodes(node, *found, weight.shape, accuracy_level, graph, block_sums)
        corrections |= {n.name for n in exact if n.op_type == "MatMul"}
        nodes.extend(exact)
        replaced += 1
    if replaced:
        del graph.node[:]
        graph.node.extend(nodes)
        used = {name for node in graph.node for name in node.input}
        kept = [init for init in graph.initializer if init.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        _use_contrib_ops(model)
    return replaced, corrections


def _exact_nodes(
    node: Any,
    k: np.ndarray,
    d: np.ndarray,
    m: np.ndarray,
    shape: tuple[int, int],
    accuracy_level: int | None,
    graph: Any,
    block_sums: dict[str, str],
) -> list[Any]:
    K, N = shape
    name, x, out = node.name or node.output[0], node.input[0], node.output[0]
    packed = (k[:, 0::2] | (k[:, 1::2] << 4)).reshape(N, K // BLOCK, BLOCK // 2)  # low nibble first
    graph.initializer.extend(
        [numpy_helper.from_array(packed, f"{name}_Q4G"), numpy_helper.from_array(d.reshape(-1), f"{name}_Q4G_scales")]
    )
    attrs: dict[str, Any] = {"K": K, "N": N, "bits": 4, "block_size": BLOCK}
    if accuracy_level is not None:
        attrs["accuracy_level"] = accuracy_level
    offsets = m + 8 * d  # (N, K/32)
    graph.initializer.append(numpy_helper.from_array(offsets.T.copy(), f"{name}_Q4G_offsets"))
    nodes = []
    if x not in block_sums:  # the sum of each block of 32 inputs, once per input: (..., K) -> (..., K/32)
        block_sums[x] = f"{name}_Q4G_sums"
        nodes.extend(_block_sums(x, block_sums[x], K, value_rank(graph, x), graph))
    return [
        *nodes,
        helper.make_node(
            "MatMulNBits",
            [x, f"{name}_Q4G", f"{name}_Q4G_scales"],
            [f"{name}_Q4G_main"],
            name=f"{name}_Q4G",
            domain="com.microsoft",
            **attrs,
        ),
        helper.make_node(
            "MatMul", [block_sums[x], f"{name}_Q4G_offsets"], [f"{name}_Q4G_correction"], name=f"{name}_Q4G_correction"
        ),
        helper.make_node("Add", [f"{name}_Q4G_main", f"{name}_Q4G_correction"], [out], name=f"{name}_Q4G_add"),
    ]


def _block_sums(x: str, out: str, K: int, rank: int | None, graph: Any) -> list[Any]:
    """Nodes computing out = the sums of x's blocks of 32 along its last axis. Reshape + ReduceSum where
    x's rank is known (exact and cheap); else a MatMul with a 0/1 (K, K/32) matrix."""
    if rank is None:
        summer = f"block_sum_matrix_{K}"
        if not any(init.name == summer for init in graph.initializer):
            graph.initializer.append(
                numpy_helper.from_array(np.repeat(np.eye(K // BLOCK, dtype=np.float32), BLOCK, axis=0), summer)
            )
        return [helper.make_node("MatMul", [x, summer], [out], name=out)]
    shape, last = f"blocks_shape_{rank}_{K}", "blocks_last_axis"
    have = {init.name for init in graph.initializer}
    if shape not in have:  # 0 keeps a leading dimension as it is
        graph.initializer.append(numpy_helper.from_array(np.array([0] * (rank - 1) + [K // BLOCK, BLOCK]), shape))
    if last not in have:
        graph.initializer.append(numpy_helper.from_array(np.array([-1]), last))
    return [
        helper.make_node("Reshape", [x, shape], [f"{out}_blocks"], name=f"{out}_blocks"),
        helper.make_node("ReduceSum", [f"{out}_blocks", last], [out], name=out, keepdims=0),
    ]


def on_grid8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(u (N, K) uint8, d (N, K/32)) when the (K, N) weight is exactly d * (u - 128) per block of 32 inputs
    (a Q8_0 tensor: d = the block's largest magnitude / 127), else None."""
    K, N = weight.shape
    if K % BLOCK:
        return None
    blocks = weight.T.reshape(N, K // BLOCK, BLOCK).astype(np.float64)
    step = np.abs(blocks).max(-1) / 127.0
    step = np.where(step > 0, step, 1.0)
    levels = blocks / step[..., None]
    k = np.rint(levels)
    if np.abs(levels - k).max() > 1e-3:
        return None
    return (k + 128).reshape(N, K).astype(np.uint8), step.astype(np.float32)


def keep_grid8(model: onnx.ModelProto, name: str, accuracy_level: int | None) -> bool:
    """Replace the MatMul `name` with an exact 8-bit MatMulNBits when its constant weight is on a Q8_0
    grid (in place); False, and nothing changed, when it is not."""
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    for index, node in enumerate(graph.node):
        if node.name != name or node.op_type != "MatMul" or node.input[1] not in weights:
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        found = on_grid8(weight) if weight.ndim == 2 else None
        if found is None:
            return False
        u, d = found
        K, N = weight.shape
        graph.initializer.extend(
            [
                numpy_helper.from_array(u.reshape(N, K // BLOCK, BLOCK), f"{name}_Q8G"),
                numpy_helper.from_array(d.reshape(-1), f"{name}_Q8G_scales"),
            ]
        )
        attrs = {"K": K, "N": N, "bits": 8, "block_size": BLOCK}
        if accuracy_level is not None:
            attrs["accuracy_level"] = accuracy_level
        graph.node.remove(node)
        graph.node.insert(
            index,
            helper.make_node(
                "MatMulNBits",
                [node.input[0], f"{name}_Q8G", f"{name}_Q8G_scales"],
                list(node.output),
                name=f"{name}_Q8G",
                domain="com.microsoft",
                **attrs,
            ),
        )
        if not any(node.input[1] in other.input for other in graph.node):
            graph.initializer.remove(weights[node.input[1]])
        _use_contrib_ops(model)
        return True
    return False


def _use_contrib_ops(model: onnx.ModelProto) -> None:
    """MatMulNBits lives in ONNX Runtime's com.microsoft domain: the model must import it."""
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
