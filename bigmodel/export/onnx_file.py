"""Steps every export shares: trace with the dynamo exporter, stamp metadata, check, publish or reject.

Metadata keys are prefixed `bigmodel.`; values are strings (JSON for structured ones), so `infer` reads
everything it needs from the one .onnx file.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch

from bigmodel import console
from bigmodel.errors import GateFailed


def export_dynamo(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: Any,
    opset: int,
) -> None:
    """torch.onnx.export(dynamo=True) with its chatter kept off stdout (which --json owns)."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with console.stdout_to_stderr(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            example_inputs,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
        program.save(str(path))


def stamp_and_check(path: Path, metadata: dict[str, Any]) -> onnx.ModelProto:
    """Write `bigmodel.*` metadata into the file and run the full ONNX checker on it."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key = f"bigmodel.{key}"
        entry.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    model.producer_name = "bigmodel"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return model


def publish_or_reject(tmp: Path, final: Path, passed: bool, failure: str) -> None:
    """Rename the checked model into place, or keep it aside as *.rejected.onnx and fail (exit 1)."""
    if passed:
        os.replace(tmp, final)
        return
    rejected = final.with_suffix(".rejected.onnx")
    os.replace(tmp, rejected)
    final.unlink(missing_ok=True)  # an older model must not pass for this checkpoint's export
    raise GateFailed(f"{failure}; the model was not published (kept for debugging as {rejected})")
