"""Import of pretrained decoders: a Hugging Face model folder or a GGUF file -> bigmodel's decoder.

`describe(path)` reads only the small parts of a source (config.json or the GGUF header, the tokenizer)
and returns its architecture, tokenizer and a plan of every weight: which file tensor goes where in
bigmodel's model, with which shape. `Source.fetch(name)` then reads one file tensor (in bigmodel's
layout) when it is needed, so an import holds one parameter at a time (pretrained/build.py).

The source is untrusted input: nothing in it is executed (custom code named by `auto_map` is ignored,
`trust_remote_code` is never used), nothing is unpickled (`pytorch_model.bin` is refused), and every
tensor's name, shape and dtype is checked against the architecture before anything is allocated.
Anything the decoder cannot represent exactly (mixtures of experts, rope scalings other than linear and
llama3) is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigmodel.arch import DecoderArch, EncoderArch
from bigmodel.errors import UserError

# A weight's destination: (bigmodel parameter name, first row it fills). Fused q/k/v projections are
# filled from three file tensors at three row offsets.
Target = tuple[str, int]
POSITIONS = ("transformer.wpe.weight", "embeddings.wpe.weight")  # learned positions: may be cut to a shorter context
# The transformers class that loads the same folder, and the output bigmodel must reproduce.
REFERENCE = ("AutoModelForCausalLM", "logits")


@dataclass
class Source:
    """A pretrained model on disk, described without reading its weights."""

    path: Path
    format: str  # "hf" (a Hugging Face folder) or "gguf"
    model_type: str  # config.json's model_type, or the GGUF general.architecture
    arch: DecoderArch | EncoderArch
    tokenizer_json: str
    special_tokens: dict[str, Any]  # bos, eos (list), pad ids
    chat_template: str | None
    dtype: str  # the weights' dtype in the file (a GGUF quantisation type name for GGUF)
    shapes: dict[str, tuple[int, ...]]  # file tensor name -> shape in bigmodel's layout
    targets: dict[str, Target]  # file tensor name -> where it goes
    fetch: Callable[[str], Any]  # one file tensor by name, in bigmodel's layout (a torch.Tensor)
    notes: list[str] = field(default_factory=list)  # what the import adapted (printed, recorded)
    reference: tuple[str, str] = REFERENCE  # transformers class and output of the parity check


def describe(path: Path) -> Source:
    """Read a pretrained model's architecture, tokenizer and weight plan (no weights are loaded)."""
    if not path.exists():
        raise UserError(f"init.from: {path} does not exist (give a Hugging Face model folder or a .gguf file)")
    if path.is_file() and path.suffix.lower() == ".gguf":
        from bigmodel.pretrained import gguf_file

        return gguf_file.describe(path)
    if path.is_dir():
        from bigmodel.pretrained import hf

        return hf.describe(path)
    raise UserError(f"init.from: {path} is neither a model folder (with config.json) nor a .gguf file")


def decoder_targets(
    arch: DecoderArch,
    names: list[str],
    top: dict[str, str],
    layer_prefix: str,
    layer: dict[str, str],
    qkv: dict[str, str],
) -> dict[str, Target]:
    """Where each file tensor goes: `top` maps whole-model tensors, `layer` the tensors of block N (named
    `<layer_prefix>N.<rest>`), and `qkv` the query/key/value projections (rest without .weight/.bias ->
    q, k or v), which fill the rows of the fused c_attn. Unknown names are left out (the caller refuses)."""
    rows = {"q": 0, "k": arch.q_width, "v": arch.q_width + arch.kv_width}
    targets: dict[str, Target] = {}
    for name in names:
        if name in top:
            targets[name] = (top[name], 0)
        elif name.startswith(layer_prefix):
            index, _, rest = name.removeprefix(layer_prefix).partition(".")
            module, _, kind = rest.rpartition(".")
            if rest in layer:
                targets[name] = (f"transformer.h.{index}.{layer[rest]}", 0)
            elif module in qkv:
                targets[name] = (f"transformer.h.{index}.attn.c_attn.{kind}", rows[qkv[module]])
    return targets


def check_plan(source: Source, expected: dict[str, tuple[int, ...]]) -> set[str]:
    """Every parameter of the model is filled exactly once, by tensors of the right shape -- except a task
    head (`head.*`) that the file lacks, which starts fresh; returns those parameters. A head the file has
    but the run's task does not use (an MLM head when fine-tuning a classifier) is left out."""
    filled: dict[str, int] = {}
    wrong = []
    for name, (target, row) in list(source.targets.items()):
        shape = source.shapes[name]
        if target not in expected and target.startswith("head."):
            source.notes.append(f"{name} left out: the model's task ({source.arch.task}) has no place for it")
            del source.targets[name]
            continue
        if target not in expected:
            raise UserError(
                f"{source.path}: tensor {name} has no place in the {source.model_type} architecture "
                "read from its config; the file and its config disagree"
            )
        want = expected[target]
        if target in POSITIONS:
            shape = (min(shape[0], want[0]), *shape[1:])
        if shape[1:] != want[1:] or row + shape[0] > want[0]:
            wrong.append(f"{name} {shape} (into {target} {want} at row {row})")
        filled[target] = filled.get(target, 0) + shape[0]
    if wrong:
        raise UserError(
            f"{source.path}: tensor shapes do not match the architecture its config describes: {'; '.join(wrong[:4])}"
        )
    fresh = {name for name in expected if name.startswith("head.") and name not in filled}
    missing = [name for name, shape in expected.items() if name not in fresh and filled.get(name, 0) != shape[0]]
    if missing:
        raise UserError(
            f"{source.path}: weights missing for {', '.join(missing[:5])}"
            f"{f' (and {len(missing) - 5} more)' if len(missing) > 5 else ''}; the file is incomplete"
        )
    return fresh


def check_config(model_cfg: Any, arch: DecoderArch | EncoderArch, origin: Path) -> None:
    """The imported model is of the config's family, and keys the user set in `model:` agree with its
    architecture (block_size may shrink the context, dropout is a training setting, task and pooling choose
    an encoder's head)."""
    if arch.family != model_cfg.family:
        raise UserError(
            f"init.from: {origin.name} holds a '{arch.family}' model, but model.family is "
            f"'{model_cfg.family}'; import it into a config of its own family"
        )
    derived = {
        "n_kv_head": getattr(arch, "n_kv_head", None),
        "head_size": arch.head_size,
        "intermediate_size": arch.mlp_hidden[0],
    }
    contradictions = []
    for key in sorted(model_cfg.model_fields_set - {"family", "dropout", "task", "pooling"}):
        wanted = getattr(model_cfg, key)
        have = derived.get(key, getattr(arch, key, None))
        if key == "block_size":
            if wanted > arch.block_size:
                contradictions.append(
                    f"model.block_size {wanted} exceeds the imported model's context {arch.block_size}"
                )
            continue
        if wanted != have:
            contradictions.append(f"model.{key} is {wanted!r} but {origin.name} has {have!r}")
    if contradictions:
        raise UserError(
            f"the config contradicts the imported model: {'; '.join(contradictions)}; remove those "
            "keys from model: (an imported model's shape comes from its checkpoint)"
        )


def with_config_overrides(
    arch: DecoderArch | EncoderArch, model_cfg: Any, task: str | None = None, labels: int = 0
) -> DecoderArch | EncoderArch:
    """The imported architecture with what the config may change: a shorter context, dropout, and the run's
    task head (`task`, with `labels` classes) and its pooling where the model has several (an encoder)."""
    update: dict[str, Any] = {}
    if "block_size" in model_cfg.model_fields_set:
        update["block_size"] = model_cfg.block_size
    if "dropout" in model_cfg.model_fields_set:
        update["dropout"] = model_cfg.dropout
    if getattr(model_cfg, "pooling", None) is not None:
        update["pooling"] = model_cfg.pooling
    if task is not None and task != arch.task:
        update.update(task=task, n_outputs=labels if task == "classification" else 0)
    return type(arch).model_validate({**arch.to_dict(), **update}) if update else arch
