"""explain: which inputs drive a model's outputs, computed by Captum on the PyTorch checkpoint.

- tabular (MLP): Integrated Gradients (Sundararajan et al. 2017, "Axiomatic Attribution for Deep Networks")
  of the predicted class's log-probability (a regression's prediction) per feature, against a stated baseline row
  (the training mean, or zeros), with IG's convergence delta: how far the attributions' sum is from
  f(input) - f(baseline).
- text classification (encoder): Layer Integrated Gradients over the token embeddings, per token, for the
  predicted class, against the same text with every token but [CLS]/[SEP] replaced by [PAD].
- decoder language models: Captum's LLMAttribution with feature ablation: how much each prompt token
  drives the log-probability of each generated token (the model's own greedy continuation).

Each family's explainer (families.py: `explainer`) writes its items; this module picks the checkpoint and
the inputs, writes <run_dir>/explain/attributions.json atomically, and says what it found. `report`
renders the file (feature bars; tokens shaded by attribution).
"""

from __future__ import annotations

import json
from typing import Any

from bigmodel import console, registry
from bigmodel.config import Config
from bigmodel.errors import UserError
from bigmodel.families import family
from bigmodel.io import atomic_open

ATTRIBUTIONS_FILE = "attributions.json"
FORMAT_VERSION = 1


def captum() -> Any:
    try:
        import captum
    except ImportError:
        raise UserError("bigmodel explain needs Captum: pip install captum (or bigmodel[explain])") from None
    return captum


def run(config: Config) -> dict[str, Any]:
    ec = config.explain
    checkpoint = config.checkpoint_path(ec.checkpoint)
    if checkpoint.suffix == ".onnx":
        raise UserError(
            f"explain.checkpoint {checkpoint}: attributions need the PyTorch checkpoint's gradients, not an ONNX "
            "file; give 'best', 'last' or a .safetensors path"
        )
    if not checkpoint.is_file():
        raise UserError(f"explain.checkpoint: no checkpoint at {checkpoint}; run 'bigmodel train' first")
    captum()
    # a LoRA checkpoint of another run's base would be explained on this run's base: refused by sha256
    registry.check_adapter_base(checkpoint, config.stage_dir("init") / "model.safetensors")
    explainer = family(config.model.family).module("explainer")
    result = explainer.explain(config, checkpoint)
    out = ec.output or config.stage_dir("explain") / ATTRIBUTIONS_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {"format_version": FORMAT_VERSION, "checkpoint": str(checkpoint), **result}
    with atomic_open(out) as handle:
        json.dump(document, handle, indent=1)
        handle.write("\n")
    console.info(f"explain: {len(result['items'])} {result['unit']} explained ({result['method']}) -> {out}")
    for line in result.get("summary", []):
        console.info(f"explain: {line}")
    return {"output": str(out), "items": len(result["items"]), "method": result["method"]}
