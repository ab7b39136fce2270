"""export.format gguf: llama.cpp's file format written from a checkpoint. The oracles: transformers' own
GGUF loader (bigmodel's import gate compares with it when the written file is imported again) and
llama.cpp itself through llama-cpp-python (slow tier, where it is installed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.torch import load_file

from bigmodel import tokenizer as tokenizers
from bigmodel.checkpoint import read_manifest
from tests import hf_models
from tests.conftest import cli, write_config
from tests.test_deploy_lm import lm_run  # noqa: F401  (a fixture: a tiny trained model, character-level)

pytest.importorskip("gguf")
TEXT = "def add(a, b):\n    return a + b  # The quick brown fox"


def llama_cpp_model(llama_cpp: Any, path: Path, lora: Path | None = None) -> Any:
    """llama.cpp on a GGUF file (and adapter), one thread, every position's logits, and an f32 KV cache:
    llama.cpp's default f16 cache alone moves the logits ~1e-2."""
    return llama_cpp.Llama(
        str(path),
        lora_path=None if lora is None else str(lora),
        n_ctx=128,
        logits_all=True,
        n_threads=1,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )


def imported(tmp: Path, kind: str) -> Path:
    """A tiny random `kind` model imported (init) from a folder transformers wrote; its config."""
    return hf_models.imported_run(tmp, kind, f"run-{kind}", {"format": "gguf"}, ("prepare", "init"))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_a_gguf_export_imports_again_as_the_same_model(tmp_path: Path, kind: str) -> None:
    config = imported(tmp_path, kind)
    result = cli("export", "-c", config, "--set", "export.gguf.dtype=f32", "-q")
    assert result.code == 0, result.stderr
    written = tmp_path / f"run-{kind}" / "export" / "model.gguf"
    report = json.loads((written.parent / "gguf_parity.json").read_text())
    assert report["passed"] and report["max_abs_diff"] == 0 and not report["missing"]
    # the written file imported again: transformers' GGUF loader agrees with it (init's gate), and the
    # weights are the checkpoint's bit for bit
    again = write_config(
        tmp_path / "again.yaml",
        {
            "seed": 0,
            "threads": 1,
            "run_dir": "again",
            "data": {"format": "text", "path": "corpus.txt"},
            "init": {"from": str(written)},
        },
    )
    for stage in ("prepare", "init"):
        result = cli(stage, "-c", again, "-q")
        assert result.code == 0, result.stderr
    ours = load_file(str(tmp_path / f"run-{kind}" / "init" / "model.safetensors"))
    back = load_file(str(tmp_path / "again" / "init" / "model.safetensors"))
    assert set(ours) == set(back) and all(bool((ours[k].float() == back[k].float()).all()) for k in ours)
    first, second = (
        tokenizers.from_json(read_manifest(tmp_path / run / "init" / "model.safetensors").data.tokenizer or "")
        for run in (f"run-{kind}", "again")
    )
    assert first.encode(TEXT) == second.encode(TEXT)


def test_gguf_dtypes_round_as_llama_cpp_writes_them(tmp_path: Path) -> None:
    config = imported(tmp_path, "llama")
    sizes = {}
    for dtype in ("f32", "f16", "bf16", "q8_0"):
        result = cli("export", "-c", config, "--set", f"export.gguf.dtype={dtype}", "--json", "-q")
        assert result.code == 0, result.stderr
        assert result.json()["gguf_dtype"] == dtype
        report = json.loads((tmp_path / "run-llama" / "export" / "gguf_parity.json").read_text())
        assert report["passed"] and report["dtype"] == dtype
        sizes[dtype] = (tmp_path / "run-llama" / "export" / "model.gguf").stat().st_size
    assert sizes["f32"] > sizes["f16"] == sizes["bf16"] > sizes["q8_0"]
    # ollama's Modelfile beside it: the file, ChatML (the tiny model's own template renders as ChatML), its stop
    lines = (tmp_path / "run-llama" / "export" / "Modelfile").read_text().splitlines()
    assert "FROM ./model.gguf" in lines and 'PARAMETER stop "<|im_end|>"' in lines and "PARAMETER num_ctx 64" in lines
    assert any(line.startswith('TEMPLATE """{{- range .Messages }}<|im_start|>') for line in lines)


def test_what_llama_cpp_cannot_take_is_refused_before_exporting(lm_run: Path, tmp_path: Path) -> None:  # noqa: F811
    result = cli("export", "-c", lm_run, "--set", "export.format=gguf")
    assert result.code == 2 and "export.format 'gguf'" in result.stderr
    assert "does not write as GGUF yet" in result.stderr  # (learned positions: a gpt2-shaped model)
    assert (
        len(result.stderr.strip().splitlines()) == 1 and not (lm_run.parent / "run" / "export" / "model.gguf").exists()
    )
    config = imported(tmp_path, "olmoe")  # a mixture of experts
    result = cli("export", "-c", config)
    assert result.code == 2 and "does not write as GGUF yet" in result.stderr
    # a GGUF setting without the GGUF format is not silently ignored
    result = cli("export", "-c", config, "--set", "export.format=onnx", "--set", "export.gguf.dtype=q8_0")
    assert result.code == 2 and "export.gguf applies to export.format gguf" in result.stderr


def test_k_quants_without_llama_cpp_are_refused_before_exporting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = imported(tmp_path, "llama")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # a machine without llama-cpp-python: its import fails
    result = cli("export", "-c", config, "--set", "export.gguf.dtype=q4_k_m")
    assert result.code == 2 and "pip install llama-cpp-python" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run-llama" / "export" / "model.gguf").exists()


@pytest.mark.slow
def test_q4_k_m_is_llama_cpps_own_quantisation_of_the_f16_file(tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes

    # widths of whole K-quant super-blocks (256), so the mix is really Q4_K/Q6_K, not fallbacks
    config = hf_models.imported_run(
        tmp_path, "llama", "run", {"format": "gguf"}, ("prepare", "init"), hidden_size=256, intermediate_size=512
    )
    export = tmp_path / "run" / "export"
    assert cli("export", "-c", config, "--set", "export.gguf.dtype=f16", "-q").code == 0
    (export / "model.gguf").rename(export / "f16.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    out = str(export / "theirs.gguf").encode()
    assert llama_cpp.llama_model_quantize(str(export / "f16.gguf").encode(), out, ctypes.byref(params)) == 0
    result = cli("export", "-c", config, "--set", "export.gguf.dtype=q4_k_m", "-q")
    assert result.code == 0, result.stderr
    report = json.loads((export / "gguf_parity.json").read_text())
    assert report["passed"] and 0.0 < report["max_relative_rms_error"] < report["limit"]
    assert (export / "model.gguf").read_bytes() == (export / "theirs.gguf").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llama_cpp_runs_the_gguf_export_as_bigmodel_does(tmp_path: Path, dtype: str) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    config = imported(tmp_path, "llama")
    result = cli(
        "export", "-c", config, "--set", "export.format=[onnx, gguf]", "--set", f"export.gguf.dtype={dtype}", "-q"
    )
    assert result.code == 0, result.stderr
    export = tmp_path / "run-llama" / "export"
    model = llama_cpp_model(llama_cpp, export / "model.gguf")
    meta = read_manifest(tmp_path / "run-llama" / "init" / "model.safetensors")
    ids = tokenizers.from_json(meta.data.tokenizer or "").encode(TEXT)
    assert model.tokenize(TEXT.encode(), add_bos=False, special=False) == ids  # llama.cpp's tokenizer agrees
    model.eval(ids)
    theirs = np.array(model.scores[: len(ids)], dtype=np.float32)
    from bigmodel.infer.gpt import Decoder
    from bigmodel.infer.session import open_model
    from bigmodel.manifests import DecoderMetadata

    session, onnx_meta = open_model(export / "model.onnx", ["CPUExecutionProvider"], 1, DecoderMetadata)
    decoder = Decoder.from_session(session, onnx_meta, export / "model.onnx")
    ours, _ = decoder.run(np.array([ids]), decoder.empty_cache(1))
    tolerance = 1e-3 if dtype == "f32" else 0.05 * float(np.abs(ours).max())
    assert float(np.abs(ours[0] - theirs).max()) <= tolerance
    # 32 greedy tokens after a 16-token prompt (within the context: past it bigmodel slides its window and
    # llama.cpp runs beyond the trained context): llama.cpp's sampler at temperature 0 against bigmodel's
    ids = ids[:16]
    new = 32
    assert len(ids) + new <= decoder.block_size
    model.reset()
    theirs_tokens = []
    for token in model.generate(ids, temp=0.0, top_k=1):
        theirs_tokens.append(token)
        if len(theirs_tokens) == new:
            break
    from bigmodel.config import InferConfig

    ours_tokens = list(decoder.tokens(ids, InferConfig(temperature=0, max_new_tokens=new), np.random.default_rng(0)))
    stop = next((i for i, t in enumerate(ours_tokens) if t in decoder.eos_ids), len(ours_tokens))
    assert stop >= 8 and theirs_tokens[:stop] == ours_tokens[:stop]


@pytest.mark.slow
def test_llama_cpp_applies_the_gguf_lora_to_its_base_as_the_merged_model(tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    export = {"format": "gguf", "peft": True, "checkpoint": "best", "gguf": {"dtype": "f32"}}
    config = hf_models.imported_run(tmp_path, "llama", "run", export)
    (tmp_path / "corpus.txt").write_text("def add(a, b):\n    return a + b\n" * 80)  # (a val split for training)
    for stage in ("prepare", "init"):
        assert cli(stage, "-c", config, "-q").code == 0
    sets = ["train.lora={rank: 4, targets: [all-linear]}", "train.max_steps=6", "train.lr=0.05", "train.eval_every=3"]
    result = cli("train", "-c", config, *[a for s in sets for a in ("--set", s)], "-q")
    assert result.code == 0, result.stderr
    result = cli("export", "-c", config, "-q")
    assert result.code == 0, result.stderr
    out = tmp_path / "run" / "export"
    ids = tokenizers.from_json(read_manifest(out.parent / "init" / "model.safetensors").data.tokenizer or "").encode(
        TEXT
    )

    def logits(model: str, lora: str | None = None) -> np.ndarray:
        llm = llama_cpp_model(llama_cpp, out / model, None if lora is None else out / lora)
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    merged, adapted, base = logits("model.gguf"), logits("base.gguf", "lora.gguf"), logits("base.gguf")
    assert float(np.abs(adapted - merged).max()) <= 1e-3  # base + adapter in llama.cpp = bigmodel's merge
    assert float(np.abs(base - merged).max()) > 1e-2  # (the adapter does change the model)
