"""Test accuracy of configs/digits.yaml over several seeds (each seed also draws its own split), next to
scikit-learn's MLPClassifier(256) trained on exactly the same train split. Prints one JSON object.

    python scripts/digits_seeds.py [--seeds 0 1 2 3 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"


def bigmodel_accuracy(seed: int, run_dir: Path) -> float:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bigmodel",
            "pipeline",
            "-c",
            str(CONFIG),
            "--run-dir",
            str(run_dir),
            "--set",
            f"seed={seed}",
            "--set",
            "eval.fail_under={}",
            "--to",
            "eval",
            "--json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)["stages"]["eval"]["accuracy"]


def sklearn_accuracy(run_dir: Path) -> float | None:
    try:
        from sklearn.neural_network import MLPClassifier
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        return None
    data = load_file(str(run_dir / "prepare" / "data.safetensors"))
    scaler = StandardScaler().fit(data["train_x"])
    scores = [
        MLPClassifier((256,), random_state=k, max_iter=300)
        .fit(scaler.transform(data["train_x"]), data["train_y"])
        .score(scaler.transform(data["test_x"]), data["test_y"])
        for k in range(3)
    ]
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    ours, theirs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            run_dir = Path(tmp) / f"seed{seed}"
            ours[seed] = bigmodel_accuracy(seed, run_dir)
            theirs[seed] = sklearn_accuracy(run_dir)
    result = {
        "config": str(CONFIG),
        "bigmodel_test_accuracy": ours,
        "bigmodel_mean": float(np.mean(list(ours.values()))),
        "bigmodel_min": min(ours.values()),
        "sklearn_mlp256_same_split": theirs,
        "sklearn_mean": float(np.mean([v for v in theirs.values() if v is not None])) if any(theirs.values()) else None,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
