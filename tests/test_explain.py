"""bigmodel explain: Captum's attributions on the PyTorch checkpoint, checked by the sanity checks of the
attribution literature (Sundararajan et al. 2017's completeness; Adebayo et al. 2018's model randomisation)
and, for a decoder, by Captum run on the transformers model loaded from export/hf (an independent forward).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import cli, tiny_digits

captum = pytest.importorskip("captum")


def explained(config: Path, *sets: str) -> dict:
    result = cli("explain", "-c", config, "-q", *[a for s in sets for a in ("--set", s)])
    assert result.code == 0, result.stderr
    return json.loads((config.parent / "run" / "explain" / "attributions.json").read_text())


def test_tabular_attributions_are_complete_and_change_with_random_weights(tmp_path: Path) -> None:
    config = tiny_digits(tmp_path, epochs=3)
    assert cli("pipeline", "-c", config, "--to", "train", "-q").code == 0
    found = explained(config, "explain.rows=6")
    assert found["kind"] == "tabular" and len(found["items"]) == 6 and found["baseline"] == "the training rows' mean"
    for item in found["items"]:
        total = sum(f["attribution"] for f in item["features"])
        gap = item["f_input"] - item["f_baseline"]
        # completeness: the attributions add up to f(x) - f(baseline), within the delta IG reports
        assert abs(total - gap) == pytest.approx(abs(item["delta"]), abs=1e-4)
        assert abs(item["delta"]) < 0.02 * max(1.0, abs(gap))
        assert len(item["features"]) == 64 and item["explains"].startswith("log-probability of class")
    trained = np.array([[f["attribution"] for f in item["features"]] for item in found["items"]])

    # model randomisation: the same rows explained by the untrained (randomly initialised) network
    random = explained(config, "explain.rows=6", "explain.checkpoint=init")
    untrained = np.array([[f["attribution"] for f in item["features"]] for item in random["items"]])
    correlation = np.corrcoef(np.abs(trained).ravel(), np.abs(untrained).ravel())[0, 1]
    assert not np.allclose(trained, untrained, atol=1e-3) and correlation < 0.9

    # the report shows the features' bars
    assert cli("report", "-c", config, "-q").code == 0
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert "<h2>Explanations</h2>" in page and 'class="bar pos"' in page and "features by mean |attribution|" in page


def test_an_encoder_classifiers_token_attributions_are_complete_and_change_with_random_weights(
    tmp_path: Path,
) -> None:
    from tests.test_text_classification import config_for, labelled_csv

    config = config_for(tmp_path, {"path": str(labelled_csv(tmp_path / "d.csv"))}, n_layer=1, n_embd=32, n_head=2)
    trained = cli(
        "pipeline", "-c", config, "--to", "train", "-q", "--set", "train.epochs=150", "--set", "train.lr=0.01"
    )
    assert trained.code == 0, trained.stderr
    found = json.loads(
        (tmp_path / "run" / "explain" / "attributions.json").read_text()
        if cli("explain", "-c", config, "-q", "--set", "explain.rows=3", "--set", "explain.steps=100").code == 0
        else "{}"
    )
    assert found["kind"] == "text_classification" and len(found["items"]) == 3
    for item in found["items"]:
        tokens = [t["token"] for t in item["tokens"]]
        assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
        total = sum(t["attribution"] for t in item["tokens"])
        assert abs(total - (item["f_input"] - item["f_baseline"])) == pytest.approx(abs(item["delta"]), abs=1e-4)
        assert abs(item["delta"]) < 0.05 * max(1.0, abs(item["f_input"] - item["f_baseline"]))
    assert max(abs(item["f_input"] - item["f_baseline"]) for item in found["items"]) > 0.5  # (not a trivial sum)
    result = cli(
        "explain",
        "-c",
        config,
        "-q",
        "--set",
        "explain.rows=3",
        "--set",
        "explain.steps=100",
        "--set",
        "explain.checkpoint=init",
    )
    assert result.code == 0, result.stderr
    random = json.loads((tmp_path / "run" / "explain" / "attributions.json").read_text())
    for trained_item, random_item in zip(found["items"], random["items"], strict=True):
        a = np.array([t["attribution"] for t in trained_item["tokens"]])
        b = np.array([t["attribution"] for t in random_item["tokens"]])
        assert np.abs(a / np.linalg.norm(a) - b / np.linalg.norm(b)).max() > 0.1
    assert cli("report", "-c", config, "-q").code == 0
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert '<p class="tokens"><span title=' in page and "rgba(" in page


@pytest.mark.filterwarnings("ignore:.*(Skipping this token|Falling back to naive decoding)")
def test_a_decoders_prompt_attributions_equal_captums_on_the_transformers_model(tmp_path: Path) -> None:
    import torch
    import transformers
    from captum.attr import FeatureAblation, LLMAttribution, TextTokenInput

    from bigmodel import tokenizer as tokenizers
    from bigmodel.checkpoint import read_manifest
    from bigmodel.explain.lm import HFStyleTokenizer
    from tests import hf_models

    config = hf_models.imported_run(tmp_path, "llama", "run", {"format": "hf"}, stages=("prepare", "init", "export"))
    prompts = ["def add(a, b):", "The quick brown fox"]
    found = explained(
        config, f"explain.prompts={json.dumps(prompts)}", "explain.checkpoint=init", "explain.max_new_tokens=5"
    )
    assert found["kind"] == "lm" and [item["prompt"] for item in found["items"]] == prompts

    # The oracle: Captum's own LLMAttribution on the transformers model of export/hf, same tokens, decoding
    # token by token (one transformers forward per generated token; bigmodel scores them all in one forward).
    # Not through transformers' cache: Captum 0.9's cached path gives other numbers with transformers 5.24
    # (the uncached path, transformers' one-pass path and bigmodel's agree to 1e-6).
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export" / "hf").eval()
    manifest = read_manifest(tmp_path / "run" / "init" / "model.safetensors")
    tok = HFStyleTokenizer(tokenizers.from_json(manifest.data.tokenizer or ""))
    attribution = LLMAttribution(FeatureAblation(hf), tok)
    for item in found["items"]:
        generated = torch.tensor(item["generated_ids"])
        assert len(generated) == 5 and tok.decode(generated) == item["generated"]
        ids = tok.encode(item["prompt"])
        with torch.no_grad():  # transformers' greedy continuation is the same
            assert (
                hf.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)[0, len(ids) :].tolist()
                == generated.tolist()
            )
        baseline = found["baseline_id"]
        theirs = attribution.attribute(
            TextTokenInput(item["prompt"], tok, baselines=baseline), target=generated, use_cached_outputs=False
        )
        assert list(theirs.input_tokens) == item["prompt_tokens"]
        np.testing.assert_allclose(item["sequence_attributions"], theirs.seq_attr.numpy(), rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(item["token_attributions"], theirs.token_attr.numpy(), rtol=1e-3, atol=1e-6)
        assert any(abs(v) > 1e-6 for v in item["sequence_attributions"])  # the prompt does drive the output


def test_explain_refuses_what_it_cannot_explain_in_one_line(tmp_path: Path) -> None:
    config = tiny_digits(tmp_path, epochs=1)
    assert cli("pipeline", "-c", config, "--to", "init", "-q").code == 0
    for sets, words in (
        ((), "no checkpoint at"),
        (("explain.checkpoint=run/export/model.onnx",), "not an ONNX file"),
        (("explain.prompts=[hi]",), "explain.prompts"),
    ):
        result = cli("explain", "-c", config, "-q", *[a for s in sets for a in ("--set", s)])
        assert result.code == 2 and words in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
