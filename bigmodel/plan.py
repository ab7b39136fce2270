"""plan: what training and serving the configured model will cost, before spending it.

Parameters are counted exactly on a model built on the meta device (no memory, so a 175B config plans
in seconds on a laptop); everything else comes from bigmodel/accounting.py's formulas and a hardware
profile. Nothing is written: the report goes to stdout (a table, or one JSON object with --json).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from bigmodel import accounting, registry
from bigmodel.arch import AnyArch, DecoderArch, TabularArch
from bigmodel.config import Config
from bigmodel.datasets import MANIFEST_FILE
from bigmodel.errors import UserError
from bigmodel.io import read_json
from bigmodel.models import gpt


@dataclass(frozen=True)
class Hardware:
    name: str
    bf16_flops: float  # dense (no structured sparsity) peak, FLOP/s
    fp32_flops: float  # plain FP32 (no TF32), FLOP/s
    memory_bytes: int
    power_w: float | None  # board power (TDP)
    runtime_bytes: int  # what the framework takes before the model: CUDA context, workspaces
    source: str


GB = 10**9
CUDA_RUNTIME = 2**30  # CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers: about 1 GiB in practice
PROFILES = {
    "a10": Hardware("NVIDIA A10", 125e12, 31.2e12, 24 * GB, 150, CUDA_RUNTIME,
                    "NVIDIA A10 Tensor Core GPU datasheet: BF16 125 TFLOPS dense (250 sparse), FP32 31.2, 150 W"),
    "l4": Hardware("NVIDIA L4", 121e12, 30.3e12, 24 * GB, 72, CUDA_RUNTIME,
                   "NVIDIA L4 Tensor Core GPU datasheet: BF16 121 TFLOPS dense (242 sparse), FP32 30.3, 72 W"),
    "a100-80gb": Hardware("NVIDIA A100 SXM 80GB", 312e12, 19.5e12, 80 * GB, 400, CUDA_RUNTIME,
                          "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS dense (624 sparse), FP32 19.5, "
                          "400 W (SXM)"),
    "h100-sxm": Hardware("NVIDIA H100 SXM", 989e12, 67e12, 80 * GB, 700, CUDA_RUNTIME,
                         "NVIDIA H100 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with sparsity = 989 dense, "
                         "FP32 67, 700 W (SXM)"),
    "h200": Hardware("NVIDIA H200 SXM", 989e12, 67e12, 141 * GB, 700, CUDA_RUNTIME,
                     "NVIDIA H200 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with sparsity = 989 dense, FP32 67, "
                     "141 GB, up to 700 W (SXM)"),
    "mi300x": Hardware("AMD Instinct MI300X", 1307.4e12, 163.4e12, 192 * GB, 750, CUDA_RUNTIME,
                       "AMD Instinct MI300X data sheet: BF16 1,307.4 TFLOPS dense, FP32 163.4 (vector), 750 W"),
}
CPU_RUNTIME = 85 * accounting.MiB  # autograd engine, oneDNN scratch, allocator: measured here (torch 2.13)


def run(config: Config) -> dict[str, Any]:
    pc, tc = config.plan, config.train
    arch = _architecture(config)
    start = time.perf_counter()
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = registry.build_model(arch)
    n_params = registry.count_parameters(model)
    report: dict[str, Any] = {"model": {"family": arch.family, "parameters": n_params,
                                        "architecture": arch.to_dict()}}
    if isinstance(arch, TabularArch):
        report["planned_in_s"] = round(time.perf_counter() - start, 3)
        return report

    n_no_pos = (gpt.parameter_counts(model)["without_position_embeddings"] if isinstance(arch, DecoderArch)
                else accounting.encoder_matmul_parameters(arch, n_params))
    hardware = _hardware(pc.hardware)
    flops_per_token = accounting.flops_per_token(arch, n_no_pos)
    tokens, tokens_from = _training_tokens(config, arch, n_params)
    total_flops = flops_per_token * tokens

    sharding = tc.distributed if pc.devices > 1 else "none"
    global_rows = tc.batch_size * tc.grad_accum_steps
    batch_per_device = max(1, min(tc.batch_size, global_rows // pc.devices))
    def memory_of(adapter: int | None) -> dict[str, int]:
        return accounting.training_memory(
            arch, n_params, batch=batch_per_device, precision=tc.precision, optimizer=tc.optimizer,
            momentum=tc.momentum, sharding=sharding, devices=pc.devices,
            activation_checkpointing=tc.activation_checkpointing,
            fsdp_param_bytes=2 if tc.fsdp.param_dtype == "bf16" else 4, runtime=hardware.runtime_bytes,
            adapter=adapter, fused_dropout=pc.hardware != "local",  # local: this CPU
        )

    adapter = (accounting.lora_parameters(arch, tc.lora.projections(), tc.lora.rank) if tc.lora is not None
               else None)
    memory = memory_of(adapter)
    lora_report = {} if adapter is None else {
        "lora_trainable_parameters": adapter, "full_fine_tuning_total": memory_of(None)["total"]}
    context = pc.inference_context or arch.block_size
    serving = {name: accounting.inference_memory(arch, n_params, batch=pc.inference_batch, context=context,
                                                 weight_bytes=width, cache_bytes=width)
               for name, width in (("fp32", 4), ("bf16", 2))}
    peak = hardware.bf16_flops if tc.precision == "bf16" else hardware.fp32_flops
    seconds = total_flops / (pc.devices * peak * pc.mfu)
    power = pc.power_w or hardware.power_w
    report.update({
        "model": {**report["model"], "parameters_without_position_embeddings": n_no_pos},
        "compute": {
            "flops_per_token": flops_per_token,
            "tokens": tokens,
            "tokens_from": tokens_from,
            "total_flops": total_flops,
            "compute_optimal_tokens": 20 * n_params,  # Hoffmann et al. 2022 (Chinchilla): ~20 per parameter
            "tokens_per_parameter": round(tokens / n_params, 2),
        },
        "training_memory_per_device": {
            **memory,
            "device_memory": hardware.memory_bytes,
            "fits": memory["total"] <= hardware.memory_bytes,
            "batch_per_device": batch_per_device,
            "precision": tc.precision,
            "optimizer_kind": tc.optimizer,
            "sharding": sharding,
            "activation_checkpointing": tc.activation_checkpointing,
            **lora_report,
        },
        "inference_memory": {
            "batch": pc.inference_batch,
            "context": context,
            "fp32_total": serving["fp32"]["total"],
            "bf16_total": serving["bf16"]["total"],
            "kv_cache_fp32": serving["fp32"]["kv_cache"],
        },
        "storage": accounting.disk_sizes(arch, n_params, tc.optimizer, tc.momentum),
        "time_and_energy": {
            "hardware": hardware.name,
            "hardware_source": hardware.source,
            "devices": pc.devices,
            "peak_flops_per_device": peak,
            "mfu": pc.mfu,
            "seconds": seconds,
            "days": seconds / 86400,
            "device_hours": seconds * pc.devices / 3600,
            "power_w_per_device": power,
            "energy_kwh": None if power is None else seconds / 3600 * pc.devices * power * pc.pue / 1000,
        },
        "planned_in_s": round(time.perf_counter() - start, 3),
    })
    return report


def _architecture(config: Config) -> AnyArch:
    """The architecture init would build: an imported model's own (read from its config.json or GGUF
    header, no weights), else from the prepared data when there is some, else from what the config alone
    says (a GPT needs only the vocabulary size)."""
    if config.init.from_ is not None:
        from bigmodel import pretrained

        source = pretrained.describe(config.init.from_)
        pretrained.check_config(config.model, source.arch, config.init.from_)
        labels = 0
        if config.task == "classification":  # an encoder's classifier: its labels come from the prepared data
            manifest_path = config.stage_dir("prepare") / MANIFEST_FILE
            if not manifest_path.is_file():
                raise UserError(f"plan: a classifier's labels come from its data; run 'bigmodel prepare' first "
                                f"({manifest_path})")
            labels = len(read_json(manifest_path, "prepared-data manifest")["labels"])
        return pretrained.with_config_overrides(source.arch, config.model, config.task, labels)
    manifest_path = config.stage_dir("prepare") / MANIFEST_FILE
    if manifest_path.is_file():
        manifest = read_json(manifest_path, "prepared-data manifest")
        if config.plan.vocab_size is not None:
            manifest = {**manifest, "vocab_size": config.plan.vocab_size}
        return registry.architecture(config.model, manifest)
    if config.model.family != "gpt":
        raise UserError(f"plan: an MLP's shape comes from its data; run 'bigmodel prepare' first ({manifest_path})")
    vocab = config.plan.vocab_size
    if vocab is None and config.data.format == "text" and config.data.tokenizer.kind == "bpe":
        vocab = config.data.tokenizer.vocab_size
    if vocab is None:
        raise UserError("plan: the vocabulary size is not known before 'bigmodel prepare' for this tokenizer; "
                        "run prepare, or pass --set plan.vocab_size=N")
    return registry.architecture(config.model, {"vocab_size": vocab})


def _training_tokens(config: Config, arch: accounting.TransformerArch, n_params: int) -> tuple[int, str]:
    tc = config.train
    if config.plan.tokens is not None:
        return config.plan.tokens, "plan.tokens"
    tokens_per_step = tc.batch_size * tc.grad_accum_steps * arch.block_size
    if tc.max_steps is not None:
        return tc.max_steps * tokens_per_step, "train.max_steps"
    manifest_path = config.stage_dir("prepare") / MANIFEST_FILE
    if manifest_path.is_file():
        splits = read_json(manifest_path, "prepared-data manifest").get("tokens", {})
        if "train" in splits:
            return (tc.epochs or 1) * int(splits["train"]), "train.epochs x prepared train tokens"
    return 20 * n_params, "compute-optimal (20 per parameter)"


def _hardware(name: str) -> Hardware:
    if name != "local":
        return PROFILES[name]
    fp32, bf16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    return Hardware("this machine (measured)", bf16, fp32, pages, None, CPU_RUNTIME,
                    f"square {MATMUL_SIZE}x{MATMUL_SIZE} matmuls timed just now, best burst")


MATMUL_SIZE = 1024


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


def render(report: dict[str, Any]) -> None:
    """The report as tables on stdout (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column(style="dim")
    model = report["model"]
    table.add_row("parameters", f"{model['parameters']:,}", _short(model["parameters"]))
    if "compute" in report:
        c, m = report["compute"], report["training_memory_per_device"]
        i, s, t = report["inference_memory"], report["storage"], report["time_and_energy"]
        rows = [
            ("compute", "", ""),
            ("  FLOPs per token", f"{c['flops_per_token']:,}", "6N + 12·L·H·Q·T"),
            ("  training tokens", f"{c['tokens']:,}", f"{_short(c['tokens'])}, from {c['tokens_from']}"),
            ("  total FLOPs", f"{c['total_flops']:.3e}", ""),
            ("  compute-optimal tokens", f"{c['compute_optimal_tokens']:,}",
             f"Chinchilla; planned {c['tokens_per_parameter']} per parameter"),
            ("training memory per device", "", f"{m['sharding']}, {m['precision']}, {m['optimizer_kind']}, batch "
             f"{m['batch_per_device']}{', activation checkpointing' if m['activation_checkpointing'] else ''}"),
            *[(f"  {key}", _bytes(m[key]), "") for key in ("weights", "gradients", "optimizer", "activations", "runtime")],
            ("  peak", _bytes(m["total"]), f"{'fits' if m['fits'] else 'DOES NOT FIT'} in {_bytes(m['device_memory'])}"),
            *([("  LoRA trainable parameters", f"{m['lora_trainable_parameters']:,}", "frozen base: no gradients "
                "or optimizer state for it"), ("  full fine-tuning peak", _bytes(m["full_fine_tuning_total"]), "")]
              if "lora_trainable_parameters" in m else []),
            ("inference memory", "", f"batch {i['batch']}, context {i['context']}"),
            ("  fp32 weights + KV cache", _bytes(i["fp32_total"]), f"KV cache {_bytes(i['kv_cache_fp32'])}"),
            ("  bf16 weights + KV cache", _bytes(i["bf16_total"]), ""),
            ("storage", "", ""),
            ("  checkpoint (weights)", _bytes(s["checkpoint"]), "safetensors, fp32"),
            ("  resumable checkpoint", _bytes(s["training_state"]), "with optimizer state"),
            ("  ONNX fp32 / int8", f"{_bytes(s['onnx_fp32'])} / {_bytes(s['onnx_int8'])}", ""),
            ("time and energy", "", f"{t['devices']} x {t['hardware']}, MFU {t['mfu']}"),
            ("  wall clock", _duration(t["seconds"]), f"{t['device_hours']:,.0f} device-hours"),
            ("  energy", "unknown" if t["energy_kwh"] is None else f"{t['energy_kwh']:,.1f} kWh",
             "set plan.power_w" if t["energy_kwh"] is None else f"{t['power_w_per_device']:g} W per device"),
        ]
        for row in rows:
            heading = not row[0].startswith(" ")
            table.add_row(*row, style="bold cyan" if heading else None)
    Console(width=max(Console().width, 110)).print(table)


def _short(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.1f} days"
