"""Knowledge distillation (Hinton, Vinyals & Dean 2015): a smaller student learns from the teacher.

Loss per token (or row): alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy, with both
distributions softened at temperature T; the T^2 keeps the soft term's gradients on the hard term's
scale. The student starts from the family's own init (seeded) and is trained by the family's normal
training recipe, so checkpoints, progress, metrics.jsonl and resume all apply. alpha = 0 is plain
training of the same student from scratch: the control a distillation result is compared against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bigmodel import console, registry
from bigmodel.arch import AnyArch
from bigmodel.checkpoint import model_tensors, save_checkpoint
from bigmodel.compress import Artifact
from bigmodel.config import Config, DistillStep
from bigmodel.datasets import data_manifest
from bigmodel.errors import UserError
from bigmodel.families import family
from bigmodel.runtime import resolve_device


def label(step: DistillStep, number: int) -> str:
    return f"{number}: distill a={step.alpha:g} T={step.temperature:g}"


def apply(step: DistillStep, config: Config, current: Artifact, folder: Path, number: int) -> Artifact:
    """The compress step: a student distilled from the current checkpoint, exported through the gate."""
    from bigmodel.export import export_checkpoint

    work_dir = folder / f"step{number}"
    checkpoint = run(step, config, current.checkpoint, work_dir)
    return Artifact(checkpoint, Path(export_checkpoint(config, checkpoint, work_dir, ["onnx"])["model"]))


def run(step: DistillStep, config: Config, teacher_path: Path, work_dir: Path) -> Path:
    device = resolve_device(config.device)
    teacher, teacher_manifest = registry.load_model(teacher_path)
    teacher.to(device).eval().requires_grad_(False)
    student_cfg = config.student_model(step)
    arch = registry.architecture(student_cfg, data_manifest(config))
    _check_compatible(teacher_manifest.architecture, arch)

    torch.manual_seed(config.seed)
    student = registry.build_model(arch)
    registry.init_weights(student, arch.family, config.init.scheme, config.init.std)
    # The same data: statistics the teacher carries as buffers (tabular standardisation) apply to the student.
    student.load_state_dict(
        {k: v for k, v in teacher.state_dict().items() if k.startswith(("feature_", "target_"))}, strict=False
    )
    start = work_dir / "student_init.safetensors"
    save_checkpoint(
        start,
        model_tensors(student),
        teacher_manifest.renewed(architecture=arch, family=arch.family, step=0, metrics={}, resume=None, adapter=None),
    )
    console.info(
        f"compress: student {registry.count_parameters(student):,} parameters, teacher "
        f"{registry.count_parameters(teacher):,}; {step.steps} steps"
    )

    tc = config.train
    lr = step.lr or tc.lr
    student_config = config.derive(
        "compress distill step",
        model=student_cfg,
        train={
            # the schedule keeps its shape: min_lr is the same fraction of the (distillation) lr
            "max_steps": step.steps,
            "lr": lr,
            "min_lr": tc.min_lr * lr / tc.lr,
            "warmup_steps": min(tc.warmup_steps, step.steps // 10),
            "eval_every": min(tc.eval_every or step.steps, step.steps),
            "save_every": None,
            "patience": None,
            "compile": False,
        },
    )
    recipe = _recipe(config)
    result = recipe.train(
        student_config,
        False,
        work_dir,
        start_from=start,
        loss_hook=distillation_loss(teacher, step.alpha, step.temperature),
    )
    return Path(result["best"])


def distillation_loss(teacher: torch.nn.Module, alpha: float, temperature: float) -> Any:
    def loss(student_out: torch.Tensor, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # an encoder's inputs are tensors by name (input_ids, attention_mask, ...)
            teacher_out = teacher(**inputs) if isinstance(inputs, dict) else teacher(inputs)
            teacher_out = teacher_out[0] if isinstance(teacher_out, tuple) else teacher_out  # gpt: (logits, cache)
        classes = student_out.size(-1)
        student_logits = student_out.float().reshape(-1, classes)
        teacher_logits = teacher_out.float().reshape(-1, classes)
        hard = F.cross_entropy(student_logits, targets.reshape(-1))
        if alpha == 0:
            return hard
        soft = F.kl_div(  # KL(teacher || student), averaged over tokens (rows)
            F.log_softmax(student_logits / temperature, dim=-1),
            F.log_softmax(teacher_logits / temperature, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        return alpha * temperature**2 * soft + (1 - alpha) * hard

    return loss


def _check_compatible(teacher: AnyArch, student: AnyArch) -> None:
    """Soft targets only make sense over the same outputs: same vocabulary (or classes) and inputs."""
    for key in student.interface:
        if getattr(teacher, key) != getattr(student, key):
            raise UserError(
                f"distill: the teacher's {key} is {getattr(teacher, key)} but the student's data gives "
                f"{getattr(student, key)}; teacher and student must share the tokenizer/labels (re-prepare the "
                "same data, or distil from a teacher trained on it)"
            )
    if student.context is not None and teacher.context is not None and student.context > teacher.context:
        raise UserError(
            f"distill: student block_size {student.context} exceeds the teacher's "
            f"{teacher.context}; the teacher cannot score such contexts"
        )


def _recipe(config: Config) -> Any:
    return family(config.model.family).module("recipe")
