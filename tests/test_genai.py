"""export.format genai: onnxruntime-genai's own runtime (the oracle here, not bigmodel) loads export/genai
and generates what `bigmodel infer` generates, alone and in a batch it pads itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bigmodel import tokenizer as tokenizers
from bigmodel.infer.session import file_metadata
from bigmodel.manifests import DecoderMetadata
from tests import hf_models
from tests.conftest import cli, write_config
from tests.test_deploy_lm import lm_run  # noqa: F401  (a fixture: a tiny trained model, character-level)

PROMPTS = ["def add(a, b):", "The quick brown fox jumps over the"]


def og_greedy(og: object, model: object, ids: list[int], new_tokens: int) -> list[int]:
    """onnxruntime-genai's greedy tokens after `ids` (batch 1)."""
    params = og.GeneratorParams(model)  # type: ignore[attr-defined]
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)  # type: ignore[attr-defined]
    generator.append_tokens(np.array([ids], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(ids) :]]


@pytest.mark.parametrize(
    ("kind", "dtype"),
    [("llama", "fp32"), ("mistral", "int4")],
    ids=["onnx-attention-fp32", "group-query-int4"],
)
def test_onnxruntime_genai_generates_what_bigmodel_infer_does(tmp_path: Path, kind: str, dtype: str) -> None:
    """og runs the folder as bigmodel infer runs the file: ONNX's Attention (the tiny Llama's heads of 8), and
    GroupQueryAttention (the tiny Mistral's heads of 16) with og's buffers shared between past and present."""
    og = pytest.importorskip("onnxruntime_genai")
    config = hf_models.imported_run(
        tmp_path,
        kind,
        "run",
        {"format": ["onnx", "genai"], "dtype": dtype, "external_data": True},
        ("prepare", "init", "export"),
    )
    export = tmp_path / "run" / "export"
    folder = export / "genai"
    assert sorted(p.name for p in folder.iterdir()) == [
        "genai_config.json",
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert (folder / "model.onnx.data").read_bytes() == (export / "model.onnx.data").read_bytes()
    report = json.loads((export / "genai_parity.json").read_text())
    assert report["passed"] and report["tokens_equal"] and report["tokenizer_agrees"]

    meta = file_metadata(export / "model.onnx")
    assert isinstance(meta, DecoderMetadata) and meta.attention == ("group_query" if kind == "mistral" else "onnx")
    search = json.loads((folder / "genai_config.json").read_text())["search"]
    assert search["past_present_share_buffer"] == (meta.attention == "group_query")
    ours_tokenizer = tokenizers.from_json(meta.tokenizer)
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    alone = []
    for prompt in PROMPTS:
        ids = [int(t) for t in tokenizer.encode(prompt)]
        assert ids == ours_tokenizer.encode(prompt)
        tokens = og_greedy(og, model, ids, 10)
        alone.append(tokens)
        ours = cli(
            "infer", "-c", config, "--prompt", prompt, "-t", "0", "-n", "10", "--json", "-o", tmp_path / "o.jsonl"
        )
        assert ours.code == 0, ours.stderr
        answer = json.loads((tmp_path / "o.jsonl").read_text())
        # the same tokens (a random model's are mostly partial UTF-8, which og's decoder drops, so they are
        # compared through one decoder)
        assert len(tokens) == answer["new_tokens"] == 10 and ours_tokenizer.decode(tokens) == answer["completion"]
    # a batch og pads itself (on the right, prompts of different lengths): each row as it was alone
    batch = tokenizer.encode_batch(PROMPTS)
    width = batch.as_numpy().shape[1]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=width + 10, do_sample=False, batch_size=len(PROMPTS))
    generator = og.Generator(model, params)
    generator.append_tokens(batch)
    while not generator.is_done():
        generator.generate_next_token()
    for row, tokens in enumerate(alone):
        assert [int(t) for t in generator.get_sequence(row)[width:]] == tokens


def test_genai_export_refuses_what_its_runtime_cannot_read(lm_run: Path) -> None:  # noqa: F811
    result = cli("export", "-c", lm_run, "--set", "export.format=genai")
    assert result.code == 2 and "character-level" in result.stderr and "data.tokenizer.kind: bpe" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (lm_run.parent / "run" / "export" / "genai").exists()
    empty = cli("export", "-c", lm_run, "--set", "export.format=[]")
    assert empty.code == 2 and "export.format" in empty.stderr and "writes nothing" in empty.stderr
    tabular = write_config(
        lm_run.parent / "mlp.yaml",
        {"data": {"format": "tabular", "path": "x.csv", "target": "y"}, "export": {"format": ["genai"]}},
    )
    wrong = cli("config", "validate", "-c", tabular)
    assert wrong.code == 2 and "writes decoder language models" in wrong.stderr
