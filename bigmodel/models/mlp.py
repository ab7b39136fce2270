"""A multi-layer perceptron for tabular classification and regression.

The model takes *raw* feature values: the standardisation statistics fitted on the training split live
in the model as buffers, so the exported ONNX graph needs no preprocessing outside it. For regression the
network predicts the standardised target (training on unit-scale targets keeps MSE well conditioned) and
`predict` maps it back to the target's units.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

import torch
from torch import nn

from bigmodel.arch import TabularArch

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


class MLP(nn.Module):
    # Buffers (register_buffer below): the standardisation of features and of a regression target.
    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    target_mean: torch.Tensor
    target_std: torch.Tensor

    def __init__(self, arch: TabularArch) -> None:
        super().__init__()
        self.task: str = arch.task
        self.activation: str = arch.activation
        n_in, n_out = arch.n_inputs, arch.n_outputs
        layers: list[nn.Module] = []
        width = n_in
        for hidden in arch.hidden_sizes:
            layers += [nn.Linear(width, hidden), ACTIVATIONS[arch.activation]()]
            if arch.dropout > 0:
                layers.append(nn.Dropout(arch.dropout))
            width = hidden
        layers.append(nn.Linear(width, n_out))
        self.net = nn.Sequential(*layers)
        # Fitted on the training split by `prepare`, copied in by `init`; saved with the weights.
        self.register_buffer("feature_mean", torch.zeros(n_in))
        self.register_buffer("feature_std", torch.ones(n_in))
        self.register_buffer("target_mean", torch.zeros(1))
        self.register_buffer("target_std", torch.ones(1))

    def neuron_groups(self) -> list[tuple[list[str], str]]:
        """Each hidden layer for structured pruning: the Linear making its units and the one reading them."""
        linears = [f"net.{i}" for i, m in enumerate(self.net) if isinstance(m, nn.Linear)]
        return [([first], second) for first, second in itertools.pairwise(linears)]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # features: (B, F) raw values -> (B, n_out) logits, or (B, 1) standardised target
        return self.net((features - self.feature_mean) / self.feature_std)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """What is deployed: class probabilities (B, C), or target values (B,) in the target's units."""
        out = self.forward(features)
        if self.task == "classification":
            return torch.softmax(out, dim=-1)
        return out.squeeze(-1) * self.target_std + self.target_mean


def architecture(model_cfg: Any, data_manifest: dict[str, Any]) -> TabularArch:
    """Everything needed to rebuild the network, derived from the config and the prepared data."""
    task = data_manifest["task"]
    return TabularArch(
        task=task,
        n_inputs=len(data_manifest["features"]),
        n_outputs=len(data_manifest["labels"]) if task == "classification" else 1,
        hidden_sizes=list(model_cfg.hidden_sizes),
        activation=model_cfg.activation,
        dropout=model_cfg.dropout,
    )


def build(arch: TabularArch) -> MLP:
    return MLP(arch)


def init_weights(model: MLP, scheme: str, std: float) -> None:
    """Initialise every Linear weight with `scheme`; biases start at zero."""
    # GELU and SiLU behave like ReLU for variance purposes; use ReLU's gain for them.
    nonlinearity: Literal["tanh", "relu"] = "tanh" if model.activation == "tanh" else "relu"
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        if scheme == "normal":
            nn.init.normal_(weight, mean=0.0, std=std)
        elif scheme == "xavier_uniform":
            nn.init.xavier_uniform_(weight, gain=nn.init.calculate_gain(nonlinearity))
        elif scheme == "xavier_normal":
            nn.init.xavier_normal_(weight, gain=nn.init.calculate_gain(nonlinearity))
        elif scheme == "kaiming_uniform":  # He et al. 2015: keeps activation variance through ReLUs
            nn.init.kaiming_uniform_(weight, nonlinearity=nonlinearity)
        elif scheme == "kaiming_normal":
            nn.init.kaiming_normal_(weight, nonlinearity=nonlinearity)
        else:
            raise ValueError(f"unknown init scheme {scheme!r}")
        nn.init.zeros_(module.bias)
