"""Build bigmodel's decoder from a described pretrained source, and check it against transformers.

The model is built on the meta device (no memory), the weight plan is checked against its parameter
shapes, and only then are the parameters allocated and filled, one file tensor at a time.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import torch

from bigmodel import console, registry
from bigmodel.arch import DecoderArch
from bigmodel.errors import UserError
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


def reference_logits(source: Source, ids: np.ndarray) -> np.ndarray:
    """Logits of transformers' own implementation loading the same files (fp32, its own code only)."""
    try:
        import transformers
    except ImportError as exc:
        raise UserError("the import parity check needs transformers (a verification extra): "
                        "pip install 'bigmodel[hf]', or skip the check with --set init.verify=false "
                        "(the checkpoint is then recorded as unverified)") from exc
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    options: dict[str, Any] = {"dtype": torch.float32, "local_files_only": True, "trust_remote_code": False}
    with console.stdout_to_stderr(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if source.format == "gguf":
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(source.path.parent), gguf_file=source.path.name, **options)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(source.path), **options)
        model.eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(ids)).logits.float().numpy()
    del model
    return logits


def check_parity(model: torch.nn.Module, source: Source, tokenizer: Any, atol: float) -> dict[str, Any]:
    """bigmodel's logits against transformers' on the same files and prompt."""
    import transformers

    ids = parity_ids(tokenizer, model.block_size)
    with torch.no_grad():
        ours = model(torch.from_numpy(ids))[0].float().numpy()
    reference = reference_logits(source, ids)
    vocab = min(ours.shape[-1], reference.shape[-1])
    diff = float(np.abs(ours[..., :vocab] - reference[..., :vocab]).max())
    return {"verified": True, "reference": f"transformers {transformers.__version__}", "prompt_tokens": ids.shape[1],
            "max_abs_diff": diff, "atol": atol, "passed": bool(diff <= atol),
            "same_greedy_tokens": bool((ours.argmax(-1) == reference.argmax(-1)).all())}
