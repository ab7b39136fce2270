"""Our numpy metrics against scikit-learn's (a test-only cross-check)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as sk

from bigmodel import metrics


def test_classification_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=300)
    logits = rng.normal(size=(300, 4)) + 2.0 * np.eye(4)[y] * rng.random((300, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = probs.argmax(1)
    ours = metrics.classification(y, probs, ["a", "b", "c", "d"])
    assert ours["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    assert ours["precision_macro"] == pytest.approx(sk.precision_score(y, pred, average="macro"))
    assert ours["recall_macro"] == pytest.approx(sk.recall_score(y, pred, average="macro"))
    assert ours["f1_macro"] == pytest.approx(sk.f1_score(y, pred, average="macro"))
    assert ours["loss"] == pytest.approx(sk.log_loss(y, probs))
    assert ours["confusion_matrix"] == sk.confusion_matrix(y, pred).tolist()
    f1_per_class = sk.f1_score(y, pred, average=None)
    assert [ours["per_class"][k]["f1"] for k in "abcd"] == pytest.approx(f1_per_class.tolist())


def test_never_predicted_class_scores_zero_precision() -> None:
    y = np.array([0, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 1, 1]]
    ours = metrics.classification(y, probs, ["x", "y", "z"])
    assert ours["per_class"]["z"]["precision"] == 0.0
    assert ours["precision_macro"] == pytest.approx(
        sk.precision_score(y, [0, 1, 1, 1], average="macro", zero_division=0)
    )


def test_regression_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    y = rng.normal(size=200)
    pred = y + rng.normal(scale=0.3, size=200)
    ours = metrics.regression(y, pred)
    assert ours["mse"] == pytest.approx(sk.mean_squared_error(y, pred))
    assert ours["mae"] == pytest.approx(sk.mean_absolute_error(y, pred))
    assert ours["r2"] == pytest.approx(sk.r2_score(y, pred))
