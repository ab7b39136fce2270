"""int8 vs fp32 GPT decoding with ONNX Runtime, same model, one run. Prints JSON.

Dynamic int8 (the compress `quantize` step's default) against the fp32 export, tokens/s of greedy
decoding at batch 1 (16-token prompt, 48 new tokens), for the shakespeare_char width (128) and wider
models. Repeats are interleaved; medians are reported.

    python -m scripts.bench_int8 [--threads 1] [--repeats 7]   (from the repository root)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bigmodel import console, streaming
from bigmodel.arch import DecoderArch
from bigmodel.compress import quantize
from bigmodel.config import QuantizeStep
from bigmodel.export.gpt import write_decoder
from bigmodel.models import gpt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_infer import decode_ort, session  # noqa: E402

WIDTHS = {"n_embd_128": (4, 4, 128), "n_embd_512": (4, 8, 512), "n_embd_768": (4, 12, 768)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    console.set_quiet(True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (n_layer, n_head, n_embd) in WIDTHS.items():
            arch = {
                "family": "gpt",
                "task": "lm",
                "vocab_size": 65,
                "block_size": 64,
                "dropout": 0.0,
                "bias": False,
                "n_layer": n_layer,
                "n_head": n_head,
                "n_embd": n_embd,
            }
            torch.manual_seed(0)
            model = gpt.GPT(DecoderArch(**arch)).eval()
            gpt.init_weights(model, "gpt2", 0.02)
            fp32 = Path(tmp) / f"{name}.onnx"
            write_decoder(DecoderArch(**arch), streaming.StateDict(model, "model."), fp32, 23)
            int8 = quantize.run(QuantizeStep(), None, fp32, Path(tmp) / f"{name}.int8.onnx")  # type: ignore[arg-type]
            sessions = {"fp32": session(fp32, args.threads), "int8": session(int8, args.threads)}
            prompt = np.random.default_rng(0).integers(0, 65, size=(1, 16), dtype=np.int64)
            rates: dict[str, list[float]] = {"fp32": [], "int8": []}
            for round_ in range(args.repeats + 1):  # round 0 warms up
                for kind, sess in sessions.items():
                    rate = decode_ort(sess, arch, prompt, 48)
                    if round_:
                        rates[kind].append(rate)
            med = {k: statistics.median(v) for k, v in rates.items()}
            results[name] = {
                "fp32_tokens_per_s": round(med["fp32"], 1),
                "int8_tokens_per_s": round(med["int8"], 1),
                "int8_speedup": round(med["int8"] / med["fp32"], 3),
                "fp32_bytes": fp32.stat().st_size,
                "int8_bytes": int8.stat().st_size,
            }
    print(json.dumps({"threads": args.threads, "batch": 1, "models": results}, indent=2))


if __name__ == "__main__":
    main()
