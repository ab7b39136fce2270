"""Build bigmodel's decoder from a described pretrained source, and check it against transformers.

The model is built on the meta device (no memory), the weight plan is checked against its parameter
shapes, and only then are the parameters allocated and filled, one file tensor at a time.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from bigmodel import console, parity, registry
from bigmodel.arch import AnyArch
from bigmodel.errors import GateFailed, UserError
from bigmodel.pretrained import POSITIONS, Source, check_plan

PARITY_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four papers that "
    "changed physics; the third introduced special relativity.\n    def add(a, b):\n        return a + b\n"
)


def build(source: Source, arch: AnyArch, seed: int = 0) -> torch.nn.Module:
    """bigmodel's model with the source's weights (fp32), filled tensor by tensor. A task head the file
    lacks (a classifier over an encoder) starts from the family's initialisation, seeded."""
    with torch.device("meta"):
        model = registry.build_model(arch)
    tied = getattr(model, "tied_weights", {})
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}
    fresh = check_plan(source, expected)
    model.to_empty(device="cpu")
    for alias, original in tied.items():  # to_empty gave every parameter its own storage: tie them again
        owner, _, attribute = alias.rpartition(".")
        setattr(model.get_submodule(owner), attribute, model.get_parameter(original))
    if fresh:
        torch.manual_seed(seed)
        registry.init_weights(model, arch.family, None, 0.02)
        source.notes.append(f"new task head, initialised: {', '.join(sorted(fresh))}")
    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in source.read():
            target, row = source.targets[name]
            param = params[target]
            if target in POSITIONS:
                tensor = tensor[: param.shape[0]]
            param[row : row + tensor.shape[0]].copy_(tensor)
    return model.eval()


def parity_ids(tokenizer: Any, block_size: int) -> np.ndarray:
    """(1, T) token ids of a fixed text: prose, digits and code, at most 32 tokens and the context."""
    ids = tokenizer.encode(PARITY_TEXT)[: min(32, block_size)]
    return np.asarray([ids], dtype=np.int64)


def load_transformers(folder: Path, gguf_file: str | None = None,
                      auto_class: str = "AutoModelForCausalLM") -> tuple[ModuleType, torch.nn.Module]:
    """transformers and its own model for a folder (or a GGUF file in it): fp32, local files, no remote code."""
    try:
        import transformers
    except ImportError as exc:
        raise UserError("checking against transformers needs the verification extra: pip install 'bigmodel[hf]' "
                        "(for an import, --set init.verify=false skips the check and records the checkpoint "
                        "as unverified)") from exc
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    options: dict[str, Any] = {"dtype": torch.float32, "local_files_only": True, "trust_remote_code": False}
    if gguf_file is not None:
        options["gguf_file"] = gguf_file
    # Its GGUF loader draws a progress bar that no setting turns off: the reference's chatter is dropped
    # (failures still raise).
    with console.stdout_to_stderr(), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, auto_class).from_pretrained(str(folder), **options)
    return transformers, model.eval()


def reference_logits(source: Source, ids: np.ndarray) -> tuple[np.ndarray, str]:
    """The output transformers' own implementation computes from the same files (a decoder's logits, an
    encoder's last hidden states), and its version."""
    auto_class, output = source.reference
    if source.format == "gguf":
        transformers, model = load_transformers(source.path.parent, source.path.name, auto_class)
    else:
        transformers, model = load_transformers(source.path, auto_class=auto_class)
    with torch.no_grad():
        reference = getattr(model(torch.from_numpy(ids)), output).float().numpy()
    return reference, f"transformers {transformers.__version__}"


def check_parity(model: torch.nn.Module, source: Source, tokenizer: Any, atol: float,
                 rtol: float = 0.0) -> dict[str, Any]:
    """bigmodel's numbers against transformers' on the same files and prompt."""
    ids = parity_ids(tokenizer, model.block_size)
    reference, version = reference_logits(source, ids)
    return {"verified": True, "prompt_tokens": ids.shape[1], **compare(model, ids, reference, version, atol, rtol)}


def compare(model: torch.nn.Module, ids: np.ndarray, reference: np.ndarray, version: str,
            atol: float, rtol: float = 0.0) -> dict[str, Any]:
    """bigmodel's output on `ids` (the model's `reference_output`) against a reference's: the max abs
    difference, passing within atol + rtol x the reference's largest |value| (fp32 rounding grows with
    the scale), and whether the argmax along the last axis agrees everywhere (greedy tokens, for logits)."""
    with torch.no_grad():
        ours = model.reference_output(torch.from_numpy(ids)).float().numpy()
    diff = float(np.abs(ours - reference).max())
    return {"reference": version, "max_abs_diff": diff,
            **parity.verdict(diff, float(np.abs(reference).max()), atol, rtol),
            "same_greedy_tokens": bool((ours.argmax(-1) == reference.argmax(-1)).all())}


def enforce(report: dict[str, Any], stage: str, checked: str, unpublished: str) -> None:
    """Print a transformers comparison's verdict; exit 1 (GateFailed, with the report) when it failed."""
    verdict = "ok" if report["passed"] else "FAILED"
    allowed = parity.allowed(report)
    console.info(f"{stage}: {checked}: max abs logit diff {report['max_abs_diff']:.3g} ({allowed}) -> {verdict}")
    if not report["passed"]:
        raise GateFailed(f"{stage} parity with {report['reference']} failed: max abs logit diff "
                         f"{report['max_abs_diff']:.3g} > {allowed}; {unpublished}", {"parity": report})
