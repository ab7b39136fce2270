"""The two ways a run can fail on purpose, and their exit codes.

UserError (exit 2): the input is wrong (config, paths, data, checkpoint); the message names what and how
to fix it. GateFailed (exit 1): the work ran but its result failed a check (parity, metric threshold).
RunFailed (exit 1): the run broke, e.g. the loss diverged. Anything else that escapes is a bug and also
exits 1.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USER = 2


class UserError(Exception):
    """A mistake in the user's input. The message is one line: the problem and the fix."""


class RunFailed(Exception):
    """The work started but could not finish (a diverged loss, a broken run); exit 1."""


class GateFailed(RunFailed):
    """The stage ran to the end but its result failed a configured gate; exit 1. `outputs` is what the
    stage would have returned (its metrics): a CI job reading --json sees by how much it failed."""

    def __init__(self, message: str, outputs: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.outputs = outputs or {}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in a stage: the message says where its last checkpoint is; when it is `resumable` the CLI
    adds the command that resumes."""

    def __init__(self, message: str, resumable: bool = False) -> None:
        super().__init__(message)
        self.resumable = resumable


def did_you_mean(name: str, choices: Collection[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
