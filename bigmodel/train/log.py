"""Where training metrics go: train/metrics.jsonl always (the report reads it), TensorBoard event files
in train/tensorboard/ when train.tensorboard is on (the optional `tensorboard` extra), and an MLflow run
when train.mlflow is set (train/tracking.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bigmodel.errors import UserError
from bigmodel.io import append_jsonl
from bigmodel.train.tracking import MlflowRun


class MetricsLog:
    def __init__(
        self, path: Path, tensorboard: bool, start_step: int, writes: bool = True, tracking: MlflowRun | None = None
    ) -> None:
        """start_step: the step a resumed run continues from; TensorBoard drops its later events (the
        run writes them again, as metrics.jsonl is cut back to that step). writes: False on every
        distributed rank but 0."""
        self.path = path
        self.writes = writes
        self.tracking = tracking
        self._board: Any = None
        if tensorboard and writes:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "train.tensorboard needs TensorBoard, which is not installed; install the extra "
                    "(pip install 'bigmodel[tensorboard]') or set train.tensorboard: false"
                ) from None
            self._board = SummaryWriter(str(path.parent / "tensorboard"), purge_step=start_step + 1, flush_secs=10)

    def write(self, record: dict[str, Any]) -> None:
        if not self.writes:
            return
        append_jsonl(self.path, record)
        if self.tracking is not None:
            self.tracking.log(record)
        if self._board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._board.add_scalar(key, value, record["step"])

    def close(self, finished: bool = True) -> None:
        """`finished`: the run reached its last step (not stopped by --until-step)."""
        if self._board is not None:
            self._board.close()
        if self.tracking is not None:
            self.tracking.close(finished)
