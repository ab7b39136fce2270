"""lm-evaluation-harness against `bigmodel serve`: its `local-completions` model (the OpenAI completions API:
token-id prompts in batches, echo, logprobs, max_tokens 0 for loglikelihoods; stop sequences for
generation) on a multiple-choice and a generate_until task read from local JSONL files, against its `hf`
model on the same weights (bigmodel's Hugging Face export). lm-eval is the oracle here, not bigmodel."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests import hf_models
from tests.test_serve import server

QUESTIONS = [
    ("The cat sat on the", ["mat", "sky", "tree"], 0),
    ("def add(a, b): return", [" a + b", " a - b"], 0),
    ("One, two,", [" three", " five", " seven"], 0),
    ("The sun is", [" hot", " cold"], 0),
    ("import", [" os", " sys", " re"], 1),
    ("for i in", [" range(3)", " list"], 0),
]
TASKS = {
    "bm_choice": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}],
    },
    "bm_generate": {
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{choices[answer]}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    },
}


def write_tasks(folder: Path) -> Path:
    """The two tasks as lm-eval YAML files over one local JSONL file (its `json` loader reads it offline)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    for name, task in TASKS.items():
        spec = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            **task,
        }
        (folder / f"{name}.yaml").write_text(json.dumps(spec))  # (JSON is YAML)
    return folder


def evaluate(model: str, model_args: str, tasks: Path, batch_size: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(TASKS),
        task_manager=TaskManager(include_path=str(tasks)),
        batch_size=batch_size,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
    )


@pytest.mark.slow
def test_lm_eval_against_serve_equals_lm_eval_on_the_hf_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hf_models.imported_run(tmp_path, "llama", "run", {"format": "both"}, ("prepare", "init", "export"))
    hf_folder = tmp_path / "run" / "export" / "hf"
    tasks = write_tasks(tmp_path / "tasks")
    theirs = evaluate("hf", f"pretrained={hf_folder},dtype=float32,device=cpu", tasks, 1)
    with server("--model", tmp_path / "run" / "export" / "model.onnx") as base:
        ours = evaluate(
            "local-completions",
            f"model=run,base_url={base}/v1/completions,tokenizer={hf_folder},tokenizer_backend=huggingface,"
            "num_concurrent=1,max_retries=1",
            tasks,
            4,  # four prompts per request
        )
    assert ours["results"]["bm_choice"]["acc,none"] == theirs["results"]["bm_choice"]["acc,none"]
    assert ours["results"]["bm_generate"] == theirs["results"]["bm_generate"]
    for name in TASKS:
        pairs = list(zip(ours["samples"][name], theirs["samples"][name], strict=True))
        assert len(pairs) == len(QUESTIONS)
        for a, b in pairs:
            assert a["doc_id"] == b["doc_id"] and a["arguments"] == b["arguments"]
            if name == "bm_choice":  # per choice: (loglikelihood, is greedy)
                for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a["filtered_resps"], b["filtered_resps"], strict=True):
                    assert abs(ll_a - ll_b) <= 1e-3 and greedy_a == greedy_b
            else:
                assert a["filtered_resps"] == b["filtered_resps"]
    assert os.environ["HF_HUB_OFFLINE"] == "1"
