"""ONNX Runtime's fused residual norms written into a traced decoder graph (export.attention ort).

Each pre-norm block adds its attention's (or MLP's) output to the residual stream and normalises the sum
for what comes next: an Add, then RMSNorm as the exporter spells it (x / sqrt(mean(x^2) + eps) * w: Pow,
ReduceMean, Add, Sqrt, Div, Mul) or a LayerNormalization node. ONNX Runtime fuses the RMSNorm into one
node when it loads the file, but leaves the Add beside it; its com.microsoft
SkipSimplifiedLayerNormalization (SkipLayerNormalization) computes both and returns the sum too (the
residual the next block adds to), so a layer runs two nodes fewer. At batch 1 a decode step's nodes are
short and each costs a dispatch and a wait on the thread pool: 32 fewer nodes took 1-3% off a 1B Llama's
int4 step on 2 threads (docs/big-models.md); onnxruntime-genai's builder writes the same. Only the exact
fp32 patterns are fused (an fp16 norm's casts are left as they are). The parity gate checks the result
like any graph.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

# (op, which input continues the pattern upwards) from the norm's Div back to the sum it normalises
_RMS_CHAIN = (("Sqrt", 0), ("Add", 0), ("ReduceMean", 0), ("Pow", 0))


def fuse_skip_norms(graph: onnx.GraphProto) -> int:
    """Rewrite every Add whose sum is normalised, and its norm, into one node (its outputs: the normalised
    sum under the norm's name and the sum under the Add's); returns how many."""
    producer = {output: node for node in graph.node for output in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    constants = {init.name: init for init in graph.initializer}
    position = {id(node): i for i, node in enumerate(graph.node)}
    replaced: dict[int, onnx.NodeProto] = {}  # the pattern's last node -> the fused node, in its place
    dropped: set[int] = set()

    def in_order(total: onnx.NodeProto, last: onnx.NodeProto, pattern: list[onnx.NodeProto]) -> bool:
        """Whether the fused node can take `last`'s place: nothing outside the pattern reads the sum before
        it (its other inputs -- the weight, even one computed, as Gemma's 1 + w -- are made before it)."""
        inside = {id(node) for node in pattern}
        return all(
            position[id(reader)] > position[id(last)] or id(reader) in inside for reader in readers[total.output[0]]
        )

    for norm in (node for node in graph.node if node.op_type == "LayerNormalization"):
        total = producer.get(norm.input[0])
        attributes = {a.name: helper.get_attribute_value(a) for a in norm.attribute}
        if not _residual_sum(total, constants) or attributes.get("axis", -1) != -1 or len(norm.output) > 1:
            continue
        assert total is not None
        if not in_order(total, norm, [norm]):
            continue
        replaced[id(norm)] = helper.make_node(
            "SkipLayerNormalization",
            [total.input[0], total.input[1], *norm.input[1:]],  # (gamma, and beta where it has one)
            [norm.output[0], "", "", total.output[0]],
            domain="com.microsoft",
            name=f"{total.name}_skip_norm",
            epsilon=attributes.get("epsilon", 1e-5),
        )
        dropped.add(id(total))
    for div in (node for node in graph.node if node.op_type == "Div"):
        found = _rms_norm(div, producer, readers, constants)
        if found is None or not in_order(found[0], found[2], found[1]):
            continue
        total, pattern, mul, epsilon = found
        gamma = next(name for name in mul.input if name != div.output[0])
        replaced[id(mul)] = helper.make_node(
            "SkipSimplifiedLayerNormalization",
            [total.input[0], total.input[1], gamma],
            [mul.output[0], "", "", total.output[0]],
            domain="com.microsoft",
            name=f"{total.name}_skip_norm",
            epsilon=epsilon,
        )
        dropped |= {id(node) for node in pattern if node is not mul} | {id(total)}
    nodes = [replaced.get(id(node), node) for node in graph.node if id(node) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(replaced)


def _rms_norm(
    div: onnx.NodeProto,
    producer: dict[str, onnx.NodeProto],
    readers: dict[str, list[onnx.NodeProto]],
    constants: dict[str, onnx.TensorProto],
) -> tuple[onnx.NodeProto, list[onnx.NodeProto], onnx.NodeProto, float] | None:
    """For the Div of an RMSNorm of an Add's sum: that Add, the norm's nodes, its Mul by the weight and
    its epsilon; None for any other Div."""
    summed, root = div.input
    pattern, name = [div], root
    for op, upwards in _RMS_CHAIN:
        node = producer.get(name)
        if node is None or node.op_type != op:
            return None
        pattern.append(node)
        name = node.input[upwards]
    add_eps, power = pattern[2], pattern[4]
    if name != summed or not _is(constants, power.input[1], 2.0) or add_eps.input[1] not in constants:
        return None
    scaled = readers.get(div.output[0], [])
    total = producer.get(summed)
    if len(scaled) != 1 or scaled[0].op_type != "Mul" or total is None or not _residual_sum(total, constants):
        return None
    inner = [output for node in pattern for output in node.output if node is not div]
    if any(reader not in pattern for name in inner for reader in readers.get(name, [])):
        return None  # a value of the norm read elsewhere
    epsilon = float(numpy_helper.to_array(constants[add_eps.input[1]]))
    return total, [*pattern, scaled[0]], scaled[0], epsilon


def _residual_sum(node: onnx.NodeProto | None, constants: dict[str, onnx.TensorProto]) -> bool:
    """An Add of two computed values (not a bias: a constant)."""
    return node is not None and node.op_type == "Add" and not any(name in constants for name in node.input)


def _is(constants: dict[str, onnx.TensorProto], name: str, value: float) -> bool:
    return name in constants and float(numpy_helper.to_array(constants[name])) == value
