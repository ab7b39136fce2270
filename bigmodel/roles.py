"""The roles a model family plays, as typing.Protocols.

A family (bigmodel/families.py) names one module per role; the module's functions are the role's members.
tests/test_contract.py checks every family's modules against these protocols (each member present, with
these parameter names, kinds and defaults), so a stage can call any family's module the same way and a
new family knows what to write. `meta` is always the family's own ONNX metadata record
(manifests.DecoderMetadata, EncoderMetadata or TabularMetadata: the family table pairs each kind with
its modules), so the protocols type it as Any. Nothing here imports PyTorch or ONNX Runtime (infer and serve use the
inferer and server roles without them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from bigmodel.config import Config, InferConfig, ServeConfig
    from bigmodel.serve.app import Metrics, Queue


class Model(Protocol):
    """models/<family>.py: the network, built from its typed architecture."""

    def build(self, arch: Any) -> Any: ...  # arch -> torch.nn.Module (its own class)
    def architecture(self, model_cfg: Any, data_manifest: dict[str, Any]) -> Any: ...  # the config's model: + data
    def init_weights(self, model: Any, scheme: str, std: float) -> None: ...


@runtime_checkable
class StructurallyPrunable(Protocol):
    """A network whose hidden neurons compress's structured pruning can remove: each group is the layers
    making a set of neurons and the layer reading them (module names)."""

    def neuron_groups(self) -> list[tuple[list[str], str]]: ...


class Recipe(Protocol):
    """train/<recipe>.py: training from the init checkpoint (or `start_from`) to best/last checkpoints.
    after_step runs after every optimizer step (compress holds pruned weights at zero with it); loss_hook
    replaces the task's training loss (distillation)."""

    def train(
        self,
        config: Config,
        resume: bool,
        out_dir: Path,
        start_from: Path | None = None,
        after_step: Callable[[Any], None] | None = None,
        loss_hook: Callable[..., Any] | None = None,
        until_step: int | None = None,
        allow_changes: bool = False,
    ) -> dict[str, Any]: ...


class Evaluator(Protocol):
    """eval/<family>.py: a checkpoint's or an ONNX file's metrics."""

    def run(self, config: Config) -> dict[str, Any]: ...
    def scores_for(self, config: Config, path: Path) -> tuple[dict[str, Any], str, int | None]: ...


class Exporter(Protocol):
    """export/<family>.py: a checkpoint -> a gated ONNX file; feeds for calibration and latency."""

    def export_checkpoint(self, config: Config, ckpt: Path, out_dir: Path) -> dict[str, Any]: ...
    def calibration_feeds(
        self, config: Config, model: Path, batches: int, rng: np.random.Generator
    ) -> list[dict[str, Any]]: ...
    def latency_feeds(self, session: Any, meta: Any) -> dict[str, np.ndarray]: ...


class Inferer(Protocol):
    """infer/<family>.py: predictions or generations from an ONNX session (ONNX Runtime only)."""

    def run_model(
        self,
        session: Any,
        meta: Any,
        path: Path,
        settings: InferConfig,
        source: Path | None,
        dest: Path,
        seed: int,
        bench_settings: dict[str, int] | None,
    ) -> dict[str, Any]: ...


class Engine(Protocol):
    """serve/<family>.py's Engine: a loaded ONNX session and its /v1 routes (serve.app.Engine gives the
    shared members: card, cut, close)."""

    kind: str
    name: str

    def warm_up(self) -> None: ...
    def gauges(self, queue: Queue) -> dict[str, tuple[str, float]]: ...
    def routes(self, queue: Queue, metrics: Metrics) -> list[tuple[str, list[str], Any]]: ...
    def card(self) -> dict[str, Any]: ...
    def cut(self) -> int: ...
    def close(self) -> None: ...


class Server(Protocol):
    """serve/<family>.py: the Engine class, built as Engine(session, meta, path, name, settings)."""

    def Engine(
        self,
        session: Any,
        meta: Any,
        path: Path,
        name: str,  # a class, called
        settings: ServeConfig,
    ) -> Engine: ...


# The family table's role names (Family fields) and what each must provide.
class Explainer(Protocol):
    """explain/<family>.py: Captum's attributions for some inputs, on a PyTorch checkpoint: a dict with kind,
    unit, method, baseline, items (one per input) and summary lines (explain/__init__.py writes it)."""

    def explain(self, config: Config, checkpoint: Path) -> dict[str, Any]: ...


ROLES: dict[str, type] = {
    "model": Model,
    "recipe": Recipe,
    "evaluator": Evaluator,
    "exporter": Exporter,
    "inferer": Inferer,
    "server": Server,
    "explainer": Explainer,
}
