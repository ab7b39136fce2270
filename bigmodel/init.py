"""init: model config + prepared data -> a seeded initial checkpoint (<run_dir>/init/model.safetensors).

It also reports what the model will cost: parameters and, for the GPT, training FLOPs per token and
the memory training will need at the configured batch size.
"""

from __future__ import annotations

from typing import Any

import torch

from bigmodel import accounting, console, registry
from bigmodel.checkpoint import model_tensors, save_checkpoint
from bigmodel.config import Config
from bigmodel.datasets import TOKENIZER_FILE, data_manifest, prepared_files
from bigmodel.io import sha256_file
from bigmodel.models import gpt
from bigmodel.runtime import setup_torch


def run(config: Config) -> dict[str, Any]:
    setup_torch(config)
    data = data_manifest(config)
    arch = registry.architecture(config.model, data)
    model = registry.build_model(arch)
    scheme = registry.init_weights(model, arch["family"], config.init.scheme, config.init.std)
    if arch["family"] == "mlp":
        _load_statistics(model, data["statistics"])

    path = config.stage_dir("init") / "model.safetensors"
    manifest = {
        "family": arch["family"],
        "architecture": arch,
        "data": data_info(config, data),
        "config": config.model_dump(mode="json"),
        "init_scheme": scheme,
        "step": 0,
        "metrics": {},
        "lineage": {"data": sha256_file(prepared_files(config)[1])},
    }
    save_checkpoint(path, model_tensors(model), manifest)
    report = _report(model, arch, config)
    console.info(f"init: {arch['family']} with {report['parameters']:,} parameters ({scheme} init) -> {path}")
    if arch["family"] == "gpt":
        memory = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in report["training_memory_bytes"].items())
        console.info(
            f"init: {report['parameters_without_position_embeddings']:,} without position embeddings; "
            f"{report['flops_per_token']:,} training FLOPs per token; training memory at batch "
            f"{config.train.batch_size}: {memory}"
        )
    return {"checkpoint": str(path), "init_scheme": scheme, **report}


def data_info(config: Config, data: dict[str, Any]) -> dict[str, Any]:
    """What later artifacts must know about the data: columns and labels, or the tokenizer itself."""
    if config.data.format == "text":
        tokenizer_json = (config.stage_dir("prepare") / TOKENIZER_FILE).read_text(encoding="utf-8")
        return {"task": "lm", "vocab_size": data["vocab_size"], "tokenizer": tokenizer_json}
    return {k: data[k] for k in ("task", "target", "features", "labels")}


def _report(model: torch.nn.Module, arch: dict[str, Any], config: Config) -> dict[str, Any]:
    if arch["family"] != "gpt":
        return {"parameters": registry.count_parameters(model)}
    counts = gpt.parameter_counts(model)
    return {
        "parameters": counts["total"],
        "parameters_without_position_embeddings": counts["without_position_embeddings"],
        "flops_per_token": accounting.flops_per_token(arch, counts["without_position_embeddings"]),
        "training_memory_bytes": accounting.training_memory(
            arch, counts["total"], batch=config.train.batch_size, precision=config.train.precision,
            optimizer=config.train.optimizer, momentum=config.train.momentum,
            activation_checkpointing=config.train.activation_checkpointing,
        ),
    }


def _load_statistics(model: torch.nn.Module, stats: dict[str, Any]) -> None:
    """Copy the standardisation fitted by `prepare` into the model, so it travels with the weights."""
    with torch.no_grad():
        model.feature_mean.copy_(torch.tensor(stats["feature_mean"]))
        model.feature_std.copy_(torch.tensor(stats["feature_std"]))
        if "target_mean" in stats:
            model.target_mean.fill_(stats["target_mean"])
            model.target_std.fill_(stats["target_std"])
