"""The accelerators plan knows: published peaks, memory, power, the links between devices and a rental
price, each with the source it comes from; or this machine, measured.

Links are per device and per direction (datasheets quote NVLink bidirectionally: 900 GB/s on an H100 is
450 each way). Between nodes the ring collectives NCCL runs cross each node boundary once per ring, one
ring per network card, so a device's share of the traffic is bounded by the node's whole network
bandwidth (all its cards), not by one card's: min(node link, cards x card bandwidth).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from bigmodel.accounting import MiB


@dataclass(frozen=True)
class Link:
    name: str
    bytes_per_s: float  # per device, one direction


@dataclass(frozen=True)
class Hardware:
    name: str
    bf16_flops: float  # dense (no structured sparsity) peak, FLOP/s
    fp32_flops: float  # plain FP32 (no TF32), FLOP/s
    memory_bytes: int
    power_w: float | None  # board power (TDP)
    runtime_bytes: int  # what the framework takes before the model: CUDA context, workspaces
    source: str
    devices_per_node: int = 1
    node_link: Link | None = None  # between the devices of one node
    network: Link | None = None  # each device's network card, between nodes
    price_per_hour: float | None = None  # USD per device-hour, on demand
    price_source: str = ""

    def link(self, devices: int) -> Link | None:
        """What carries the collectives of `devices` devices: the node's links inside one node, else the
        slower of those and the node's network cards together."""
        if devices <= self.devices_per_node:
            return self.node_link
        if self.node_link is None or self.network is None:
            return None
        across = self.devices_per_node * self.network.bytes_per_s
        if across >= self.node_link.bytes_per_s:
            return self.node_link
        return Link(f"{self.devices_per_node} x {self.network.name} per node", across)


GB = 10**9
CUDA_RUNTIME = 2**30  # CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers: about 1 GiB in practice
PCIE4 = Link("PCIe 4.0 x16", 32 * GB)  # 64 GB/s both ways (PCI-SIG)
NVLINK3 = Link("NVLink 3", 300 * GB)  # A100 datasheet: 600 GB/s GPU-to-GPU, both ways
NVLINK4 = Link("NVLink 4", 450 * GB)  # H100/H200 datasheets: 900 GB/s GPU-to-GPU, both ways
INFINITY_FABRIC = Link("Infinity Fabric", 448 * GB)  # MI300X data sheet: 896 GB/s peer-to-peer, both ways
HDR = Link("InfiniBand HDR 200 Gb/s", 25 * GB)  # DGX A100: one ConnectX-6 per GPU
NDR = Link("InfiniBand NDR 400 Gb/s", 50 * GB)  # DGX H100/H200: one ConnectX-7 per GPU; MI300X platforms alike
ETHERNET_100G_SHARED = Link("100 Gb/s Ethernet shared by 8 GPUs", 12.5 * GB / 8)  # AWS g5/g6.48xlarge
# On-demand rental, the middle of the specialty-cloud range (Mercatus "Cloud GPU pricing", May 2026:
# A100 80GB $1.10-1.50, H100 SXM $2.50-3.50, H200 SXM $3.50-4.50 per GPU-hour; hyperscalers charge
# more, long-tail providers less). Profiles without a surveyed price leave it to plan.price.
PRICE_SOURCE = "Mercatus cloud GPU pricing, May 2026: the middle of the specialty clouds' on-demand range"
PROFILES = {
    "a10": Hardware(
        "NVIDIA A10",
        125e12,
        31.2e12,
        24 * GB,
        150,
        CUDA_RUNTIME,
        "NVIDIA A10 Tensor Core GPU datasheet: BF16 125 TFLOPS dense (250 sparse), FP32 31.2, 150 W",
        8,
        PCIE4,
        ETHERNET_100G_SHARED,
    ),
    "l4": Hardware(
        "NVIDIA L4",
        121e12,
        30.3e12,
        24 * GB,
        72,
        CUDA_RUNTIME,
        "NVIDIA L4 Tensor Core GPU datasheet: BF16 121 TFLOPS dense (242 sparse), FP32 30.3, 72 W",
        8,
        PCIE4,
        ETHERNET_100G_SHARED,
    ),
    "a100-80gb": Hardware(
        "NVIDIA A100 SXM 80GB",
        312e12,
        19.5e12,
        80 * GB,
        400,
        CUDA_RUNTIME,
        "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS dense (624 sparse), FP32 19.5, "
        "400 W (SXM), NVLink 600 GB/s; DGX A100: 8 x 200 Gb/s HDR",
        8,
        NVLINK3,
        HDR,
        1.30,
        PRICE_SOURCE,
    ),
    "h100-sxm": Hardware(
        "NVIDIA H100 SXM",
        989e12,
        67e12,
        80 * GB,
        700,
        CUDA_RUNTIME,
        "NVIDIA H100 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with sparsity = 989 dense, "
        "FP32 67, 700 W (SXM), NVLink 900 GB/s; DGX H100: 8 x 400 Gb/s NDR",
        8,
        NVLINK4,
        NDR,
        3.00,
        PRICE_SOURCE,
    ),
    "h200": Hardware(
        "NVIDIA H200 SXM",
        989e12,
        67e12,
        141 * GB,
        700,
        CUDA_RUNTIME,
        "NVIDIA H200 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with sparsity = 989 dense, FP32 67, "
        "141 GB, up to 700 W (SXM), NVLink 900 GB/s; DGX H200: 8 x 400 Gb/s NDR",
        8,
        NVLINK4,
        NDR,
        4.00,
        PRICE_SOURCE,
    ),
    "mi300x": Hardware(
        "AMD Instinct MI300X",
        1307.4e12,
        163.4e12,
        192 * GB,
        750,
        CUDA_RUNTIME,
        "AMD Instinct MI300X data sheet: BF16 1,307.4 TFLOPS dense, FP32 163.4 (vector), 750 W, "
        "Infinity Fabric 896 GB/s peer-to-peer; 400 Gb/s per GPU between nodes",
        8,
        INFINITY_FABRIC,
        NDR,
    ),
}
CPU_RUNTIME = 85 * MiB  # autograd engine, oneDNN scratch, allocator: measured here (torch 2.13)
MATMUL_SIZE = 1024


def profile(name: str) -> Hardware:
    """A named profile, or 'local': this machine's matmul peaks measured now (about 2 s)."""
    if name != "local":
        return PROFILES[name]
    fp32, bf16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    return Hardware(
        "this machine (measured)",
        bf16,
        fp32,
        pages,
        None,
        CPU_RUNTIME,
        f"square {MATMUL_SIZE}x{MATMUL_SIZE} matmuls timed just now, best burst",
    )


def matmul_peak(dtype: torch.dtype, size: int = MATMUL_SIZE, seconds: float = 1.0) -> float:
    """FLOP/s of a square matmul on this CPU, the best of several timed bursts."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        begin = time.perf_counter()
        for _ in range(10):
            a @ b
        best = max(best, 10 * 2 * size**3 / (time.perf_counter() - begin))
    return best
