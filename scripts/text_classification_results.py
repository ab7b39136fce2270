"""A real labelled text set that is on every machine, and a baseline: docstrings of the Python standard
library labelled by the package they come from; prints JSON.

    python scripts/text_classification_results.py [--out DIR] [--per-class 300]

Builds DIR/docstrings.csv (text, label) from this Python's own standard library: every module, class and
function docstring of at least 5 words in the packages that have at least --min-per-class of them (tests
excluded), at most --per-class per package (seeded choice). Then prepares it with bigmodel (the seeded,
stratified split every model below shares) and scores a TF-IDF + logistic-regression baseline
(scikit-learn) on that split: accuracy, macro F1, per-class precision/recall.

In progress (issue 18): the fine-tuned all-MiniLM-L6-v2 and an encoder trained from scratch are to be added
to the same run, side by side with the baseline.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_import import bigmodel  # noqa: E402

CANDIDATES = ("asyncio", "email", "xml", "http", "unittest", "multiprocessing", "logging", "json", "importlib",
              "urllib", "tkinter", "idlelib", "lib2to3", "distutils", "ctypes", "concurrent", "sqlite3")


def docstrings(package: Path) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        if "test" in path.relative_to(package).parts or path.name.startswith("test"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text.split()) >= 5:
                    found.append(" ".join(text.split()))
    return found


def build(out: Path, per_class: int, min_per_class: int, seed: int) -> dict[str, int]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rng = np.random.default_rng(seed)
    counts = {}
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for name in CANDIDATES:
            if not (stdlib / name).is_dir():
                continue
            texts = sorted(set(docstrings(stdlib / name)))
            if len(texts) < min_per_class:
                continue
            chosen = [texts[i] for i in sorted(rng.choice(len(texts), size=min(per_class, len(texts)), replace=False))]
            writer.writerows([text, name] for text in chosen)
            counts[name] = len(chosen)
    return counts


def tfidf_baseline(work: Path) -> dict[str, object]:
    """TF-IDF (word 1-2 grams) + logistic regression on the split bigmodel prepared."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import classification_report, f1_score

    rows = list(csv.DictReader((work / "docstrings.csv").open(encoding="utf-8")))
    test = [json.loads(line) for line in (work / "run" / "prepare" / "test.jsonl").read_text().splitlines()]
    test_texts = {record["text"] for record in test}
    train = [row for row in rows if row["text"] not in test_texts]  # val rows train the baseline too
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    x_train = vectorizer.fit_transform([row["text"] for row in train])
    classifier = LogisticRegression(max_iter=2000, C=10.0).fit(x_train, [row["label"] for row in train])
    predicted = classifier.predict(vectorizer.transform([record["text"] for record in test]))
    truth = [record["label"] for record in test]
    report = classification_report(truth, predicted, output_dict=True, zero_division=0)
    return {"accuracy": round(float(np.mean(predicted == np.array(truth))), 4),
            "f1_macro": round(float(f1_score(truth, predicted, average="macro")), 4),
            "per_class": {label: {k: round(report[label][k], 3) for k in ("precision", "recall", "f1-score")}
                          for label in sorted(set(truth))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--min-per-class", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="docstrings_"))
    work.mkdir(parents=True, exist_ok=True)
    counts = build(work / "docstrings.csv", args.per_class, args.min_per_class, args.seed)
    (work / "scratch.yaml").write_text(json.dumps({
        "seed": args.seed, "threads": 2, "run_dir": "run",
        "data": {"format": "text_classification", "path": "docstrings.csv"},
        "model": {"n_layer": 4, "n_embd": 128, "n_head": 4, "block_size": 128}}))
    bigmodel("prepare", "-c", "scratch.yaml", cwd=work)
    print(json.dumps({"data": {"texts_per_label": counts, "python": sys.version.split()[0]},
                      "tfidf_logistic_regression": tfidf_baseline(work)}, indent=2))


if __name__ == "__main__":
    main()
