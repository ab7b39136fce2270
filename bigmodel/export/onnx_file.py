"""Steps every export shares: trace with the dynamo exporter, stamp metadata, check, publish or reject.

The metadata (bigmodel/manifests.py: typed and versioned) is stamped into the .onnx file, so `infer`
reads everything it needs from that one file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import torch

from bigmodel import console
from bigmodel.errors import GateFailed
from bigmodel.io import atomic_path
from bigmodel.manifests import OnnxMetadata


def export_dynamo(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: Any,
    opset: int,
) -> None:
    """The ONNX file of `module`, traced and optimised by torch.onnx.export(dynamo=True)."""
    with quiet_export():
        dynamo_program(module, example_inputs, input_names, output_names, dynamic_shapes, opset).save(str(path))


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """torch.onnx's chatter kept off stdout (which --json owns): its logs and warnings silenced, its prints
    sent to stderr."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with console.stdout_to_stderr(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def dynamo_program(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: Any,
    opset: int,
    optimize: bool = True,
) -> Any:
    """torch.onnx.export(dynamo=True)'s program (call it inside `quiet_export`)."""
    program = torch.onnx.export(
        module,
        example_inputs,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic_shapes,
        opset_version=opset,
        dynamo=True,
        optimize=optimize,
        verbose=False,
    )
    assert program is not None  # (dynamo=True always returns the program)
    return program


def stamp_and_check(path: Path, metadata: OnnxMetadata, external_data: bool = False) -> None:
    """Write `bigmodel.*` metadata into the file and run the full ONNX checker on it.

    With external_data the weights go to `<name>.data` beside the model (needed past protobuf's 2 GB
    limit); the checker then reads the model from its path.
    """
    model = onnx.load(str(path))
    stamp(model, metadata)
    for node in model.graph.node:  # the exporter notes each node's Python stack trace: this machine's paths,
        del node.metadata_props[:]  # and most of a small model's file
    for stale in path.parent.glob(f"{path.name}.data"):
        stale.unlink()
    if external_data:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{path.name}.data"
        )
    else:
        onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def stamp(model: onnx.ModelProto, metadata: OnnxMetadata | None) -> None:
    """Replace the model's metadata with the `bigmodel.*` entries of `metadata` (none: no entries)."""
    del model.metadata_props[:]
    for key, value in (metadata.entries() if metadata is not None else {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "bigmodel"


def value_rank(graph: onnx.GraphProto, name: str) -> int | None:
    """The rank of a value as the graph's shape information records it (None: not recorded)."""
    for info in [*graph.input, *graph.value_info]:
        if info.name == name and info.type.tensor_type.HasField("shape"):
            return len(info.type.tensor_type.shape.dim)
    return None


def output_head(model: onnx.ModelProto) -> str | None:
    """The name of the MatMul that computes a decoder's logits (the graph output, perhaps through a bias
    Add, a Reshape or a soft cap's Div, Tanh and Mul); None for graphs without one (tabular models)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get("logits")
    while node is not None and node.op_type != "MatMul":
        if node.op_type not in ("Add", "Identity", "Reshape", "Div", "Tanh", "Mul"):
            return None
        computed = [producers[name] for name in node.input if name in producers]  # (not constants)
        computed = [source for source in computed if source.op_type != "Constant"]
        node = computed[0] if len(computed) == 1 else None
    return node.name if node is not None else None


def optimize_offline(model: Path, out: Path) -> Path:
    """Save ONNX Runtime's offline-optimised graph (extended level: fusions that stay portable across
    CPUs, unlike the layout optimisations of level 'all')."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with atomic_path(out) as tmp:
        options.optimized_model_filepath = str(tmp)
        ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return out


def publish_or_reject(tmp: Path, final: Path, passed: bool, failure: str) -> None:
    """Rename the checked model into place, or keep it aside as *.rejected.onnx and fail (exit 1)."""
    data, final_data = tmp.with_name(f"{tmp.name}.data"), final.with_name(f"{final.name}.data")
    if passed:
        if data.exists():  # the weights first: the model must never point at missing data
            os.replace(data, final_data)
        else:
            final_data.unlink(missing_ok=True)
        os.replace(tmp, final)
        return
    rejected = final.with_suffix(".rejected.onnx")
    if data.exists():
        data.unlink()  # the rejected copy is for reading its graph; its weights are not kept
    os.replace(tmp, rejected)
    final.unlink(missing_ok=True)  # an older model must not pass for this checkpoint's export
    raise GateFailed(f"{failure}; the model was not published (kept for debugging as {rejected})")
