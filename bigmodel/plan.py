"""plan: what training and serving the configured model will cost, before spending it.

Parameters are counted exactly on a model built on the meta device (no memory, so a 175B config plans
in seconds on a laptop); everything else comes from bigmodel/accounting.py's formulas and a hardware
profile. Nothing is written: the report goes to stdout (a table, or one JSON object with --json).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from bigmodel import accounting, console, memory, registry
from bigmodel.arch import AnyArch, DecoderArch, TabularArch
from bigmodel.config import HARDWARE, Config
from bigmodel.datasets import MANIFEST_FILE
from bigmodel.errors import UserError
from bigmodel.hardware import Hardware, profile
from bigmodel.io import read_json
from bigmodel.models import gpt


def run(config: Config) -> dict[str, Any]:
    pc, tc = config.plan, config.train
    arch = _architecture(config)
    start = time.perf_counter()
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = registry.build_model(arch)
    n_params = registry.count_parameters(model)
    report: dict[str, Any] = {"model": {"family": arch.family, "parameters": n_params, "architecture": arch.to_dict()}}
    if isinstance(arch, TabularArch):
        report["planned_in_s"] = round(time.perf_counter() - start, 3)
        return report

    n_no_pos = (
        gpt.parameter_counts(model)["without_position_embeddings"]
        if isinstance(arch, DecoderArch)
        else accounting.encoder_matmul_parameters(arch, n_params)
    )
    hardware = profile(pc.hardware)
    if "hardware" not in pc.model_fields_set:  # a datacenter GPU, assumed: said where nobody can miss it
        console.warn(
            f"plan: planning for {pc.devices} x {hardware.name}, plan.hardware's default; --hardware "
            "local plans for this machine (measured now), or name a profile: "
            f"{', '.join(h for h in HARDWARE if h != 'local')}"
        )
    flops_per_token = accounting.flops_per_token(arch, n_no_pos)
    tokens, tokens_from = _training_tokens(config, arch, n_params)
    total_flops = flops_per_token * tokens
    adapter = accounting.lora_parameters(arch, tc.lora.projections(), tc.lora.rank) if tc.lora is not None else None
    run_plan = RunPlan(config, arch, hardware, n_params, adapter, total_flops, tokens)

    memory = run_plan.memory(pc.devices)
    lora_report = (
        {}
        if adapter is None
        else {
            "lora_trainable_parameters": adapter,
            "full_fine_tuning_total": run_plan.memory(pc.devices, full=True)["total"],
        }
    )
    context = pc.inference_context or arch.block_size
    serving = {
        name: accounting.inference_memory(
            arch, n_params, batch=pc.inference_batch, context=context, weight_bytes=width, cache_bytes=width
        )
        for name, width in (("fp32", 4), ("bf16", 2))
    }
    communication = run_plan.communication(pc.devices)
    seconds = run_plan.seconds(pc.devices)
    power = pc.power_w or hardware.power_w
    energy_kwh = None if power is None else seconds / 3600 * pc.devices * power * pc.pue / 1000
    device_hours = seconds * pc.devices / 3600
    price = pc.price if pc.price is not None else hardware.price_per_hour
    report.update(
        {
            "model": {**report["model"], "parameters_without_position_embeddings": n_no_pos},
            "compute": {
                "flops_per_token": flops_per_token,
                "tokens": tokens,
                "tokens_from": tokens_from,
                "total_flops": total_flops,
                "compute_optimal_tokens": 20 * n_params,  # Hoffmann et al. 2022 (Chinchilla): ~20 per parameter
                "tokens_per_parameter": round(tokens / n_params, 2),
                "steps": run_plan.steps,
                "tokens_per_step": run_plan.tokens_per_step,
            },
            "training_memory_per_device": {
                **memory,
                "device_memory": hardware.memory_bytes,
                "fits": memory["total"] <= hardware.memory_bytes,
                "batch_per_device": run_plan.batch_per_device(pc.devices),
                "precision": run_plan.precision,
                "optimizer_kind": tc.optimizer,
                "sharding": run_plan.sharding(pc.devices),
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
            "stage_memory": stage_memory(config, arch, n_params),
            "storage": run_plan.storage,
            "communication": communication,
            "storage_io": run_plan.storage_io(pc.devices),
            "devices_needed": run_plan.devices_needed(),
            "time_and_energy": {
                "hardware": hardware.name,
                "hardware_source": hardware.source,
                "hardware_assumed": "hardware" not in pc.model_fields_set,  # plan.hardware's default, not chosen
                "devices": pc.devices,
                "peak_flops_per_device": run_plan.peak,
                "mfu": pc.mfu,
                "compute_seconds": run_plan.compute_seconds(pc.devices),
                "seconds": seconds,
                "days": seconds / 86400,
                "device_hours": device_hours,
                "power_w_per_device": power,
                "energy_kwh": energy_kwh,
            },
            "cost": {
                "price_per_device_hour": price,
                "price_source": "plan.price" if pc.price is not None else (hardware.price_source or None),
                "devices_usd": None if price is None else device_hours * price,
                "price_per_kwh": pc.price_per_kwh,
                "energy_usd": None if energy_kwh is None else energy_kwh * pc.price_per_kwh,
            },
            "planned_in_s": round(time.perf_counter() - start, 3),
        }
    )
    return report


class RunPlan:
    """One training run's figures as functions of the device count, the global batch held fixed: memory,
    communication and wall clock, so plan can also ask which count fits, or finishes in time."""

    MAX_DEVICES = 1 << 20

    def __init__(
        self,
        config: Config,
        arch: accounting.TransformerArch,
        hardware: Hardware,
        n_params: int,
        adapter: int | None,
        total_flops: float,
        tokens: int,
    ) -> None:
        self.config, self.arch, self.hardware = config, arch, hardware
        self.n_params, self.adapter, self.total_flops, self.tokens = n_params, adapter, total_flops, tokens
        tc = config.train
        self.global_rows = tc.batch_size * tc.grad_accum_steps
        self.tokens_per_step = self.global_rows * arch.block_size
        self.steps = max(1, math.ceil(tokens / self.tokens_per_step))
        # auto: bf16 where the device multiplies it faster than fp32 (every GPU profile; 'local' as measured)
        self.precision = (
            tc.precision if tc.precision != "auto" else "bf16" if hardware.bf16_flops > hardware.fp32_flops else "fp32"
        )
        self.peak = hardware.bf16_flops if self.precision == "bf16" else hardware.fp32_flops
        # LoRA under bf16 autocast keeps the checkpoint's frozen matrices as stored (registry.load_frozen_base)
        self.frozen_bytes = memory.DTYPE_BYTES.get(stored_dtype(config), 4) if self.precision == "bf16" else 4
        self.storage = accounting.disk_sizes(arch, n_params, tc.optimizer, tc.momentum)
        if adapter is not None:  # a LoRA run's checkpoints hold the adapters (and their optimizer state) only
            adapter_sizes = accounting.disk_sizes(arch, adapter, tc.optimizer, tc.momentum)
            self.storage = {
                **self.storage,
                "checkpoint": adapter_sizes["checkpoint"],
                "training_state": adapter_sizes["training_state"],
                "lora_adapter": True,
            }
        self.checkpoint_bytes = self.storage["training_state"]
        # Steps between resumable checkpoints, as train does it: save_every, else eval_every, else once an
        # epoch (of the prepared data), else once at the end.
        train_tokens = _prepared_train_tokens(config)
        per_epoch = math.ceil(train_tokens / self.tokens_per_step) if train_tokens else self.steps
        self.checkpoint_interval = min(self.steps, tc.save_every or tc.eval_every or per_epoch)
        self.checkpoint_writes = math.ceil(self.steps / self.checkpoint_interval)

    def sharding(self, devices: int) -> str:
        return self.config.train.distributed if devices > 1 else "none"

    def batch_per_device(self, devices: int) -> int:
        return max(1, min(self.config.train.batch_size, self.global_rows // devices))

    def memory(self, devices: int, full: bool = False) -> dict[str, int]:
        tc = self.config.train
        return accounting.training_memory(
            self.arch,
            self.n_params,
            batch=self.batch_per_device(devices),
            precision=self.precision,
            optimizer=tc.optimizer,
            momentum=tc.momentum,
            sharding=self.sharding(devices),
            devices=devices,
            activation_checkpointing=tc.activation_checkpointing,
            fsdp_param_bytes=2 if tc.fsdp.param_dtype == "bf16" else 4,
            runtime=self.hardware.runtime_bytes,
            adapter=None if full else self.adapter,
            fused_dropout=self.config.plan.hardware != "local",  # local: this CPU
            frozen_bytes=self.frozen_bytes,
            per_example=accounting.poisson_ceiling(tc.batch_size) if tc.privacy is not None else 0,
        )

    def compute_seconds(self, devices: int) -> float:
        return self.total_flops / (devices * self.peak * self.config.plan.mfu)

    def communication(self, devices: int) -> dict[str, Any]:
        """Gradient and parameter traffic per step, its time on the link the devices share, and how much of
        it the step's compute hides: DDP overlaps its all-reduce with the backward pass (2/3 of the step's
        FLOPs); FSDP prefetches each all-gather during the previous block's compute (forward: 1/3) and its
        backward all-gathers and reduce-scatter overlap the backward."""
        tc = self.config.train
        sharding = self.sharding(devices)
        per_device = self.global_rows // devices
        collectives = accounting.communication_per_step(
            sharding,
            devices,
            parameters=self.n_params,
            trainable=self.adapter or self.n_params,
            micro_batches=max(1, math.ceil(per_device / self.batch_per_device(devices))),
            param_bytes=2 if tc.fsdp.param_dtype == "bf16" else 4,
            reduce_bytes=2 if tc.fsdp.reduce_dtype == "bf16" else 4,
            reshard_after_forward=tc.fsdp.reshard_after_forward,
        )
        step_bytes = sum(collectives.values())
        found: dict[str, Any] = {
            "sharding": sharding,
            "bytes_per_step_per_device": step_bytes,
            "bytes_per_run_per_device": step_bytes * self.steps,
            "collectives": collectives,
        }
        link = self.hardware.link(devices)
        if not collectives:
            return {**found, "exposed_seconds_per_step": 0.0}
        if link is None:
            return {**found, "link": None, "exposed_seconds_per_step": 0.0}
        step = self.compute_seconds(devices) / self.steps
        times = {name: size / link.bytes_per_s for name, size in collectives.items()}
        if sharding == "ddp":
            exposed = max(0.0, times["all_reduce"] - 2 * step / 3)
        else:
            exposed = max(0.0, times["all_gather_forward"] - step / 3) + max(
                0.0, times["all_gather_backward"] + times["reduce_scatter"] - 2 * step / 3
            )
        return {
            **found,
            "link": link.name,
            "link_bytes_per_s": link.bytes_per_s,
            "seconds_per_step": sum(times.values()),
            "compute_seconds_per_step": step,
            "exposed_seconds_per_step": exposed,
            "hidden": exposed == 0.0,
        }

    def seconds(self, devices: int) -> float:
        """Wall clock: compute at the assumed MFU, the communication compute cannot hide, and the checkpoint
        writes (synchronous: rank 0 writes the consolidated checkpoint while the others wait)."""
        return (
            self.compute_seconds(devices)
            + self.steps * self.communication(devices)["exposed_seconds_per_step"]
            + self.checkpoint_writes * self.checkpoint_bytes / self.config.plan.storage_bandwidth
        )

    def storage_io(self, devices: int) -> dict[str, Any]:
        """Reading the training tokens (uint16 ids, uint32 past 65,536) and writing resumable checkpoints at
        plan.storage_bandwidth; the loader reads ahead, so only a read slower than a step would show."""
        bandwidth = self.config.plan.storage_bandwidth
        token_bytes = 2 if self.arch.vocab_size <= 1 << 16 else 4
        read_seconds = self.tokens * token_bytes / bandwidth
        writes = self.checkpoint_writes
        return {
            "storage_bandwidth": bandwidth,
            "data_bytes": self.tokens * token_bytes,
            "data_read_seconds": read_seconds,
            "data_read_hidden": read_seconds <= self.compute_seconds(devices),
            "checkpoint_bytes": self.checkpoint_bytes,
            "checkpoint_interval_steps": self.checkpoint_interval,
            "checkpoint_writes": writes,
            "checkpoint_write_seconds": self.checkpoint_bytes / bandwidth,
            "checkpoint_seconds_total": writes * self.checkpoint_bytes / bandwidth,
        }

    def devices_needed(self) -> dict[str, Any]:
        """The fewest devices whose memory holds the run (train.distributed sharding), and with plan.days the
        fewest that also finish in time. Candidates divide the global batch (each gets whole rows)."""
        candidates = [n for n in range(1, min(self.global_rows, self.MAX_DEVICES) + 1) if self.global_rows % n == 0]
        memory = self.hardware.memory_bytes
        fit = next((n for n in candidates if self.memory(n)["total"] <= memory), None)
        found: dict[str, Any] = {
            "fewest_that_fit": fit,
            "candidates": f"divisors of the global batch ({self.global_rows} rows)",
            "sharding": self.config.train.distributed,
        }
        days = self.config.plan.days
        if days is not None:
            usable = [n for n in candidates if fit is not None and n >= fit]
            found["days"] = days
            found["to_finish_in_days"] = next((n for n in usable if self.seconds(n) <= days * 86400), None)
            if usable:
                found["fastest_days"] = min(self.seconds(n) for n in usable) / 86400
        return found


def stored_dtype(config: Config, source: Any = None) -> str:
    """The dtype init's checkpoint stores its weights in: the import's (init.dtype; `source`: its described
    files, when already read), else fp32."""
    if config.init.from_ is None:
        return "float32"
    from bigmodel import pretrained
    from bigmodel.pretrained.build import checkpoint_dtype

    source = source or pretrained.describe(config.init.from_)
    return str(checkpoint_dtype(config.init.dtype, source)).removeprefix("torch.")


def stage_memory(config: Config, arch: AnyArch, n_params: int) -> dict[str, Any]:
    """Each stage's predicted peak resident memory on the machine it runs on (bigmodel/memory.py: what the
    stage's own guard checks before it allocates): the import, the export in fp32 and int4, and inference
    and serving of the int4 file."""
    if not isinstance(arch, DecoderArch):
        return {}
    from bigmodel.infer import PROMPT_ROOM

    stored = "float32"
    found: dict[str, Any] = {}
    if config.init.from_ is not None:
        from bigmodel import pretrained

        source = pretrained.describe(config.init.from_)
        stored = stored_dtype(config, source)
        found["init"] = memory.import_peak(arch, source.format, source.dtype, stored, n_params, config.init.verify)
    from bigmodel.export.gpt import attends_group_query

    xc = config.export  # (export itself refuses `attention: ort` where the operator cannot compute the model)
    group_query = attends_group_query(arch, xc.opset, "auto" if xc.attention == "ort" else xc.attention)
    for dtype in ("fp32", "int4"):
        found[f"export_{dtype}"] = memory.export_peak(arch, n_params, stored, dtype, xc.int4, group_query)
    int4_file = memory.export_file_bytes(arch, n_params, "int4", xc.int4, group_query)
    context = min(arch.block_size, config.infer.max_new_tokens + PROMPT_ROOM)
    found["infer_int4"] = memory.runtime_peak("infer", arch, int4_file, 1, context)
    serve_context = min(arch.block_size, config.serve.max_tokens + PROMPT_ROOM)
    found["serve_int4"] = memory.runtime_peak("serve", arch, int4_file, config.serve.max_batch, serve_context)
    room, where = memory.room(config.memory_limit)
    return {
        "available": room,
        "available_from": where,
        "int4_file": int4_file,
        **{name: estimate.to_dict() for name, estimate in found.items()},
    }


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
                raise UserError(
                    f"plan: a classifier's labels come from its data; run 'bigmodel prepare' first ({manifest_path})"
                )
            labels = len(read_json(manifest_path, "prepared-data manifest")["labels"])
        return pretrained.with_config_overrides(source.arch, config.model, config.task, labels)
    manifest_path = config.stage_dir("prepare") / MANIFEST_FILE
    if manifest_path.is_file():
        manifest = read_json(manifest_path, "prepared-data manifest")
        if config.plan.vocab_size is not None:
            manifest = {**manifest, "vocab_size": config.plan.vocab_size}
        return registry.architecture(config.model, manifest)
    if config.model.family != "gpt":
        raise UserError(
            f"plan: a {config.model.family} model's shape comes from its data (its columns, vocabulary "
            f"or labels); run 'bigmodel prepare' first ({manifest_path})"
        )
    vocab = config.plan.vocab_size
    if vocab is None and config.data.format == "text" and config.data.tokenizer.kind == "bpe":
        vocab = config.data.tokenizer.vocab_size
    if vocab is None:
        raise UserError(
            "plan: the vocabulary size is not known before 'bigmodel prepare' for this tokenizer; "
            "run prepare, or pass --set plan.vocab_size=N"
        )
    return registry.architecture(config.model, {"vocab_size": vocab})


def _training_tokens(config: Config, arch: accounting.TransformerArch, n_params: int) -> tuple[int, str]:
    tc = config.train
    if config.plan.tokens is not None:
        return config.plan.tokens, "plan.tokens"
    tokens_per_step = tc.batch_size * tc.grad_accum_steps * arch.block_size
    if tc.max_steps is not None:
        return tc.max_steps * tokens_per_step, "train.max_steps"
    train_tokens = _prepared_train_tokens(config)
    if train_tokens is not None:
        return (tc.epochs or 1) * train_tokens, "train.epochs x prepared train tokens"
    return 20 * n_params, "compute-optimal (20 per parameter)"


def _prepared_train_tokens(config: Config) -> int | None:
    manifest_path = config.stage_dir("prepare") / MANIFEST_FILE
    if not manifest_path.is_file():
        return None
    splits = read_json(manifest_path, "prepared-data manifest").get("tokens", {})
    return int(splits["train"]) if "train" in splits else None


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
            (
                "  compute-optimal tokens",
                f"{c['compute_optimal_tokens']:,}",
                f"Chinchilla; planned {c['tokens_per_parameter']} per parameter",
            ),
            (
                "training memory per device",
                "",
                f"{m['sharding']}, {m['precision']}, {m['optimizer_kind']}, batch "
                f"{m['batch_per_device']}{', activation checkpointing' if m['activation_checkpointing'] else ''}",
            ),
            *[
                (f"  {key}", _bytes(m[key]), "")
                for key in ("weights", "gradients", "optimizer", "activations", "runtime")
            ],
            (
                "  peak",
                _bytes(m["total"]),
                f"{'fits' if m['fits'] else 'DOES NOT FIT'} in {_bytes(m['device_memory'])}",
            ),
            *(
                [
                    (
                        "  LoRA trainable parameters",
                        f"{m['lora_trainable_parameters']:,}",
                        "frozen base: no gradients or optimizer state for it",
                    ),
                    ("  full fine-tuning peak", _bytes(m["full_fine_tuning_total"]), ""),
                ]
                if "lora_trainable_parameters" in m
                else []
            ),
            ("inference memory", "", f"batch {i['batch']}, context {i['context']}"),
            ("  fp32 weights + KV cache", _bytes(i["fp32_total"]), f"KV cache {_bytes(i['kv_cache_fp32'])}"),
            ("  bf16 weights + KV cache", _bytes(i["bf16_total"]), ""),
            *_stage_memory_rows(report["stage_memory"]),
            ("storage", "", ""),
            (
                "  checkpoint (weights)",
                _bytes(s["checkpoint"]),
                "safetensors, fp32" + (": the LoRA adapters only" if s.get("lora_adapter") else ""),
            ),
            ("  resumable checkpoint", _bytes(s["training_state"]), "with optimizer state"),
            ("  ONNX fp32 / int8", f"{_bytes(s['onnx_fp32'])} / {_bytes(s['onnx_int8'])}", ""),
            *_communication_rows(report["communication"]),
            *_storage_io_rows(report["storage_io"]),
            *_devices_rows(report["devices_needed"]),
            ("time and energy", "", f"{t['devices']} x {t['hardware']}, MFU {t['mfu']}"),
            (
                "  wall clock",
                _duration(t["seconds"]),
                f"{t['device_hours']:,.0f} device-hours"
                + (f"; compute alone {_duration(t['compute_seconds'])}" if t["seconds"] > t["compute_seconds"] else ""),
            ),
            (
                "  energy",
                "unknown" if t["energy_kwh"] is None else f"{t['energy_kwh']:,.1f} kWh",
                "set plan.power_w" if t["energy_kwh"] is None else f"{t['power_w_per_device']:g} W per device",
            ),
            *_cost_rows(report["cost"], t["device_hours"]),
        ]
        for row in rows:
            heading = not row[0].startswith(" ")
            table.add_row(*row, style="bold cyan" if heading else None)
    Console(width=max(Console().width, 110)).print(table)


def _stage_memory_rows(memory: dict[str, Any]) -> list[tuple[str, str, str]]:
    if not memory:
        return []
    labels = {
        "init": "init (import + gate)",
        "export_fp32": "export fp32",
        "export_int4": "export int4",
        "infer_int4": "infer (int4 file)",
        "serve_int4": "serve (int4 file)",
    }
    room = memory["available"]
    return [
        ("stage peak memory (host)", "", f"{_bytes(room)} {memory['available_from']}"),
        *[
            (f"  {label}", _bytes(memory[key]["peak"]), "fits" if memory[key]["peak"] <= room else "DOES NOT FIT")
            for key, label in labels.items()
            if key in memory
        ],
    ]


def _communication_rows(c: dict[str, Any]) -> list[tuple[str, str, str]]:
    if not c["collectives"]:
        return []
    what = "gradient all-reduce" if c["sharding"] == "ddp" else "parameter all-gathers, gradient reduce-scatter"
    rows = [
        ("communication", "", f"{c['sharding']}: {what}"),
        (
            "  per step per device",
            _bytes(c["bytes_per_step_per_device"]),
            f"per run {_bytes(c['bytes_per_run_per_device'])}",
        ),
    ]
    if c.get("link") is None:
        return [*rows, ("  time per step", "unknown", "this hardware profile has no link bandwidths")]
    verdict = (
        "hidden behind compute"
        if c["hidden"]
        else f"NOT hidden: {_duration(c['exposed_seconds_per_step'])} per step exposed"
    )
    return [
        *rows,
        (
            "  time per step",
            _duration(c["seconds_per_step"]),
            f"{c['link']}, {c['link_bytes_per_s'] / 1e9:g} GB/s per device",
        ),
        ("  compute per step", _duration(c["compute_seconds_per_step"]), verdict),
    ]


def _storage_io_rows(io: dict[str, Any]) -> list[tuple[str, str, str]]:
    bandwidth = f"at {io['storage_bandwidth'] / 1e9:g} GB/s"
    return [
        ("storage traffic", "", bandwidth),
        (
            "  training data read",
            _bytes(io["data_bytes"]),
            f"{_duration(io['data_read_seconds'])}, "
            + ("behind compute" if io["data_read_hidden"] else "SLOWER than compute"),
        ),
        (
            "  checkpoint writes",
            f"{io['checkpoint_writes']:,} x {_bytes(io['checkpoint_bytes'])}",
            f"every {io['checkpoint_interval_steps']:,} steps, {_duration(io['checkpoint_write_seconds'])} each, "
            f"{_duration(io['checkpoint_seconds_total'])} in all (in the wall clock)",
        ),
    ]


def _devices_rows(d: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = [
        ("devices needed", "", f"{d['sharding']}; {d['candidates']}"),
        (
            "  fewest that fit",
            "none" if d["fewest_that_fit"] is None else f"{d['fewest_that_fit']:,}",
            "no count fits: shard (fsdp), checkpoint activations or shrink the batch"
            if d["fewest_that_fit"] is None
            else "",
        ),
    ]
    if "days" in d:
        n = d["to_finish_in_days"]
        rows.append(
            (
                f"  to finish in {d['days']:g} days",
                "none" if n is None else f"{n:,}",
                ""
                if n is not None or "fastest_days" not in d
                else f"the fastest any count gets is {d['fastest_days']:,.1f} days: raise the global batch",
            )
        )
    return rows


def _cost_rows(c: dict[str, Any], device_hours: float) -> list[tuple[str, str, str]]:
    devices = (
        ("unknown", "set plan.price (--price)")
        if c["devices_usd"] is None
        else (f"${c['devices_usd']:,.0f}", f"{device_hours:,.0f} device-hours x ${c['price_per_device_hour']:.2f}")
    )
    energy = (
        ("unknown", "needs a power figure")
        if c["energy_usd"] is None
        else (f"${c['energy_usd']:,.0f}", f"at ${c['price_per_kwh']:g} per kWh")
    )
    source = [] if c["devices_usd"] is None else [("  price from", "", c["price_source"])]
    return [("cost", "", "USD"), ("  devices", *devices), *source, ("  energy", *energy)]


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
