"""Does augmentation help when data is scarce? digits trained on 20% of its training split (252 rows),
with and without feature noise and mixup, over 3 seeds; val and test stay whole. Prints JSON: the test
accuracy of every run and the mean per variant.

    python scripts/augment_digits.py [--subset 0.2] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bigmodel import console
from bigmodel.config import load_config
from bigmodel.stages import STAGES

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"
VARIANTS = {
    "none": "[]",
    "noise": "[{kind: noise, std: 0.3}]",
    "mixup": "[{kind: mixup, alpha: 0.4}]",
    "noise+mixup": "[{kind: noise, std: 0.3}, {kind: mixup, alpha: 0.4}]",
}


def test_accuracy(run_dir: Path, seed: int, subset: float, augment: str) -> float:
    config = load_config(
        CONFIG,
        [f"seed={seed}", f"data.train_subset={subset}", f"train.augment={augment}", "eval.fail_under={}"],
        run_dir,
    )
    for stage in ("prepare", "init", "train", "eval"):
        outputs = STAGES[stage].run(config)
    return float(outputs["accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    console.set_quiet(True)
    runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name, augment in VARIANTS.items():
                runs[name].append(test_accuracy(Path(tmp) / f"{seed}-{name}", seed, args.subset, augment))
    report = {
        "train_subset": args.subset,
        "seeds": args.seeds,
        "variants": VARIANTS,
        "test_accuracy": {name: [round(a, 4) for a in accs] for name, accs in runs.items()},
        "mean_test_accuracy": {name: round(statistics.mean(accs), 4) for name, accs in runs.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
