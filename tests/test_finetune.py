"""Fine-tuning: instruction/chat data with the prompt masked out of the loss, and LoRA adapters.

Oracles are independent implementations: transformers' `apply_chat_template` for the rendered tokens,
`peft` loading the exported adapter onto the transformers model for the adapted logits. Tiny random
models are written by transformers itself (tests/hf_models.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bigmodel import lora, registry
from bigmodel import sft as examples
from bigmodel import tokenizer as tokenizers
from bigmodel.checkpoint import load_checkpoint, save_checkpoint
from bigmodel.config import LoRAConfig
from bigmodel.datasets import load_examples
from bigmodel.scoring import IGNORE, pad
from bigmodel.train.batches import masked_loss_sum
from tests import hf_models
from tests.conftest import cli, write_config

transformers = pytest.importorskip("transformers")

CHAT = {
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "8"},
    ]
}
PROMPT_COMPLETION = {"prompt": "The quick brown fox", "completion": " jumps over the lazy dog."}
ALPACA = {"instruction": "Add the numbers.", "input": "0123 + 4", "output": "0127"}


def records(n: int = 48) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append({"prompt": f"add {i} and 1:", "completion": f" {i + 1}"})
        rows.append({"instruction": "Double the number.", "input": str(i), "output": str(2 * i)})
        rows.append({"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": str(i)}]})
    return rows


def sft_config(
    tmp: Path, source: Path, rows: list[dict] | None = None, data: dict | None = None, **train: object
) -> Path:
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (rows or records())))
    config = {
        "seed": 0,
        "threads": 1,
        "run_dir": "run",
        "data": {"format": "sft", "path": "train.jsonl", "val_fraction": 0.2, **(data or {})},
        "init": {"from": str(source)},
        "train": {"max_steps": 4, "batch_size": 4, "eval_every": 2, "eval_batches": 2, "lr": 1e-2, **train},
    }
    return write_config(tmp / "sft.yaml", config)


def run(config: Path, *stages: str, sets: tuple[str, ...] = ()) -> None:
    for stage in stages:
        result = cli(stage, "-c", config, "-q", *[a for s in sets for a in ("--set", s)])
        assert result.code == 0, f"{stage}: {result.stderr}"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        kind: hf_models.make(kind, root / kind)
        for kind in ("llama", "gpt2", "qwen3", "phi3", "gemma2", "gemma3", "olmoe")
    }


# ------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("record", [CHAT, PROMPT_COMPLETION, ALPACA], ids=["chat", "prompt_completion", "alpaca"])
@pytest.mark.parametrize("with_bos", [False, True], ids=["chatml", "bos_template"])
def test_rendered_tokens_equal_transformers_apply_chat_template(
    sources: dict[str, Path], tmp_path: Path, record: dict, with_bos: bool
) -> None:
    folder = sources["llama"]
    if with_bos:  # a template that writes the BOS token itself (as Llama 3's): it must appear once
        folder = tmp_path / "bos"
        folder.mkdir()
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (folder / name).symlink_to(sources["llama"] / name)
        settings = json.loads((sources["llama"] / "tokenizer_config.json").read_text())
        settings.update(bos_token="<|endoftext|>", chat_template="{{ bos_token }}" + hf_models.CHATML)
        (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    from bigmodel import pretrained

    source = pretrained.describe(folder)
    tok = tokenizers.from_json(source.tokenizer_json)
    renderer = examples.Renderer(tok, source.chat_template, source.special_tokens, "completion", None)
    parsed = examples.read_record(record, "test: line 1")
    ours = renderer.example(parsed, "test: line 1")

    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    theirs = reference.apply_chat_template(parsed.messages, tokenize=True)
    theirs = list(theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs)
    assert ours.ids == theirs
    assert ours.text == reference.apply_chat_template(parsed.messages, tokenize=False)
    # Trained: exactly the assistant turns (answer + end-of-turn), never the prompt.
    trained_text = tok.decode([i for i, t in zip(ours.ids, ours.trained) if t])
    answers = [m["content"] + "<|im_end|>\n" for m in parsed.messages if m["role"] == "assistant"]
    assert trained_text == "".join(answers)


def test_train_on_modes_and_plain_template(sources: dict[str, Path]) -> None:
    from bigmodel import pretrained

    source = pretrained.describe(sources["llama"])
    tok = tokenizers.from_json(source.tokenizer_json)
    parsed = examples.read_record(CHAT, "x")

    def trained(mode: str, template: str | None = source.chat_template) -> str:
        example = examples.Renderer(tok, template, source.special_tokens, mode, eos_id=7).example(parsed, "x")
        return tok.decode([i for i, t in zip(example.ids, example.trained) if t])

    assert trained("completion") == "5<|im_end|>\n8<|im_end|>\n"
    assert trained("last_turn") == "8<|im_end|>\n"
    assert (
        trained("all")
        == examples.Renderer(tok, source.chat_template, source.special_tokens, "all", 7).example(parsed, "x").text
    )
    plain = examples.Renderer(tok, None, source.special_tokens, "completion", eos_id=7)
    example = plain.example(examples.read_record(ALPACA, "x"), "x")
    assert example.text.startswith("Below is an instruction") and example.text.endswith("### Response:\n0127")
    assert example.ids[-1] == 7 and example.trained[-1]  # the model learns to stop
    assert tok.decode([i for i, t in zip(example.ids[:-1], example.trained[:-1]) if t]) == "0127"
    with pytest.raises(Exception, match="line 3: data.template 'plain' writes single-turn"):
        plain.example(parsed, "f: line 3")


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "hi"}, "line 2: 'completion' is missing"),
        ({"prompt": "hi", "completion": "  "}, "line 2: 'completion' is empty"),
        ({"instruction": "x", "output": 3}, "line 2: 'output' must be a string"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]},
            "line 2: message 1 must be",
        ),
        ({"messages": [{"role": "user", "content": "a"}]}, "line 2: the conversation has no assistant message"),
        ({"text": "plain text"}, "line 2: not an example"),
    ],
)
def test_bad_records_are_one_line_exit_2_errors_naming_the_line(
    sources: dict[str, Path], tmp_path: Path, bad: dict, message: str
) -> None:
    config = sft_config(tmp_path, sources["llama"], rows=[PROMPT_COMPLETION, bad, PROMPT_COMPLETION])
    result = cli("prepare", "-c", config, "-q")
    assert result.code == 2
    assert message in result.stderr and "train.jsonl" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "prepare" / "manifest.json").exists()


HOSTILE_TEMPLATES = {  # a model's chat template is untrusted code: each ends in one line, quickly
    "{% for i in range(10**8) %}x{% endfor %}": "asked for a width or count of 100,000,000",
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}": "ran for more than 5 s",
    "{{ 'x' * 10**10 }}": "asked for a width or count",
    "{{ 'x'|center(10**10) }}": "asked for a width or count",
    "{{ '{:>10000000000}'.format(1) }}": "asked for a format width of 10,000,000,000",
    "{{ '%10000000000s' % 'x' }}": "asked for a format width",
    "{% set s = 'a' * 1000000 %}{{ s.replace('a', 'b' * 100) }}": "built a value of more than 16,777,216",
    "{{ 10**10**8 }}": "computed an integer of more than 256 bits",
    "{% macro f(n) %}{{ f(n+1) }}{% endmacro %}{{ f(0) }}": "RecursionError",
    "{{ 1/0 }}": "ZeroDivisionError",
    "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}": "does not compile (line 2: unexpected '}')",
}


@pytest.mark.parametrize("template", list(HOSTILE_TEMPLATES), ids=range(len(HOSTILE_TEMPLATES)))
def test_a_hostile_or_broken_chat_template_is_one_line_naming_it(template: str) -> None:
    from bigmodel import chat
    from bigmodel.errors import UserError

    started = time.perf_counter()
    with pytest.raises(UserError) as refused:
        chat.render(template, [{"role": "user", "content": "hi"}], {}, origin="the chat template of m.gguf")
    assert time.perf_counter() - started < chat.RENDER_SECONDS + 3
    message = str(refused.value)
    assert message.startswith("the chat template of m.gguf ") and HOSTILE_TEMPLATES[template] in message
    assert "set data.template: chatml" in message and "\n" not in message


# Templates written for these tests in the styles newer models publish, with the constructs theirs use:
# Gemma's (BOS written by the template, a system turn folded into the first user turn or refused, roles
# checked to alternate, the assistant shown as 'model', contents trimmed, `is string`, a slice of the
# messages) and Qwen3's (a namespace carried across a loop, dot access, `is defined` / `is false` and the
# enable_thinking switch that opens an empty thinking block).
GEMMA_STYLE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set prefix = messages[0]['content'] | trim + '\n\n' -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set prefix = '' -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- for m in turns -%}
    {%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('roles must alternate user/assistant') }}
    {%- endif -%}
    {{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' + (prefix if loop.first else '') }}
    {%- if m['content'] is string -%}{{ m['content'] | trim }}{%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"""
QWEN3_STYLE = """{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
    {{- '<|im_start|>' + m.role + '\n' + m.content.strip() -}}
    {%- if loop.index0 == ns.last_user -%}{{- ' (latest)' -}}{%- endif -%}
    {{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}
{%- endif -%}"""


@pytest.mark.parametrize("template", [GEMMA_STYLE, QWEN3_STYLE], ids=["gemma-style", "qwen3-style"])
@pytest.mark.parametrize("with_system", [False, True], ids=["user-first", "system-first"])
def test_newer_template_constructs_render_as_transformers_renders_them(
    sources: dict[str, Path], template: str, with_system: bool
) -> None:
    from bigmodel import chat

    messages = [m for m in CHAT["messages"] if with_system or m["role"] != "system"]
    reference = transformers.AutoTokenizer.from_pretrained(str(sources["llama"]))
    reference.bos_token = "<|endoftext|>"
    theirs = reference.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert chat.render(template, messages, {"bos": "<|endoftext|>", "eos": "<|im_end|>"}) == theirs
    assert theirs.startswith("<|endoftext|><start_of_turn>user\n" if template == GEMMA_STYLE else "<|im_start|>")


VENDOR_TEMPLATES = sorted((Path(__file__).parent / "data" / "chat_templates").glob("*.jinja"))


@pytest.mark.parametrize("path", VENDOR_TEMPLATES, ids=[path.stem for path in VENDOR_TEMPLATES])
@pytest.mark.parametrize("with_system", [False, True], ids=["user-first", "system-first"])
@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["open", "closed"])
def test_vendors_chat_templates_render_as_transformers_renders_them(
    sources: dict[str, Path], path: Path, with_system: bool, add_generation_prompt: bool
) -> None:
    """Gemma 2's, Llama 3.2's, Phi-3.5's and Qwen3's own templates (tests/data/chat_templates) give the text
    apply_chat_template gives, or refuse what it refuses (Gemma: a system turn) with its reason, one line."""
    from bigmodel import chat
    from bigmodel.errors import UserError

    assert len(VENDOR_TEMPLATES) == 4
    template = path.read_text(encoding="utf-8")
    messages = [m for m in CHAT["messages"] if with_system or m["role"] != "system"]
    reference = transformers.AutoTokenizer.from_pretrained(str(sources["llama"]))
    reference.bos_token = "<|endoftext|>"
    tokens = {"bos": "<|endoftext|>", "eos": "<|im_end|>"}
    try:
        theirs = reference.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # (jinja2's TemplateError from the template's raise_exception)
        with pytest.raises(UserError) as refused:
            chat.render(template, messages, tokens, add_generation_prompt)
        assert str(exc) in str(refused.value) and "\n" not in str(refused.value)
        assert path.stem.startswith("google-gemma") and with_system
        return
    assert chat.render(template, messages, tokens, add_generation_prompt) == theirs
    assert messages[-1]["content"].strip() in theirs


def test_a_template_that_refuses_the_messages_is_one_line_with_its_reason() -> None:
    from bigmodel import chat
    from bigmodel.errors import UserError

    refusing = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    with pytest.raises(UserError, match="chat template refused the messages: System role not supported"):
        chat.render(refusing + GEMMA_STYLE, CHAT["messages"], {"bos": "<s>"})


def test_prepare_blames_a_broken_template_not_the_first_record(sources: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).symlink_to(sources["llama"] / name)
    settings = json.loads((sources["llama"] / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": "{% if %}"}))
    config = sft_config(tmp_path, folder)
    result = cli("prepare", "-c", config, "-q")
    assert result.code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "the chat template of broken does not compile (line 1:" in result.stderr
    assert "set data.template: chatml" in result.stderr and "train.jsonl" not in result.stderr
    assert cli("prepare", "-c", config, "--set", "data.template=chatml", "-q").code == 0  # the fix it names works


def test_too_long_examples_are_truncated_and_counted_or_refused(sources: dict[str, Path], tmp_path: Path) -> None:
    long = {"prompt": "hi", "completion": " 0123456789" * 30}
    rows = records(10) + [long]
    config = sft_config(tmp_path, sources["llama"], rows=rows, data={"val_path": "val.jsonl"})
    (tmp_path / "val.jsonl").write_text(json.dumps(PROMPT_COMPLETION) + "\n")
    run(config, "prepare")
    manifest = json.loads((tmp_path / "run" / "prepare" / "manifest.json").read_text())
    assert manifest["truncated"] == {"train": 1, "val": 0} and manifest["examples"]["train"] == len(rows)
    assert manifest["context_length"] == 64
    train = load_examples_of(config)
    assert max(np.diff(train.starts)) == 64
    result = cli("prepare", "-c", config, "--set", "data.too_long=error")
    assert (
        result.code == 2 and f"line {len(rows)}: the example has" in result.stderr and "data.too_long" in result.stderr
    )


def load_examples_of(config: Path):  # noqa: ANN201
    from bigmodel.config import load_config

    return load_examples(load_config(config), "train")


def test_masked_tokens_contribute_exactly_zero_gradient(sources: dict[str, Path], tmp_path: Path) -> None:
    config = sft_config(tmp_path, sources["llama"])
    run(config, "prepare", "init")
    train = load_examples_of(config)
    x, y = pad([train.example(i) for i in range(6)], pad_id=0)
    assert (y == IGNORE).any() and (y != IGNORE).any()
    model, _ = registry.load_model(tmp_path / "run" / "init" / "model.safetensors")
    logits, _ = model(x)
    logits.retain_grad()
    masked_loss_sum(logits, y).backward()
    ignored = y == IGNORE
    assert torch.count_nonzero(logits.grad[ignored]) == 0
    assert torch.count_nonzero(logits.grad[~ignored]) > 0
    # And the prompt tokens' targets do not matter: a different prompt target gives the same gradient.
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits, _ = model(x)
    masked_loss_sum(logits, torch.where(ignored, IGNORE, y)).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))


# ------------------------------------------------------------------------------------------- LoRA


def test_lora_starts_at_the_base_model_and_merges_exactly(sources: dict[str, Path], tmp_path: Path) -> None:
    config = sft_config(tmp_path, sources["llama"])
    run(config, "prepare", "init")
    base, _ = registry.load_model(tmp_path / "run" / "init" / "model.safetensors")
    adapted, _ = registry.load_model(tmp_path / "run" / "init" / "model.safetensors")
    trainable = lora.apply(adapted, LoRAConfig(rank=4, targets=["q", "v", "o", "mlp"]), seed=0)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(base(ids)[0], adapted(ids)[0])  # B = 0: step 0 is the base model
        for name, param in lora.adapter_tensors(adapted).items():
            if ".lora_B." in name:
                param.normal_(0, 0.02)  # about what training leaves in B
        unmerged = adapted(ids)[0]
        assert (unmerged - base(ids)[0]).abs().max() > 1e-2
    assert trainable == sum(p.numel() for p in lora.adapter_tensors(adapted).values())
    assert all(not p.requires_grad for n, p in adapted.named_parameters() if "lora_" not in n)
    merged = lora.merge(adapted)
    assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
    with torch.no_grad():
        assert (merged(ids)[0] - unmerged).abs().max() <= 1e-5


def test_gate_target_on_a_gelu_mlp_is_refused(sources: dict[str, Path], tmp_path: Path) -> None:
    config = sft_config(tmp_path, sources["gpt2"], lora={"targets": ["gate"]})
    run(config, "prepare", "init")
    result = cli("train", "-c", config)
    assert result.code == 2 and "has no gate projection" in result.stderr


def test_lora_run_adapter_checkpoint_eval_export_and_base_check(sources: dict[str, Path], tmp_path: Path) -> None:
    config = sft_config(
        tmp_path,
        sources["llama"],
        lora={"rank": 2, "targets": ["attention"]},
        max_steps=6,
        eval_every=3,
        eval_batches=50,
    )  # train's val loss covers every val example, as eval
    run(config, "prepare", "init", "train")
    init, best = tmp_path / "run" / "init" / "model.safetensors", tmp_path / "run" / "train" / "best.safetensors"
    manifest, adapter = load_checkpoint(best)
    assert manifest.adapter is not None and manifest.adapter.rank == 2 and manifest.adapter.base.path == str(init)
    assert all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert best.stat().st_size * 5 < init.stat().st_size  # adapters only (tiny base: a real one is ~1000x)
    assert any(t.abs().max() > 0 for k, t in adapter.items() if ".lora_B." in k)  # it trained
    # a 6-step run (train.log_every unset) logs its loss every step: a curve, not two points
    log = [json.loads(line) for line in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "tokens_per_s" in r] == [1, 2, 3, 4, 5, 6]

    eval_result = cli("eval", "-c", config, "-q", "--json")
    assert eval_result.code == 0, eval_result.stderr
    assert eval_result.json()["loss"] == pytest.approx(manifest.metrics["val_loss"], rel=1e-4)
    run(config, "export")  # merges, then the normal ONNX parity gate
    assert json.loads((tmp_path / "run" / "export" / "parity.json").read_text())["passed"]

    # Another base (here: the same file with one weight changed) is refused by sha256, in one line.
    base_manifest, tensors = load_checkpoint(init)
    name = next(k for k in tensors if k.endswith("wte.weight"))
    tensors[name] = tensors[name] + 1
    save_checkpoint(init, tensors, base_manifest)
    result = cli("eval", "-c", config, "-q")
    assert (
        result.code == 2
        and len(result.stderr.strip().splitlines()) == 1
        and "fits only its own base" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_lora_resume_after_kill_9_is_bitwise_identical(sources: dict[str, Path], tmp_path: Path) -> None:
    from tests.test_lm import assert_resume_after_kill_is_exact

    rows = records(120)
    config = sft_config(
        tmp_path,
        sources["llama"],
        rows=rows,
        lora={"rank": 4, "dropout": 0.1},
        max_steps=150,
        save_every=3,
        eval_every=50,
        log_every=5,
        lr=1e-3,
    )
    run(config, "prepare", "init")
    assert_resume_after_kill_is_exact(config, 150, volatile=("tokens_per_s",))


@pytest.mark.parametrize(
    "kind, targets",
    [
        pytest.param("llama", ["all-linear"], marks=pytest.mark.slow),
        ("gpt2", ["q", "v", "down"]),
        pytest.param("qwen3", ["all-linear"], marks=pytest.mark.slow),
        pytest.param("phi3", ["q", "v", "gate"], marks=pytest.mark.slow),
        pytest.param("gemma2", ["all-linear"], marks=pytest.mark.slow),
        pytest.param("gemma3", ["q", "v", "gate"], marks=pytest.mark.slow),
        pytest.param("olmoe", ["all-linear"], marks=pytest.mark.slow),  # (a mixture: its attention adapted)
    ],
)
def test_peft_loads_the_exported_adapter_with_the_same_logits(
    sources: dict[str, Path], tmp_path: Path, kind: str, targets: list[str]
) -> None:
    peft = pytest.importorskip("peft")
    config = sft_config(tmp_path, sources[kind], lora={"rank": 4, "targets": targets})
    run(config, "prepare", "init", "train")
    run(config, "export", sets=("export.peft=true",))
    folder = tmp_path / "run" / "export" / "peft"
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    base_folder = (  # an HF folder with PEFT's module names is named as is; Phi-3's fused one is written as llama
        tmp_path / "run" / "export" / "peft-base" if kind == "phi3" else sources[kind]
    )
    assert adapter_config["base_model_name_or_path"] == str(base_folder.absolute())
    shown = cli("inspect", folder, "--json")
    assert shown.code == 0 and shown.json()["kind"] == "peft adapter" and shown.json()["r"] == 4, shown.stderr
    assert shown.json()["parameters"] > 0 and shown.json()["base_model_name_or_path"] == str(base_folder.absolute())
    base = transformers.AutoModelForCausalLM.from_pretrained(
        adapter_config["base_model_name_or_path"], dtype=torch.float32
    )
    reference = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    ours, _ = registry.load_model(tmp_path / "run" / "train" / "best.safetensors", merge=False)
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        theirs, mine = reference(ids).logits, ours.eval()(ids)[0]
        with reference.disable_adapter():
            plain = reference(ids).logits
    assert (theirs - plain).abs().max() > 1e-3  # the adapter changes the model...
    # ...exactly as bigmodel's does, to fp32 rounding, which grows with the logits' scale (two
    # implementations differed by 1.3e-5 at |logits| ~5 on an AVX-512 CPU; export's gate allows the same)
    assert (theirs - mine).abs().max() <= 1e-5 + 1e-5 * theirs.abs().max()


def test_the_peft_base_of_a_gguf_model_is_written_as_a_folder_peft_loads(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    """peft cannot load a GGUF base: export.peft writes the base beside the adapter (export/peft-base, checked
    against transformers) and names it; PeftModel.from_pretrained of that base + adapter gives our logits."""
    peft = pytest.importorskip("peft")
    gguf = hf_models.write_gguf(sources["llama"], tmp_path / "llama.gguf")
    config = sft_config(tmp_path, gguf, lora={"rank": 4, "targets": ["q", "v"]}, max_steps=2)
    run(config, "prepare", "init", "train")
    run(config, "export", sets=("export.peft=true", "export.format=hf"))
    adapter_config = json.loads((tmp_path / "run" / "export" / "peft" / "adapter_config.json").read_text())
    base_folder = tmp_path / "run" / "export" / "peft-base"
    assert adapter_config["base_model_name_or_path"] == str(base_folder.absolute())
    base = transformers.AutoModelForCausalLM.from_pretrained(
        adapter_config["base_model_name_or_path"], dtype=torch.float32
    )
    reference = peft.PeftModel.from_pretrained(base, str(tmp_path / "run" / "export" / "peft")).eval()
    ours, _ = registry.load_model(tmp_path / "run" / "train" / "best.safetensors", merge=False)
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        theirs, mine = reference(ids).logits, ours.eval()(ids)[0]
    assert (theirs - mine).abs().max() <= 1e-5 + 1e-5 * theirs.abs().max()


def test_inspect_shows_a_rendered_example_with_trained_tokens_marked(sources: dict[str, Path], tmp_path: Path) -> None:
    short = {
        "messages": [
            {"role": "user", "content": "2 + 3?"},
            {"role": "assistant", "content": "5"},
            {"role": "user", "content": "4 + 4?"},
            {"role": "assistant", "content": "8"},
        ]
    }
    config = sft_config(tmp_path, sources["llama"], rows=[short] * 6)
    run(config, "prepare")
    result = cli("inspect", str(tmp_path / "run" / "prepare"), "--json")
    assert result.code == 0, result.stderr
    shown = result.json()["example"]
    assert "[[5<|im_end|>\n]]" in shown and "[[8<|im_end|>\n]]" in shown
    assert "<|im_start|>user\n2 + 3?<|im_end|>" in shown and "[[2 +" not in shown


def test_plan_counts_lora_parameters_and_shows_full_fine_tuning_beside(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    from bigmodel import accounting

    config = sft_config(tmp_path, sources["llama"], lora={"rank": 4, "targets": ["q", "down", "gate"]})
    result = cli("plan", "-c", config, "--json", "-q")
    assert result.code == 0, result.stderr
    memory = result.json()["training_memory_per_device"]
    run(config, "prepare", "init")
    model, _ = registry.load_model(tmp_path / "run" / "init" / "model.safetensors")
    settings = LoRAConfig(rank=4, targets=["q", "down", "gate"])
    assert memory["lora_trainable_parameters"] == lora.apply(model, settings, seed=0)
    assert accounting.lora_parameters(model.arch, settings.projections(), 4) == memory["lora_trainable_parameters"]
    assert memory["total"] < memory["full_fine_tuning_total"]
    assert memory["optimizer"] == 8 * memory["lora_trainable_parameters"]  # AdamW: two moments, adapters only
    # Checkpoints are adapter-sized: the tensors train writes are the bytes plan said
    storage = result.json()["storage"]
    assert storage["lora_adapter"] and storage["checkpoint"] == 4 * memory["lora_trainable_parameters"]
    assert "planning for 1 x NVIDIA H100 SXM, plan.hardware's default; --hardware local" in result.stderr
    assert result.json()["time_and_energy"]["hardware_assumed"] is True
    run(config, "train")
    from safetensors import safe_open

    def tensor_bytes(path: Path) -> int:
        with safe_open(str(path), "np") as handle:
            return sum(handle.get_tensor(name).nbytes for name in handle.keys())  # noqa: SIM118

    assert tensor_bytes(tmp_path / "run" / "train" / "best.safetensors") == storage["checkpoint"]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"data": {"format": "sft", "path": "x.jsonl"}}, "data.format 'sft' fine-tunes a pretrained model"),
        (
            {"data": {"format": "tabular", "path": "x.csv", "target": "y"}, "train": {"lora": {}}},
            "train.lora adapts transformers (model.family 'gpt' or 'bert'), not 'mlp'",
        ),
        (
            {
                "data": {"format": "sft", "path": "x.jsonl"},
                "init": {"from": "m"},
                "train": {"lora": {}, "distributed": "fsdp"},
            },
            "train.lora trains under DDP only",
        ),
        (
            {
                "data": {"format": "sft", "path": "x.jsonl"},
                "init": {"from": "m"},
                "train": {"lora": {"targets": ["qkv"]}},
            },
            "train.lora.targets.0",
        ),
    ],
)
def test_config_refuses_fine_tuning_mistakes_in_one_line(tmp_path: Path, settings: dict, message: str) -> None:
    config = write_config(tmp_path / "c.yaml", settings)
    result = cli("config", "validate", "-c", config)
    assert result.code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
