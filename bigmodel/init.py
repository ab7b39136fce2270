"""init: model config + prepared data -> a seeded initial checkpoint (<run_dir>/init/model.safetensors)."""

from __future__ import annotations

from typing import Any

import torch

from bigmodel import console, registry
from bigmodel.checkpoint import model_tensors, save_checkpoint
from bigmodel.config import Config
from bigmodel.datasets import DATA_FILE, data_manifest
from bigmodel.io import sha256_file
from bigmodel.runtime import setup_torch


def run(config: Config) -> dict[str, Any]:
    setup_torch(config)
    data = data_manifest(config)
    arch = registry.architecture(config.model, data)
    model = registry.build_model(arch)
    scheme = registry.init_weights(model, arch["family"], config.init.scheme, config.init.std)
    _load_statistics(model, data["statistics"])

    n_params = registry.count_parameters(model)
    path = config.stage_dir("init") / "model.safetensors"
    manifest = {
        "family": arch["family"],
        "architecture": arch,
        "data": {k: data[k] for k in ("task", "target", "features", "labels")},
        "config": config.model_dump(mode="json"),
        "init_scheme": scheme,
        "step": 0,
        "metrics": {},
        "lineage": {"data": sha256_file(config.stage_dir("prepare") / DATA_FILE)},
    }
    save_checkpoint(path, model_tensors(model), manifest)
    console.info(f"init: {arch['family']} with {n_params:,} parameters ({scheme} init) -> {path}")
    return {"checkpoint": str(path), "parameters": n_params, "init_scheme": scheme}


def _load_statistics(model: torch.nn.Module, stats: dict[str, Any]) -> None:
    """Copy the standardisation fitted by `prepare` into the model, so it travels with the weights."""
    with torch.no_grad():
        model.feature_mean.copy_(torch.tensor(stats["feature_mean"]))
        model.feature_std.copy_(torch.tensor(stats["feature_std"]))
        if "target_mean" in stats:
            model.target_mean.fill_(stats["target_mean"])
            model.target_std.fill_(stats["target_std"])
