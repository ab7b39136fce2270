"""Metrics on numpy predictions, shared by `eval` (PyTorch or ONNX) and `infer`. No PyTorch here."""

from __future__ import annotations

from typing import Any

import numpy as np


def classification(y_true: np.ndarray, probabilities: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Accuracy, log loss, per-class and macro precision/recall/F1, confusion matrix.

    confusion[i][j] counts rows whose true class is i and predicted class is j. A class never predicted
    has precision 0 (and one never present has recall 0), the convention scikit-learn uses with
    zero_division=0.
    """
    n_classes = len(labels)
    y_pred = probabilities.argmax(axis=1)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    true_pos = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    precision = np.divide(true_pos, predicted, out=np.zeros(n_classes), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros(n_classes), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(n_classes), where=denom > 0)
    eps = 1e-12
    log_loss = float(-np.mean(np.log(np.clip(probabilities[np.arange(len(y_true)), y_true], eps, 1.0))))
    return {
        "accuracy": float((y_pred == y_true).mean()),
        "loss": log_loss,
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, actual)
        },
        "confusion_matrix": confusion.tolist(),
        "labels": labels,
        "rows": int(len(y_true)),
    }


def regression(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    err = y_pred.astype(np.float64) - y_true.astype(np.float64)
    total = float(((y_true - y_true.mean()) ** 2).sum())
    return {
        "mse": float((err**2).mean()),
        "mae": float(np.abs(err).mean()),
        "r2": 1.0 - float((err**2).sum()) / total if total > 0 else 0.0,
        "rows": int(len(y_true)),
    }


HEADLINE = {
    "classification": ("accuracy", "f1_macro", "loss"),
    "regression": ("mse", "mae", "r2"),
    "lm": ("loss", "perplexity", "bits_per_char", "bits_per_byte", "bits_per_token"),
    "mlm": ("loss", "accuracy", "perplexity"),  # on the masked tokens
    "embedding": ("recall_at_1", "recall_at_5", "mrr"),
}
# The scalar metrics each task reports: what eval.fail_under may name.
SCALARS = {
    "classification": ("accuracy", "loss", "precision_macro", "recall_macro", "f1_macro"),
    "regression": ("mse", "mae", "r2"),
    "lm": ("loss", "perplexity", "bits_per_char", "bits_per_byte", "bits_per_token"),
    "mlm": ("loss", "accuracy", "perplexity"),
    "embedding": ("recall_at_1", "recall_at_5", "mrr", "loss"),
}
