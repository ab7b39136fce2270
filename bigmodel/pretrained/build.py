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

from bigmodel import console, registry
from bigmodel.arch import DecoderArch
from bigmodel.errors import GateFailed, UserError
from bigmodel.pretrained import POSITIONS, Source, check_plan

PARITY_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four papers that "
    "changed physics; the third introduced special relativity.\n    def add(a, b):\n        return a + b\n"
)


def build(source: Source, arch: DecoderArch) -> torch.nn.Module:
    """bigmodel's model with the source's weights (fp32), filled tensor by tensor."""
    with torch.device("meta"):
        model = registry.build_model(arch)
    tied = getattr(model, "tied_weights", {})
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}
    check_plan(source, expected)
    model.to_empty(device="cpu")
    if tied:  # to_empty gives every parameter its own storage: tie the head to the embedding again
        model.lm_head.weight = model.transformer.wte.weight
    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in source.read():
            target, row = source.targets[name]
            param = params[target]
            if target == POSITIONS:
                tensor = tensor[: param.shape[0]]
            param[row : row + tensor.shape[0]].copy_(tensor)
    return model.eval()


def parity_ids(tokenizer: Any, block_size: int) -> np.ndarray:
    """(1, T) token ids of a fixed text: prose, digits and code, at most 32 tokens and the context."""
    ids = tokenizer.encode(PARITY_TEXT)[: min(32, block_size)]
    return np.asarray([ids], dtype=np.int64)


def load_transformers(folder: Path, gguf_file: str | None = None) -> tuple[ModuleType, torch.nn.Module]:
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
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **options)
    return transformers, model.eval()


def reference_logits(source: Source, ids: np.ndarray) -> tuple[np.ndarray, str]:
    """Logits of transformers' own implementation loading the same files, and its version."""
    if source.format == "gguf":
        transformers, model = load_transformers(source.path.parent, source.path.name)
    else:
        transformers, model = load_transformers(source.path)
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)).logits.float().numpy()
    return logits, f"transformers {transformers.__version__}"


def check_parity(model: torch.nn.Module, source: Source, tokenizer: Any, atol: float) -> dict[str, Any]:
    """bigmodel's logits against transformers' on the same files and prompt."""
    ids = parity_ids(tokenizer, model.block_size)
    reference, version = reference_logits(source, ids)
    return {"verified": True, "prompt_tokens": ids.shape[1], **compare(model, ids, reference, version, atol)}


def compare(model: torch.nn.Module, ids: np.ndarray, reference: np.ndarray, version: str,
            atol: float) -> dict[str, Any]:
    """bigmodel's logits on `ids` against a reference's: the max abs difference, and the greedy tokens."""
    with torch.no_grad():
        ours = model(torch.from_numpy(ids))[0].float().numpy()
    diff = float(np.abs(ours - reference).max())
    return {"reference": version, "max_abs_diff": diff, "atol": atol, "passed": bool(diff <= atol),
            "same_greedy_tokens": bool((ours.argmax(-1) == reference.argmax(-1)).all())}


def enforce(parity: dict[str, Any], stage: str, checked: str, unpublished: str) -> None:
    """Print a transformers comparison's verdict; exit 1 (GateFailed, with the report) when it failed."""
    verdict = "ok" if parity["passed"] else "FAILED"
    console.info(f"{stage}: {checked}: max abs logit diff {parity['max_abs_diff']:.3g} (atol {parity['atol']}) "
                 f"-> {verdict}")
    if not parity["passed"]:
        raise GateFailed(f"{stage} parity with {parity['reference']} failed: max abs logit diff "
                         f"{parity['max_abs_diff']:.3g} > atol {parity['atol']}; {unpublished}", {"parity": parity})
