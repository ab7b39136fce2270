"""How close is `bigmodel plan`'s training-memory estimate to a measured training step? Prints JSON.

Each case builds bigmodel's GPT and optimizer, runs two training steps (the second has optimizer state)
and reads the peak: on CUDA the allocator's max_memory_allocated (the CUDA context and cuBLAS
workspaces are outside it, so the estimate is compared without its `runtime` term); on CPU the
process's VmHWM in a fresh process, as tests/test_plan.py does (with plan's CPU runtime term).

    python scripts/check_plan_memory.py                 # CPU, the test's small GPT
    python scripts/check_plan_memory.py --device cuda   # a GPT-2-small shape on one GPU
    python scripts/check_plan_memory.py --lora          # CPU: LoRA vs full fine-tuning of one model
    python scripts/check_plan_memory.py --lora --arch-from SmolLM2-135M-Instruct.Q4_1.gguf --batch 8 --block 128

With --lora the model is larger (its weights, gradients and optimizer state are a real share of the
peak) and both LoRA (rank 8 on every linear projection, the base frozen) and full fine-tuning run on it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bigmodel import accounting, hardware, registry
from bigmodel.arch import DecoderArch
from bigmodel.config import LoRAConfig, TrainConfig
from bigmodel.train.optim import build_optimizer

REPO = Path(__file__).resolve().parent.parent

SHAPES = {
    "cpu": ({"vocab_size": 65, "n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256}, 16),
    "cuda": ({"vocab_size": 50257, "n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024}, 8),
}
CASES = [("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)]
LORA_SHAPE = ({"vocab_size": 8192, "n_layer": 8, "n_head": 8, "n_embd": 512, "block_size": 128}, 4)
LORA = {"rank": 8, "targets": ["all-linear"]}


def training_steps(
    arch: dict, batch: int, precision: str, checkpointing: bool, device: str, lora_settings: dict | None = None
) -> None:
    torch.manual_seed(0)
    x = torch.randint(arch["vocab_size"], (batch, arch["block_size"] + 1), device=device)
    model = registry.build_model(arch).to(device)
    if lora_settings is not None:
        from bigmodel import lora
        from bigmodel.config import LoRAConfig

        lora.apply(model, LoRAConfig(**lora_settings), seed=0)
    model.activation_checkpointing = checkpointing
    optimizer = build_optimizer(model, TrainConfig(optimizer="adamw", max_steps=2))
    autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    for _ in range(2):
        with autocast:
            if arch["family"] == "bert":  # masked-LM: logits for every position, as train/encoder.py
                logits = model(x[:, :-1], torch.ones_like(x[:, :-1]))
            else:
                logits, _ = model(x[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def measure_cuda(arch: dict, batch: int, precision: str, checkpointing: bool, lora_settings: dict | None = None) -> int:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    training_steps(arch, batch, precision, checkpointing, "cuda", lora_settings)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure_cpu(arch: dict, batch: int, precision: str, checkpointing: bool, lora_settings: dict | None = None) -> int:
    """In a fresh process, how far the peak resident memory rose above what it held before the model.

    MALLOC_MMAP_THRESHOLD_ makes every large allocation its own mapping, returned to the OS when freed,
    so the peak is what was really held at once. The peak is VmHWM, this process image's own:
    getrusage's ru_maxrss would also count the parent's pages at fork (Linux keeps it across exec)."""
    code = (
        "import json, os, sys; sys.path.insert(0, os.getcwd())\n"
        "import torch; torch.set_num_threads(1)\n"
        "from scripts.check_plan_memory import training_steps\n"
        "def rss(): return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
        "before = rss()\n"
        "a = json.loads(sys.argv[1]); training_steps(*a[:4], 'cpu', a[4])\n"
        "status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines())\n"
        "print(int(status['VmHWM'].split()[0]) * 1024 - before)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps([arch, batch, precision, checkpointing, lora_settings])],
        capture_output=True,
        text=True,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
        cwd=REPO,
        check=True,
    )
    return int(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--lora", action="store_true", help="LoRA vs full fine-tuning (fp32) on a larger model")
    parser.add_argument(
        "--arch-from",
        type=Path,
        help="the architecture of a pretrained model (HF folder or GGUF; headers only, weights random)",
    )
    parser.add_argument("--batch", type=int, help="rows per step (default: the shape's)")
    parser.add_argument("--block", type=int, help="tokens per row (default: the shape's)")
    args = parser.parse_args()
    shape, batch = LORA_SHAPE if args.lora else SHAPES[args.device]
    if args.arch_from is not None:
        from bigmodel import pretrained

        shape = pretrained.describe(args.arch_from).arch.to_dict()
    if args.block is not None:
        shape = {**shape, "block_size": args.block}
    batch = args.batch or batch
    arch = {"family": "gpt", "task": "lm", "dropout": 0.0, "bias": False, **shape}
    with torch.device("meta"):
        n_params = registry.count_parameters(registry.build_model(arch))
    cases = [("fp32", False, None), ("fp32", False, LORA)] if args.lora else [(p, c, None) for p, c in CASES]
    results = []
    for precision, checkpointing, lora_settings in cases:
        measure = measure_cuda if args.device == "cuda" else measure_cpu
        measured = measure(arch, batch, precision, checkpointing, lora_settings)
        runtime = 0 if args.device == "cuda" else hardware.CPU_RUNTIME
        typed = DecoderArch(**arch)
        adapter = (
            accounting.lora_parameters(typed, LoRAConfig(**lora_settings).projections(), lora_settings["rank"])
            if lora_settings
            else None
        )
        estimate = accounting.training_memory(
            typed,
            n_params,
            batch=batch,
            precision=precision,
            activation_checkpointing=checkpointing,
            runtime=runtime,
            adapter=adapter,
        )
        results.append(
            {
                "precision": precision,
                "activation_checkpointing": checkpointing,
                "training": "lora" if lora_settings else "full",
                "measured_mib": round(measured / 2**20, 1),
                "estimate_mib": round(estimate["total"] / 2**20, 1),
                "estimate_over_measured": round(estimate["total"] / measured, 3),
            }
        )
    print(
        json.dumps(
            {"device": args.device, "parameters": n_params, "batch": batch, "shape": shape, "cases": results}, indent=2
        )
    )


if __name__ == "__main__":
    main()
