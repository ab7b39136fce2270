"""What a stage's process holds at its peak, predicted before it allocates, and the guard that refuses a job
too big for the memory -- one line naming needed against available and the fix, exit 2 -- instead of being
killed by the kernel's OOM killer half-way through.

The stages stream weights (bigmodel/weights.py, streaming.py, export/weightless.py), so a peak is the
runtime itself plus the largest thing held at once, not the model:

- init (an import): one parameter read and converted; then the parity gate, one module of each
  implementation in fp32 (a GGUF's reference is transformers' own, which dequantises the whole file);
- export: one matrix read, converted and transposed or quantised; then the gate's reference, one layer in
  fp32; then ONNX Runtime holding the new file;
- infer and serve: ONNX Runtime holding the file, the KV cache of the batch and context, the logits.

The constants are this runtime's own, measured (scripts/bench_big.py prints each stage's predicted peak
beside its measured one); plan reports the same predictions.
"""

from __future__ import annotations

import ctypes
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigmodel.config import Int4Export
from bigmodel.errors import UserError

GiB = 2**30
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
# Resident memory before any weight: Python + PyTorch + ONNX (+ the exporter after a two-layer trace), and
# transformers on top for an import's gate; ONNX Runtime's Python session alone for infer and serve.
TORCH_RUNTIME = int(0.55 * GiB)
TRANSFORMERS_RUNTIME = int(0.3 * GiB)
ORT_RUNTIME = int(0.15 * GiB)
# ONNX Runtime's peak over the file it loads: initializers read into memory, MatMulNBits' packed copies.
# Measured on int4 files of 0.7 and 4.8 GB (scripts/bench_big.py, session 26): 1.33 in infer, 1.37 in
# export's gate (after its earlier phases).
SESSION_OVER_FILE = 1.4
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(value: Any) -> int | None:
    """A memory size: bytes (int), or text such as '8GiB', '500 MB', '1.5gb'."""
    if value is None or isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in UNITS:
        raise ValueError(f"{value!r} is not a size; write bytes or e.g. 8GiB, 500MB")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


@dataclass
class Estimate:
    """A stage's predicted peak resident memory, what makes it up, and how to make it smaller."""

    stage: str
    parts: dict[str, int]
    fixes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"peak": self.peak, **self.parts}


def available() -> tuple[int, str]:
    """The memory this process may still take: the OS's MemAvailable, or the cgroup's limit when lower."""
    found = None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
    except OSError:
        pass
    cgroup = _cgroup_room()
    if cgroup is not None and (found is None or cgroup < found):
        return cgroup, "the container's memory limit"
    if found is None:
        return 1 << 62, "unknown (no /proc/meminfo)"
    return found, "available on this machine"


def _cgroup_room() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - used


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:  # not glibc (macOS, Windows, musl): nothing to do
        return None


# The most a layer-by-layer pass keeps of freed fp32 weight copies for the next layer (streaming.Converted)
KEPT_COPIES = 1 << 30


def map_large_allocations() -> None:
    """Allocate every block of 4 MiB or more with its own memory map, so a freed tensor goes back to the OS
    at once. By default glibc raises that threshold as large blocks are freed (up to 32 MiB) and keeps the
    blocks below it in its heaps, where a stream of tensors fragments them: one 8B model streamed through
    the import measured 2.8 GB peak that way and 1.7 GB with this (scripts/bench_big.py). Set by the
    streaming stages (an import, the export); process-wide from then on, and a no-op off glibc."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 4 << 20)


def room(limit: int | None) -> tuple[int, str]:
    """The memory a stage may take, and where that figure comes from: memory_limit, else what is available."""
    return (limit, "memory_limit") if limit is not None else available()


def guard(estimate: Estimate, limit: int | None) -> None:
    """Refuse, before anything is allocated, a stage whose predicted peak exceeds `limit` (memory_limit)
    or, without one, the memory available now."""
    room_bytes, where = room(limit)
    if estimate.peak <= room_bytes:
        return
    biggest = sorted(estimate.parts.items(), key=lambda item: -item[1])[:3]
    detail = ", ".join(f"{name} {size / GiB:.1f}" for name, size in biggest)
    fix = "; ".join(estimate.fixes) or "use a machine with more memory"
    raise UserError(
        f"{estimate.stage} needs about {estimate.peak / GiB:.1f} GiB at its peak ({detail} GiB) but "
        f"{room_bytes / GiB:.1f} GiB is {where}; nothing was started: {fix}"
    )


# ------------------------------------------------------------------------------------------ decoders


def largest_matrix(arch: Any) -> int:
    """Elements of the largest single weight: the vocabulary-sized embedding or head, or an MLP matrix."""
    qkv = arch.q_width + 2 * arch.kv_width
    return max(arch.vocab_size * arch.n_embd, max(arch.mlp_hidden) * arch.n_embd, qkv * arch.n_embd)


def import_peak(
    arch: Any, source_format: str, source_dtype: str, checkpoint_dtype: str, parameters: int, verify: bool
) -> Estimate:
    """init with init.from: one parameter read (source dtype) and converted (checkpoint dtype); the gate
    holds one module in fp32 per implementation at a time, and up to a layer's freed fp32 copies for the
    next layer to reuse (streaming.Converted) -- transformers' side while the import writes (for a folder:
    pretrained.build.Reference), except that reading a GGUF it dequantises the whole file in fp32, after
    the write."""
    from bigmodel.accounting import block_parameters

    largest = largest_matrix(arch)
    source_bytes = DTYPE_BYTES.get(source_dtype, 4)  # a quantised GGUF is dequantised to fp32 as it is read
    parts = {"runtime": TORCH_RUNTIME, "one parameter": largest * (source_bytes + DTYPE_BYTES[checkpoint_dtype])}
    fixes = []
    if verify:
        parts["runtime"] += TRANSFORMERS_RUNTIME
        gate = largest * (source_bytes + 4) + min(block_parameters(arch) * 4, KEPT_COPIES)
        if source_format == "gguf":
            gate += 4 * parameters
            fixes.append(
                "import the model's Hugging Face folder instead of the GGUF (its gate streams), or "
                "--set init.verify=false (the checkpoint is then recorded as unverified)"
            )
            parts["one parameter"] = max(parts["one parameter"], gate)
        else:
            parts["the gate's module and a layer's kept copies, while writing"] = gate
    return Estimate("init", parts, fixes)


def export_file_bytes(
    arch: Any, parameters: int, dtype: str, int4: Int4Export | None = None, group_query: bool = False
) -> int:
    """The ONNX file's size: fp32/fp16 store every weight once (a tied table too); int4 stores the matrices
    in 4-bit blocks (+ an fp32 scale per block), head and embedding as `int4` (export.int4, default
    settings when None) asks; a GroupQueryAttention graph adds its fp32 cos and sin tables of every
    position (block_size x rotary/2 each)."""
    from bigmodel.export.weightless import int8_block  # (here: it brings torch and onnx)

    tables_of_positions = (
        2 * arch.block_size * (arch.rope_dim // 2) * 4 if group_query and arch.position == "rope" else 0
    )
    if dtype in ("fp32", "fp16"):
        return parameters * DTYPE_BYTES[dtype] + tables_of_positions
    int4 = int4 or Int4Export()
    table = arch.vocab_size * arch.n_embd
    tables = 1 if arch.tie_embeddings else 2
    block_bytes = {
        "int4": 0.5 + 4 / int4.block_size,
        "int8": 1 + 4 / int8_block(arch.n_embd, int4.int8_block_size),
        "fp32": 4,
    }
    matrices = parameters - tables * table
    head_bytes = table * block_bytes[int4.head]
    shared = arch.tie_embeddings and int4.head == int4.embedding_format
    embedding_bytes = 0.0 if shared else table * block_bytes[int4.embedding_format]
    return int(matrices * block_bytes["int4"] + head_bytes + embedding_bytes + tables_of_positions)


def export_peak(
    arch: Any,
    parameters: int,
    checkpoint_dtype: str,
    dtype: str,
    int4: Int4Export | None = None,
    group_query: bool = False,
) -> Estimate:
    """export of a decoder: one matrix read, converted to fp32 and transposed (fp32/fp16) or quantised
    (int4) -- a routed mixture's experts one layer at a time; the gate's fp32 reference holds one layer
    (and the embedding); ONNX Runtime then holds the file."""
    from bigmodel.accounting import block_parameters

    largest = largest_matrix(arch)
    stored = DTYPE_BYTES.get(checkpoint_dtype, 4)
    write = largest * (stored + 4 + 4)
    if arch.n_experts:  # a routed mixture's layer: its experts' gate and up stacked, then converted
        write = max(write, arch.n_experts * 2 * max(arch.mlp_hidden) * arch.n_embd * (stored + 4) + largest * stored)
    reference = (block_parameters(arch) + largest) * (stored + 4)
    session = ORT_RUNTIME + int(SESSION_OVER_FILE * export_file_bytes(arch, parameters, dtype, int4, group_query))
    fixes = ["--set export.dtype=int4 (a 4-bit file: about an eighth of fp32)"] if dtype != "int4" else []
    return Estimate(
        f"export ({dtype})",
        {
            "runtime": TORCH_RUNTIME,
            "largest of: one matrix / the gate's layer / the new file in ONNX Runtime": max(write, reference, session),
        },
        fixes,
    )


def train_peak(step: dict[str, int], loading: int, lora: bool) -> Estimate:
    """train on this machine: accounting.training_memory's step (`step`: weights, optimizer, and the
    larger of gradients and activations), or loading the model when that is larger (`loading`: a full
    load holds the fp32 model and the checkpoint's tensors at once)."""
    held = step["weights"] + step["optimizer"]
    parts = {
        "runtime": TORCH_RUNTIME,
        "weights + optimizer state": held,
        "activations or gradients": max(step["activations"], step["gradients"], loading - held, 0),
    }
    fixes = ["--set train.batch_size=<smaller> (activations grow with it)", "--set train.activation_checkpointing=true"]
    fixes.append(
        "a smaller train.lora.rank"
        if lora
        else "--set 'train.lora={rank: 8}' (the base frozen: no gradients or optimizer state for it)"
    )
    return Estimate("train", parts, fixes)


def runtime_peak(stage: str, arch: Any, file_bytes: int, batch: int, context: int, cache_bytes: int = 4) -> Estimate:
    """infer and serve: ONNX Runtime holding the file of a decoder `arch`, the KV cache of `batch` sequences
    of `context` tokens (`cache_bytes` per value: 2 for an fp16 export), and one step's logits."""
    kv_cache = 2 * arch.n_layer * batch * context * arch.n_kv_head * arch.head_size * cache_bytes
    return Estimate(
        stage,
        {
            "runtime": ORT_RUNTIME,
            "model": int(SESSION_OVER_FILE * file_bytes),
            "kv_cache": kv_cache,
            "logits": batch * arch.vocab_size * 4 * 2,
        },
        ["a smaller file (export.dtype int4)", "a shorter context or fewer sequences at once"],
    )


def onnx_file_bytes(path: Path) -> int:
    """An exported model's bytes: the .onnx and its external data."""
    data = path.with_name(f"{path.name}.data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
