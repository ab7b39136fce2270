"""Opening an exported model with ONNX Runtime and reading the metadata bigmodel stamped into it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, overload

import onnxruntime as ort

from bigmodel.errors import UserError
from bigmodel.manifests import AnyMetadata, DecoderMetadata, OnnxMetadata, read_onnx_metadata

M = TypeVar("M", bound=OnnxMetadata)


def open_session(path: Path, providers: list[str], threads: int | None, spin: bool = True) -> ort.InferenceSession:
    """An ONNX Runtime session. spin=False: idle worker threads sleep instead of spinning for the next run
    (a server's event loop needs those cycles between runs)."""
    if not path.is_file():
        if (path.parent / "hf" / "config.json").is_file():  # export.format hf wrote a folder, and no ONNX
            raise UserError(
                f"ONNX model not found: {path}; {path.parent} holds only a Hugging Face folder (export."
                "format hf, for transformers): run 'bigmodel export' with --set export.format=both "
                "(or onnx) for ONNX Runtime"
            )
        raise UserError(f"ONNX model not found: {path} (run 'bigmodel export' first, or set infer.model)")
    available = ort.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown:
        gpu = {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(unknown)
        hint = (
            "; CUDA and TensorRT need the onnxruntime-gpu package in place of onnxruntime, and NVIDIA's CUDA/"
            "cuDNN (and TensorRT) libraries"
            if gpu
            else ""
        )
        raise UserError(
            f"infer.providers: {', '.join(unknown)} not available in this onnxruntime "
            f"(available: {', '.join(available)}){hint}"
        )
    options = ort.SessionOptions()
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(
            str(path),
            options,
            providers=providers,
            provider_options=[_provider_options(name, path) for name in providers],
        )
    except Exception as exc:  # ORT raises its own exception types for bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a loadable ONNX model ({first}); re-run 'bigmodel export'") from exc


def _provider_options(provider: str, path: Path) -> dict[str, str]:
    """TensorRT builds an engine for the model when the session opens (minutes for a large model): keep it
    beside the model (trt_cache/) so the next start reuses it."""
    if provider == "TensorrtExecutionProvider":
        return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(path.parent / "trt_cache")}
    return {}


@dataclass(frozen=True)
class Workload:
    """What a decoder session will be asked to hold at once, for the memory guard: `batch` sequences of
    up to `context` tokens (their KV cache), under `limit` bytes (memory_limit; None: what is available)."""

    stage: str
    batch: int
    context: int
    limit: int | None = None


def preflight(path: Path, workload: Workload) -> None:
    """Refuse, before ONNX Runtime reads any weight, a decoder whose file, KV cache and logits would not fit
    (bigmodel/memory.py); the metadata comes from the graph alone (external data is not read)."""
    from bigmodel import memory

    try:
        meta = file_metadata(path)
    except UserError:
        return  # (open_session says what is wrong with the file)
    if not isinstance(meta, DecoderMetadata):
        return
    context = min(workload.context, meta.block_size)
    estimate = memory.runtime_peak(
        workload.stage,
        meta.architecture,
        memory.onnx_file_bytes(path),
        workload.batch,
        context,
        cache_bytes=2 if meta.dtype == "fp16" else 4,
    )
    memory.guard(estimate, workload.limit)


@overload
def open_model(
    path: Path,
    providers: list[str],
    threads: int | None,
    kind: None = None,
    spin: bool = True,
    workload: Workload | None = None,
) -> tuple[ort.InferenceSession, AnyMetadata]: ...


@overload
def open_model(
    path: Path,
    providers: list[str],
    threads: int | None,
    kind: type[M],
    spin: bool = True,
    workload: Workload | None = None,
) -> tuple[ort.InferenceSession, M]: ...


def open_model(
    path: Path,
    providers: list[str],
    threads: int | None,
    kind: type[OnnxMetadata] | None = None,
    spin: bool = True,
    workload: Workload | None = None,
) -> tuple[ort.InferenceSession, OnnxMetadata]:
    """A session and the model's bigmodel metadata (manifests.py); refuses a model of another kind than
    `kind` (DecoderMetadata, ...; None: any), and (with a `workload`) one that would not fit in memory,
    before loading it."""
    if workload is not None:
        preflight(path, workload)
    session = open_session(path, providers, threads, spin)
    meta = metadata(session, path)
    if kind is not None and not isinstance(meta, kind):
        wanted = kind.model_fields["kind"].default
        raise UserError(
            f"{path} is a '{meta.kind}' model; this needs a '{wanted}' model: give the ONNX model "
            "exported from this config's run, or the config it was made with"
        )
    return session, meta


def metadata(session: ort.InferenceSession, path: Path) -> AnyMetadata:
    """The `bigmodel.*` metadata, typed; refuses models bigmodel did not export."""
    return read_onnx_metadata(dict(session.get_modelmeta().custom_metadata_map), str(path))


def file_metadata(path: Path) -> AnyMetadata | None:
    """`metadata` read from the graph alone, without a session or the external data (what a guard or a
    reuse check needs before loading anything); None for a missing or unreadable file."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        props = onnx.load(str(path), load_external_data=False).metadata_props
    except (OSError, DecodeError):
        return None
    return read_onnx_metadata({p.key: p.value for p in props}, str(path))
