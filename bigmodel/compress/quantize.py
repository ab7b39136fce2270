"""int8 and int4 quantisation of an exported ONNX graph with onnxruntime.quantization.

int4 is weight-only and block-wise: MatMulNBitsQuantizer (it replaced MatMul4BitsQuantizer) turns each
matrix product with a constant weight into a MatMulNBits node holding 4-bit blocks and their scales.

quant_pre_process (shape inference and graph clean-up) runs first, as ONNX Runtime recommends. Dynamic
mode stores int8 weights and quantises activations on the fly; static mode also quantises activations,
with ranges calibrated on batches of the prepared training data (MinMax, entropy or percentile), in
the QDQ format. torch.ao.quantization is not used: it is deprecated and its models cannot be exported.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.registry import IntegerOpsRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process

from bigmodel import console
from bigmodel.compress import Artifact, grids
from bigmodel.config import Config, Int4Export, QuantizeStep
from bigmodel.export.onnx_file import output_head
from bigmodel.export.weightless import int8_block
from bigmodel.families import family
from bigmodel.io import atomic_path, clone

# The quantizer and its symbolic shape inference know ops by type alone, and take the standard ONNX Attention
# (opset 23; decoders export their attention as one) for ONNX Runtime's contrib op of the same name, whose
# inputs differ. The attention's inputs are activations, which dynamic quantisation leaves alone anyway.
DYNAMIC_OP_TYPES = sorted(set(IntegerOpsRegistry) - {"Attention"})

CALIBRATION = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


def label(step: QuantizeStep, number: int) -> str:
    if step.bits == 8:
        return f"{number}: quantize {step.mode}"
    return (
        f"{number}: quantize int4 block {step.block_size}"
        + (f" head {step.head}" if step.head != "int8" else "")
        + (" +emb" if step.embeddings else "")
    )


def apply(step: QuantizeStep, config: Config, current: Artifact, folder: Path, number: int) -> Artifact:
    """The compress step: compress/model.int{4,8}.onnx, written from the checkpoint as `export.dtype: int4`
    writes it when that streams (`streams`), else quantised from the current ONNX file."""
    target = folder / f"model.int{step.bits}.onnx"
    if streams(step, config, current.checkpoint):
        return Artifact(current.checkpoint, run_streamed(step, config, current.checkpoint, target))
    return Artifact(current.checkpoint, run(step, config, current.model, target))


def run(step: QuantizeStep, config: Config, fp32: Path, out: Path) -> Path:
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)  # it warns of every node it skips
    with tempfile.TemporaryDirectory(dir=out.parent) as work, console.stdout_to_stderr():
        pre = Path(work) / "model.pre.onnx"
        external = fp32.with_name(f"{fp32.name}.data").exists()  # (then so are its intermediate copies)
        quant_pre_process(
            str(fp32),
            str(pre),
            skip_symbolic_shape=_has_standard_attention(fp32),
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            external_data_location=f"{pre.name}.data",
        )
        with atomic_path(out) as tmp:
            if step.bits == 4:
                _int4(pre, tmp, step)
            elif step.mode == "dynamic":
                quantize_dynamic(
                    str(pre),
                    str(tmp),
                    weight_type=QuantType.QInt8,
                    per_channel=step.per_channel,
                    op_types_to_quantize=DYNAMIC_OP_TYPES,
                )
            else:
                quantize_static(
                    str(pre),
                    str(tmp),
                    _calibration_reader(step, config, fp32),
                    quant_format=QuantFormat.QDQ,
                    per_channel=step.per_channel,
                    weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8,
                    calibrate_method=CALIBRATION[step.calibration],
                    # Only the inputs of matrix products: the attention graph masks scores with -inf,
                    # and an activation range that includes -inf quantises everything to garbage.
                    op_types_to_quantize=["MatMul", "Gemm"],
                    extra_options={"CalibMovingAverage": True} if step.calibration == "minmax" else {},
                )
    _copy_metadata(fp32, out)
    return out


def _has_standard_attention(model: Path) -> bool:
    """Whether the graph has an ONNX (not com.microsoft) Attention node, which ONNX Runtime's symbolic shape
    inference mistakes for its own (ONNX's shape inference, which quant_pre_process also runs, knows it)."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    return any(node.op_type == "Attention" and node.domain in ("", "ai.onnx") for node in graph.node)


def streams(step: QuantizeStep, config: Config, checkpoint: Path) -> bool:
    """Whether the int4 step is written straight from the checkpoint, as `export.dtype: int4` writes it
    (tensor by tensor, in the export's bounded memory, the same blocks: tests/test_big.py): a family whose
    exporter streams int4, symmetric blocks, and no 4-bit grid to keep (a Q4_0/Q4_1 GGUF import's)."""
    from bigmodel.checkpoint import read_manifest

    if step.bits != 4 or not step.symmetric or not family(config.model.family).streams_int4:
        return False
    imported = read_manifest(checkpoint).import_
    return not (step.keep_grids and imported is not None and imported.format == "gguf")


def export_settings(step: QuantizeStep) -> Int4Export:
    """The int4 step as export.int4 settings (compress's embeddings: 4-bit blocks or fp32)."""
    return Int4Export(
        block_size=step.block_size,
        accuracy_level=step.accuracy_level,
        head=step.head,
        embeddings="int4" if step.embeddings else "fp32",
        int8_block_size=step.int8_block_size,
    )


def run_streamed(step: QuantizeStep, config: Config, checkpoint: Path, out: Path) -> Path:
    """The int4 step through the gated streaming export, published as `out` (its gate report beside it);
    an export already made of the same checkpoint with the same settings (export/model.onnx, its gate
    passed) is reused: cloned, not quantised and gated again."""
    import shutil

    from bigmodel.export import export_checkpoint

    derived = config.derive("compress", export={"dtype": "int4", "int4": export_settings(step)})
    existing = config.stage_dir("export") / "model.onnx"
    if _same_export(existing, derived, checkpoint):
        console.info(f"compress: int4: reusing {existing} (the same checkpoint and settings, its gate passed)")
        _publish(existing, out, clone_it=True)
        return out
    work = out.with_name(f".{out.name}.work")
    shutil.rmtree(work, ignore_errors=True)  # (an interrupted run's)
    try:
        _publish(Path(export_checkpoint(derived, checkpoint, work, ["onnx"])["model"]), out, clone_it=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _same_export(path: Path, config: Config, checkpoint: Path) -> bool:
    import json

    from bigmodel.export.gpt import weight_format
    from bigmodel.infer.session import file_metadata
    from bigmodel.io import sha256_file
    from bigmodel.manifests import DecoderMetadata

    meta, report = file_metadata(path), path.with_name("parity.json")
    if meta is None or not report.is_file():
        return False
    try:
        passed = bool(json.loads(report.read_text()).get("passed"))
    except (OSError, ValueError):  # not a report to trust
        return False
    return (
        passed
        and isinstance(meta, DecoderMetadata)
        and meta.weights == weight_format("int4", config.export.int4, meta.architecture.n_embd)
        and meta.lineage.get("checkpoint") == sha256_file(checkpoint)
    )


def _publish(model: Path, target: Path, clone_it: bool) -> None:
    """`model` as `target`, its external data as `target`.data (the graph's references renamed to match)
    and its gate report as `target` .parity.json: cloned from a reused export (`clone_it`), else moved. Data
    first, the graph last: a reader never finds a graph without its data."""
    import os

    import onnx

    graph = onnx.load(str(model), load_external_data=False)
    pairs = [
        (model.with_name(f"{model.name}.data"), target.with_name(f"{target.name}.data")),
        (model.with_name("parity.json"), target.with_name(f"{target.stem}.parity.json")),
    ]
    for source, destination in pairs:
        if not source.exists():  # (a self-contained model: no data file of an earlier run stays beside it)
            destination.unlink(missing_ok=True)
            continue
        with atomic_path(destination) as tmp:
            tmp.unlink()
            if not clone_it:
                os.replace(source, tmp)
                continue
            clone(source, tmp)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = pairs[0][1].name
    with atomic_path(target) as tmp:
        onnx.save(graph, str(tmp))


def _int4(source: Path, target: Path, step: QuantizeStep) -> None:
    """Every matrix product with a constant weight in 4-bit blocks (weights already on a 4-bit grid keep
    theirs: compress/grids.py); the output head as step.head says (int8: 8-bit blocks, weight-only like
    the rest, or its own Q8_0 grid); the embedding table too with step.embeddings (its Gather blocks run
    along the embedding dimension)."""
    import onnx

    model = onnx.load(str(source))
    if step.embeddings:
        _gather_rows(model)
    head = output_head(model)
    exclude = {head} if head and step.head != "int4" else set()
    if step.keep_grids:
        kept, corrections = grids.keep_grids(model, step.accuracy_level, exclude)
        if kept:
            console.info(
                f"compress: int4: {kept} weight matrices already on a 4-bit grid (blocks of {grids.BLOCK}, "
                "as a Q4_0/Q4_1 GGUF's) keep it exactly"
            )
        exclude |= corrections
    model = _matmul_nbits(
        model,
        4,
        step,
        step.block_size,
        nodes_to_exclude=sorted(exclude),
        op_types_to_quantize=("MatMul", "Gather") if step.embeddings else ("MatMul",),
    )
    if head and step.head == "int8":
        if step.keep_grids and grids.keep_grid8(model, head, step.accuracy_level):
            console.info("compress: int4: the output head is on an 8-bit grid (a GGUF's Q8_0) and keeps it exactly")
        else:  # the head alone: the quantizer adds nodes_to_include to every MatMul it would quantise anyway
            others = [node.name for node in model.graph.node if node.op_type == "MatMul" and node.name != head]
            width = _inner_width(model, head)
            model = _matmul_nbits(
                model,
                8,
                step,
                int8_block(width, step.int8_block_size),
                nodes_to_include=[head],
                nodes_to_exclude=others,
            )
    onnx.save(model, str(target))


def _gather_rows(model: Any) -> None:
    """A float export stores a tied table once, transposed for the head, and looks tokens up along its
    columns (Gather on axis 1, then a Transpose: export/weightless.py). Block-quantising the lookup needs
    rows: give it the table untransposed (the head keeps its own)."""
    import onnx
    from onnx import numpy_helper

    weights = {init.name: init for init in model.graph.initializer}
    consumers = {name: node for node in model.graph.node for name in node.input}
    kept = []
    for node in model.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        rows = consumers.get(node.output[0]) if node.op_type == "Gather" else None
        if rows is not None and axis == 1 and node.input[0] in weights and rows.op_type == "Transpose":
            table = numpy_helper.to_array(weights[node.input[0]]).T
            model.graph.initializer.append(numpy_helper.from_array(table.copy(), f"{node.input[0]}.rows"))
            kept.append(
                onnx.helper.make_node(
                    "Gather", [f"{node.input[0]}.rows", node.input[1]], list(rows.output), name=node.name, axis=0
                )
            )
            rows.ClearField("output")  # the Transpose goes: the Gather now gives its rows directly
        elif node.op_type != "Transpose" or list(node.output):
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)


def _inner_width(model: Any, matmul: str) -> int:
    """K of a MatMul's (K, N) constant weight."""
    node = next(node for node in model.graph.node if node.name == matmul)
    return int(next(init.dims[0] for init in model.graph.initializer if init.name == node.input[1]))


def _matmul_nbits(model: Any, bits: int, step: QuantizeStep, block_size: int, **which: Any) -> Any:
    """onnxruntime's weight-only block quantizer (round to nearest) over the nodes `which` selects."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=step.symmetric,
        accuracy_level=step.accuracy_level,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
        **which,
    )
    quantizer.process()
    return quantizer.model.model


def _copy_metadata(source: Path, target: Path) -> None:
    """The quantizer drops metadata_props; infer needs them (tokenizer, labels...)."""
    import onnx

    model = onnx.load(str(target))
    del model.metadata_props[:]
    model.metadata_props.extend(onnx.load(str(source), load_external_data=False).metadata_props)
    with atomic_path(target) as tmp:
        onnx.save(model, str(tmp))


class _Batches(CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _calibration_reader(step: QuantizeStep, config: Config, model: Path) -> _Batches:
    """Training batches in the graph's own input format (the family's exporter knows it)."""
    rng = np.random.default_rng(config.seed)
    exporter = family(config.model.family).module("exporter")
    return _Batches(exporter.calibration_feeds(config, model, step.calibration_batches, rng))
