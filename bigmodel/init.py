"""init: model config + prepared data -> a seeded initial checkpoint (<run_dir>/init/model.safetensors).

It also reports what the model will cost: parameters and, for the GPT, training FLOPs per token and
the memory training will need at the configured batch size.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bigmodel import accounting, console, memory, registry, streaming
from bigmodel import tokenizer as tokenizers
from bigmodel.arch import AnyArch, DecoderArch
from bigmodel.checkpoint import model_tensors, save_checkpoint
from bigmodel.config import Config
from bigmodel.datasets import TOKENIZER_FILE, data_manifest, prepared_files
from bigmodel.errors import UserError
from bigmodel.io import sha256_file
from bigmodel.manifests import CheckpointManifest, DataInfo, ImportRecord
from bigmodel.models import gpt
from bigmodel.runtime import peak_rss_bytes, resolve_device, setup_torch, training_precision
from bigmodel.weights import SafetensorsFile, safetensors_writer


def run(config: Config) -> dict[str, Any]:
    setup_torch(config)
    if config.init.from_ is not None:
        return import_pretrained(config)
    data = data_manifest(config)
    arch = registry.architecture(config.model, data)
    model = registry.build_model(arch)
    scheme = registry.init_weights(model, arch.family, config.init.scheme, config.init.std)
    if "statistics" in data:  # tabular: the standardisation travels inside the model
        _load_statistics(model, data["statistics"])

    path = config.stage_dir("init") / "model.safetensors"
    manifest = CheckpointManifest(
        family=arch.family,
        architecture=arch,
        data=data_info(config, data),
        config=config.model_dump(mode="json"),
        init_scheme=scheme,
        lineage={"data": sha256_file(prepared_files(config)[1])},
    )
    save_checkpoint(path, model_tensors(model), manifest)
    report = _report(model, arch, config)
    console.info(f"init: {arch.family} with {report['parameters']:,} parameters ({scheme} init) -> {path}")
    if "training_memory_bytes" in report:
        memory = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in report["training_memory_bytes"].items())
        console.info(
            f"init: {report['parameters_without_position_embeddings']:,} without position embeddings; "
            f"{report['flops_per_token']:,} training FLOPs per token; training memory at batch "
            f"{config.train.batch_size}: {memory}"
        )
    return {"checkpoint": str(path), "init_scheme": scheme, **report}


def import_pretrained(config: Config) -> dict[str, Any]:
    """init.from: a pretrained model, written into the run's init checkpoint one parameter at a time (in
    the source's dtype unless init.dtype says otherwise), checked against transformers with both models'
    weights streamed, and published only when the gate passes: the import holds one parameter, or one
    module in fp32 during the gate, never the model."""
    from bigmodel import pretrained
    from bigmodel.pretrained import build

    source_path = config.init.from_
    assert source_path is not None
    memory.map_large_allocations()
    start = time.perf_counter()
    source = pretrained.describe(source_path)
    pretrained.check_config(config.model, source.arch, source_path)
    data = data_manifest(config)
    arch = pretrained.with_config_overrides(source.arch, config.model, config.task, len(data.get("labels") or []))
    if data.get("tokenizer", {}).get("source") != str(source_path):
        raise UserError(
            f"the prepared data was not tokenized with {source_path.name}'s tokenizer; re-run "
            "'bigmodel prepare' with this init.from"
        )
    plan = build.WeightPlan(source, arch, config.seed)
    for note in source.notes:
        console.info(f"init: {note}")
    dtype = build.checkpoint_dtype(config.init.dtype, source)
    with torch.device("meta"):
        model = registry.build_model(arch)  # shapes and counts only: no memory
    parameters = registry.count_parameters(model)
    if isinstance(arch, DecoderArch):
        memory.guard(
            memory.import_peak(
                arch, source.format, source.dtype, str(dtype).removeprefix("torch."), parameters, config.init.verify
            ),
            config.memory_limit,
        )
    record = ImportRecord(
        source=str(source_path),
        format=source.format,
        model_type=source.model_type,
        parameters=parameters,
        source_dtype=source.dtype,
        dtype=str(dtype).removeprefix("torch."),
        sha256=sha256_file(source_path) if source_path.is_file() else None,
        notes=source.notes,
        context=source.arch.block_size,  # the model's own context (model.block_size may be shorter)
    )
    manifest = CheckpointManifest(
        family=arch.family,
        architecture=arch,
        data=data_info(config, data),
        config=config.model_dump(mode="json"),
        init_scheme="pretrained",
        import_=record,
        lineage={"data": sha256_file(prepared_files(config)[1])},
    )
    path = config.stage_dir("init") / "model.safetensors"
    entries = [(f"model.{name}", dtype, shape) for name, shape in plan.shapes.items()]
    reference = None
    if config.init.verify:  # transformers' side of the gate reads the source: it runs while the import writes
        tok = tokenizers.from_json(source.tokenizer_json, f"{source_path} (tokenizer)")
        reference = build.Reference(source, build.parity_ids(tok, arch.block_size))
    with safetensors_writer(path, entries, manifest.header()) as out:
        for name in plan.shapes:
            out.write(f"model.{name}", plan.assemble(name, dtype))
        out.flush()
        seconds = time.perf_counter() - start
        if reference is not None:
            written = streaming.fetch_from(SafetensorsFile(out.tmp), "model.")
            parity = build.check_parity(
                written, arch, source, tok, config.init.atol, config.init.rtol, reference=reference
            )
            build.enforce(
                parity,
                "init",
                f"parity with {parity['reference']} on a {parity['prompt_tokens']}-token "
                "prompt (both models streamed, fp32)",
                "nothing was written",
            )
        else:
            parity = {"verified": False}
            console.info("init: parity check skipped (init.verify: false): the checkpoint is recorded as unverified")
        peak = peak_rss_bytes()
        record.parity, record.seconds, record.peak_rss_bytes = parity, round(seconds, 2), peak
        record.gate_seconds = round(time.perf_counter() - start - seconds, 2)
        out.finish(manifest.header())
    report = _report(model, arch, config)
    console.info(
        f"init: imported {source.model_type} ({source.format}, {source.dtype}) with "
        f"{report['parameters']:,} parameters as {record.dtype} in {seconds:.1f} s (gate "
        f"{record.gate_seconds:.1f} s), peak RSS {(peak or 0) / 2**20:,.0f} MiB -> {path}"
    )
    return {"checkpoint": str(path), "init_scheme": "pretrained", "import": record.model_dump(mode="json"), **report}


def data_info(config: Config, data: dict[str, Any]) -> DataInfo:
    """What later artifacts must know about the data: columns and labels, or the tokenizer itself (with
    an imported model's special tokens and chat template)."""
    if config.task == "lm":
        tokenizer_json = (config.stage_dir("prepare") / TOKENIZER_FILE).read_text(encoding="utf-8")
        return DataInfo(
            task="lm",
            vocab_size=data["vocab_size"],
            tokenizer=tokenizer_json,
            special_tokens=data.get("special_tokens") or {},
            chat_template=data.get("chat_template"),
        )
    if config.data.format == "text_classification":
        tokenizer_json = (config.stage_dir("prepare") / TOKENIZER_FILE).read_text(encoding="utf-8")
        return DataInfo(
            task=config.task,
            vocab_size=data["vocab_size"],
            tokenizer=tokenizer_json,
            **{k: data[k] for k in ("text", "text_pair", "target", "labels", "special_ids", "pad_id")},
        )
    return DataInfo(**{k: data[k] for k in ("task", "target", "features", "labels")})


def _report(model: torch.nn.Module, arch: AnyArch, config: Config) -> dict[str, Any]:
    if not isinstance(arch, DecoderArch):
        return {"parameters": registry.count_parameters(model)}
    counts = gpt.parameter_counts(model)
    precision = training_precision(config.train.precision, resolve_device(config.device))
    return {
        "parameters": counts["total"],
        **(_active(arch, counts["without_position_embeddings"]) if arch.n_experts else {}),
        "parameters_without_position_embeddings": counts["without_position_embeddings"],
        "flops_per_token": accounting.flops_per_token(arch, counts["without_position_embeddings"]),
        "training_memory_bytes": accounting.training_memory(
            arch,
            counts["total"],
            batch=config.train.batch_size,
            precision=precision,
            optimizer=config.train.optimizer,
            momentum=config.train.momentum,
            activation_checkpointing=config.train.activation_checkpointing,
        ),
    }


def _active(arch: DecoderArch, matmul_parameters: int) -> dict[str, int]:
    """A mixture's parameters and training FLOPs per token counting only the experts a token is routed to
    (bigmodel computes every expert: `flops_per_token` is what it runs, this is what the routing needs)."""
    active = accounting.active_parameters(arch, matmul_parameters)
    return {"active_parameters": active, "active_flops_per_token": accounting.flops_per_token(arch, active)}


def _load_statistics(model: torch.nn.Module, stats: dict[str, Any]) -> None:
    """Copy the standardisation fitted by `prepare` into the model, so it travels with the weights."""
    with torch.no_grad():
        model.get_buffer("feature_mean").copy_(torch.tensor(stats["feature_mean"]))
        model.get_buffer("feature_std").copy_(torch.tensor(stats["feature_std"]))
        if "target_mean" in stats:
            model.get_buffer("target_mean").fill_(stats["target_mean"])
            model.get_buffer("target_std").fill_(stats["target_std"])
