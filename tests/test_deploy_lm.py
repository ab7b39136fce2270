"""Deploying the GPT: KV-cache ONNX export with its parity gate, and generation with ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from bigmodel import registry, streaming
from bigmodel import tokenizer as tokenizers
from bigmodel.export.gpt import check_parity
from bigmodel.infer.session import file_metadata
from bigmodel.manifests import DecoderMetadata, read_onnx_metadata
from tests.conftest import cli, cli_subprocess
from tests.test_formats import as_format_1
from tests.test_lm import lm_config


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT trained for a few steps and exported: the model every test here deploys."""
    tmp = tmp_path_factory.mktemp("lm")
    config = lm_config(tmp, max_steps=40)
    result = cli("pipeline", "-c", config, "--to", "export", "-q")
    assert result.code == 0, result.stderr
    return config


def onnx_of(config: Path) -> Path:
    return config.parent / "run" / "export" / "model.onnx"


def generate(config: Path, *args: str) -> list[dict]:
    result = cli("infer", "--model", onnx_of(config), "--json", "-o", config.parent / "out.jsonl", *args)
    assert result.code == 0, result.stderr
    return [json.loads(line) for line in (config.parent / "out.jsonl").read_text().splitlines()]


def test_export_writes_one_checked_graph_with_everything_infer_needs(lm_run: Path) -> None:
    model = onnx.load(str(onnx_of(lm_run)))
    onnx.checker.check_model(model, full_check=True)
    names = [i.name for i in model.graph.input]
    assert names == ["input_ids", "past_keys.0", "past_values.0", "attention_mask"]  # lm_config: one layer
    # export.attention auto, heads of 16: each layer's attention is one GroupQueryAttention node (ONNX
    # Runtime's, which writes the cache in place); export.attention onnx writes ONNX's Attention (below)
    assert [node.op_type for node in model.graph.node].count("GroupQueryAttention") == 1  # lm_config: one layer
    meta = file_metadata(onnx_of(lm_run))
    assert isinstance(meta, DecoderMetadata) and meta.block_size == 32 and meta.attention == "group_query"
    assert tokenizers.from_json(meta.tokenizer).vocab_size > 50
    report = json.loads((lm_run.parent / "run" / "export" / "parity.json").read_text())
    assert report["passed"] and report["decode_steps"] == 8 and report["max_abs_diff"] < 1e-4
    assert report["padded"]["prompt_tokens"][0] > report["padded"]["prompt_tokens"][1]  # rows of two lengths
    assert report["padded"]["max_abs_diff"] < 1e-4
    # the gate's tolerance grows with the logits' scale: atol + rtol x the largest |logit| of PyTorch's
    assert report["max_abs_logit"] > 1 and report["tolerance"] == pytest.approx(1e-4 + 1e-5 * report["max_abs_logit"])


def test_a_corrupted_export_is_caught_by_the_parity_gate(lm_run: Path) -> None:
    model, manifest = registry.load_model(lm_run.parent / "run" / "train" / "best.safetensors")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[3, 5] += 0.5  # one perturbed weight
    tokens = np.fromfile(lm_run.parent / "run" / "prepare" / "val.bin", dtype=np.uint16).astype(np.int64)
    arch = manifest.architecture
    report = check_parity(streaming.StateDict(model, "model."), onnx_of(lm_run), tokens, arch, (1e-4, 1e-5), 8, 1)
    assert not report["passed"] and report["max_abs_diff"] > report["tolerance"] > 1e-4


def test_failed_gate_publishes_nothing(lm_run: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(lm_run.parent / "run", tmp_path / "run")
    shutil.copy(lm_run, tmp_path / "lm.yaml")
    result = cli("export", "-c", tmp_path / "lm.yaml", "--set", "export.atol=1e-30", "--set", "export.rtol=0")
    assert result.code == 1 and "export parity failed" in result.stderr
    assert not (tmp_path / "run" / "export" / "model.onnx").exists()


def test_opset_18_writes_attention_out_and_decodes_the_same(lm_run: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(lm_run.parent / "run", tmp_path / "run")
    shutil.copy(lm_run, tmp_path / "lm.yaml")
    result = cli("export", "-c", tmp_path / "lm.yaml", "--set", "export.opset=18", "--json", "-q")
    assert result.code == 0, result.stderr
    assert result.json()["max_abs_diff"] < 1e-4
    ops = [node.op_type for node in onnx.load(str(onnx_of(tmp_path / "lm.yaml"))).graph.node]
    assert "Attention" not in ops and "Softmax" in ops
    assert (
        generate(tmp_path / "lm.yaml", "--prompt", "def ", "-t", "0", "-n", "12")[0]["completion"]
        == generate(lm_run, "--prompt", "def ", "-t", "0", "-n", "12")[0]["completion"]
    )
    newer = cli("export", "-c", tmp_path / "lm.yaml", "--set", "export.opset=24")
    assert newer.code == 2 and "export.opset" in newer.stderr


def test_external_data_and_offline_optimisation(lm_run: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(lm_run.parent / "run", tmp_path / "run")
    shutil.copy(lm_run, tmp_path / "lm.yaml")
    result = cli(
        "export",
        "-c",
        tmp_path / "lm.yaml",
        "--set",
        "export.external_data=true",
        "--set",
        "export.optimize=true",
        "--json",
        "-q",
    )
    assert result.code == 0, result.stderr
    export = tmp_path / "run" / "export"
    assert (export / "model.onnx.data").stat().st_size > (export / "model.onnx").stat().st_size
    assert result.json()["optimized_max_abs_diff"] < 1e-4
    out = generate(tmp_path / "lm.yaml", "--prompt", "def ", "-t", "0", "-n", "10")
    assert len(out) == 1 and out[0]["new_tokens"] == 10


def test_greedy_ort_generation_equals_pytorch(lm_run: Path) -> None:
    model, manifest = registry.load_model(lm_run.parent / "run" / "train" / "best.safetensors")
    tok = tokenizers.from_json(manifest.data.tokenizer)
    prompt = "def main(args):\n    "
    ids = torch.tensor([tok.encode(prompt)])
    expected = tok.decode(model.eval().generate(ids, 60, temperature=0)[0, ids.size(1) :].tolist())
    out = generate(lm_run, "--prompt", prompt, "-t", "0", "-n", "60")  # 21 + 60 > block 32: crops too
    assert out[0]["completion"] == expected


def test_prompts_one_by_one_equal_the_batch_and_sampling_is_seeded(lm_run: Path) -> None:
    prompts = ["import os\n", "class A:", "    return x"]
    batch_file = lm_run.parent / "prompts.jsonl"
    batch_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    together = generate(lm_run, "--input", batch_file, "-n", "15", "-t", "1.0")
    alone = [generate(lm_run, "--prompt", p, "-n", "15", "-t", "1.0")[0] for p in prompts]
    assert [r["completion"] for r in together] == [r["completion"] for r in alone]
    again = generate(lm_run, "--input", batch_file, "-n", "15", "-t", "1.0")
    assert again == together


def test_stop_strings_end_the_completion(lm_run: Path) -> None:
    free = generate(lm_run, "--prompt", "def ", "-t", "0", "-n", "40")[0]["completion"]
    stop = free[5:7]
    config = lm_run.parent / "stop.yaml"
    config.write_text(lm_run.read_text())
    result = cli(
        "infer",
        "-c",
        config,
        "--prompt",
        "def ",
        "-t",
        "0",
        "-n",
        "40",
        "--set",
        f"infer.stop={json.dumps([stop])}",
        "--json",
        "-o",
        lm_run.parent / "stop.jsonl",
    )
    assert result.code == 0, result.stderr
    record = json.loads((lm_run.parent / "stop.jsonl").read_text())
    assert record["stop_reason"] == "stop" and stop not in record["completion"]
    assert free.startswith(record["completion"])


def test_a_prompt_given_on_the_command_line_is_answered_on_stdout(lm_run: Path) -> None:
    result = cli("infer", "-c", lm_run, "--prompt", "def ", "-t", "0", "-n", "5")
    assert result.code == 0 and result.stdout.startswith("def ") and "-> stdout" in result.stderr, result.stderr
    assert "warning" not in result.stderr  # 4 + 5 tokens fit the 32-token context
    sliding = cli("infer", "-c", lm_run, "--prompt", "def ", "-t", "0", "-n", "40")
    assert sliding.code == 0 and "1 of 1 generation(s) ran past the model's context of 32 tokens" in sliding.stderr
    to_file = cli("infer", "-c", lm_run, "--prompt", "def ", "-t", "0", "-n", "5", "-o", lm_run.parent / "p.txt")
    assert to_file.code == 0 and to_file.stdout == "" and (lm_run.parent / "p.txt").read_text().startswith("def ")


def test_prompt_longer_than_the_block_is_cropped(lm_run: Path) -> None:
    out = generate(lm_run, "--prompt", "x = 1\n" * 20, "-t", "0", "-n", "5")[0]
    assert out["cropped"] is True and out["new_tokens"] == 5


def test_bad_inputs_are_user_errors(lm_run: Path, tmp_path: Path) -> None:
    model = onnx_of(lm_run)
    empty = cli("infer", "--model", model, "--prompt", "")
    assert empty.code == 2 and "empty prompt" in empty.stderr
    unknown = cli("infer", "--model", model, "--prompt", "日本")
    assert unknown.code == 2 and "not in this char-level model's vocabulary" in unknown.stderr
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"\x00not an onnx file")
    wrong = cli("infer", "--model", bogus, "--prompt", "def ")
    assert wrong.code == 2 and "not a loadable ONNX model" in wrong.stderr
    provider = cli(
        "infer",
        "--model",
        model,
        "--prompt",
        "def ",
        "-c",
        lm_run,
        "--set",
        'infer.providers=["TensorrtExecutionProvider"]',
    )
    assert provider.code == 2 and "available: " in provider.stderr and "CPUExecutionProvider" in provider.stderr


def test_bench_reports_latency_and_throughput(lm_run: Path) -> None:
    result = cli(
        "infer",
        "--model",
        onnx_of(lm_run),
        "--bench",
        "--batch",
        "4",
        "--prompt-tokens",
        "8",
        "--new-tokens",
        "8",
        "--repeats",
        "2",
        "--json",
    )
    assert result.code == 0, result.stderr
    bench = result.json()
    assert bench["batch"] == 4 and bench["tokens_per_s"] > 0
    assert 0 < bench["per_token_ms_p50"] <= bench["per_token_ms_p95"]
    plain = cli("infer", "--model", onnx_of(lm_run), "--bench", "--new-tokens", "4", "--repeats", "1")
    assert plain.code == 0 and "tokens/s" in plain.stderr  # without --json the numbers still show
    too_long = cli("infer", "--model", onnx_of(lm_run), "--bench", "--prompt-tokens", "30", "--new-tokens", "8")
    assert too_long.code == 2 and "exceed the block size" in too_long.stderr


def test_generation_streams_from_stdin_without_torch(lm_run: Path) -> None:
    script = (
        "import sys, runpy\n"
        "sys.argv = ['bigmodel', 'infer', '--model', sys.argv[1], '--input', '-', '-n', '5', '-t', '0', '-q']\n"
        "try:\n    runpy.run_module('bigmodel', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
        "print('|torch imported' if 'torch' in sys.modules else '|no torch', code)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(onnx_of(lm_run))],
        input="def \nclass \n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip().endswith("|no torch 0"), proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("def ") and any(line.startswith("class ") for line in lines)


def test_pipeline_runs_export_and_infer_for_the_gpt(lm_run: Path) -> None:
    result = cli_subprocess(
        "pipeline", "-c", lm_run, "--set", "infer.prompt=def ", "--set", "infer.max_new_tokens=5", "--json", "-q"
    )
    assert result.code == 0, result.stderr
    stages = json.loads(result.stdout)["stages"]
    assert stages["export"] == {"skipped": True} and stages["infer"]["new_tokens"] == 5


def test_an_onnx_file_from_before_grouped_query_attention_still_generates(lm_run: Path, tmp_path: Path) -> None:
    """Files exported before n_kv_head existed have no such metadata (nor special tokens, and their metadata is
    format 1): they cache n_head heads and generate as before."""
    model = onnx.load(str(onnx_of(lm_run)))
    as_format_1(model, drop={"bigmodel.n_kv_head", "bigmodel.special_tokens", "bigmodel.chat_template"})
    old = tmp_path / "old.onnx"
    onnx.save(model, str(old))
    args = ("--prompt", "def ", "-n", "12", "-t", "0", "--json", "-o")
    now = cli("infer", "--model", onnx_of(lm_run), *args, tmp_path / "a.jsonl")
    before = cli("infer", "--model", old, *args, tmp_path / "b.jsonl")
    assert now.code == before.code == 0, before.stderr
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def export_older(lm_run: Path, path: Path, layout: str) -> None:
    """The trained model in an older file layout: "stacked", one (L, B, nkv, P, hs) cache tensor each for
    keys and values and left_padding (before November 2026); "stacked-no-left-padding" (before batching);
    "left-padding", per-layer caches and left_padding (B,) in place of the attention mask (before
    December 2026)."""
    from bigmodel.export.onnx_file import export_dynamo, stamp_and_check

    model, _ = registry.load_model(lm_run.parent / "run" / "train" / "best.safetensors")
    model.eval()

    class Older(torch.nn.Module):
        def forward(
            self,
            input_ids: torch.Tensor,
            past_keys: Any,
            past_values: Any,  # noqa: ANN201
            left_padding: torch.Tensor | None = None,
        ):
            logits, present = model(input_ids, list(zip(past_keys, past_values)), left_padding)
            keys, values = [k for k, _ in present], [v for _, v in present]
            return (
                (logits, keys, values) if layout == "left-padding" else (logits, torch.stack(keys), torch.stack(values))
            )

    batch, seq, past_len = torch.export.Dim("b", max=64), torch.export.Dim("t", max=32), torch.export.Dim("p", max=31)
    padding = torch.zeros(2, dtype=torch.long)
    ids = torch.zeros(2, 3, dtype=torch.long)
    if layout == "left-padding":  # (lm_config: one layer)
        past = [torch.zeros(2, 2, 2, 16)]
        inputs: tuple[Any, ...] = (ids, past, [past[0].clone()], padding)
        names = ["input_ids", "past_keys.0", "past_values.0", "left_padding"]
        outputs = ["logits", "present_keys.0", "present_values.0"]
        cache = [{0: batch, 2: past_len}]
        dims: dict[str, Any] = {"input_ids": {0: batch, 1: seq}, "past_keys": cache, "past_values": cache}
    else:
        stacked = torch.zeros(1, 2, 2, 2, 16)
        inputs, names = (ids, stacked, stacked.clone()), ["input_ids", "past_keys", "past_values"]
        outputs = ["logits", "present_keys", "present_values"]
        cache_dims = {1: batch, 3: past_len}
        dims = {"input_ids": {0: batch, 1: seq}, "past_keys": cache_dims, "past_values": cache_dims}
        if layout == "stacked":
            inputs, names = (*inputs, padding), [*names, "left_padding"]
    if "left_padding" in names:
        dims["left_padding"] = {0: batch}
    export_dynamo(Older(), inputs, path, names, outputs, dims, 18)
    current = onnx.load(str(onnx_of(lm_run)))
    meta = read_onnx_metadata({p.key: p.value for p in current.metadata_props}, "current")
    stamp_and_check(path, meta.model_copy(update={"attention": "onnx"}))  # (older files: ONNX's attention)


def serve_two(path: Path, max_batch: int) -> tuple[Any, list[dict]]:
    """Two prompts through the batching scheduler; the scheduler and what each request ended with."""
    import threading

    from bigmodel.config import InferConfig
    from bigmodel.infer.gpt import Decoder, Generation
    from bigmodel.infer.session import open_model
    from bigmodel.serve.batching import Request, Scheduler

    session, meta = open_model(path, ["CPUExecutionProvider"], 1)
    decoder = Decoder.from_session(session, meta, path)
    scheduler = Scheduler(decoder, max_batch=max_batch)
    ends: list[dict] = []
    both = threading.Semaphore(0)
    for prompt in ("def ", "import os\n"):
        generation = Generation(decoder, prompt, InferConfig(max_new_tokens=16, temperature=0), 0)
        scheduler.submit(Request(generation, lambda text: None, lambda end: (ends.append(end), both.release())))
    assert both.acquire(timeout=30) and both.acquire(timeout=30)
    scheduler.stop()
    return scheduler, sorted(ends, key=lambda end: end["prompt"])


@pytest.mark.parametrize("layout", ["stacked", "stacked-no-left-padding", "left-padding"])
def test_onnx_files_of_older_layouts_generate_the_same_and_serve(lm_run: Path, tmp_path: Path, layout: str) -> None:
    """Files with the stacked cache (exported before per-layer caches) or left_padding in place of the
    attention mask still generate the same text; one without either (exported before batching) is served
    one request at a time, the others batched."""
    old = tmp_path / "old.onnx"
    export_older(lm_run, old, layout)
    inputs = [i.name for i in onnx.load(str(old)).graph.input]
    assert inputs[1:3] == (
        ["past_keys.0", "past_values.0"] if layout == "left-padding" else ["past_keys", "past_values"]
    )
    left_padding = layout != "stacked-no-left-padding"
    assert ("left_padding" in inputs) == left_padding and "attention_mask" not in inputs
    args = ("--prompt", "def ", "-n", "12", "-t", "0", "--json", "-o")
    assert cli("infer", "--model", onnx_of(lm_run), *args, tmp_path / "a.jsonl").code == 0
    before = cli("infer", "--model", old, *args, tmp_path / "b.jsonl")
    assert before.code == 0, before.stderr
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()

    scheduler, ends = serve_two(old, max_batch=8)
    assert scheduler.max_batch == (8 if left_padding else 1)
    assert scheduler.largest_batch == (2 if left_padding else 1)
    _, now = serve_two(onnx_of(lm_run), max_batch=8)
    assert [e["new_tokens"] for e in ends] == [16, 16] and [e["completion"] for e in ends] == [
        e["completion"] for e in now
    ]


# ---- fp16 export and ONNX Runtime providers (issue 17)


@pytest.mark.slow
def test_fp16_export_has_its_own_gate_and_runs_everywhere_fp32_does(lm_run: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(lm_run.parent / "run", tmp_path / "run")
    shutil.copy(lm_run, tmp_path / "lm.yaml")
    fp32_bytes = (tmp_path / "run" / "export" / "model.onnx").stat().st_size
    result = cli("export", "-c", tmp_path / "lm.yaml", "--set", "export.dtype=fp16", "--json", "-q")
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "run" / "export" / "parity.json").read_text())
    assert report["dtype"] == "fp16" and report["atol"] == 0.1 and 1e-5 < report["max_abs_diff"] < 0.1
    model = onnx.load(str(tmp_path / "run" / "export" / "model.onnx"))
    types = {i.name: i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]}
    assert types["past_keys.0"] == types["present_values.0"] == types["logits"] == onnx.TensorProto.FLOAT16
    assert (tmp_path / "run" / "export" / "model.onnx").stat().st_size < 0.6 * fp32_bytes
    out = generate(tmp_path / "lm.yaml", "--prompt", "def ", "-t", "0", "-n", "10")
    assert out[0]["new_tokens"] == 10
    fp32_loss = json.loads(
        cli(
            "eval",
            "-c",
            lm_run,
            "--checkpoint",
            str(onnx_of(lm_run)),
            "--json",
            "-q",
            "--output",
            str(tmp_path / "m32.json"),
        ).stdout
    )["loss"]
    fp16 = cli(
        "eval",
        "-c",
        tmp_path / "lm.yaml",
        "--checkpoint",
        str(tmp_path / "run" / "export" / "model.onnx"),
        "--json",
        "-q",
    )
    assert fp16.code == 0, fp16.stderr
    assert abs(fp16.json()["loss"] - fp32_loss) < 0.01 * fp32_loss
    # compress starts from fp32 whatever export.dtype says (quantizers read fp32 weights)
    quantized = cli(
        "compress",
        "-c",
        tmp_path / "lm.yaml",
        "--set",
        "export.dtype=fp16",
        "--set",
        "compress.steps=[{method: quantize}]",
        "--json",
        "-q",
    )
    assert quantized.code == 0, quantized.stderr
    assert quantized.json()["steps"][0]["metrics"]["loss"] == pytest.approx(fp32_loss, rel=1e-6)  # from fp32


def test_providers_are_checked_against_this_onnxruntime_in_one_line(lm_run: Path, digits_run: Path) -> None:
    args = ("infer", "--model", onnx_of(lm_run), "--prompt", "def ", "-n", "3")
    assert cli(*args, "--provider", "cpu", "-q").code == 0
    for name in ("cuda", "tensorrt"):
        result = cli(*args, "--provider", name)
        assert result.code == 2 and "not available in this onnxruntime" in result.stderr
        assert "onnxruntime-gpu" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    bogus = cli(*args, "--provider", "warp-drive")
    assert bogus.code == 2 and "--provider: " in bogus.stderr and "unknown provider 'warp-drive'" in bogus.stderr
    both = cli(*args, "--provider", "cpu", "--device", "cpu")
    assert both.code == 2 and "give one of them" in both.stderr
    from tests.test_serve import free_port

    served = cli("serve", "--model", onnx_of(lm_run), "--provider", "tensorrt", "--port", str(free_port()))
    assert served.code == 2 and "TensorrtExecutionProvider" in served.stderr
    configured = cli("infer", "-c", lm_run, "--set", "infer.providers=[cuda]", "--prompt", "def ")
    assert configured.code == 2 and "CUDAExecutionProvider" in configured.stderr
    tabular = cli("export", "-c", digits_run, "--set", "export.dtype=fp16")
    assert tabular.code == 2 and "export.dtype 'fp16' is for decoder language models" in tabular.stderr


def test_serve_refuses_a_taken_port_or_a_host_that_does_not_resolve_before_loading(lm_run: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        busy = cli_subprocess("serve", "--model", onnx_of(lm_run), "--port", port)
    assert busy.code == 2 and f"serve.port {port} on 127.0.0.1 is in use" in busy.stderr, busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1 and "serving" not in busy.stderr  # nothing was loaded
    nowhere = cli_subprocess("serve", "--model", onnx_of(lm_run), "--host", "no-such-host.invalid")
    assert nowhere.code == 2 and "serve.host 'no-such-host.invalid' does not resolve" in nowhere.stderr, nowhere.stderr


# ---- the CLI contract for infer and for checkpoints of the other family (issue 16)


def test_infer_flags_are_validated_the_same_with_and_without_a_config(lm_run: Path) -> None:
    model = onnx_of(lm_run)
    for flags, named in (
        (["-n", "0"], "--max-new-tokens"),
        (["-n", "-5"], "--max-new-tokens"),
        (["-t", "-1"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"),
    ):
        alone = cli("infer", "--model", model, "--prompt", "def ", *flags)
        with_config = cli("infer", "-c", lm_run, "--prompt", "def ", *flags)
        assert alone.code == with_config.code == 2, (alone.stderr, with_config.stderr)
        assert alone.stderr == with_config.stderr and named in alone.stderr
        assert len(alone.stderr.strip().splitlines()) == 1 and "pydantic" not in alone.stderr


def test_infer_without_config_has_the_sampling_options_and_infer_sets(lm_run: Path) -> None:
    out = generate(lm_run, "--prompt", "def ", "-n", "12", "--top-k", "3", "--top-p", "0.9", "--seed", "7")
    again = generate(
        lm_run,
        "--prompt",
        "def ",
        "-n",
        "12",
        "--set",
        "infer.top_k=3",
        "--set",
        "infer.top_p=0.9",
        "--set",
        "infer.seed=7",
    )
    other_seed = generate(lm_run, "--prompt", "def ", "-n", "12", "--top-k", "3", "--top-p", "0.9", "--seed", "8")
    assert out == again and out[0]["completion"] != other_seed[0]["completion"]
    greedy = generate(lm_run, "--prompt", "def ", "-n", "30", "-t", "0")[0]["completion"]
    stopped = generate(lm_run, "--prompt", "def ", "-n", "30", "-t", "0", "--stop", greedy[5:7])
    assert stopped[0]["stop_reason"] == "stop" and greedy.startswith(stopped[0]["completion"])
    bad = cli("infer", "--model", onnx_of(lm_run), "--prompt", "x", "--set", "train.lr=1")
    assert bad.code == 2 and "only infer keys" in bad.stderr


def test_an_explicit_input_wins_over_the_config_prompt_and_two_inputs_conflict(lm_run: Path) -> None:
    prompts = lm_run.parent / "two_prompts.txt"
    prompts.write_text("def \nclass \n")
    config = lm_run.parent / "with_prompt.yaml"
    config.write_text(lm_run.read_text() + "infer: {prompt: 'import ', max_new_tokens: 4}\n")
    out = lm_run.parent / "from_file.jsonl"
    result = cli("infer", "-c", config, "--input", prompts, "--output", out, "-q")
    assert result.code == 0, result.stderr
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["def ", "class "]
    both = cli("infer", "--model", onnx_of(lm_run), "-p", "ROMEO:", "-i", prompts)
    assert both.code == 2 and "--prompt and --input" in both.stderr
    both = cli("infer", "-c", config, "-p", "ROMEO:", "-i", prompts)
    assert both.code == 2 and "--prompt and --input" in both.stderr


def test_a_checkpoint_of_the_other_family_is_refused(lm_run: Path, digits_run: Path) -> None:
    gpt_best = lm_run.parent / "run" / "train" / "best.safetensors"
    mlp_best = digits_run.parent / "run" / "train" / "best.safetensors"
    for stage, config, checkpoint in (
        ("eval", digits_run, gpt_best),
        ("export", digits_run, gpt_best),
        ("compress", digits_run, gpt_best),
        ("eval", lm_run, mlp_best),
        ("export", lm_run, mlp_best),
    ):
        key = "compress.checkpoint" if stage == "compress" else f"{stage}.checkpoint"
        extra = ["--set", "compress.steps=[{method: quantize}]"] if stage == "compress" else []
        result = cli(stage, "-c", config, "--set", f"{key}={checkpoint}", "--run-dir", lm_run.parent / "other", *extra)
        assert result.code == 2, (stage, result.stderr)
        assert "holds a '" in result.stderr and "model.family" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    onnx = cli("eval", "-c", digits_run, "--set", f"eval.checkpoint={onnx_of(lm_run)}")  # refused: touches nothing
    assert onnx.code == 2 and "'gpt' model; this needs a 'tabular' model" in onnx.stderr


# ---- the KV cache written in place (export.attention ort: GroupQueryAttention)


def test_infer_decodes_into_buffers_written_in_place_with_the_arrays_numbers(lm_run: Path) -> None:
    """lm_config's heads are 16 wide, so export.attention auto wrote GroupQueryAttention: infer binds one
    buffer per layer as both past and present, and a step writes into it (the present *is* that buffer:
    no copy of the cache) -- with the logits and the cache contents of the plain run that returns new
    arrays each step, bit for bit, over a prompt of two rows and 8 steps."""
    from bigmodel.infer.gpt import ArrayCache, Decoder, SharedCache
    from bigmodel.infer.session import open_model

    session, meta = open_model(onnx_of(lm_run), ["CPUExecutionProvider"], 1)
    decoder = Decoder.from_session(session, meta, onnx_of(lm_run))
    assert meta.attention == "group_query" and decoder.right_padded
    shared, arrays = decoder.sequences(2, 20), ArrayCache(decoder, 2)
    assert isinstance(shared, SharedCache)
    ids = np.random.default_rng(0).integers(0, 50, (2, 6))
    for _ in range(9):
        got, want = shared.run(ids), arrays.run(ids)
        assert np.array_equal(got, want)
        ids = got[:, -1:].argmax(-1)
    presents = [value for value in shared.binding.get_outputs() if len(value.shape()) == 4]
    assert [p.data_ptr() for p in presents] == [b.data_ptr() for b in shared.buffers]
    assert shared.length == arrays.length == 14
    for buffer, array in zip(shared.buffers, (*arrays.cache.keys, *arrays.cache.values)):
        assert np.array_equal(buffer.numpy()[:, :, :14], array)
    with pytest.raises(ValueError, match="exceed"):
        shared.run(np.zeros((2, 7), np.int64))


def test_serve_keeps_the_batch_in_slots_written_in_place_with_the_arrays_numbers(lm_run: Path) -> None:
    """serve's batch on a GroupQueryAttention file: each row's keys and values in its slot of buffers the
    graph writes in place -- rows of different lengths prefilled together, steps, a row leaving from the
    middle (the rows after it move down), a row joining a running batch, the buffers outgrown -- with the logits of the batch
    kept as arrays each run returns, bit for bit, and each slot holding that row's cached positions."""
    from bigmodel.infer.gpt import Decoder
    from bigmodel.infer.session import open_model
    from bigmodel.serve.batching import ArrayRows, Scheduler, SlotRows

    session, meta = open_model(onnx_of(lm_run), ["CPUExecutionProvider"], 1)
    decoder = Decoder.from_session(session, meta, onnx_of(lm_run))
    scheduler = Scheduler(decoder, max_batch=4)
    scheduler.stop()
    assert isinstance(scheduler._rows, SlotRows)
    slots, arrays = SlotRows(decoder, 4, capacity=4), ArrayRows(decoder)  # (4 positions: it has to grow)
    rng = np.random.default_rng(0)

    def both(call: str, *args: object) -> np.ndarray:
        got, want = getattr(slots, call)(*args), getattr(arrays, call)(*args)
        assert np.array_equal(got, want), call
        return got

    lengths = np.array([5, 9, 2])
    logits = both("add", rng.integers(0, 50, (3, 9)), 9 - lengths)  # (right-padded: the ids past each length)
    for _ in range(3):
        logits = both("step", logits[:, -1].argmax(-1)[:, None])
    slots.keep([0, 2]), arrays.keep([0, 2])  # the 9-token row leaves: the last row moves into its slot
    assert slots.lengths.tolist() == [8, 5]
    both("step", rng.integers(0, 50, (2, 1)))
    both("add", rng.integers(0, 50, (1, 7)), np.zeros(1, np.int64))  # joins in the third slot
    for _ in range(2):
        both("step", rng.integers(0, 50, (3, 1)))
    assert slots.lengths.tolist() == [11, 8, 9] and slots.capacity == 18  # 4 -> 9 (the prompt) -> 18
    width = arrays.cache.length  # (right-padded arrays: row b's positions are its first lengths[b])
    for buffer, array in zip(slots.buffers, (*arrays.cache.keys, *arrays.cache.values)):
        for row, used in enumerate(slots.lengths):
            assert np.array_equal(buffer[row, :, :used], array[row, :, :used]) and used <= width
    with pytest.raises(ValueError, match="slots"):
        slots.add(np.zeros((2, 3), np.int64), np.zeros(2, np.int64))


def test_export_attention_onnx_writes_onnx_attention_and_decodes_and_serves_the_same(
    lm_run: Path, tmp_path: Path
) -> None:
    """export.attention onnx: ONNX's own Attention (rows padded in front) for runtimes without ONNX Runtime's
    operators -- the same greedy text and the same batched serving as the default file; ort where the
    operator cannot compute the model (opset 18 here) is refused in one line."""
    import shutil

    shutil.copytree(lm_run.parent / "run", tmp_path / "run")
    shutil.copy(lm_run, tmp_path / "lm.yaml")
    result = cli("export", "-c", tmp_path / "lm.yaml", "--set", "export.attention=onnx", "--json", "-q")
    assert result.code == 0, result.stderr
    model = onnx.load(str(onnx_of(tmp_path / "lm.yaml")))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("Attention") == 1 and "GroupQueryAttention" not in ops
    meta = file_metadata(onnx_of(tmp_path / "lm.yaml"))
    assert isinstance(meta, DecoderMetadata) and meta.attention == "onnx"
    args = ("--prompt", "def ", "-t", "0", "-n", "12")
    assert generate(tmp_path / "lm.yaml", *args)[0]["completion"] == generate(lm_run, *args)[0]["completion"]
    scheduler, ends = serve_two(onnx_of(tmp_path / "lm.yaml"), max_batch=8)
    assert scheduler.largest_batch == 2
    assert [e["completion"] for e in ends] == [e["completion"] for e in serve_two(onnx_of(lm_run), max_batch=8)[1]]
    refused = cli("export", "-c", tmp_path / "lm.yaml", "--set", "export.attention=ort", "--set", "export.opset=18")
    assert refused.code == 2 and "export.attention ort" in refused.stderr and "opset 18" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
