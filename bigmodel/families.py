"""The family table: for each model family, the code that builds, trains, evaluates and exports it.

Stages look a family up here instead of branching on its name, so a new family is one entry (and its
modules), and an unknown one is a one-line error. What each role's module must provide is a Protocol in
bigmodel/roles.py, checked for every family by tests/test_contract.py. Modules are named, not imported, so
this table costs nothing to import (`infer` must not pull in PyTorch) and a stage loads only the family it
runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from bigmodel.arch import ARCHES, Arch
from bigmodel.errors import UserError

# The train.* keys each recipe reads (a set key it does not read is refused by the config, naming both).
# Every recipe: the optimizer and schedule, the batch, how long, when to evaluate and save, when to stop,
# clipping, TensorBoard, MLflow, differential privacy (train.privacy).
COMMON_TRAIN_KEYS = frozenset(
    {
        "optimizer",
        "lr",
        "weight_decay",
        "momentum",
        "nesterov",
        "betas",
        "schedule",
        "warmup_steps",
        "min_lr",
        "batch_size",
        "epochs",
        "max_steps",
        "eval_every",
        "patience",
        "grad_clip",
        "tensorboard",
        "mlflow",
        "save_every",
        "privacy",
    }
)
# train/lm.py: one loop for every language model, on one process or many (torchrun: DDP, FSDP2).
LM_TRAIN_KEYS = COMMON_TRAIN_KEYS | {
    "grad_accum_steps",
    "precision",
    "compile",
    "eval_batches",
    "log_every",
    "distributed",
    "backend",
    "timeout_s",
    "activation_checkpointing",
    "fsdp",
    "lora",
}
# train/epochs.py under train/encoder.py and train/tabular.py: epochs over rows, the best by train.monitor.
ENCODER_TRAIN_KEYS = COMMON_TRAIN_KEYS | {"monitor", "lora"}
TABULAR_TRAIN_KEYS = COMMON_TRAIN_KEYS | {"monitor", "augment", "loss"}
# The explain.* keys each explainer reads (bigmodel/explain/<family>.py).
COMMON_EXPLAIN_KEYS = frozenset({"checkpoint", "input", "rows", "output"})


@dataclass(frozen=True)
class Family:
    name: str
    data_format: str  # the `data.format` it learns from
    onnx_kind: str  # `bigmodel.kind` in its ONNX metadata
    default_init: str
    model: str  # build(arch), architecture(model_cfg, data), init_weights(model, scheme, std)
    recipe: str  # train(config, resume, out_dir, ...)
    evaluator: str  # run(config), scores_for(config, path)
    exporter: str  # export_checkpoint(config, ckpt, out_dir), calibration_feeds(...), latency_feeds(session, meta)
    inferer: str  # run_model(session, meta, path, settings, source, dest, seed, bench_settings): ONNX Runtime only
    server: str  # Engine(session, meta, path, name, settings): `bigmodel serve`'s routes (ONNX Runtime only)
    explainer: str  # explain(config, checkpoint): `bigmodel explain`'s attributions (Captum, on the checkpoint)
    infer_output: str  # default file name of infer's output
    test_split: str | None  # infer's default input: the file prepare writes the test split to (None: none)
    distributed: bool  # trains under torchrun (DDP/FSDP)
    streams_int4: bool = False  # its exporter writes int4 as it streams (export.dtype int4; compress reuses it)
    train_keys: frozenset[str] = COMMON_TRAIN_KEYS  # the train.* keys its recipe reads
    explain_keys: frozenset[str] = COMMON_EXPLAIN_KEYS  # the explain.* keys its explainer reads

    @property
    def arch(self) -> type[Arch]:
        return ARCHES[self.name]

    def module(self, role: str) -> ModuleType:
        """The module that plays `role` (model, recipe, evaluator, exporter) for this family."""
        return importlib.import_module(getattr(self, role))


FAMILIES: dict[str, Family] = {
    "gpt": Family(
        name="gpt",
        data_format="text",
        onnx_kind="gpt",
        default_init="gpt2",
        model="bigmodel.models.gpt",
        recipe="bigmodel.train.lm",
        evaluator="bigmodel.eval.lm",
        exporter="bigmodel.export.gpt",
        inferer="bigmodel.infer.gpt",
        server="bigmodel.serve.lm",
        explainer="bigmodel.explain.lm",
        infer_output="generations.jsonl",
        test_split=None,
        distributed=True,
        streams_int4=True,
        train_keys=LM_TRAIN_KEYS,
        explain_keys=COMMON_EXPLAIN_KEYS | {"prompts", "max_new_tokens", "baseline_token"},
    ),
    "mlp": Family(
        name="mlp",
        data_format="tabular",
        onnx_kind="tabular",
        default_init="kaiming_uniform",
        model="bigmodel.models.mlp",
        recipe="bigmodel.train.tabular",
        evaluator="bigmodel.eval.tabular",
        exporter="bigmodel.export.tabular",
        inferer="bigmodel.infer.tabular",
        server="bigmodel.serve.tabular",
        explainer="bigmodel.explain.tabular",
        infer_output="predictions.csv",
        test_split="test.csv",
        distributed=False,
        train_keys=TABULAR_TRAIN_KEYS,
        explain_keys=COMMON_EXPLAIN_KEYS | {"steps", "baseline"},
    ),
    "bert": Family(
        name="bert",
        data_format="text_classification",
        onnx_kind="encoder",
        default_init="bert",
        model="bigmodel.models.bert",
        recipe="bigmodel.train.encoder",
        evaluator="bigmodel.eval.encoder",
        exporter="bigmodel.export.encoder",
        inferer="bigmodel.infer.encoder",
        server="bigmodel.serve.encoder",
        explainer="bigmodel.explain.encoder",
        infer_output="predictions.jsonl",
        test_split="test.jsonl",
        distributed=False,
        train_keys=ENCODER_TRAIN_KEYS,
        explain_keys=COMMON_EXPLAIN_KEYS | {"steps"},
    ),
}


def family_of_onnx_kind(kind: str, path: Path) -> Family:
    """The family whose exporter stamps `kind` into its ONNX files."""
    for candidate in FAMILIES.values():
        if candidate.onnx_kind == kind:
            return candidate
    raise UserError(f"{path}: a '{kind}' model, which this version of bigmodel cannot run")


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]
