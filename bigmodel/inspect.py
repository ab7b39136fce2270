"""inspect: say what an artifact is (checkpoint, ONNX model, prepared data), without PyTorch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bigmodel.errors import UserError
from bigmodel.io import read_json


def run(path: Path) -> dict[str, Any]:
    if (path.is_dir() and (path / "config.json").is_file()) or path.suffix.lower() == ".gguf":
        return _pretrained(path)
    if path.is_dir():
        for candidate in ("manifest.json", "model.onnx", "best.safetensors", "model.safetensors"):
            if (path / candidate).exists():
                return run(path / candidate)
        raise UserError(f"{path}: no bigmodel artifact in this folder")
    if not path.is_file():
        raise UserError(f"not found: {path}")
    if path.suffix == ".onnx":
        return _onnx(path)
    if path.suffix == ".json":
        manifest = read_json(path, "manifest")
        shown = {"kind": manifest.get("kind", "json"), "path": str(path), **manifest}
        if manifest.get("kind") == "sft-data":
            shown["chat_template"] = manifest.get("chat_template") is not None
            shown["example"] = _first_example(path.parent)
        return shown
    return _checkpoint(path)


def _checkpoint(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
            shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}
    except Exception as exc:
        raise UserError(f"{path} is not a bigmodel checkpoint, ONNX model or manifest ({exc})") from exc
    if "bigmodel" not in meta:
        raise UserError(f"{path} is a safetensors file but not a bigmodel checkpoint (no manifest)")
    manifest = json.loads(meta["bigmodel"])
    params = sum(_numel(s) for k, s in shapes.items() if k.startswith("model.") and not _is_buffer(k))
    return {
        "kind": manifest.get("kind"),
        "path": str(path),
        "family": manifest.get("family"),
        "architecture": manifest.get("architecture"),
        "parameters": params,
        "step": manifest.get("step"),
        "metrics": manifest.get("metrics"),
        "lineage": manifest.get("lineage"),
        **({"import": manifest["import"]} if "import" in manifest else {}),
        "created": manifest.get("created"),
        "bigmodel_version": manifest.get("bigmodel_version"),
    }


def _first_example(folder: Path) -> str:
    """The first training example as the model sees it, trained tokens between [[ and ]]."""
    import numpy as np

    from bigmodel import sft
    from bigmodel import tokenizer as tokenizers
    from bigmodel.datasets import TOKENIZER_FILE, sft_files

    manifest = read_json(folder / "manifest.json", "manifest")
    files = sft_files(folder, "train")
    starts = np.fromfile(files["starts"], dtype=np.int64, count=2)
    ids = np.fromfile(files["tokens"], dtype=np.dtype(manifest["dtype"]), count=int(starts[1])).tolist()
    trained = np.fromfile(files["mask"], dtype=np.uint8, count=int(starts[1])).astype(bool).tolist()
    tok = tokenizers.load(folder / TOKENIZER_FILE)
    return sft.marked(sft.Example(ids, trained, ""), tok)


def _pretrained(path: Path) -> dict[str, Any]:
    """A Hugging Face folder or GGUF file as `init.from` would import it (headers only, no weights)."""
    from bigmodel import pretrained
    from bigmodel import tokenizer as tokenizers

    source = pretrained.describe(path)
    tok = tokenizers.from_json(source.tokenizer_json, f"{path} (tokenizer)")
    parameters = sum(_numel(list(shape)) for shape in source.shapes.values())
    return {
        "kind": f"pretrained ({source.format})",
        "path": str(path),
        "model_type": source.model_type,
        "architecture": source.arch.to_dict(),
        "parameters": parameters,
        "weights_dtype": source.dtype,
        "tensors": len(source.shapes),
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "special_tokens": source.special_tokens,
                      "chat_template": source.chat_template is not None},
        "notes": source.notes,
    }


def _onnx(path: Path) -> dict[str, Any]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise UserError(f"{path} is not a readable ONNX model ({exc})") from exc
    meta = {p.key.removeprefix("bigmodel."): _maybe_json(p.value) for p in model.metadata_props}
    if "tokenizer" in meta:  # the whole vocabulary (and BPE merges) is too long to show: summarise it
        from bigmodel import tokenizer

        tok = tokenizer.from_json(next(p.value for p in model.metadata_props if p.key == "bigmodel.tokenizer"))
        meta["tokenizer"] = {"kind": tok.kind, "vocab_size": tok.vocab_size}
    params = sum(_numel(list(t.dims)) for t in model.graph.initializer)
    return {
        "kind": "onnx",
        "path": str(path),
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "inputs": [_io(v) for v in model.graph.input],
        "outputs": [_io(v) for v in model.graph.output],
        "parameters": params,
        "size_bytes": path.stat().st_size,
        "metadata": meta,
    }


def _io(value: Any) -> dict[str, Any]:
    dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    return {"name": value.name, "shape": dims}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _is_buffer(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("feature_mean", "feature_std", "target_mean", "target_std")


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
