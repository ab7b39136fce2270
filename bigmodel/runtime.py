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
    torch.use_deterministic_algorithms(True, warn_only=True)
    return resolve_device(config.device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is available; set device: cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' was asked for but MPS is not available; set device: cpu or auto")
    return torch.device(name)


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
