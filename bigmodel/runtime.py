"""Process-wide PyTorch setup shared by the stages: threads, seeds, determinism, device."""

from __future__ import annotations

import torch

from bigmodel.config import Config
from bigmodel.errors import UserError


def setup_torch(config: Config) -> torch.device:
    """Apply threads and seed; return the device. Same config + seed + threads -> same numbers."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    # The flag torch.use_deterministic_algorithms sets, without its import of torch._inductor (1.2 s of
    # every stage's start-up) to set the config only torch.compile reads: compile_deterministic does that.
    torch._C._set_deterministic_algorithms(True, warn_only=True)
    return resolve_device(config.device)


def compile_deterministic(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile with inductor's deterministic mode on, as setup_torch's flag asks of eager ops."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.compile(model)  # type: ignore[return-value]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is available; set device: cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' was asked for but MPS is not available; set device: cpu or auto")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether this device multiplies bf16 in hardware: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX tiles. Elsewhere bf16 autocast is emulated and many times slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def training_precision(requested: str, device: torch.device) -> str:
    """train.precision as it runs on this device: 'auto' becomes bf16 where bf16 is native, else fp32."""
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return requested


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory (Linux VmHWM: this image's own, unlike getrusage, which
    keeps a forking parent's pages), or None where /proc is not available."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
