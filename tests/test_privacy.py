"""train.privacy: DP-SGD through Opacus (bigmodel/train/privacy.py).

Oracles: Opacus's own RDP analysis, called directly on (sample rate, noise, steps), for the epsilon a run
reports; the plain (non-private) step for a private step without noise or clipping; single-example backward
passes for the per-example gradients of the LoRA adapters (whose grad samplers are bigmodel's).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bigmodel import lora, registry
from bigmodel.checkpoint import read_manifest
from bigmodel.config import LoRAConfig, PrivacyConfig
from bigmodel.train.batches import ExampleBatches
from tests.conftest import cli, tiny_digits, write_config

opacus = pytest.importorskip("opacus")


def private_digits(tmp: Path, **privacy: object) -> Path:
    return tiny_digits(tmp, batch_size=32, epochs=2, eval_every=20, privacy=privacy or {"target_epsilon": 4.0})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_the_reported_epsilon_is_opacus_analysis_of_sample_rate_noise_and_steps(
    tmp_path: Path, accountant: str
) -> None:
    config = private_digits(tmp_path, target_epsilon=4.0, accountant=accountant)
    assert cli("pipeline", "-c", config, "--to", "train", "-q").code == 0
    run = tmp_path / "run"
    rows = json.loads((run / "prepare" / "manifest.json").read_text())["splits"]["train"]
    record = read_manifest(run / "train" / "last.safetensors").privacy
    assert record is not None and record.accountant == accountant and record.unit == "row"
    assert record.sample_rate == 32 / rows and record.delta == 1 / (10 * rows)
    assert record.steps == 2 * -(-rows // 32) and record.history == [(record.noise_multiplier, 32 / rows, record.steps)]

    def independent(steps: int) -> float:
        if accountant == "rdp":
            from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

            orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 257))
            rdp = compute_rdp(q=32 / rows, noise_multiplier=record.noise_multiplier, steps=steps, orders=orders)
            return float(get_privacy_spent(orders=orders, rdp=rdp, delta=record.delta)[0])
        from opacus.accountants import PRVAccountant

        prv = PRVAccountant()
        prv.history = [(record.noise_multiplier, 32 / rows, steps)]
        return float(prv.get_epsilon(delta=record.delta))

    # every evaluation logs what was spent by then; the end spends the target (the noise was chosen so)
    logged = [(r["step"], r["epsilon"]) for r in metrics(run) if "val_loss" in r]
    assert len(logged) >= 2
    for step, epsilon in logged:
        assert epsilon == pytest.approx(independent(step), rel=1e-6)
    assert record.epsilon == pytest.approx(independent(record.steps), rel=1e-6)
    assert 4.0 - 0.05 <= record.epsilon <= 4.0
    best = read_manifest(run / "train" / "best.safetensors").privacy
    assert best is not None and best.steps <= record.steps and best.epsilon is not None
    if accountant == "rdp":  # the report page says what the model's guarantee is, and plots its spending
        assert cli("report", "-c", config, "-q").code == 0
        page = (run / "report" / "index.html").read_text()
        spent = f"(epsilon {record.epsilon:.3g}, delta {record.delta:.2g})-differentially private per training row"
        assert spent in page  # the whole run's spending: the best checkpoint was chosen among all of them
        assert (run / "report" / "epsilon.png").is_file()


def _mlp_case(tmp: Path) -> tuple[torch.nn.Module, dict, callable]:
    config = tiny_digits(tmp)
    assert cli("pipeline", "-c", config, "--to", "init", "-q").code == 0
    model, _ = registry.load_model(tmp / "run" / "init" / "model.safetensors")
    rng = np.random.default_rng(0)
    batch = {"x": torch.from_numpy(rng.normal(size=(8, 64)).astype(np.float32)), "y": torch.arange(8) % 10}
    return model, batch, lambda m, b: F.cross_entropy(m(b["x"]), b["y"])


def _encoder_case(tmp: Path) -> tuple[torch.nn.Module, dict, callable]:
    from tests.test_text_classification import config_for, labelled_csv

    config = config_for(tmp, {"path": str(labelled_csv(tmp / "d.csv"))}, n_layer=1, n_embd=16, n_head=2, dropout=0.0)
    assert cli("pipeline", "-c", config, "--to", "init", "-q").code == 0
    model, _ = registry.load_model(tmp / "run" / "init" / "model.safetensors")
    ids = torch.randint(5, 40, (6, 10), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    inputs["attention_mask"][0, 7:] = 0  # a padded row
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    return model, {"inputs": inputs, "y": labels}, lambda m, b: F.cross_entropy(m(**b["inputs"]), b["y"])


def _lora_case(tmp: Path) -> tuple[torch.nn.Module, dict, callable]:
    from tests import hf_models
    from tests.test_finetune import sft_config

    config = sft_config(tmp, hf_models.make("llama", tmp / "hf"))
    assert cli("pipeline", "-c", config, "--to", "init", "-q").code == 0
    model, _ = registry.load_model(tmp / "run" / "init" / "model.safetensors")
    lora.apply(model, LoRAConfig(rank=2, targets=["all-linear"]), seed=0)
    for module in model.modules():  # B starts at zero: give it values, so A's gradients are not zero too
        if isinstance(module, lora.LoRAUp):
            for b in module.values():
                torch.nn.init.normal_(b, std=0.5, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 100, (5, 12), generator=g)
    y = torch.randint(0, 100, (5, 12), generator=g)
    y[:, :4] = -100  # prompts are not scored
    y[1, 6:] = -100  # a shorter example
    return model, {"x": x, "y": y}, lambda m, b: ExampleBatches.per_example_objective(m(b["x"])[0], b["y"])


CASES = {"mlp": _mlp_case, "encoder": _encoder_case, "lora": _lora_case}


def _private(model: torch.nn.Module, batch_size: int, **settings: float):  # noqa: ANN202
    from bigmodel.train.privacy import DPSGD

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return DPSGD(model, optimizer, PrivacyConfig(**settings), 100, batch_size, 10, "example")


@pytest.mark.parametrize("case", list(CASES))
def test_a_private_step_without_noise_or_clipping_is_the_plain_step(tmp_path: Path, case: str) -> None:
    model, batch, loss_of = CASES[case](tmp_path)
    n = len(next(iter(batch.values())) if "x" in batch else batch["y"])
    plain = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.train()  # (Opacus hooks training mode only; every case's dropout is 0)

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss_of(model, batch).backward()
    optimizer.step()
    after_plain = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(plain)

    private = _private(model, n, noise_multiplier=0.0, max_grad_norm=1e9)
    private.optimizer.zero_grad()
    loss_of(model, batch).backward()
    private.optimizer.step()
    after_private = model.state_dict()
    changed = [k for k in plain if not torch.equal(plain[k], after_plain[k])]
    assert changed, "the plain step changed nothing"
    for key in plain:
        torch.testing.assert_close(after_private[key], after_plain[key], rtol=1e-5, atol=1e-6)
    assert private.epsilon() is None  # no noise: no guarantee, said as such


@pytest.mark.parametrize("case", list(CASES))
def test_per_example_gradients_are_single_example_gradients_and_clipped_to_max_grad_norm(
    tmp_path: Path, case: str
) -> None:
    model, batch, loss_of = CASES[case](tmp_path)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def rows(i: int) -> dict:
        return {
            k: ({n: t[i : i + 1] for n, t in v.items()} if isinstance(v, dict) else v[i : i + 1])
            for k, v in batch.items()
        }

    n = len(batch["y"])
    singles = []
    for i in range(n):  # the oracle: one backward pass per example
        model.zero_grad()
        loss_of(model, rows(i)).backward()
        singles.append([p.grad.detach().clone() for p in params])
    norms = [float(torch.cat([g.flatten() for g in grads]).norm()) for grads in singles]
    clip = float(np.median(norms))  # half the examples are clipped

    private = _private(model, n, noise_multiplier=0.0, max_grad_norm=clip)
    private.optimizer.zero_grad()
    loss_of(model, batch).backward()
    for j, p in enumerate(params):  # Opacus's per-example gradients (bigmodel's grad samplers for LoRA)
        for i in range(n):
            scale = float(singles[i][j].abs().max())  # (float32 sums in another order)
            torch.testing.assert_close(p.grad_sample[i], singles[i][j], rtol=1e-4, atol=1e-4 * scale)
    private.optimizer.clip_and_accumulate()
    summed = torch.cat([p.summed_grad.flatten() for p in params])
    clipped = [[g * min(1.0, clip / (norm + 1e-6)) for g in grads] for grads, norm in zip(singles, norms, strict=True)]
    for i, grads in enumerate(clipped):
        assert float(torch.cat([g.flatten() for g in grads]).norm()) <= clip * (1 + 1e-5)
        assert norms[i] > 0
    expected = torch.cat([sum(c[j] for c in clipped).flatten() for j in range(len(params))])
    torch.testing.assert_close(summed, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert sum(norm > clip for norm in norms) >= 1


def test_an_encoder_classifier_and_a_decoders_lora_adapters_train_privately_end_to_end(tmp_path: Path) -> None:
    from tests import hf_models
    from tests.test_finetune import records, sft_config
    from tests.test_text_classification import config_for, labelled_csv

    encoder = config_for(tmp_path / "e", {"path": str(labelled_csv(_mkdir(tmp_path / "e") / "d.csv"))}, n_layer=1)
    write_config(
        encoder, {**_yaml(encoder), "train": {"batch_size": 8, "max_steps": 6, "privacy": {"noise_multiplier": 1.0}}}
    )
    decoder = sft_config(
        _mkdir(tmp_path / "d"),
        hf_models.make("llama", tmp_path / "hf"),
        rows=records(20),
        lora={"rank": 2, "targets": ["attention"]},
        max_steps=6,
        eval_every=3,
        privacy={"target_epsilon": 8.0, "max_grad_norm": 0.5},
    )
    for config, unit in ((encoder, "text"), (decoder, "example")):
        result = cli("pipeline", "-c", config, "--to", "train")
        assert result.code == 0, result.stderr
        assert f"the guarantee is per training {unit}" in result.stderr  # said before, and after:
        last = next(line for line in result.stderr.splitlines() if line.startswith("train: step "))
        assert f"-differentially private per training {unit}" in last
        run = config.parent / "run" if (config.parent / "run").is_dir() else Path(_yaml(config)["run_dir"])
        record = read_manifest(run / "train" / "last.safetensors").privacy
        assert record is not None and record.steps == 6 and record.unit == unit and record.epsilon is not None
        assert [r["epsilon"] for r in metrics(run) if "val_loss" in r][-1] == pytest.approx(record.epsilon)
    adapter = read_manifest(Path(tmp_path / "d" / "run" / "train" / "best.safetensors")).adapter
    assert adapter is not None and adapter.rank == 2  # the adapters alone trained (and were saved)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_empty_poisson_draws_are_noise_only_steps_and_counted(tmp_path: Path) -> None:
    # batch_size 1 of ~1,250 rows: about a third of the draws hold no row at all
    config = tiny_digits(tmp_path, batch_size=1, max_steps=30, eval_every=30, privacy={"noise_multiplier": 1.0})
    assert cli("pipeline", "-c", config, "--to", "init", "-q").code == 0
    from bigmodel.config import load_config
    from bigmodel.train.privacy import DPSGD

    loaded = load_config(config)
    rows = json.loads((tmp_path / "run" / "prepare" / "manifest.json").read_text())["splits"]["train"]
    model, _ = registry.load_model(tmp_path / "run" / "init" / "model.safetensors")
    sampler = _private(model, 1, noise_multiplier=1.0)
    sampler.examples, sampler.sample_rate = rows, 1 / rows
    sizes = [len(sampler.batch(loaded.seed, step)) for step in range(30)]
    assert 0 in sizes and max(sizes) >= 1
    assert isinstance(sampler, DPSGD)

    result = cli("train", "-c", config, "-q", "--json")
    assert result.code == 0, result.stderr
    record = read_manifest(tmp_path / "run" / "train" / "last.safetensors").privacy
    assert record is not None and record.steps == 30 and record.epsilon is not None and record.epsilon > 0


@pytest.mark.slow  # (30 s; the default tier resumes a private LoRA run exactly, below)
def test_a_private_run_resumes_after_kill_9_bitwise(tmp_path: Path) -> None:
    from tests.test_lm import assert_resume_after_kill_is_exact

    config = tiny_digits(tmp_path, batch_size=32, epochs=6, eval_every=20, privacy={"target_epsilon": 8.0})
    assert cli("pipeline", "-c", config, "--to", "init", "-q").code == 0
    train_dir = tmp_path / "run" / "train"
    total = 6 * 40
    assert_resume_after_kill_is_exact(config, total, volatile=("elapsed_s",))
    record = read_manifest(train_dir / "last.safetensors").privacy
    assert record is not None and record.steps == total and len(record.history) == 1


@pytest.mark.parametrize(
    "sets, words",
    [
        (["train.grad_clip=1.0"], "remove train.grad_clip"),
        (["train.grad_accum_steps=2"], "set grad_accum_steps 1"),
        (["train.augment=[{kind: mixup}]"], "remove mixup"),
        (["train.privacy.noise_multiplier=1.0"], "exactly one of target_epsilon"),
        (["train.privacy.target_epsilon=0.001"], "cannot be met"),
        (["train.batch_size=5000"], "is not below the"),
        (["compress.steps=[{method: prune, sparsity: 0.5, finetune_steps: 5}]"], "outside train.privacy"),
    ],
)
def test_what_dp_sgd_cannot_do_is_refused_by_name(tmp_path: Path, sets: list[str], words: str) -> None:
    config = private_digits(tmp_path)
    assert cli("pipeline", "-c", config, "--to", "init", "-q").code == 0
    result = cli("train", "-c", config, "-q", *[a for s in sets for a in ("--set", s)])
    assert result.code == 2, result.stderr
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_privacy_needs_an_example_per_record_and_lora_on_a_decoder(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("some text to train on\n" * 50)
    config = write_config(
        tmp_path / "lm.yaml",
        {"run_dir": "run", "data": {"format": "text", "path": str(text)}, "train": {"privacy": {"target_epsilon": 3}}},
    )
    result = cli("prepare", "-c", config, "-q")
    assert result.code == 2 and "use data.format 'sft'" in result.stderr and "set train.lora" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_resuming_a_run_trained_without_privacy_privately_is_refused(tmp_path: Path) -> None:
    config = tiny_digits(tmp_path, epochs=2)
    assert cli("pipeline", "-c", config, "--to", "init", "-q").code == 0
    assert cli("train", "-c", config, "--until-step", "5", "-q").code == 0
    result = cli(
        "train", "-c", config, "--resume", "--allow-changes", "-q", "--set", "train.privacy.noise_multiplier=1"
    )
    assert result.code == 2 and "trained without train.privacy" in result.stderr


def test_a_private_lora_run_stopped_and_resumed_ends_as_the_uninterrupted_one(tmp_path: Path) -> None:
    """The decoder's loop (train/lm.py) resumes a private run exactly too: the same Poisson draws, noise,
    adapters, optimizer state and privacy account."""
    from tests import hf_models
    from tests.test_finetune import records, sft_config
    from tests.test_lm import _state

    config = sft_config(
        tmp_path,
        hf_models.make("llama", tmp_path / "hf"),
        rows=records(20),
        lora={"rank": 2, "targets": ["attention"]},
        max_steps=8,
        eval_every=4,
        save_every=2,
        privacy={"noise_multiplier": 0.8},
    )
    assert cli("pipeline", "-c", config, "--to", "train", "-q").code == 0
    last = tmp_path / "run" / "train" / "last.safetensors"
    uninterrupted, account = _state(last), read_manifest(last).privacy
    assert cli("train", "-c", config, "-q", "--restart", "--until-step", "3").code == 0
    assert read_manifest(last).privacy.steps == 3  # type: ignore[union-attr]
    assert cli("train", "-c", config, "-q", "--resume").code == 0
    resumed = _state(last)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), "resume diverged"
    assert read_manifest(last).privacy == account
