"""The verdict of a parity gate (import against transformers, export against PyTorch): the largest
absolute difference must stay within atol + rtol x the reference's largest |value|, because fp32 rounding
grows with the scale of the numbers (two correct runtimes differ by ~1e-4 on logits of +-40)."""

from __future__ import annotations

from typing import Any


def verdict(max_abs_diff: float, max_abs_logit: float, atol: float, rtol: float) -> dict[str, Any]:
    tolerance = atol + rtol * max_abs_logit
    return {
        "atol": atol,
        "rtol": rtol,
        "max_abs_logit": max_abs_logit,
        "tolerance": tolerance,
        "passed": bool(max_abs_diff <= tolerance),
    }


def allowed(report: dict[str, Any]) -> str:
    """How a report's tolerance was reached, for the gate's line and its failure message."""
    return (
        f"tolerance {report['tolerance']:.3g} = atol {report['atol']} + rtol {report['rtol']} x max |logit| "
        f"{report['max_abs_logit']:.3g}"
    )
