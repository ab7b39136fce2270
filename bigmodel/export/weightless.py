"""An ONNX graph traced without its weights, whose weights are then written one tensor at a time.

Tracing a 7B model with real weights holds them (and the exporter's constant folding makes copies); here
the model is built on the meta device, so `torch.onnx.export` sees only shapes. The traced weights become
graph inputs while ONNX's optimizer cleans the graph (it cannot fold what has no value), then each is a
*virtual* initializer: a name, a shape and a recipe that makes its array from the checkpoint when it is
written. Rewrites act on recipes, not data:

- `Transpose(W)` (how a Linear is traced) becomes an initializer made as W's transpose;
- products of one input with several weights (a SwiGLU MLP's gate and up) become one MatMul over the
  weights side by side, then a Split: one larger kernel call per decode step instead of several;
- `quantize` turns MatMul into MatMulNBits and Gather into GatherBlockQuantized, each matrix quantised by
  onnxruntime.quantization's own block quantizer (its C++ kernel, the one MatMulNBitsQuantizer calls)
  when it is written -- no fp32 model, no fp32 file in between.

`write` then makes each initializer in turn, appends its bytes to the external-data file (page-aligned:
ONNX Runtime can map them) and records where they are: the process holds one tensor at a time.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper

from bigmodel.export.onnx_file import dynamo_program, quiet_export, value_rank
from bigmodel.io import FULL, disk_full

ALIGN = 4096
TRANSPOSE_BAND = 128  # checkpoint rows transposed at a time into a quantizer's input (fits in cache)
GATHER = "@gather"  # GraphWeights.layout: a matrix's blocks as an embedding table reads them
Read = Callable[[str], torch.Tensor]  # a traced weight (the graph's float type), by its graph name
Array = np.ndarray | torch.Tensor  # a recipe's result; transposes stay views until written


@dataclass
class Group:
    """Initializers made together: one weight, or a quantised matrix's blocks and scales."""

    names: list[str]
    make: Callable[[], list[Array]]
    # Further initializers over the same bytes as one of `names` (a tied embedding reading the head's
    # quantised blocks): alias -> (name, dims, ONNX element type).
    aliases: dict[str, tuple[str, list[int], int]] = field(default_factory=dict)


def trace(
    module: torch.nn.Module,
    example_inputs: tuple[Any, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: Any,
    opset: int,
) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """The optimised ONNX graph of `module` (parameters on the meta device) and its weights' names and
    shapes; the weights are not in the graph (neither inputs nor initializers) until `GraphWeights`
    places them."""
    import onnx_ir as ir
    from onnxscript._framework_apis.torch_2_8 import optimize

    with quiet_export():
        program = dynamo_program(
            module, example_inputs, input_names, output_names, dynamic_shapes, opset, optimize=False
        )
    model = program.model
    graph = model.graph
    weights = {}
    for name, value in list(graph.initializers.items()):
        raw = getattr(value.const_value, "raw", None)
        if isinstance(raw, torch.Tensor) and raw.is_meta:  # a parameter: no value to fold
            weights[name] = list(raw.shape)
            del graph.initializers[name]
            value.const_value = None
            graph.inputs.append(value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimize(model)
    proto = ir.serde.serialize_model(model)
    kept = [value for value in proto.graph.input if value.name not in weights]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    for node in proto.graph.node:  # keep the module each node belongs to; drop the exporter's stack traces
        scopes = [p for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"]
        del node.metadata_props[:]
        node.metadata_props.extend(scopes)
    return proto, weights


class GraphWeights:
    """A weightless graph's initializers as recipes over the checkpoint (see the module docstring)."""

    def __init__(
        self, model: onnx.ModelProto, weights: dict[str, list[int]], read: Read, dtype: torch.dtype = torch.float32
    ) -> None:
        """`read` gives a weight in the checkpoint's dtype; what is written is `dtype` (the graph's)."""
        self.model, self.graph, self.dtype = model, model.graph, dtype
        self.groups: dict[str, Group] = {}  # what will be written: first initializer's name -> its group
        # Every float weight ever named, kept when a rewrite drops it: later recipes are made from earlier ones
        self.recipes: dict[str, Callable[[], torch.Tensor]] = {}
        self.dims: dict[str, list[int]] = {}
        self.transposed_from: dict[str, str] = {}
        # A (K, N) matrix's N columns as the checkpoint rows they are: [(weight name, rows), ...] side by side
        self.columns: dict[str, list[tuple[str, int]]] = {}
        # Each quantised checkpoint matrix: where its blocks are (what the gate reads back)
        self.layout: dict[str, dict[str, Any]] = {}
        for name, dims in weights.items():
            self._add(name, dims, functools.partial(read, name))

    def _add(self, name: str, dims: list[int], make: Callable[[], torch.Tensor]) -> None:
        self.recipes[name] = make
        self.groups[name] = Group([name], lambda: [make()])
        self.dims[name] = list(dims)

    def _array(self, name: str) -> torch.Tensor:
        return self.recipes[name]()

    def _transposed(self, name: str) -> torch.Tensor:
        return self._array(name).t()

    def _side_by_side(self, parts: list[str]) -> torch.Tensor:
        """Matrices side by side along axis 1 = their transposes stacked along axis 0 (a fast copy when the
        parts are transposed views of the checkpoint's rows, as they are)."""
        return torch.cat([self._array(part).t() for part in parts]).t()

    def _float_matrix(self, weight: str) -> np.ndarray:
        """A (K, N) weight as the block quantizer reads it: row-major fp32 (the kernel reads its input as
        row-major whatever its strides, so a transposed view must be copied). A weight whose N columns are
        checkpoint rows (a transposed Linear, merged ones side by side, a table's transpose) is filled from
        those rows a band at a time: each band's transpose stays in cache, ~1.6-2x faster than transposing
        whole matrices and, for merged ones, no concatenated copy in between."""
        K, N = self.dims[weight]
        columns = self.columns.get(weight, [])
        if sum(rows for _, rows in columns) != N:
            return made(self._array(weight), torch.float32)
        out = torch.empty(K, N, dtype=torch.float32)
        first = 0
        for source, rows in columns:
            matrix = self._array(source)  # (rows, K): the checkpoint's rows
            if tuple(matrix.shape) != (rows, K):
                return made(self._array(weight), torch.float32)
            for start in range(0, rows, TRANSPOSE_BAND):
                band = matrix[start : start + TRANSPOSE_BAND]
                out[:, first + start : first + start + len(band)].copy_(band.t())
            first += rows
        return out.numpy()

    def _uses(self) -> dict[str, list[onnx.NodeProto]]:
        uses: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                uses.setdefault(name, []).append(node)
        return uses

    def fold_transposes(self) -> int:
        """Transpose(W) of a 2-D weight becomes an initializer `W.T` made transposed; returns how many."""
        kept, renamed = [], {}
        for node in self.graph.node:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
            source = node.input[0] if node.op_type == "Transpose" and node.input else None
            if source in self.groups and len(self.dims[source]) == 2 and perm == [1, 0]:
                name = renamed[node.output[0]] = f"{source}.T"
                self._add(name, self.dims[source][::-1], functools.partial(self._transposed, source))
                self.transposed_from[name] = source
                self.columns[name] = [(source, self.dims[source][0])]
            else:
                kept.append(node)
        for node in kept:
            node.input[:] = [renamed.get(name, name) for name in node.input]
        self._replace_nodes(kept)
        self._drop_unused()
        return len(renamed)

    def gather_from_transposed(self) -> int:
        """A table both looked up (Gather, the token embedding) and transposed (the tied output head) is
        stored once, transposed: the lookup reads its columns (Gather on axis 1) and moves the embedding axis
        last (a Transpose of the few rows looked up). Without this a float file holds a tied vocabulary-sized
        table twice (+21% for SmolLM2-135M). Returns how many lookups were rewritten."""
        transposed = {source: name for name, source in self.transposed_from.items()}
        nodes, rewritten = [], 0
        for node in self.graph.node:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            table = transposed.get(node.input[0]) if node.op_type == "Gather" and axis == 0 else None
            rank = value_rank(self.graph, node.input[1]) if table is not None else None
            if table is None or rank is None:
                nodes.append(node)
                continue
            columns = f"{node.output[0]}_columns"
            nodes.append(
                helper.make_node("Gather", [table, node.input[1]], [columns], name=f"{node.name}_columns", axis=1)
            )
            nodes.append(
                helper.make_node(
                    "Transpose", [columns], list(node.output), name=f"{node.name}_rows", perm=[*range(1, rank + 1), 0]
                )
            )
            rewritten += 1
        self._replace_nodes(nodes)
        self._drop_unused()
        return rewritten

    def merge_shared_input_matmuls(self) -> int:
        """Products of one input with several constant weights (a SwiGLU MLP's gate and up) become one
        MatMul over the weights side by side, then a Split: one larger kernel call instead of several small
        ones, which is what a decode step of batch 1 pays for (and int4 then quantises one matrix, not
        two). Returns how many MatMuls were merged away."""
        uses = self._uses()
        groups: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            weight = node.input[1] if node.op_type == "MatMul" else None
            if weight in self.groups and len(self.dims[weight]) == 2 and len(uses[weight]) == 1:
                groups.setdefault(node.input[0], []).append(node)
        merged = {id(node): group for group in groups.values() if len(group) > 1 for node in group}
        if not merged:
            return 0
        nodes, done = [], set()
        for node in self.graph.node:
            group = merged.get(id(node))
            if group is None:
                nodes.append(node)
                continue
            if id(group[0]) in done:  # the group is placed at its first member
                continue
            done.add(id(group[0]))
            parts = [member.input[1] for member in group]
            widths = [self.dims[part][1] for part in parts]
            name = f"{group[0].name or group[0].output[0]}_merged"
            self.columns[f"{name}.weight"] = [column for part in parts for column in self.columns.get(part, [])]
            self._add(
                f"{name}.weight", [self.dims[parts[0]][0], sum(widths)], functools.partial(self._side_by_side, parts)
            )
            split = np.array(widths, dtype=np.int64)
            self.graph.initializer.append(onnx.numpy_helper.from_array(split, f"{name}.split"))
            nodes.append(helper.make_node("MatMul", [group[0].input[0], f"{name}.weight"], [f"{name}_out"], name=name))
            nodes.append(
                helper.make_node(
                    "Split",
                    [f"{name}_out", f"{name}.split"],
                    [out for member in group for out in member.output],
                    name=f"{name}_split",
                    axis=-1,
                )
            )
        self._replace_nodes(nodes)
        self._drop_unused()
        return sum(len(group) - 1 for group in groups.values() if len(group) > 1)

    def quantize(
        self,
        bits: int,
        block_sizes: dict[int, int],
        accuracy_level: int | None,
        head: str | None,
        head_bits: int | None,
        embedding_bits: int | None,
    ) -> dict[str, int]:
        """Weight-only block quantisation (symmetric: no zero points) of every MatMul with a 2-D weight, in
        `bits` (the MatMul named `head` in `head_bits`; None keeps it float), and of every Gather of a weight
        (the token embedding) in `embedding_bits` (None: float), in blocks of `block_sizes[bits]`. A Gather of
        the very matrix the head quantises in the same bits reads the head's blocks (a tied embedding is
        stored once). Returns how many matrices went to each form."""
        counts = {"matmul": 0, "gather": 0, "shared": 0, "float": 0}
        quantized: dict[tuple[str, int], tuple[str, str]] = {}  # (float weight, bits) -> (blocks, scales)
        kept: list[onnx.NodeProto] = []
        gathers = []
        for node in self.graph.node:
            weight = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else None
            if weight not in self.groups or len(self.dims[weight]) != 2:
                kept.append(node)
                if node.op_type == "Gather" and node.input[0] in self.groups:
                    gathers.append(node)
                continue
            width = head_bits if node.name == head else bits
            if width is None:
                kept.append(node)
                continue
            K, N = self.dims[weight]
            blocks, scales = self._quantized(weight, width, block_sizes[width], quantized)
            attrs: dict[str, Any] = {"K": K, "N": N, "bits": width, "block_size": block_sizes[width]}
            if accuracy_level:
                attrs["accuracy_level"] = accuracy_level
            kept.append(
                helper.make_node(
                    "MatMulNBits",
                    [node.input[0], blocks, scales],
                    list(node.output),
                    name=f"{node.name or node.output[0]}_Q{width}",
                    domain="com.microsoft",
                    **attrs,
                )
            )
            counts["matmul"] += 1
        if embedding_bits is not None:
            for node in gathers:
                counts[self._gather_quantized(node, embedding_bits, block_sizes[embedding_bits], quantized, kept)] += 1
        self._replace_nodes(kept)
        self._drop_unused()
        if not any(opset.domain == "com.microsoft" for opset in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return counts

    def quantize_experts(
        self,
        bits: int,
        block_size: int,
        accuracy_level: int | None,
        rows: dict[str, tuple[int, list[list[str]]]],
    ) -> int:
        """Each com.microsoft MoE node (a routed mixture, float experts) -> QMoE over `bits`-bit blocks of
        `block_size` (symmetric, as MatMulNBits'), each expert matrix quantised by the same block quantizer
        when it is written. `rows` says which checkpoint matrices each stacked weight's rows are (stacked
        name -> (row step, per expert the matrices interleaved)): the gate reads them back. Returns how many."""
        nodes, count = [], 0
        for node in self.graph.node:
            if node.op_type != "MoE" or node.domain != "com.microsoft":
                nodes.append(node)
                continue
            fc1, fc1_scales = self._quantized_experts(node.input[2], bits, block_size, rows)
            fc2, fc2_scales = self._quantized_experts(node.input[4], bits, block_size, rows)
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            attrs.update(expert_weight_bits=bits, block_size=block_size)
            if accuracy_level:
                attrs["accuracy_level"] = accuracy_level
            inputs = [node.input[0], node.input[1], fc1, fc1_scales, "", fc2, fc2_scales]
            nodes.append(
                helper.make_node(
                    "QMoE", inputs, list(node.output), name=f"{node.name}_Q{bits}", domain="com.microsoft", **attrs
                )
            )
            count += 1
        self._replace_nodes(nodes)
        self._drop_unused()
        return count

    def _quantized_experts(
        self, weight: str, bits: int, block_size: int, rows: dict[str, tuple[int, list[list[str]]]]
    ) -> tuple[str, str]:
        """The (E, N, K) stacked experts as QMoE's (E, N, K bits/8) levels and (E, N, K/block) scales."""
        experts, n, k = self.dims[weight]
        quantizer = block_quantizer(bits, block_size)
        blocks, scales = f"{weight}_Q{bits}", f"{weight}_scales"

        def make() -> list[Array]:
            levels, steps = [], []
            for matrix in self._array(weight):  # (N, K): the quantizer takes its (K, N) transpose
                packed, scale, _ = quantizer.qbits_block_quant(made(matrix.t(), torch.float32))
                levels.append(packed.reshape(n, -1))
                steps.append(scale.reshape(n, -1))
            return [np.stack(levels), np.stack(steps)]

        self.groups[blocks] = Group([blocks, scales], make)
        self.dims[blocks], self.dims[scales] = [experts, n, k * bits // 8], [experts, n, k // block_size]
        step, sources = rows[weight]
        for expert, matrices in enumerate(sources):
            for first, source in enumerate(matrices):
                self.layout[source] = {
                    "blocks": blocks,
                    "scales": scales,
                    "bits": bits,
                    "block_size": block_size,
                    "expert": expert,
                    "first_row": first,
                    "row_step": step,
                    "rows": n // step,
                    "K": k,
                }
        return blocks, scales

    def _quantized(
        self, weight: str, bits: int, block_size: int, quantized: dict[tuple[str, int], tuple[str, str]], role: str = ""
    ) -> tuple[str, str]:
        """The (blocks, scales) initializers of a (K, N) weight in MatMulNBits' layout: (N, K/block, block
        bytes) and (N, K/block)."""
        key = (self.transposed_from.get(weight, weight), bits)
        if key in quantized:
            return quantized[key]
        quantizer = block_quantizer(bits, block_size)
        blocks, scales = f"{weight}_Q{bits}", f"{weight}_scales"
        if scales in self.dims:  # the matrix in other bits too (a tied table: the head and the lookup differ)
            scales = f"{weight}_Q{bits}_scales"
        K, N = self.dims[weight]

        def make(weight: str = weight) -> list[Array]:
            packed, scale, _ = quantizer.qbits_block_quant(self._float_matrix(weight))
            return [packed, scale]

        self.groups[blocks] = Group([blocks, scales], make)
        first = 0
        for source, rows in self.columns.get(weight, []):
            self.layout[source + role] = {
                "blocks": blocks,
                "scales": scales,
                "bits": bits,
                "block_size": block_size,
                "first_row": first,
                "rows": rows,
                "K": K,
            }
            first += rows
        k_blocks = -(-K // block_size)
        self.dims[blocks], self.dims[scales] = [N, k_blocks, block_size * bits // 8], [N, k_blocks]
        quantized[key] = (blocks, scales)
        return blocks, scales

    def _gather_quantized(
        self,
        node: onnx.NodeProto,
        bits: int,
        block_size: int,
        quantized: dict[tuple[str, int], tuple[str, str]],
        kept: list[onnx.NodeProto],
    ) -> str:
        """Gather(W, ids) -> GatherBlockQuantized over W's rows in blocks of `block_size` (uint8 data, the
        zero point implied as MatMulNBits' symmetric one). Returns "shared" when it reads a head's blocks,
        "gather" when quantised on its own, "float" when W's rows are not whole blocks (left as it is)."""
        weight = node.input[0]
        V, C = self.dims[weight]
        if C % block_size:  # whole blocks only: the rows' bytes must be exactly the blocks'
            return "float"
        key = (weight, bits)
        shared = key in quantized
        if shared:  # the head's (V, C/block, block bytes) blocks, seen as (V, C bytes)
            blocks, scales = quantized[key]
            self.layout[weight + GATHER] = dict(self.layout[weight])
        else:  # quantise W as the head would be: its transpose is the (K, N) = (C, V) matrix
            transposed = f"{weight}.T"
            self._add(transposed, [C, V], lambda: self._array(weight).t())
            self.transposed_from[transposed] = weight
            self.columns[transposed] = [(weight, V)]
            blocks, scales = self._quantized(transposed, bits, block_size, quantized, GATHER)
        data = f"{blocks}_rows"
        self.groups[blocks].aliases[data] = (blocks, [V, C * bits // 8], onnx.TensorProto.UINT8)
        self.layout[weight + GATHER] = {**self.layout[weight + GATHER], "blocks": data}  # what the file declares
        gather = helper.make_node(
            "GatherBlockQuantized",
            [data, node.input[1], scales],
            list(node.output),
            name=f"{node.name or node.output[0]}_Q{bits}",
            domain="com.microsoft",
            bits=bits,
            block_size=block_size,
            gather_axis=0,
            quantize_axis=1,
        )
        kept[kept.index(node)] = gather
        return "shared" if shared else "gather"

    def _replace_nodes(self, nodes: list[onnx.NodeProto]) -> None:
        del self.graph.node[:]
        self.graph.node.extend(nodes)

    def _drop_unused(self) -> None:
        """Forget weights no node reads any more (a transposed-away original, a merged part); a group that
        one of its aliases reads stays."""
        used = {name for node in self.graph.node for name in node.input}
        for name in list(self.groups):
            group = self.groups[name]
            if not (used & ({*group.names, *group.aliases})):
                del self.groups[name]

    def write(self, path: Path) -> int:
        """Make every initializer, in graph order, into `path.data` beside `path` and save the graph at
        `path`; returns the bytes of weights written."""
        data_path = path.with_name(f"{path.name}.data")
        order = {name: i for i, node in enumerate(self.graph.node) for name in node.input}
        used = set(order)
        groups = sorted(
            self.groups.values(), key=lambda g: min(order.get(n, len(order)) for n in [*g.names, *g.aliases])
        )
        tensors, total = [], 0
        try:
            with open(data_path, "wb") as out:
                for group in groups:
                    arrays = group.make()
                    placed = {}
                    for name, array in zip(group.names, arrays):
                        array = (
                            made(array, self.dtype) if isinstance(array, torch.Tensor) else np.ascontiguousarray(array)
                        )
                        out.seek(-out.tell() % ALIGN, 1)
                        offset = out.tell()
                        out.write(array.reshape(-1).view(np.uint8).data)
                        placed[name] = (offset, array.nbytes)
                        total += array.nbytes
                        if name in used:  # (blocks only an alias reads are written, not declared twice)
                            tensors.append(
                                _external(
                                    name,
                                    list(array.shape),
                                    helper.np_dtype_to_tensor_dtype(array.dtype),
                                    data_path.name,
                                    offset,
                                    array.nbytes,
                                )
                            )
                    for alias, (name, dims, elem_type) in group.aliases.items():
                        tensors.append(_external(alias, dims, elem_type, data_path.name, *placed[name]))
                    del arrays
        except OSError as exc:
            if exc.errno in FULL:
                raise disk_full(data_path) from exc
            raise
        self.graph.initializer.extend(tensors)
        onnx.save(self.model, str(path))
        return total


class Initializers:
    """A saved ONNX model's initializers, read one at a time: external data by its offset and length (no
    memory map), inline data from the proto."""

    def __init__(self, path: Path) -> None:
        self.folder = path.parent
        self.tensors = {t.name: t for t in onnx.load(str(path), load_external_data=False).graph.initializer}

    def read(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        tensor = self.tensors[name]
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor)
        info = {entry.key: entry.value for entry in tensor.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        with open(self.folder / info["location"], "rb", buffering=0) as handle:
            handle.seek(int(info.get("offset", 0)))
            data = handle.read(int(info["length"]))
        return np.frombuffer(data, dtype=dtype).reshape(tuple(tensor.dims))


def made(weight: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A recipe's tensor (often a transposed view of a checkpoint's bf16 rows) as a row-major array of
    `dtype`: transposed in the source dtype first, then converted -- 4x faster than converting to fp32 and
    transposing that (half the bytes to shuffle, and a plain conversion is a fast kernel)."""
    return weight.contiguous().to(dtype).numpy()


def int8_block(width: int, configured: int | None) -> int:
    """Weights per block of an 8-bit matrix: as configured, else the widest power of 2 up to 256 dividing
    the matrix's inner `width` (whole blocks, so a tied table's rows are its blocks). 8 bits in blocks of
    256 still round ~10x closer than 4 bits in blocks of 32, and ONNX Runtime reads the wider blocks ~1.5x
    faster: the head is the largest matrix a decode step reads (docs/big-models.md)."""
    if configured:
        return configured
    return next(size for size in (256, 128, 64, 32, 16) if width % size == 0 or size == 16)


def block_quantizer(bits: int, block_size: int) -> Any:
    """onnxruntime.quantization's weight-only block quantizer (symmetric, round to nearest): the kernel
    MatMulNBitsQuantizer itself calls."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    return DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=bits))


def dequantize(blocks: np.ndarray, scales: np.ndarray, bits: int, block_size: int, k: int) -> torch.Tensor:
    """MatMulNBits' (N, K/block, block bytes) blocks and (N, K/block) scales as the (N, K) fp32 matrix they
    stand for: symmetric blocks, the zero point implied (8 for 4 bits, 128 for 8), two 4-bit values per
    byte with the low nibble first. Written into one output, scaled in place (the gate dequantises every
    matrix of the model)."""
    n = blocks.shape[0]
    levels = torch.from_numpy(np.array(blocks, copy=True)).reshape(n, -1)  # (a read-only buffer: copied)
    values = torch.empty(n, levels.shape[1], 8 // bits, dtype=torch.float32)
    if bits == 4:
        values[..., 0].copy_(levels & 0x0F)
        values[..., 1].copy_(levels >> 4)
    else:
        values[..., 0].copy_(levels)
    values = values.reshape(n, scales.shape[1], block_size)
    values.sub_(1 << (bits - 1)).mul_(torch.from_numpy(np.array(scales, dtype=np.float32)).reshape(n, -1, 1))
    return values.reshape(n, -1)[:, :k]


def _external(name: str, dims: list[int], elem_type: int, location: str, offset: int, length: int) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=name, dims=dims, data_type=elem_type, data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor
