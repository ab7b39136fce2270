"""LoRA: low-rank adapters on a frozen transformer, decoder or encoder (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of LLMs").

A targeted projection W (out x in) computes W x + (alpha / r) B A dropout(x), with A (r x in)
Kaiming-uniform (as nn.Linear's default, and PEFT's) and B (out x r) zero, so the adapted model starts
exactly at the base model. Only A and B train; the optimizer holds state for them alone.

Targets have the same names for GPT-2-, Llama- and BERT-style models: q, k, v (rows of the fused c_attn
projection: each gets its own A and B, as PEFT's separate q_proj/k_proj/v_proj), o (attn.c_proj), gate
(mlp.c_gate, SwiGLU only), up (mlp.c_fc), down (mlp.c_proj). A task head the base does not have trained
(an encoder's new classifier) trains in full beside the adapters and is saved with them (PEFT's
`modules_to_save`).

An adapter checkpoint holds only A and B (names `...c_attn.lora_A.q`) and those heads, and its manifest names the base
checkpoint by sha256: it is refused against another base. `merge` folds the adapters into the weights
(W + scale B A), giving the plain model that export turns into ONNX. `peft_folder` writes the adapter as
a PEFT `adapter_config.json` + `adapter_model.safetensors` for the Hugging Face model of the same base.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigmodel.arch import DecoderArch, EncoderArch
from bigmodel.config import LoRAConfig
from bigmodel.errors import UserError
from bigmodel.manifests import AdapterBase, AdapterRecord

# target -> the Linear inside a block that it adapts
MODULES = {
    "q": "attn.c_attn",
    "k": "attn.c_attn",
    "v": "attn.c_attn",
    "o": "attn.c_proj",
    "gate": "mlp.c_gate",
    "up": "mlp.c_fc",
    "down": "mlp.c_proj",
}
# the Hugging Face module of each target, for PEFT folders
LLAMA_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
GPT2_MODULES = {
    "q": "attn.c_attn",
    "k": "attn.c_attn",
    "v": "attn.c_attn",
    "o": "attn.c_proj",
    "up": "mlp.c_fc",
    "down": "mlp.c_proj",
}


class LoRADown(nn.ParameterDict):
    """The adapters' A matrices of one projection (r x in each, by adapter name): h (..., in) -> the
    adapters' h A^T side by side (..., k*r). A module that computes with its own parameters, so Opacus can
    hook it for per-example gradients (bigmodel/train/privacy.py); the names stay `lora_A.<adapter>`."""

    __call__ = nn.Module.__call__  # (a ParameterDict refuses to be called; this one computes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([h @ a.t() for a in self.values()], dim=-1)


class LoRAUp(nn.ParameterDict):
    """The adapters' B matrices (rows x r each, by adapter name): the down-projections (..., k*r) -> each
    adapter's scale * (h A^T) B^T side by side (..., sum of rows), in the order of the adapters."""

    __call__ = nn.Module.__call__

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, down: torch.Tensor) -> torch.Tensor:
        pieces = down.split([b.shape[1] for b in self.values()], dim=-1)
        return torch.cat([(u @ b.t()) * self.scale for u, b in zip(pieces, self.values(), strict=True)], dim=-1)


class LoRALinear(nn.Module):
    """A frozen Linear plus low-rank updates of some of its output rows: y = base(x), then for each
    adapter (first row a, rows n): y[..., a:a+n] += scale * (dropout(x) A^T) B^T."""

    def __init__(
        self,
        base: nn.Linear,
        rows: dict[str, tuple[int, int]],
        rank: int,
        alpha: float,
        dropout: float,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.base = base
        # adapter name -> (first row, rows), in row order (the order of the up-projection's pieces)
        self.rows = dict(sorted(rows.items(), key=lambda item: item[1][0]))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        device = base.weight.device
        self.lora_A = LoRADown()
        self.lora_B = LoRAUp(self.scale)
        drawn = {}
        for name in rows:  # A is drawn in the order the targets are given (the same numbers whatever the rows)
            drawn[name] = torch.empty(rank, base.in_features)
            nn.init.kaiming_uniform_(drawn[name], a=math.sqrt(5), generator=generator)  # nn.Linear's (PEFT's too)
        for name, (_, n_rows) in self.rows.items():
            self.lora_A[name] = nn.Parameter(drawn[name].to(device))
            self.lora_B[name] = nn.Parameter(torch.zeros(n_rows, rank, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (B, T, out)
        updates = self.lora_B(self.lora_A(self.dropout(x)))  # (B, T, adapted rows)
        if len(self.rows) == 1 and next(iter(self.rows.values())) == (0, self.base.out_features):
            return y + updates
        pieces, row, done = [], 0, 0
        for first, n_rows in self.rows.values():
            if first > row:
                pieces.append(y[..., row:first])
            pieces.append(y[..., first : first + n_rows] + updates[..., done : done + n_rows])
            row, done = first + n_rows, done + n_rows
        if row < self.base.out_features:
            pieces.append(y[..., row:])
        return torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base Linear with W[a:a+n] += scale * B A for every adapter (a new weight; the base is kept)."""
        weight = self.base.weight.detach().clone()
        for name, (first, n_rows) in self.rows.items():
            weight[first : first + n_rows] += self.scale * (self.lora_B[name] @ self.lora_A[name]).to(weight.dtype)
        linear = nn.Linear(
            self.base.in_features,
            self.base.out_features,
            bias=self.base.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        linear.weight.copy_(weight)
        if self.base.bias is not None:
            linear.bias.copy_(self.base.bias)
        return linear


def target_rows(arch: DecoderArch | EncoderArch, target: str, out_features: int) -> tuple[int, int]:
    """The output rows of its Linear that a target adapts."""
    fused = {
        "q": (0, arch.q_width),
        "k": (arch.q_width, arch.kv_width),
        "v": (arch.q_width + arch.kv_width, arch.kv_width),
    }
    return fused.get(target, (0, out_features))


def apply(model: nn.Module, settings: LoRAConfig, seed: int, trains_also: tuple[str, ...] = ()) -> int:
    """Freeze `model` and add adapters in place; returns the number of trainable parameters. A is drawn
    from a generator seeded by `seed`, layer by layer in a fixed order (reproducible). Parameters under the
    prefixes `trains_also` (a new task head) stay trainable and are saved with the adapters."""
    arch: DecoderArch | EncoderArch = model.arch  # type: ignore[assignment]
    mlp = arch.mlp
    gated = getattr(arch, "gated_mlp", False)  # (an encoder's MLP is GELU)
    wanted = settings.projections()
    experts = bool(getattr(arch, "n_experts", 0))  # a mixture of experts: adapters on the attention only
    named_mlp = sorted({"gate", "up", "down", "mlp"} & set(settings.targets))
    if experts and named_mlp:
        raise UserError(
            f"train.lora.targets: adapters on a mixture of experts' MLPs ({', '.join(named_mlp)}) are not "
            "supported; target the attention (q, k, v, o, or attention; all-linear adapts only those there)"
        )
    if "gate" in wanted and not gated and "gate" in settings.targets:
        raise UserError(
            f"train.lora.targets 'gate': this model's MLP ({mlp}) has no gate projection; use up, down or mlp"
        )
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(trains_also) if trains_also else False)
    generator = torch.Generator().manual_seed(seed)
    for block in model.blocks:  # type: ignore[union-attr]
        by_module: dict[str, list[str]] = {}
        for target in adapted_projections(arch, settings):
            by_module.setdefault(MODULES[target], []).append(target)
        for path, targets in by_module.items():
            parent_path, _, child = path.rpartition(".")
            parent = block.get_submodule(parent_path)
            base = getattr(parent, child)
            rows = {t: target_rows(arch, t, base.out_features) for t in targets}
            setattr(parent, child, LoRALinear(base, rows, settings.rank, settings.alpha, settings.dropout, generator))
    model.lora = settings  # type: ignore[assignment]  # marks the model as adapted (what checkpoints save)
    model.lora_trains_also = trains_also  # type: ignore[assignment]
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def is_adapted(model: nn.Module) -> bool:
    return getattr(model, "lora", None) is not None


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' A and B, and the heads trained beside them, by parameter name."""
    also = getattr(model, "lora_trains_also", ())
    return {
        name: p
        for name, p in model.named_parameters()
        if ".lora_A." in name or ".lora_B." in name or (also and name.startswith(also))
    }


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight, in place: the result is the plain model (no LoRA modules)."""
    for module_name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_path, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_path), child, module.merged())
    for param in model.parameters():
        param.requires_grad_(True)
    model.lora = None  # type: ignore[assignment]
    return model


def adapted_projections(arch: Any, settings: LoRAConfig) -> tuple[str, ...]:
    """The projections that get adapters: the targets, groups expanded, less what a group names but the
    model lacks (a GELU MLP's gate; a mixture's expert MLPs, which are not adapted)."""
    gated = getattr(arch, "gated_mlp", False)  # (an encoder's MLP is GELU)
    experts = bool(getattr(arch, "n_experts", 0))
    return tuple(
        target
        for target in settings.projections()
        if not ((target == "gate" and not gated) or (experts and target in ("gate", "up", "down")))
    )


def manifest_record(
    settings: LoRAConfig,
    trainable: int,
    base_path: Path,
    base_sha256: str,
    trains_also: tuple[str, ...] = (),
    arch: Any = None,
) -> AdapterRecord:
    """What an adapter checkpoint says about itself: enough to rebuild the adapters on the right base (the
    projections adapted on `arch`'s model)."""
    return AdapterRecord(
        rank=settings.rank,
        alpha=settings.alpha,
        dropout=settings.dropout,
        targets=list(settings.projections() if arch is None else adapted_projections(arch, settings)),
        trainable_parameters=trainable,
        trains_also=list(trains_also),
        base=AdapterBase(path=str(base_path), sha256=base_sha256),
    )


def settings_of(record: AdapterRecord) -> LoRAConfig:
    return LoRAConfig(rank=record.rank, alpha=record.alpha, dropout=record.dropout, targets=record.targets)


# ------------------------------------------------------------------------------------- PEFT folders


def peft_tensors(model: nn.Module, model_type: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapters under PEFT's names for the Hugging Face `model_type` (gpt2, or llama's module names), and the
    adapter_config.json entries that differ per module.

    GPT-2's q, k and v are one Conv1D (c_attn), so PEFT adapts them as one module: adapters on k of
    q/k/v become one of rank k*r (A stacked, B block-diagonal), with alpha k*alpha to keep the scale."""
    settings: LoRAConfig = model.lora  # type: ignore[assignment]
    names = GPT2_MODULES if model_type == "gpt2" else LLAMA_MODULES
    prefix = "base_model.model.transformer.h" if model_type == "gpt2" else "base_model.model.model.layers"
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    from bigmodel.models.gpt import GPT

    assert isinstance(model, GPT)  # PEFT folders are written for the decoders' Hugging Face twins
    for i, block in enumerate(model.layers()):
        for module in block.modules():
            if not isinstance(module, LoRALinear):
                continue
            by_hf: dict[str, list[str]] = {}
            for target in module.rows:
                by_hf.setdefault(names[target], []).append(target)
            for hf_module, targets in by_hf.items():
                key = f"{prefix}.{i}.{hf_module}"
                a = torch.cat([module.lora_A[t] for t in targets])  # (k r, in)
                if len(targets) == 1 and hf_module != GPT2_MODULES["q"]:
                    b = module.lora_B[targets[0]]
                else:  # GPT-2's fused c_attn: each adapter's B fills its own rows and its own r columns
                    b = torch.zeros(module.base.out_features, a.shape[0])
                    for j, t in enumerate(targets):
                        first, n_rows = module.rows[t]
                        b[first : first + n_rows, j * settings.rank : (j + 1) * settings.rank] = module.lora_B[t]
                tensors[f"{key}.lora_A.weight"] = a.detach().float().contiguous()
                tensors[f"{key}.lora_B.weight"] = b.detach().float().contiguous()
                if len(targets) > 1:
                    rank_pattern[hf_module] = a.shape[0]
                    alpha_pattern[hf_module] = settings.alpha * len(targets)
    return tensors, {"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}


def peft_folder(model: nn.Module, model_type: str, folder: Path, base_name: str) -> Path:
    """Write `folder`/adapter_config.json + adapter_model.safetensors (PEFT's LoRA format)."""
    from safetensors.torch import save_file

    settings: LoRAConfig = model.lora  # type: ignore[assignment]
    tensors, patterns = peft_tensors(model, model_type)
    names = GPT2_MODULES if model_type == "gpt2" else LLAMA_MODULES
    # Module paths, not bare names: PEFT matches them as suffixes, and GPT-2 has both attn.c_proj and mlp.c_proj.
    modules = sorted({names[t] for t in settings.projections() if t in names})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": model_type == "gpt2",
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        **patterns,
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder
