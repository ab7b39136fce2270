"""Peak memory of text `prepare` as the corpus grows. Prints one JSON object.

Builds corpora of increasing size (copies of a source text, one file per copy, each made unique so
dedupe keeps it), prepares each in a fresh process and reads that process's peak resident memory. With
streaming, the peak should stay flat while the corpus grows several times past it.

    python scripts/bench_prepare.py [--source FILE] [--sizes-mb 32 128 512] [--chunk-chars 1048576]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import yaml

WRAPPER = """
import atexit, resource, runpy, sys
atexit.register(lambda: print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr))
sys.argv = ["bigmodel", "prepare", "-c", sys.argv[1], "--quiet", "--json"]
runpy.run_module("bigmodel", run_name="__main__")
"""


def build_corpus(folder: Path, source_text: str, size_mb: int, file_mb: int = 16) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    target, written, index = size_mb * 2**20, 0, 0
    per_file = max(1, file_mb * 2**20 // len(source_text))
    while written < target:
        body = "".join(f"[{index}.{k}]\n{source_text}" for k in range(per_file))
        (folder / f"part{index:05d}.txt").write_text(body, encoding="utf-8")
        written += len(body.encode("utf-8"))
        index += 1
    return written


def prepare_peak(corpus: Path, run_dir: Path, tokenizer: str, chunk_chars: int) -> dict:
    config = run_dir.parent / f"{run_dir.name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(run_dir),
                "data": {
                    "format": "text",
                    "path": str(corpus / "*.txt"),
                    "chunk_chars": chunk_chars,
                    "tokenizer": {"kind": tokenizer, "vocab_size": 1024},
                },
                "model": {"family": "gpt"},
                "eval": {"split": "val"},
            }
        )
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(config)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    peak_kb = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("MAXRSS_KB")))
    tokens = json.loads(proc.stdout)["tokens"]
    return {
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "seconds": round(seconds, 1),
        "tokens": tokens["train"] + tokens["val"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path(sysconfig.get_paths()["stdlib"]) / "typing.py")
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--chunk-chars", type=int, default=1 << 20)
    parser.add_argument("--tokenizer", choices=["char", "bpe"], default="char")
    args = parser.parse_args()
    source_text = args.source.read_text(encoding="utf-8")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes_mb:
            corpus = Path(tmp) / f"corpus{size}"
            corpus_bytes = build_corpus(corpus, source_text, size)
            result = prepare_peak(corpus, Path(tmp) / f"run{size}", args.tokenizer, args.chunk_chars)
            result["corpus_mb"] = round(corpus_bytes / 2**20, 1)
            result["corpus_over_peak"] = round(result["corpus_mb"] / result["peak_rss_mb"], 2)
            runs.append(result)
            for part in corpus.iterdir():  # keep the disk footprint to one corpus at a time
                part.unlink()
    peaks = [r["peak_rss_mb"] for r in runs]
    print(
        json.dumps(
            {
                "tokenizer": args.tokenizer,
                "chunk_chars": args.chunk_chars,
                "runs": runs,
                "peak_growth_smallest_to_largest": round(peaks[-1] / peaks[0], 3),
                "corpus_growth": round(runs[-1]["corpus_mb"] / runs[0]["corpus_mb"], 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
