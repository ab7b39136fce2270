"""The language model: tokenizers, text prepare, the GPT and its KV cache, training, resume, eval."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from bigmodel import registry, runtime
from bigmodel import tokenizer as tokenizers
from bigmodel.arch import DecoderArch
from bigmodel.checkpoint import read_manifest
from bigmodel.errors import UserError
from bigmodel.models.gpt import GPT, causal_mask, window_mask
from bigmodel.train import lm as train_lm
from tests.conftest import cli, write_config

STDLIB = Path(sysconfig.get_paths()["stdlib"])
ARCH = {
    "family": "gpt",
    "task": "lm",
    "vocab_size": 50,
    "n_layer": 2,
    "n_head": 2,
    "n_embd": 32,
    "block_size": 16,
    "dropout": 0.0,
    "bias": False,
}


def corpus(tmp: Path, modules: tuple[str, ...] = ("textwrap.py", "shlex.py", "fnmatch.py")) -> Path:
    """Real text that exists wherever Python does: a few standard-library modules."""
    path = tmp / "corpus.txt"
    path.write_text("".join((STDLIB / m).read_text(encoding="utf-8") for m in modules), encoding="utf-8")
    return path


def lm_config(tmp: Path, data: dict | None = None, **train: object) -> Path:
    return write_config(
        tmp / "lm.yaml",
        {
            "seed": 0,
            "threads": 1,
            "run_dir": "run",
            "data": {"format": "text", "path": str(corpus(tmp)), **(data or {})},
            "model": {"family": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
            "train": {
                "batch_size": 8,
                "max_steps": 30,
                "lr": 3e-3,
                "warmup_steps": 5,
                "eval_every": 10,
                "eval_batches": 4,
                "log_every": 5,
                **train,
            },
            "eval": {"split": "val"},
        },
    )


# ---- tokenizers


def test_char_tokenizer_round_trips_and_refuses_unknown_characters() -> None:
    tok = tokenizers.CharTokenizer.from_chars("hello world\n")
    assert tok.decode(tok.encode("hello\nworld")) == "hello\nworld"
    again = tokenizers.from_json(tok.to_json())
    assert again.encode("low") == tok.encode("low")
    with pytest.raises(UserError, match="'Z' is not in this char-level model's vocabulary"):
        tok.encode("Zoo")


def test_bpe_tokenizer_round_trips_any_text(tmp_path: Path) -> None:
    text = corpus(tmp_path).read_text()
    tok = tokenizers.train_bpe(iter([text]), vocab_size=400)
    assert tok.vocab_size == 400
    for sample in (text[:2000], "naïve café — 日本語 🙂\n\ttabs", ""):
        assert tok.decode(tok.encode(sample)) == sample
    assert len(tok.encode(text[:5000])) < 5000 * 0.6  # merges actually compress
    again = tokenizers.from_json(tok.to_json())
    assert again.encode(text[:500]) == tok.encode(text[:500])


# ---- prepare


def prepare(config: Path) -> dict:
    result = cli("prepare", "-c", config, "--json", "-q")
    assert result.code == 0, result.stderr
    return json.loads((config.parent / "run" / "prepare" / "manifest.json").read_text())


def test_char_prepare_tail_split_and_shards(tmp_path: Path) -> None:
    manifest = prepare(lm_config(tmp_path, {"cleaning": {"dedupe": False}}))
    text = (tmp_path / "corpus.txt").read_text()
    assert manifest["characters"]["train"] == int(len(text) * 0.9)
    assert manifest["tokens"]["train"] + manifest["tokens"]["val"] == len(text)
    assert manifest["dtype"] == "uint16"
    tok = tokenizers.load(tmp_path / "run" / "prepare" / "tokenizer.json")
    train = np.memmap(tmp_path / "run" / "prepare" / "train.bin", dtype=np.uint16, mode="r")
    assert tok.decode(train[:300].tolist()) == text[:300]


def test_chunked_streaming_gives_the_same_shards(tmp_path: Path) -> None:
    shards = []
    for name, chunk in (("small", 1024), ("large", 1 << 22)):
        folder = tmp_path / name
        folder.mkdir()
        prepare(lm_config(folder, {"chunk_chars": chunk, "tokenizer": {"kind": "bpe", "vocab_size": 300}}))
        shards.append((folder / "run" / "prepare" / "train.bin").read_bytes())
    assert shards[0] == shards[1]


def test_cleaning_dedupes_filters_and_strips_control_characters(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("same line\nsame line\nx\nbell\x07 here\n" + "long " * 50 + "\nok line\n")
    config = write_config(
        tmp_path / "c.yaml",
        {
            "run_dir": "run",
            "model": {"family": "gpt"},
            "eval": {"split": "val"},
            "data": {
                "format": "text",
                "path": "a.txt",
                "document": "line",
                "split": "document",
                "val_fraction": 0.3,
                "cleaning": {"min_chars": 3, "max_chars": 100},
            },
        },
    )
    report = prepare(config)["cleaning"]
    assert report["documents_seen"] == 6
    assert report["dropped"] == {"too_short": 1, "too_long": 1, "duplicate": 1}
    assert report["control_chars_removed"] == 1


def test_jsonl_sources_and_their_errors(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": f"document number {i}\n"}) + "\n" for i in range(40)))
    config = write_config(
        tmp_path / "c.yaml",
        {
            "run_dir": "run",
            "model": {"family": "gpt"},
            "eval": {"split": "val"},
            "data": {"format": "text", "path": "d.jsonl", "jsonl_field": "body"},
        },
    )
    assert prepare(config)["cleaning"]["documents_kept"] == 40
    result = cli("prepare", "-c", config, "--set", "data.jsonl_field=text")
    assert result.code == 2 and "line 1 has no field 'text' (set data.jsonl_field" in result.stderr


def test_prepare_globs_and_missing_files(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"part{i}.txt").write_text(f"part {i} " * 200)
    config = write_config(
        tmp_path / "c.yaml",
        {
            "run_dir": "run",
            "model": {"family": "gpt"},
            "eval": {"split": "val"},
            "data": {"format": "text", "path": "part*.txt"},
        },
    )
    assert len(prepare(config)["sources"]) == 3
    result = cli("prepare", "-c", config, "--set", "data.path=nothing*.txt")
    assert result.code == 2 and "no files match" in result.stderr


# ---- the model


WINDOWED = {"sliding_window": 4, "local_layers": (False, True)}  # layer 1 local, layer 0 global


@pytest.mark.parametrize("options", [{}, WINDOWED], ids=["global", "sliding-window"])
def test_kv_cache_decoding_equals_the_full_forward(options: dict) -> None:
    torch.manual_seed(0)
    model = GPT(DecoderArch(**ARCH, **options)).eval()
    idx = torch.randint(0, 50, (3, 12))
    full, _ = model(idx)
    logits, past = model(idx[:, :5])  # a prompt of 5, then one token at a time
    steps = [logits]
    for t in range(5, 12):
        logits, past = model(idx[:, t : t + 1], past)
        steps.append(logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_a_local_layer_trains_the_same_with_activation_checkpointing() -> None:
    """Training a model with a local layer (its window mask built for sequences longer than the window):
    the gradients are the same when each block is recomputed in backward."""
    torch.manual_seed(0)
    model = GPT(DecoderArch(**ARCH, **WINDOWED)).train()
    idx = torch.randint(0, 50, (2, 12))

    def gradients() -> list[torch.Tensor]:
        logits, _ = model(idx)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), idx[:, 1:].reshape(-1))
        return list(torch.autograd.grad(loss, list(model.parameters())))

    plain = gradients()
    model.activation_checkpointing = True
    for a, b in zip(plain, gradients()):
        assert torch.allclose(a, b, atol=1e-6)
    model.activation_checkpointing = False
    model.blocks[1].window = None  # the same weights attending globally: other gradients
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, gradients()))


@pytest.mark.parametrize("normalize", [True, False], ids=["mixtral", "qwen3-moe"])
def test_a_mixture_of_experts_sends_each_token_through_its_top_experts(normalize: bool) -> None:
    """Each token's output is the sum of its two likeliest experts (router softmax), weighted by their scores
    (renormalised, Mixtral; or not, Qwen3-MoE), computed here token by token; plan counts the experts."""
    from bigmodel import accounting

    options = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "normalize_expert_weights": normalize}
    arch = DecoderArch(**ARCH, **options, n_experts=4, experts_per_token=2)
    torch.manual_seed(0)
    model = GPT(arch).eval()
    moe = model.blocks[0].mlp
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = moe(x)
        for b in range(2):
            for t in range(5):
                scores = torch.softmax(moe.router(x[b, t]), dim=-1)
                top = scores.topk(2)
                weights = top.values / top.values.sum() if normalize else top.values
                expected = sum(w * moe.experts[int(e)](x[b, t]) for w, e in zip(weights, top.indices))
                assert torch.allclose(out[b, t], expected, atol=1e-6)
    # Only the picked experts run (gathered rows); one that no token picks still takes part in the step, with
    # zero gradients rather than none (DDP expects every parameter to get one).
    x = torch.randn(2, 5, 32).abs()
    with torch.no_grad():
        moe.router.weight[3] = -10.0  # (all-positive inputs: expert 3's score is never in the top 2)
    seen = [0] * 4  # rows each expert computes
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda module, args, out, e=e: seen.__setitem__(e, seen[e] + out.shape[0]))
    moe(x).sum().backward()
    assert seen[3] == 0 and sum(seen) == 2 * 5 * 2  # each of the 10 tokens through its 2 experts, no more
    assert all(p.grad is not None and not p.grad.any() for p in moe.experts[3].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in moe.experts[0].parameters())
    assert accounting.block_parameters(arch) == sum(p.numel() for p in model.blocks[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    assert accounting.active_parameters(arch, total) == total - 2 * 2 * 3 * 32 * 128  # 2 idle experts, 2 layers
    with pytest.raises(ValueError, match="experts_per_token"):
        DecoderArch(**ARCH, **options, n_experts=4, experts_per_token=5)


def test_causal_mask_is_bottom_right_aligned() -> None:
    mask = causal_mask(2, 5)  # 3 past tokens, 2 new
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    # a window of 2: each query sees itself and the one key before it (transformers' key > query - window)
    assert window_mask(2, 5, 2).tolist() == [[False, False, True, True, False], [False, False, False, True, True]]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_head": 4, "n_kv_head": 2, "head_size": 8},
        {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", **WINDOWED},
    ],
    ids=["gpt2", "llama", "sliding-window"],
)
def test_left_padded_rows_in_one_batch_get_their_own_numbers(options: dict) -> None:
    """Rows of 7, 3 and 1 tokens left-padded into one batch, then a cached step: each row's logits are the
    ones it gets alone (learned positions; and rotary, RMSNorm, SwiGLU, grouped-query attention; and a
    window of 4 on one layer, shorter than the longest row)."""
    arch = {**ARCH, "n_kv_head": 2, "head_size": 16, "mlp_hidden": (128, 128), **options}
    torch.manual_seed(0)
    model = GPT(DecoderArch(**arch)).eval()
    rows = [torch.randint(0, 50, (n,)) for n in (7, 3, 1)]
    pad = torch.tensor([7 - len(r) for r in rows])
    ids = torch.stack([torch.cat([torch.full((7 - len(r),), 3), r]) for r in rows])
    following = torch.randint(0, 50, (3, 1))
    with torch.no_grad():
        logits, past = model(ids, None, pad)
        next_logits, _ = model(following, past, pad)
        assert torch.isfinite(logits).all()  # padding queries see themselves: no empty softmax row, no NaN
        for b, row in enumerate(rows):
            alone, alone_past = model(row[None])
            assert torch.allclose(logits[b, pad[b] :], alone[0], atol=1e-5)
            assert torch.allclose(next_logits[b], model(following[b : b + 1], alone_past)[0][0], atol=1e-5)


def test_context_longer_than_block_size_is_refused_and_generate_crops() -> None:
    model = GPT(DecoderArch(**ARCH)).eval()
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=40, temperature=0)
    assert out.shape == (1, 43)


def test_tied_weights_survive_a_checkpoint_round_trip(tmp_path: Path) -> None:
    from bigmodel.checkpoint import model_tensors, save_checkpoint
    from bigmodel.manifests import CheckpointManifest, DataInfo

    model = GPT(DecoderArch(**ARCH))
    manifest = CheckpointManifest(family="gpt", architecture=ARCH, data=DataInfo(), config={})
    save_checkpoint(tmp_path / "c.safetensors", model_tensors(model), manifest)
    loaded, _ = registry.load_model(tmp_path / "c.safetensors")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


# ---- init, train, resume, eval


def test_init_reports_parameters_flops_and_memory(tmp_path: Path) -> None:
    config = lm_config(tmp_path)
    prepare(config)
    report = cli("init", "-c", config, "--json", "-q").json()
    model, _ = registry.load_model(tmp_path / "run" / "init" / "model.safetensors")
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert report["parameters"] - report["parameters_without_position_embeddings"] == 32 * 32
    n = report["parameters_without_position_embeddings"]
    assert report["flops_per_token"] == 6 * n + 12 * 1 * 2 * 16 * 32
    assert report["training_memory_bytes"]["optimizer"] == 8 * report["parameters"]


def run_pipeline(config: Path, *extra: str) -> dict:
    result = cli("pipeline", "-c", config, "--to", "eval", "--json", "-q", *extra)
    assert result.code == 0, result.stderr
    return result.json()["stages"]


def test_training_lowers_the_loss_and_eval_reports_lm_metrics(tmp_path: Path) -> None:
    stages = run_pipeline(lm_config(tmp_path), "--set", "eval.samples=2", "--set", "eval.max_new_tokens=20")
    log = [json.loads(line) for line in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0]
    ev = stages["eval"]
    assert ev["perplexity"] == pytest.approx(np.exp(ev["loss"]))
    assert ev["bits_per_char"] == pytest.approx(ev["bits_per_token"])  # char level: one token, one char
    assert len(ev["samples"]) == 2 and all(s.startswith("\n") for s in ev["samples"])
    again = cli(
        "eval", "-c", tmp_path / "lm.yaml", "--set", "eval.samples=2", "--set", "eval.max_new_tokens=20", "--json", "-q"
    ).json()
    assert again["samples"] == ev["samples"]  # seeded sampling


def test_bpe_run_reports_fewer_bits_per_char_than_per_token(tmp_path: Path) -> None:
    config = lm_config(tmp_path, {"tokenizer": {"kind": "bpe", "vocab_size": 300}}, max_steps=10)
    ev = run_pipeline(config)["eval"]
    assert ev["bits_per_char"] < ev["bits_per_token"]
    text = tmp_path / "other.txt"
    text.write_text((STDLIB / "glob.py").read_text())
    other = cli("eval", "-c", config, "--set", f"eval.text_file={text}", "--json", "-q").json()
    assert other["source"] == str(text) and other["loss"] > 0


def test_eval_text_with_unknown_characters_is_a_user_error(tmp_path: Path) -> None:
    config = lm_config(tmp_path, max_steps=5)
    run_pipeline(config)
    text = tmp_path / "odd.txt"
    text.write_text("日本語")
    result = cli("eval", "-c", config, "--set", f"eval.text_file={text}")
    assert result.code == 2 and "not in this char-level model's vocabulary" in result.stderr


def _train_process(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bigmodel", "train", "-c", str(config), "-q", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _state(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys() if not k.startswith("rng.")}


def assert_resume_after_kill_is_exact(config: Path, total_steps: int, volatile: tuple[str, ...]) -> None:
    """Train once uninterrupted; train again, kill -9 mid-run, resume; both must end bitwise equal."""
    train_dir = config.parent / "run" / "train"
    last = train_dir / "last.safetensors"
    assert cli("train", "-c", config, "-q").code == 0
    uninterrupted = _state(last)
    uninterrupted_log = (train_dir / "metrics.jsonl").read_text()
    last.unlink()

    from bigmodel.checkpoint import read_manifest

    proc = _train_process(config)
    deadline = time.time() + 120
    # Kill once a checkpoint past 10% exists: mid-run, and possibly in the middle of writing the next.
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and read_manifest(last).step >= total_steps // 10:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_manifest(last).step < total_steps, "the run finished before the kill; make it longer"

    assert cli("train", "-c", config, "--resume", "-q").code == 0
    resumed = _state(last)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), "resume diverged"

    def records(text: str) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k not in volatile} for line in text.splitlines()]

    assert records((train_dir / "metrics.jsonl").read_text()) == records(uninterrupted_log)


def test_gpt_resume_after_kill_9_is_bitwise_identical(tmp_path: Path) -> None:
    config = lm_config(tmp_path, max_steps=300, save_every=5, eval_every=50, log_every=10)
    run_pipeline(config, "--to", "init")
    assert_resume_after_kill_is_exact(config, 300, volatile=("tokens_per_s",))


def test_tabular_resume_after_kill_9_is_bitwise_identical(tmp_path: Path) -> None:
    from tests.conftest import tiny_digits

    config = tiny_digits(tmp_path, epochs=80, eval_every=5)
    assert cli("pipeline", "-c", config, "--to", "init", "-q").code == 0
    assert_resume_after_kill_is_exact(config, 80 * 20, volatile=("elapsed_s",))


def test_nan_loss_stops_with_exit_1_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    config = lm_config(
        tmp_path, optimizer="sgd", momentum=0.0, lr=1e9, warmup_steps=0, max_steps=50, save_every=1, eval_every=1000
    )
    run_pipeline(config, "--to", "init")
    result = cli("train", "-c", config)
    assert result.code == 1 and "loss became" in result.stderr
    last = tmp_path / "run" / "train" / "last.safetensors"
    if last.exists():  # steps before the explosion were saved; they are finite
        assert all(torch.isfinite(t).all() for k, t in _state(last).items() if t.is_floating_point())


def test_second_train_on_the_same_run_dir_is_refused(tmp_path: Path) -> None:
    config = lm_config(tmp_path, max_steps=100000)
    run_pipeline(config, "--to", "init")
    proc = _train_process(config)
    lock = tmp_path / "run" / "train" / ".lock"
    deadline = time.time() + 60
    while not (lock.exists() and lock.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    try:
        result = cli("train", "-c", config)
        assert result.code == 2 and f"being trained by another process (pid {proc.pid})" in result.stderr
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert cli("train", "-c", config, "--set", "train.max_steps=2", "-q").code == 0  # the kill freed it


def test_bf16_autocast_keeps_attention_in_fp32_and_cache_consistent() -> None:
    torch.manual_seed(0)
    model = GPT(DecoderArch(**ARCH)).eval()
    idx = torch.randint(0, 50, (2, 10))
    seen: list[torch.dtype] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *args, **kwargs):  # records the dtype attention runs in; the real kernel does the work
        seen.append(q.dtype)
        return original(q, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full, _ = model(idx)
            first, past = model(idx[:, :6])
            rest, _ = model(idx[:, 6:], past)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    assert set(seen) == {torch.float32}
    assert full.dtype == torch.bfloat16  # the projections did run in bf16
    assert torch.allclose(torch.cat([first, rest], 1).float(), full.float(), atol=0.05)


def test_precision_auto_is_bf16_only_where_the_cpu_multiplies_bf16_natively(tmp_path: Path, monkeypatch) -> None:
    """auto trains exactly as bf16 where bf16 is native and exactly as fp32 where it would be emulated
    (such a CPU is simulated through the capability probe); the run says and records which it used, and
    asking for bf16 on such a CPU warns."""
    config = lm_config(tmp_path, max_steps=4, eval_every=4)
    run_pipeline(config, "--to", "init")

    def train(name: str, precision: str, native: bool) -> tuple[dict[str, torch.Tensor], str]:
        monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
        monkeypatch.setattr(train_lm, "native_bf16", lambda device: native)
        run = tmp_path / name
        shutil.copytree(tmp_path / "run", run)
        result = cli("train", "-c", config, "--run-dir", run, "--set", f"train.precision={precision}", "--json")
        assert result.code == 0, result.stderr
        assert result.json()["precision"] == read_manifest(run / "train" / "last.safetensors").precision
        return _state(run / "train" / "last.safetensors"), result.stderr

    fp32, _ = train("fp32", "fp32", True)
    bf16, _ = train("bf16", "bf16", True)
    auto_native, said = train("auto_native", "auto", True)
    assert "train on cpu, bf16 (auto):" in said
    auto_emulated, said = train("auto_emulated", "auto", False)
    assert "train on cpu, fp32 (auto: no native bf16 here):" in said
    _, said = train("bf16_emulated", "bf16", False)
    assert "no native bf16" in said and "set train.precision: auto or fp32" in said
    weights = [k for k in fp32 if k.startswith("model.")]
    assert any(not torch.equal(fp32[k], bf16[k]) for k in weights)  # bf16 autocast did change the numbers
    assert all(torch.equal(auto_native[k], bf16[k]) and torch.equal(auto_emulated[k], fp32[k]) for k in weights)


class _Bigram(torch.nn.Module):
    """A next-token table: a real model whose loss differs from window to window."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.table(x), None


def test_val_windows_tile_the_split_once_asked_for_more_than_it_holds() -> None:
    from contextlib import nullcontext

    import torch.nn.functional as F

    from bigmodel.distributed import SINGLE
    from bigmodel.train.batches import TokenWindows, fixed_windows

    val = (np.arange(1000) * 7 % 50).astype(np.uint16)
    tiled = fixed_windows(val, n_batches=100, batch=4, block=32)  # 400 windows asked, 31 fit
    x, y = torch.cat([b[0] for b in tiled]), torch.cat([b[1] for b in tiled])
    assert len(x) == 31 and len(tiled[-1][0]) == 3  # each token once; the last batch is short
    assert torch.equal(x.flatten(), torch.from_numpy(val[: 31 * 32].astype(np.int64)))
    assert torch.equal(y.flatten(), torch.from_numpy(val[1 : 31 * 32 + 1].astype(np.int64)))
    assert sum(len(b[0]) for b in fixed_windows(val, n_batches=2, batch=4, block=32)) == 8  # fewer: spaced

    torch.manual_seed(0)
    model = _Bigram(50)
    windows = TokenWindows(val, val, block=32, batch=4, accum=1, eval_batches=100)
    with torch.no_grad():  # the loss of every val token once, however the batches fall
        whole = F.cross_entropy(model(x)[0].reshape(-1, 50), y.reshape(-1)).item()
    assert abs(windows.val_loss(model, nullcontext(), torch.device("cpu"), SINGLE) - whole) < 1e-5


def test_gradient_accumulation_matches_one_larger_batch(tmp_path: Path) -> None:
    """2 micro-batches of 4 windows see the same windows as 1 batch of 8 (the sampler draws them in
    the same order), and the averaged gradient is the same up to float summation order."""
    weights = []
    for name, batch, accum in (("big", 8, 1), ("accum", 4, 2)):
        folder = tmp_path / name
        folder.mkdir()
        config = lm_config(folder, batch_size=batch, grad_accum_steps=accum, max_steps=5, eval_every=5)
        run_pipeline(config, "--to", "train")
        weights.append(_state(folder / "run" / "train" / "last.safetensors"))
    for key, value in weights[0].items():
        if key.startswith("model."):
            assert torch.allclose(value, weights[1][key], atol=1e-5), key


def test_compiled_training_saves_plain_checkpoints(tmp_path: Path) -> None:
    config = lm_config(tmp_path, compile=True, max_steps=3, eval_every=3)
    stages = run_pipeline(config, "--to", "train")
    assert np.isfinite(stages["train"]["best_val_loss"])
    seconds = stages["train"]["seconds"]  # where the stage's time went: setup, then the loop and its parts
    assert seconds["setup"] > 0 and seconds["evaluation"] > 0 and seconds["checkpoints"] > 0
    assert seconds["loop"] > seconds["evaluation"] + seconds["checkpoints"]
    with safe_open(str(tmp_path / "run" / "train" / "best.safetensors"), "pt") as handle:
        assert not any("_orig_mod" in key for key in handle.keys())


@pytest.mark.parametrize("options", [{}, WINDOWED], ids=["global", "sliding-window"])
def test_gpt_forward_equals_an_independent_textbook_computation(options: dict) -> None:
    """The same weights through explicit matrix products (no SDPA, no nn modules): the model computes
    exactly pre-LN attention + MLP blocks with a causal softmax and a tied output head (and on a local
    layer, a query sees only the keys less than its window behind it)."""
    torch.manual_seed(0)
    arch = {**ARCH, "bias": True, **options}
    model = GPT(DecoderArch(**arch)).eval()
    from bigmodel.models.gpt import init_weights

    init_weights(model, "gpt2", 0.02)
    for block in model.transformer.h:  # non-zero biases, so a dropped bias would show
        for linear in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            torch.nn.init.normal_(linear.bias, std=0.02)
    idx = torch.randint(0, 50, (2, 12))
    B, T, C, H = 2, 12, arch["n_embd"], arch["n_head"]
    p = {k: v.detach() for k, v in model.state_dict().items()}

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * p[f"{name}.weight"] + p[f"{name}.bias"]

    x = p["transformer.wte.weight"][idx] + p["transformer.wpe.weight"][:T]
    causal = torch.ones(T, T).tril().bool()
    query, key = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for i in range(arch["n_layer"]):
        local = "sliding_window" in arch and arch["local_layers"][i]
        allowed = causal & (query - key < arch["sliding_window"]) if local else causal
        pre = f"transformer.h.{i}"
        qkv = ln(x, f"{pre}.ln_1") @ p[f"{pre}.attn.c_attn.weight"].T + p[f"{pre}.attn.c_attn.bias"]
        q, k, v = (t.reshape(B, T, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=-1))
        scores = (q @ k.transpose(-1, -2)) / (C // H) ** 0.5
        att = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        att = att.transpose(1, 2).reshape(B, T, C)
        x = x + att @ p[f"{pre}.attn.c_proj.weight"].T + p[f"{pre}.attn.c_proj.bias"]
        h = ln(x, f"{pre}.ln_2") @ p[f"{pre}.mlp.c_fc.weight"].T + p[f"{pre}.mlp.c_fc.bias"]
        h = 0.5 * h * (1 + torch.erf(h / 2**0.5))  # exact GELU
        x = x + h @ p[f"{pre}.mlp.c_proj.weight"].T + p[f"{pre}.mlp.c_proj.bias"]
    expected = ln(x, "transformer.ln_f") @ p["transformer.wte.weight"].T  # the tied head
    with torch.no_grad():
        logits, _ = model(idx)
    assert torch.allclose(logits, expected, atol=1e-5)
