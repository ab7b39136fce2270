"""bigmodel plan: counts checked against models actually built, memory against a measured training step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bigmodel import accounting, hardware
from bigmodel.arch import DecoderArch
from scripts.check_plan_memory import measure_cpu
from tests.conftest import CONFIGS, cli, tiny_digits
from tests.test_lm import lm_config

ARCH = {
    "family": "gpt",
    "task": "lm",
    "vocab_size": 65,
    "n_layer": 4,
    "n_head": 4,
    "n_embd": 256,
    "block_size": 256,
    "dropout": 0.0,
    "bias": False,
}


def plan_json(config: Path, *args: str) -> dict:
    result = cli("plan", "-c", config, "--json", *args)
    assert result.code == 0, result.stderr
    return result.json()


def test_parameters_equal_what_init_builds(tmp_path: Path) -> None:
    (tmp_path / "gpt").mkdir()
    (tmp_path / "mlp").mkdir()
    gpt, digits = lm_config(tmp_path / "gpt"), tiny_digits(tmp_path / "mlp")
    for config in (gpt, digits):
        for stage in ("prepare", "init"):
            assert cli(stage, "-c", config, "-q").code == 0
        built = cli("init", "-c", config, "--json", "-q").json()["parameters"]
        assert plan_json(config)["model"]["parameters"] == built
    # The checkpoint init wrote is the size plan predicts (the manifest header adds a little).
    report = plan_json(gpt)
    written = (tmp_path / "gpt" / "run" / "init" / "model.safetensors").stat().st_size
    assert report["storage"]["checkpoint"] <= written <= report["storage"]["checkpoint"] * 1.25


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"bias": True},
        {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2, "head_size": 16, "qk_norm": True},
        {
            "position": "rope",
            "norm": "rmsnorm",
            "mlp": "swiglu",
            "n_kv_head": 2,
            "qk_norm": True,
            "qk_norm_per_head": False,
        },
        {"mlp": "swiglu", "sandwich_norms": True, "n_experts": 4, "experts_per_token": 2},
    ],
)
def test_block_parameters_are_what_a_block_holds(options: dict) -> None:
    """What FSDP gathers at once (and the import's memory guard reads): one block's parameters."""
    from bigmodel.models.gpt import Block

    arch = DecoderArch(vocab_size=50, n_layer=1, n_head=4, n_embd=32, block_size=8, **options)
    assert accounting.block_parameters(arch) == sum(p.numel() for p in Block(arch, 0).parameters())


@pytest.mark.parametrize("targets", [["q", "v"], ["all-linear"]])
def test_lora_parameters_of_an_encoder_are_what_lora_trains(targets: list[str]) -> None:
    """plan's adapter count for a BERT (it crashed: an encoder had no `mlp`) against lora.apply's."""
    from bigmodel import lora, registry
    from bigmodel.arch import EncoderArch
    from bigmodel.config import LoRAConfig

    arch = EncoderArch(task="mlm", vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=8)
    settings = LoRAConfig(rank=4, targets=targets)
    trained = lora.apply(registry.build_model(arch), settings, seed=0)
    assert accounting.lora_parameters(arch, settings.projections(), 4) == trained > 0


@pytest.mark.slow  # (19 s: the default run stays under 10 minutes)
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads Linux's /proc")
def test_an_encoders_memory_estimate_is_within_25_percent_of_a_measured_step() -> None:
    """A masked-LM encoder with dropout on this CPU (attention keeps its scores: the unfused path) and a
    GPT with dropout: the estimate against two measured steps of each."""
    from bigmodel import registry
    from bigmodel.arch import parse

    encoder = {
        "family": "bert",
        "task": "mlm",
        "vocab_size": 8000,
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 256,
        "block_size": 128,
        "dropout": 0.1,
    }
    for arch in (encoder, {**ARCH, "dropout": 0.2}):
        measured = measure_cpu(arch, 16, "fp32", False)
        with torch.device("meta"):
            n_params = registry.count_parameters(registry.build_model(arch))
        estimate = accounting.training_memory(
            parse(arch, "test"), n_params, batch=16, runtime=hardware.CPU_RUNTIME, fused_dropout=False
        )
        assert abs(estimate["total"] - measured) <= 0.25 * measured, (arch["family"], estimate, measured)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads Linux's /proc")
@pytest.mark.parametrize(
    "precision,checkpointing", [("fp32", False), pytest.param("bf16", False, marks=pytest.mark.slow), ("fp32", True)]
)
def test_memory_estimate_is_within_25_percent_of_a_measured_step(precision: str, checkpointing: bool) -> None:
    batch = 16
    measured = measure_cpu(ARCH, batch, precision, checkpointing)  # two steps of bigmodel's GPT + AdamW
    n_params = 12 * 4 * 256**2 + 65 * 256 + 256 * 256 + 9 * 256  # blocks, embeddings, norms
    estimate = accounting.training_memory(
        DecoderArch(**ARCH),
        n_params,
        batch=batch,
        precision=precision,
        activation_checkpointing=checkpointing,
        runtime=hardware.CPU_RUNTIME,
    )
    assert abs(estimate["total"] - measured) <= 0.25 * measured, (estimate, measured)


def test_gpt3_175b_plans_from_its_config_alone() -> None:
    report = plan_json(CONFIGS / "gpt3_175b.yaml")
    L, d, T, V = 96, 12288, 2048, 50257
    params = V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d  # embeddings, blocks with biases, ln_f
    assert report["model"]["parameters"] == params
    assert 174e9 < params < 176e9
    compute = report["compute"]
    assert compute["flops_per_token"] == 6 * (params - T * d) + 12 * L * 96 * 128 * T
    assert compute["total_flops"] == pytest.approx(3.2e23, rel=0.02)  # GPT-3's reported 3.14e23, + attention
    memory = report["training_memory_per_device"]
    assert memory["sharding"] == "fsdp" and memory["fits"]
    assert memory["optimizer"] == 8 * params // 768
    time = report["time_and_energy"]
    assert time["compute_seconds"] == pytest.approx(3.229e23 / (768 * 989e12 * 0.4), rel=0.01)
    io = report["storage_io"]  # a resumable checkpoint every 1000 steps, written while the others wait
    assert io["checkpoint_writes"] == 96 and io["checkpoint_bytes"] == report["storage"]["training_state"]
    assert report["communication"]["hidden"]  # 3.5 s of FSDP traffic per 11 s step
    assert time["seconds"] == pytest.approx(time["compute_seconds"] + io["checkpoint_seconds_total"])
    assert report["storage"]["checkpoint"] == 4 * params


def test_published_runs_meta_reported() -> None:
    """Llama 2 70B and Llama 3.1 405B: the parameters of the released models, the training FLOPs Meta
    reports, and the GPU-hours it reports imply an MFU in the range the Llama 3 paper measured."""
    llama2 = plan_json(CONFIGS / "llama2_70b.yaml")
    assert llama2["model"]["parameters"] == 68_976_648_192  # meta-llama/Llama-2-70b-hf
    # Touvron et al. 2023, table 2: 1,720,320 A100-80GB GPU-hours (312 TFLOPS bf16 dense)
    implied = llama2["compute"]["total_flops"] / (1_720_320 * 3600 * 312e12)
    assert 0.40 < implied < 0.50, implied
    llama3 = plan_json(CONFIGS / "llama3_405b.yaml")
    params, tokens = llama3["model"]["parameters"], llama3["compute"]["tokens"]
    assert params == 405_853_388_800  # meta-llama/Llama-3.1-405B
    assert 6 * params * tokens == pytest.approx(3.8e25, rel=0.01)  # Llama 3 paper, sec. 3.2.1 (6ND)
    # the Llama 3.1 model card: 30.84M H100-80GB GPU-hours; the paper's table 4: 38-43% BF16 MFU
    implied = llama3["compute"]["total_flops"] / (30.84e6 * 3600 * 989e12)
    assert 0.33 < implied < 0.43, implied
    # with FSDP alone each device holds whole 8192-token sequences: no count of 80 GB devices fits
    assert not llama3["training_memory_per_device"]["fits"] and llama3["devices_needed"]["fewest_that_fit"] is None


def test_communication_follows_the_collectives_and_the_link() -> None:
    ddp = accounting.communication_per_step("ddp", 8, parameters=1000, trainable=1000, micro_batches=1)
    fsdp = accounting.communication_per_step("fsdp", 8, parameters=1000, trainable=1000, micro_batches=1)
    assert sum(fsdp.values()) == pytest.approx(
        1.5 * sum(ddp.values())
    )  # ZeRO-3's 1.5x (Rajbhandari et al. 2019, sec. 7)
    assert accounting.communication_per_step("ddp", 1, parameters=1000, trainable=1000, micro_batches=1) == {}
    assert hardware.PROFILES["h100-sxm"].link(8).bytes_per_s == 450e9  # NVLink inside a node
    assert hardware.PROFILES["h100-sxm"].link(16).bytes_per_s == 400e9  # 8 x 400 Gb/s cards per node
    assert hardware.PROFILES["a100-80gb"].link(16).bytes_per_s == 200e9
    config = CONFIGS / "gpt3_175b.yaml"
    for profile, hidden in (("h100-sxm", True), ("a10", False)):  # A10 nodes share one 100 Gb/s Ethernet
        report = plan_json(config, "--hardware", profile)
        c, time = report["communication"], report["time_and_energy"]
        assert c["seconds_per_step"] == pytest.approx(c["bytes_per_step_per_device"] / c["link_bytes_per_s"])
        assert c["hidden"] is hidden
        exposed = report["compute"]["steps"] * c["exposed_seconds_per_step"]
        assert (exposed > 0) is not hidden
        assert time["seconds"] == pytest.approx(
            time["compute_seconds"] + exposed + report["storage_io"]["checkpoint_seconds_total"]
        )


def test_devices_and_cost_follow_from_the_plan() -> None:
    config = CONFIGS / "gpt3_175b.yaml"
    report = plan_json(config, "--days", "30")
    time, cost, needed = report["time_and_energy"], report["cost"], report["devices_needed"]
    assert cost["devices_usd"] == pytest.approx(time["device_hours"] * 3.00)  # the profile's price
    assert cost["energy_usd"] == pytest.approx(time["energy_kwh"] * 0.09)
    priced = plan_json(config, "--price", "2")["cost"]
    assert priced["devices_usd"] == pytest.approx(time["device_hours"] * 2) and priced["price_source"] == "plan.price"
    divisors = [n for n in range(1, 1537) if 1536 % n == 0]  # the global batch: 1536 sequences

    def before(n: int) -> str:
        return str(divisors[divisors.index(n) - 1])

    fit, in_time = needed["fewest_that_fit"], needed["to_finish_in_days"]
    assert plan_json(config, "--devices", str(fit))["training_memory_per_device"]["fits"]
    assert not plan_json(config, "--devices", before(fit))["training_memory_per_device"]["fits"]
    assert plan_json(config, "--devices", str(in_time))["time_and_energy"]["days"] <= 30
    assert plan_json(config, "--devices", before(in_time))["time_and_energy"]["days"] > 30
    unpriced = plan_json(config, "--hardware", "a10")["cost"]
    assert unpriced["devices_usd"] is None and unpriced["energy_usd"] is not None  # no surveyed price


def test_sharding_and_precision_move_the_memory_the_right_way(tmp_path: Path) -> None:
    config = CONFIGS / "gpt3_175b.yaml"
    one = plan_json(config, "--devices", "1")["training_memory_per_device"]
    many = plan_json(config, "--devices", "64")["training_memory_per_device"]
    ddp = plan_json(config, "--devices", "64", "--set", "train.distributed=ddp")["training_memory_per_device"]
    assert not one["fits"] and one["optimizer"] == 64 * many["optimizer"]
    assert ddp["gradients"] == 2 * one["gradients"]  # DDP's buckets: a second copy of the gradients
    no_ckpt = plan_json(config, "--set", "train.activation_checkpointing=false")["training_memory_per_device"]
    assert no_ckpt["activations"] > 5 * many["activations"]
    # precision auto plans bf16 on a GPU (its bf16 peak, bf16 activations), like the config's explicit bf16
    auto = plan_json(config, "--devices", "64", "--set", "train.precision=auto")
    fp32 = plan_json(config, "--devices", "64", "--set", "train.precision=fp32")
    assert auto["training_memory_per_device"] == many and auto["training_memory_per_device"]["precision"] == "bf16"
    assert auto["time_and_energy"]["peak_flops_per_device"] > 10 * fp32["time_and_energy"]["peak_flops_per_device"]


def test_plan_says_what_it_needs_before_prepare(tmp_path: Path) -> None:
    config = lm_config(tmp_path)  # a char tokenizer: the vocabulary comes from the data
    result = cli("plan", "-c", config)
    assert result.code == 2
    assert "run prepare, or pass --set plan.vocab_size=N" in result.stderr
    assert plan_json(config, "--set", "plan.vocab_size=100")["model"]["architecture"]["vocab_size"] == 100
    unknown = cli("plan", "-c", config, "--hardware", "tpu9")
    assert unknown.code == 2 and "plan.hardware" in unknown.stderr


def test_llama_options_are_planned_from_the_architecture(tmp_path: Path) -> None:
    """Grouped-query attention shrinks the KV cache to n_kv_head heads; rope has no position table; the
    parameter count equals the model init builds with these options."""
    options = [
        "--set",
        "model.position=rope",
        "--set",
        "model.norm=rmsnorm",
        "--set",
        "model.mlp=swiglu",
        "--set",
        "model.n_kv_head=1",
        "--set",
        "model.intermediate_size=80",
        "--set",
        "model.tie_embeddings=false",
    ]
    config = lm_config(tmp_path)
    for stage in ("prepare", "init"):
        assert cli(stage, "-c", config, "-q", *options).code == 0
    built = cli("init", "-c", config, "--json", "-q", *options).json()
    report = plan_json(config, *options)
    assert report["model"]["parameters"] == built["parameters"]
    assert report["model"]["parameters_without_position_embeddings"] == built["parameters"]
    arch = report["model"]["architecture"]
    context = report["inference_memory"]["context"]
    assert report["inference_memory"]["kv_cache_fp32"] == 2 * arch["n_layer"] * context * 1 * arch["head_size"] * 4
