"""Every compression result of the compress issue, from scratch, as one JSON object.

digits: dynamic int8 (weight bytes and accuracy vs fp32).
shakespeare_char (the 2000-step baby GPT is trained first): dynamic int8; 50% unstructured pruning +
300 fine-tune steps; 25% of MLP neurons removed (structured) + 300 steps; the same 300 steps with
nothing pruned (the control the fine-tuned results should be compared with); a 2-layer student
distilled from the 4-layer teacher vs the same student trained from scratch (alpha 0), same steps and
seed. Every number comes from `bigmodel compress`'s report, i.e. from the eval code. About 10 minutes
on 2 CPU cores.

    python scripts/compress_results.py --data ../shared/data/tinyshakespeare/input.txt
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def bigmodel(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bigmodel", *args, "--json", "--quiet"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout)


def compress(config: Path, run_dir: Path, steps: str, *extra: str) -> list[dict]:
    report = bigmodel(
        "compress", "-c", str(config), "--run-dir", str(run_dir), "--set", f"compress.steps={steps}", *extra
    )
    return [
        {
            "name": r["name"],
            "parameters": r["parameters"],
            "nonzeros": r["nonzeros"],
            "file_bytes": r["file_bytes"],
            "weight_bytes": r["weight_bytes"],
            r["metric"]: round(r["metrics"][r["metric"]], 4),
            "latency_ms": r["latency_ms"],
        }
        for r in report["steps"]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="tinyshakespeare input.txt")
    args = parser.parse_args()
    data = f"data.path={args.data.absolute()}"
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        digits = Path(tmp) / "digits"
        bigmodel("pipeline", "-c", str(CONFIGS / "digits.yaml"), "--run-dir", str(digits), "--to", "eval")
        results["digits_int8_dynamic"] = compress(CONFIGS / "digits.yaml", digits, "[{method: quantize}]")

        shakespeare = CONFIGS / "shakespeare_char.yaml"
        teacher = Path(tmp) / "teacher"
        bigmodel("pipeline", "-c", str(shakespeare), "--set", data, "--run-dir", str(teacher), "--to", "train")
        variants = {
            "int8_dynamic": "[{method: quantize}]",
            "unstructured_50_finetune_300": "[{method: prune, sparsity: 0.5, finetune_steps: 300}]",
            "structured_mlp_25_finetune_300": "[{method: prune, kind: structured, sparsity: 0.25, finetune_steps: 300}]",
            "control_unpruned_finetune_300": "[{method: prune, sparsity: 0.0, finetune_steps: 300}]",
            "structured_mlp_25_no_finetune": "[{method: prune, kind: structured, sparsity: 0.25}]",
            "distill_2_layer_student": "[{method: distill, student: {n_layer: 2}, steps: 2000}]",
            "scratch_2_layer_student": "[{method: distill, student: {n_layer: 2}, steps: 2000, alpha: 0}]",
        }
        for name, steps in variants.items():
            run_dir = Path(tmp) / name
            shutil.copytree(teacher, run_dir)  # each variant starts from the same trained teacher
            results[f"shakespeare_{name}"] = compress(shakespeare, run_dir, steps, "--set", data)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
