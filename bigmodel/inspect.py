"""inspect: say what an artifact is (a run, checkpoint, ONNX model, prepared data, log, report, any file
the project writes), without PyTorch."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bigmodel.errors import UserError
from bigmodel.io import read_json
from bigmodel.manifests import (
    ONNX_PREFIX,
    DecoderMetadata,
    EncoderMetadata,
    read_checkpoint_manifest,
    read_onnx_metadata,
)


def run(path: Path) -> dict[str, Any]:
    if (path.is_dir() and (path / "config.json").is_file()) or path.suffix.lower() == ".gguf":
        return _pretrained(path)
    if path.is_dir():
        from bigmodel import runs

        if (path / runs.RECORD).is_file():
            return runs.describe(path)
        if (path / "adapter_config.json").is_file():
            return _peft(path)
        for pattern in STAGE_FOLDER_FILES:  # a stage's folder: the file that says what the stage made
            found = sorted(path.glob(pattern))
            if found:
                return run(found[0])
        raise UserError(f"{path}: no bigmodel artifact in this folder (give a run folder, a stage folder or a file)")
    if not path.is_file():
        raise UserError(f"not found: {path}")
    if path.suffix == ".onnx":
        return _onnx(path)
    if path.suffix == ".json":
        return _json_file(path)
    if path.suffix == ".safetensors":
        return _checkpoint(path)
    reader = FILE_KINDS.get(path.suffix.lower())
    if reader is None:
        raise UserError(
            f"{path}: not a file bigmodel writes (runs, checkpoints, .onnx, .json, .jsonl, .bin, .csv, "
            "config .yaml, GGUF, Hugging Face folders)"
        )
    return reader(path)


# What a stage's folder is shown by, first match first: prepare's manifest, export's and compress's models,
# train's best checkpoint, init's, eval's metrics, infer's output, report's page.
STAGE_FOLDER_FILES = (
    "manifest.json",
    "model.onnx",
    "report.json",
    "model.int*.onnx",
    "best.safetensors",
    "model.safetensors",
    "metrics*.json",
    "generations.jsonl",
    "predictions.*",
    "index.html",
)


def _peft(path: Path) -> dict[str, Any]:
    """A PEFT LoRA adapter folder (export.peft): its settings, base model and tensors."""
    settings = read_json(path / "adapter_config.json", "PEFT adapter config")
    weights = path / "adapter_model.safetensors"
    shown: dict[str, Any] = {"kind": "peft adapter", "path": str(path)}
    shown.update(
        {
            key: settings.get(key)
            for key in ("peft_type", "base_model_name_or_path", "r", "lora_alpha", "target_modules", "task_type")
        }
    )
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), "np") as handle:
            names = list(handle.keys())
            shown["tensors"] = len(names)
            shown["parameters"] = sum(math.prod(handle.get_slice(name).get_shape()) for name in names)
    return shown


def _page(path: Path) -> dict[str, Any]:
    """report's HTML page and the figures beside it."""
    return {
        "kind": "report page",
        "path": str(path),
        "bytes": path.stat().st_size,
        "figures": sorted(p.name for p in path.parent.glob("*.png")),
    }


def _json_file(path: Path) -> dict[str, Any]:
    manifest = read_json(path, "JSON file")
    if not isinstance(manifest, dict):
        return {"kind": "json", "path": str(path), "type": type(manifest).__name__}
    if path.name == "tokenizer.json" or ("model" in manifest and "added_tokens" in manifest):
        from bigmodel import tokenizer as tokenizers

        tok = tokenizers.load(path)
        return {"kind": "tokenizer", "path": str(path), "tokenizer": tok.kind, "vocab_size": tok.vocab_size}
    kind = manifest.get("kind") or JSON_KINDS.get(path.name, "json")
    shown = {"kind": kind, "path": str(path), **{k: v for k, v in manifest.items() if k != "kind"}}
    if manifest.get("kind") == "sft-data":
        shown["chat_template"] = manifest.get("chat_template") is not None
        shown["example"] = _first_example(path.parent)
    return shown


# What the stages' JSON files are, by name (manifests name their own kind).
JSON_KINDS = {
    "metrics.json": "eval metrics",
    "parity.json": "export parity report",
    "report.json": "compress report",
    ".stamp.json": "stage stamp (what the stage last ran with)",
}


def _log(path: Path) -> dict[str, Any]:
    """A metrics.jsonl training log, a generations file, or any JSON-lines file."""
    from bigmodel.io import jsonl_objects

    records = [record for _, record in jsonl_objects(path.read_text(encoding="utf-8").splitlines(), path)]
    fields = sorted({key for record in records for key in record})
    if "step" in fields:
        evals = [r for r in records if "val_loss" in r]
        best = min(evals, key=lambda r: r["val_loss"]) if evals else None
        return {
            "kind": "training log",
            "path": str(path),
            "records": len(records),
            "steps": [records[0]["step"], records[-1]["step"]] if records else [],
            "last_train_loss": next((r["train_loss"] for r in reversed(records) if "train_loss" in r), None),
            "best_val_loss": best["val_loss"] if best else None,
            "best_step": best["step"] if best else None,
            "fields": fields,
        }
    if "completion" in fields:
        return {
            "kind": "generations",
            "path": str(path),
            "records": len(records),
            "new_tokens": sum(int(r.get("new_tokens", 0)) for r in records),
        }
    return {"kind": "json lines", "path": str(path), "records": len(records), "fields": fields}


def _shard(path: Path) -> dict[str, Any]:
    """A prepared token shard (<split>.bin) or a fine-tuning mask / example-start file beside it."""
    import numpy as np

    manifest_path = path.parent / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{path}: a .bin file without the manifest.json of a prepare folder beside it")
    manifest = read_json(manifest_path, "prepared-data manifest")
    name = path.name.removesuffix(".bin")
    dtype: np.dtype[Any]
    if name.endswith(".mask"):
        kind, dtype = "loss mask (1 = trained token)", np.dtype(np.uint8)
    elif name.endswith(".starts"):
        kind, dtype = "example offsets", np.dtype(np.int64)
    else:
        kind, dtype = "token shard", np.dtype(manifest.get("dtype", "uint16"))
    return {
        "kind": kind,
        "path": str(path),
        "split": name.split(".")[0],
        "dtype": dtype.name,
        "count": path.stat().st_size // dtype.itemsize,
        "vocab_size": manifest.get("vocab_size"),
        "manifest": str(manifest_path),
    }


def _csv(path: Path) -> dict[str, Any]:
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        rows = csv.reader(handle)
        header = next(rows, [])
        count = sum(1 for _ in rows)
    return {"kind": "csv", "path": str(path), "rows": count, "columns": header}


def _config(path: Path) -> dict[str, Any]:
    from bigmodel.config import load_config

    config = load_config(path)
    return {
        "kind": "config",
        "path": str(path),
        "family": config.model.family,
        "data": config.data.format,
        "run_dir": str(config.run_dir),
    }


FILE_KINDS = {".jsonl": _log, ".bin": _shard, ".csv": _csv, ".yaml": _config, ".yml": _config, ".html": _page}


def _checkpoint(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
            shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}
    except Exception:
        raise UserError(f"{path}: not a readable safetensors file (truncated or another format)") from None
    if "bigmodel" not in meta:
        if {"train_x", "train_y"} <= set(shapes):
            return {"kind": "prepared tabular data", "path": str(path), "arrays": shapes}
        raise UserError(f"{path} is a safetensors file but not a bigmodel checkpoint (no manifest)")
    manifest = read_checkpoint_manifest(meta, str(path))
    fields = manifest.model_dump(mode="json", by_alias=True)
    params = sum(_numel(s) for k, s in shapes.items() if k.startswith("model.") and not _is_buffer(k))
    loop = manifest.resume.loop if manifest.resume is not None else None
    return {
        "kind": manifest.kind,
        "path": str(path),
        "family": manifest.family,
        "architecture": fields["architecture"],
        "parameters": params,
        "step": manifest.step,
        "metrics": manifest.metrics,
        "lineage": manifest.lineage,
        **({"import": fields["import"]} if manifest.import_ is not None else {}),
        **({"adapter": fields["adapter"]} if manifest.adapter is not None else {}),
        **({"privacy": fields["privacy"]} if manifest.privacy is not None else {}),
        **({"training": {k: v for k, v in loop.items() if k != "resumed_with_changes"}} if loop is not None else {}),
        **({"resumed_with_changes": manifest.resumed_with_changes} if manifest.resumed_with_changes else {}),
        "config": manifest.config,
        "created": manifest.created,
        "bigmodel_version": manifest.bigmodel_version,
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
        "tokenizer": {
            "kind": tok.kind,
            "vocab_size": tok.vocab_size,
            "special_tokens": source.special_tokens,
            "chat_template": source.chat_template is not None,
        },
        "notes": source.notes,
    }


def _onnx(path: Path) -> dict[str, Any]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise UserError(f"{path} is not a readable ONNX model ({exc})") from exc
    entries = {p.key: p.value for p in model.metadata_props}
    meta: dict[str, Any] = {key: _maybe_json(value) for key, value in entries.items()}  # another tool's model
    if f"{ONNX_PREFIX}kind" in entries:
        typed = read_onnx_metadata(entries, str(path))
        meta = typed.model_dump(mode="json")
        if isinstance(typed, (DecoderMetadata, EncoderMetadata)):  # a whole vocabulary is too long: summarise it
            from bigmodel import tokenizer

            tok = tokenizer.from_json(typed.tokenizer)
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
