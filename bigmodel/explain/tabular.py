"""explain for the MLP: Integrated Gradients per feature (Sundararajan et al. 2017).

IG integrates the gradient along the straight line from a baseline row to the input; its attributions
sum to f(input) - f(baseline) up to the integral's error, which Captum returns as the convergence delta
(reported per row). f is the predicted class's log-probability (log-softmax: a class gains from what lowers
its rivals too, which its logit alone would not show); a regression's is the prediction in the target's units.
The baseline is stated in the output: the training rows' mean (what prepare fitted the standardisation on;
an "average row"), or all zeros.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bigmodel import registry
from bigmodel.arch import TabularArch
from bigmodel.config import Config
from bigmodel.datasets import load_split
from bigmodel.errors import UserError
from bigmodel.models.mlp import MLP
from bigmodel.tabular_io import parse_number, read_csv


class Predicted(nn.Module):
    """What the attributions explain: the classes' log-probabilities, or the prediction in target units."""

    def __init__(self, model: MLP) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, C) or (B,)
        if self.model.task == "classification":
            return torch.log_softmax(self.model(features), dim=-1)
        return self.model.predict(features)


def explain(config: Config, checkpoint: Path) -> dict[str, Any]:
    from captum.attr import IntegratedGradients

    ec = config.explain
    model, manifest = registry.load_model(checkpoint)
    assert isinstance(model, MLP)  # the family table sends only tabular models here
    model.eval()
    arch = manifest.architecture
    assert isinstance(arch, TabularArch)
    names = manifest.data.features or [f"x{i}" for i in range(arch.n_inputs)]
    x = _rows(config, names, ec.input)[: ec.rows]
    baseline = (model.feature_mean if ec.baseline == "mean" else torch.zeros(arch.n_inputs)).expand_as(x)
    forward = Predicted(model)
    classification = model.task == "classification"
    with torch.no_grad():
        out = forward(x)
        base_out = forward(baseline)
    target = out.argmax(-1) if classification else None
    attributions, delta = IntegratedGradients(forward).attribute(
        x, baselines=baseline, target=target, n_steps=ec.steps, return_convergence_delta=True
    )
    labels = manifest.data.labels or []
    items = []
    for i in range(len(x)):
        f_input = float(out[i, target[i]] if target is not None else out[i])
        f_baseline = float(base_out[i, target[i]] if target is not None else base_out[i])
        items.append(
            {
                "index": i,
                "prediction": str(labels[int(target[i])]) if target is not None and labels else f_input,
                "explains": f"log-probability of class {labels[int(target[i])]!r}"
                if target is not None
                else "the prediction",
                "f_input": f_input,
                "f_baseline": f_baseline,
                "delta": float(delta[i]),
                "features": [
                    {"name": name, "value": float(x[i, j]), "attribution": float(attributions[i, j])}
                    for j, name in enumerate(names)
                ],
            }
        )
    importance = attributions.abs().mean(0)
    ranked = sorted(zip(names, importance.tolist(), strict=True), key=lambda item: -item[1])
    return {
        "kind": "tabular",
        "unit": "rows",
        "method": f"IntegratedGradients ({ec.steps} steps)",
        "baseline": "the training rows' mean" if ec.baseline == "mean" else "zeros",
        "items": items,
        "importance": [{"name": name, "mean_abs_attribution": value} for name, value in ranked],
        "summary": [
            "features by mean |attribution|: " + ", ".join(f"{name} {value:.3g}" for name, value in ranked[:5]),
            f"largest |convergence delta| {float(delta.abs().max()):.2e} (sum of attributions vs f(x) - f(baseline))",
        ],
    }


def _rows(config: Config, names: list[str], source: Path | None) -> torch.Tensor:
    """The rows to explain (B, F): explain.input's CSV (the feature columns by name), else the test split."""
    if source is None:
        x, _ = load_split(config, "test")
        return torch.from_numpy(np.ascontiguousarray(x))
    header, rows = read_csv(source)
    missing = [name for name in names if name not in header]
    if missing:
        raise UserError(f"{source}: no column {missing[0]!r}; the model reads the features {', '.join(names)}")
    columns = [header.index(name) for name in names]
    values = [
        [parse_number(row[c], line, names[k], source) for k, c in enumerate(columns)]
        for line, row in enumerate(rows, start=2)
    ]
    return torch.tensor(values, dtype=torch.float32)
