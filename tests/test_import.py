"""Importing pretrained decoders (init.from), checked against transformers on the same files.

Tiny random models are written by transformers itself (tests/hf_models.py): GPT-2, Llama with
grouped-query attention and an untied head, Llama with llama3 rope scaling and a tied head, Mistral with
a head size independent of the width, Qwen2 with q/k/v bias. Each goes through import parity, a few
training steps, the ONNX export gate, and greedy generation with ONNX Runtime that must equal
transformers' `generate` token for token. A GGUF file of the Llama (written as llama.cpp writes it)
must import to exactly the folder's weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from bigmodel import registry
from bigmodel import tokenizer as tokenizers
from bigmodel.checkpoint import read_manifest
from bigmodel.config import InferConfig
from bigmodel.infer.gpt import Decoder
from bigmodel.infer.session import file_metadata, open_model
from bigmodel.manifests import DecoderMetadata
from tests import hf_models
from tests.conftest import cli, write_config

transformers = pytest.importorskip("transformers")

CORPUS = "The quick brown fox jumps over the lazy dog. 0123456789\nSphinx of black quartz, judge my vow.\n" * 150


def import_config(tmp: Path, source: Path, **sections: object) -> Path:
    (tmp / "corpus.txt").write_text(CORPUS)
    config = {
        "seed": 0,
        "threads": 1,
        "run_dir": "run",
        "data": {"format": "text", "path": "corpus.txt"},
        "init": {"from": str(source)},
        "train": {"max_steps": 3, "batch_size": 4, "eval_every": 3, "eval_batches": 2, "lr": 1e-4},
        **sections,
    }
    return write_config(tmp / "import.yaml", config)


def hf_greedy(source: Path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    options = {"dtype": torch.float32, "local_files_only": True}
    if source.suffix == ".gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, **options)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(source), **options)
    out = model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=new_tokens,
        do_sample=False,
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        pad_token_id=0,
    )
    return out[0, len(prompt_ids) :].tolist()


def ort_greedy(model_path: Path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    session, meta = open_model(model_path, ["CPUExecutionProvider"], 1, DecoderMetadata)
    decoder = Decoder.from_session(session, meta, model_path)
    settings = InferConfig(max_new_tokens=new_tokens, temperature=0)
    return list(decoder.tokens(prompt_ids, settings, np.random.default_rng(0)))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    made = {
        kind: hf_models.make(kind, root / kind)
        for kind in (
            *("gpt2", "llama", "llama_tied_scaled", "mistral", "mistral_window", "qwen2", "qwen2_window"),
            *("qwen3", "phi3", "phi3_partial", "gemma2", "gemma3", "mixtral", "qwen3_moe", "olmoe"),
        )
    }
    made["gguf"] = hf_models.write_gguf(made["llama"], root / "llama.gguf")
    made["qwen2_gguf"] = hf_models.write_gguf(made["qwen2"], root / "qwen2.gguf")
    made["qwen3_gguf"] = hf_models.write_gguf(made["qwen3"], root / "qwen3.gguf")
    made["phi3_gguf"] = hf_models.write_gguf(made["phi3"], root / "phi3.gguf")
    # transformers' GGUF reader builds Qwen3-MoE experts of its config's default width (768) and renormalises
    # (llama.cpp's qwen3moe does): a folder of that width is the GGUF's twin
    made["qwen3_moe_768"] = hf_models.make(
        "qwen3_moe", root / "qwen3_moe_768", moe_intermediate_size=768, norm_topk_prob=True
    )
    made["qwen3_moe_gguf"] = hf_models.write_gguf(made["qwen3_moe_768"], root / "qwen3moe.gguf")
    # Gemma files lack query_pre_attn_scalar (llama.cpp: 1/sqrt(head_dim)) and transformers' GGUF reader their
    # caps and local rope base (its config defaults): twins with the published Gemma values it assumes
    gemma = {"head_dim": 256, "query_pre_attn_scalar": 256}
    made["gemma2_256"] = hf_models.make(
        "gemma2", root / "gemma2_256", **gemma, attn_logit_softcapping=50.0, final_logit_softcapping=30.0
    )
    made["gemma2_gguf"] = hf_models.write_gguf(made["gemma2_256"], root / "gemma2.gguf")
    made["gemma3_256"] = hf_models.make(
        "gemma3",
        root / "gemma3_256",
        **gemma,
        layer_types=["sliding_attention", "sliding_attention"],  # (Gemma 3's pattern of 6, in two layers)
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    )
    made["gemma3_gguf"] = hf_models.write_gguf(made["gemma3_256"], root / "gemma3.gguf")
    return made


@pytest.fixture(scope="module")
def imported_llama(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llama imported (prepare + init) and its init checkpoint exported: shared by tests that only read."""
    config = import_config(tmp_path_factory.mktemp("imported"), sources["llama"])
    for args in (("prepare",), ("init",), ("export", "--set", "export.checkpoint=init")):
        result = cli(args[0], "-c", config, "-q", *args[1:])
        assert result.code == 0, result.stderr
    return config


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    [
        *("gpt2", "llama", "llama_tied_scaled", "mistral", "mistral_window", "qwen2", "qwen2_window"),
        *("qwen3", "phi3", "phi3_partial", "gemma2", "gemma3", "mixtral", "qwen3_moe", "olmoe"),
    ],
)
def test_import_trains_exports_and_generates_like_transformers(
    kind: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    source = sources[kind]
    config = import_config(tmp_path, source)
    result = cli("pipeline", "-c", config, "--to", "init", "-q")
    assert result.code == 0, result.stderr
    init = tmp_path / "run" / "init" / "model.safetensors"
    manifest = read_manifest(init)
    parity = manifest.import_.parity
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-4 and parity["same_greedy_tokens"]
    arch = manifest.architecture
    if kind in ("mistral", "mistral_window", "qwen3", "gemma2", "gemma3", "qwen3_moe"):
        assert arch.head_size * arch.n_head != arch.n_embd  # a head size of its own
    # a window shorter than the context is computed, on the layers that have it (one sliding in qwen2_window)
    windows = {"mistral_window": (8, 8), "qwen2_window": (None, 8), "gemma2": (8, None), "gemma3": (8, None)}
    assert arch.windows == windows.get(kind, (None, None))
    assert arch.qk_norm == (kind in ("qwen3", "gemma3", "qwen3_moe", "olmoe"))
    assert arch.qk_norm_per_head == (kind != "olmoe")  # (OLMoE's norms span all heads)
    mixtures = ("mixtral", "qwen3_moe", "olmoe")
    assert (arch.n_experts, arch.experts_per_token) == ((4, 2) if kind in mixtures else (0, 0))
    assert arch.normalize_expert_weights == (kind not in ("qwen3_moe", "olmoe"))
    if kind != "gpt2":
        assert arch.position == "rope" and arch.rmsnorm and arch.n_kv_head == 2 and arch.n_head == 4
    if kind.startswith("gemma"):  # all of Gemma's options in use, Gemma 2's caps and Gemma 3's local base
        assert arch.embedding_scale and arch.sandwich_norms and arch.mlp == "geglu_tanh"
        assert arch.attention_scale == 24**-0.5 and arch.norm == "rmsnorm_unit_offset"
        assert (arch.attention_softcap, arch.logit_softcap) == ((2.0, 3.0) if kind == "gemma2" else (None, None))
        assert arch.local_rope_theta == (10000.0 if kind == "gemma3" else None)
    assert arch.qkv_bias == (kind in ("gpt2", "qwen2", "qwen2_window"))

    # The model's logits are O(1), so the 1e-4 gate above is a real test of the arithmetic.
    model, _ = registry.load_model(init)
    tok = tokenizers.from_json(manifest.data.tokenizer)
    ids = tok.encode("The quick brown fox jumps")
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    assert logits.std() > 0.5

    # Export the imported weights; ORT's greedy tokens equal transformers' generate, token for token.
    result = cli("export", "-c", config, "--set", "export.checkpoint=init", "-q")
    assert result.code == 0, result.stderr
    onnx_path = tmp_path / "run" / "export" / "model.onnx"
    ops = [node.op_type for node in onnx.load(str(onnx_path), load_external_data=False).graph.node]
    # opset 23, per layer one attention node: ONNX Runtime's GroupQueryAttention where it computes the model
    # (export.attention auto: heads of 16 or more, no local rotary base; the cache written in place, the
    # rotation inside), else ONNX's Attention (the cache appended inside it) and, with rope, RotaryEmbedding
    meta = file_metadata(onnx_path)
    assert isinstance(meta, DecoderMetadata)
    group_query = arch.head_size % 16 == 0 and arch.rope_dim % 16 == 0 and not arch.local_rope_theta
    assert meta.attention == ("group_query" if group_query else "onnx")
    assert ops.count("GroupQueryAttention" if group_query else "Attention") == arch.n_layer  # and no copies:
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    assert not any(node.op_type == "Concat" and any(i.startswith("past_") for i in node.input) for node in graph.node)
    rotated = arch.position == "rope" and not group_query
    assert ops.count("RotaryEmbedding") == (arch.n_layer if rotated else 0)
    assert ops.count("MoE") == (arch.n_layer if arch.n_experts else 0)  # a mixture: ONNX Runtime's routed kernel
    ours = ort_greedy(onnx_path, ids, 20)  # (20 tokens: ORT's generator does not stop at EOS)
    theirs = hf_greedy(source, ids, 20)  # (transformers stops at EOS)
    assert ours[: len(theirs)] == theirs and (len(theirs) == 20 or theirs[-1] == 2)
    if any(arch.windows):  # decoded well past the window: its mask, not the context, decided the tokens
        assert len(ids) + len(theirs) > 2 * (arch.sliding_window or 0)

    # A few steps of continued pre-training, then eval: the recipe runs unchanged on the import.
    result = cli("pipeline", "-c", config, "--to", "eval", "--json", "-q")
    assert result.code == 0, result.stderr
    assert np.isfinite(result.json()["stages"]["eval"]["loss"])


@pytest.mark.parametrize(
    "folder,gguf",
    [
        *(("llama", "gguf"), ("qwen2", "qwen2_gguf"), ("qwen3", "qwen3_gguf"), ("phi3", "phi3_gguf")),
        *(("qwen3_moe_768", "qwen3_moe_gguf"), ("gemma2_256", "gemma2_gguf"), ("gemma3_256", "gemma3_gguf")),
    ],
)
def test_gguf_import_equals_the_folders_bit_for_bit(
    folder: str, gguf: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    """The GGUF file of the llama (q/k permuted, llama.cpp's names), the qwen2 (unpermuted, q/k/v biases),
    the qwen3 (unpermuted, QK-norm), the phi3 (fused attn_qkv and ffn_up), the qwen3_moe (experts stacked
    per layer) or the gemma2/gemma3 (norms stored as 1 + w, caps and window in the metadata) imports to exactly
    the folder's weights, and passes the gate against transformers reading the GGUF."""
    from bigmodel import pretrained
    from bigmodel.pretrained import build

    from_folder, from_gguf = pretrained.describe(sources[folder]), pretrained.describe(sources[gguf])
    assert from_gguf.arch.norm_eps == pytest.approx(from_folder.arch.norm_eps)  # GGUF stores it as float32
    assert from_gguf.arch.model_copy(update={"norm_eps": from_folder.arch.norm_eps}) == from_folder.arch
    a, b = build.build(from_folder, from_folder.arch), build.build(from_gguf, from_gguf.arch)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        # (Gemma's norms went through 1 + w and back: within fp32's rounding of 1 + w)
        assert torch.equal(x, y) or (gguf.startswith("gemma") and torch.allclose(x, y, rtol=0, atol=2**-23)), name
    result = cli("pipeline", "-c", import_config(tmp_path, sources[gguf]), "--to", "init", "-q")
    assert result.code == 0, result.stderr
    parity = read_manifest(tmp_path / "run" / "init" / "model.safetensors").import_.parity
    assert parity["passed"] and parity["same_greedy_tokens"]


def test_k_quant_gguf_tensors_import_as_gguf_dequantises_them(tmp_path: Path) -> None:
    """A GGUF file whose matrices are Q4_K, Q5_K and Q6_K blocks (what most downloaded GGUF files hold; 256
    values a block, so a model 256 wide): each imports to exactly what the gguf package dequantises (a
    llama's q/k rows unpermuted), and the import passes its gate against transformers reading the file."""
    import gguf
    from gguf.quants import dequantize

    from bigmodel import pretrained
    from bigmodel.pretrained import build
    from bigmodel.pretrained.gguf_file import unpermute

    q = gguf.GGMLQuantizationType
    folder = hf_models.make(
        "llama", tmp_path / "wide", hidden_size=256, intermediate_size=512, num_attention_heads=4, head_dim=64
    )
    per_layer = {"attn_q": q.Q4_K, "attn_k": q.Q5_K, "attn_v": q.Q6_K, "ffn_up": q.Q5_K, "ffn_down": q.Q4_K}
    kinds = {f"blk.{i}.{name}.weight": kind for i in range(2) for name, kind in per_layer.items()}
    kinds.update({"token_embd.weight": q.Q4_K, "output.weight": q.Q6_K})
    path = hf_models.write_gguf(folder, tmp_path / "k-quants.gguf", dtypes=kinds)
    source = pretrained.describe(path)
    assert source.dtype == "F32/Q4_K/Q5_K/Q6_K"
    state = build.build(source, source.arch).state_dict()
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}

    def dequantized(name: str) -> torch.Tensor:
        tensor = tensors[name]
        values = dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed([int(d) for d in tensor.shape])))
        return torch.from_numpy(np.ascontiguousarray(values, np.float32))

    assert torch.equal(state["transformer.wte.weight"], dequantized("token_embd.weight"))
    assert torch.equal(state["lm_head.weight"], dequantized("output.weight"))
    c_attn = state["transformer.h.1.attn.c_attn.weight"]
    assert torch.equal(c_attn[:256], torch.from_numpy(unpermute(dequantized("blk.1.attn_q.weight").numpy(), 4)))
    assert torch.equal(c_attn[256:384], torch.from_numpy(unpermute(dequantized("blk.1.attn_k.weight").numpy(), 2)))
    assert torch.equal(c_attn[384:], dequantized("blk.1.attn_v.weight"))
    assert torch.equal(state["transformer.h.0.mlp.c_proj.weight"], dequantized("blk.0.ffn_down.weight"))
    result = cli("pipeline", "-c", import_config(tmp_path, path), "--to", "init", "-q")
    assert result.code == 0, result.stderr
    parity = read_manifest(tmp_path / "run" / "init" / "model.safetensors").import_.parity
    assert parity["passed"] and parity["same_greedy_tokens"]


def test_each_expert_of_a_k_quant_stacked_gguf_tensor_is_its_own_blocks(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    """A qwen3moe file's stacked experts in Q6_K blocks: each expert imports to exactly its slice of what the
    gguf package dequantises from the whole tensor (each read from its own byte range)."""
    import gguf
    from gguf.quants import dequantize

    from bigmodel import pretrained
    from bigmodel.pretrained import build

    kinds = {f"blk.{i}.ffn_down_exps.weight": gguf.GGMLQuantizationType.Q6_K for i in range(2)}  # 768 = 3 blocks
    path = hf_models.write_gguf(sources["qwen3_moe_768"], tmp_path / "q6k-experts.gguf", dtypes=kinds)
    source = pretrained.describe(path)
    assert source.dtype == "F32/Q6_K" and source.arch.n_experts == 4
    state = build.build(source, source.arch).state_dict()
    tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.1.ffn_down_exps.weight")
    whole = dequantize(tensor.data, tensor.tensor_type).reshape(4, 32, 768)
    for e in range(4):
        assert torch.equal(state[f"transformer.h.1.mlp.experts.{e}.c_proj.weight"], torch.from_numpy(whole[e]))
    assert len({float(whole[e].std()) for e in range(4)}) == 4  # four different experts


@pytest.mark.slow
def test_llama_3_2_1b_shapes_import_export_and_generate_like_transformers(tmp_path: Path) -> None:
    """Llama 3.2 1B's layer shapes (hidden 2048, 32 query heads over 8 KV heads of 64, MLP 8192), its rope
    (theta 500000, llama3 scaling x32 from 8192) and tied head, with two layers and a small vocabulary (the
    real one's 128k rows would be most of the file): import parity, export parity, and ORT's greedy tokens
    against transformers'."""
    source = hf_models.make(
        "llama_tied_scaled",
        tmp_path / "llama-3.2-1b-shaped",
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    config = import_config(tmp_path, source, model={"block_size": 256})
    result = cli("pipeline", "-c", config, "--to", "export", "--set", "export.checkpoint=init", "--json", "-q")
    assert result.code == 0, result.stderr
    manifest = read_manifest(tmp_path / "run" / "init" / "model.safetensors")
    arch = manifest.architecture
    assert (arch.n_embd, arch.n_head, arch.n_kv_head, arch.head_size, arch.mlp_hidden[0]) == (2048, 32, 8, 64, 8192)
    assert arch.tie_embeddings and arch.rope_scaling.kind == "llama3" and arch.rope_scaling.factor == 32.0
    assert manifest.import_.parity["passed"] and result.json()["stages"]["export"]["passed"]
    ids = tokenizers.from_json(manifest.data.tokenizer).encode("The quick brown fox jumps")
    onnx_path = tmp_path / "run" / "export" / "model.onnx"
    ours, theirs = ort_greedy(onnx_path, ids, 12), hf_greedy(source, ids, 12)
    assert ours[: len(theirs)] == theirs and (len(theirs) == 12 or theirs[-1] == 2)  # transformers stops at EOS


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", ["qwen3", "phi3", "phi3_partial", "qwen2_window", "gemma2", "gemma3", "mixtral", "qwen3_moe", "olmoe"]
)
def test_int4_export_of_a_qk_norm_or_fused_import_passes_its_gate(
    kind: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    """export.dtype int4 (weights written and quantised tensor by tensor) of the newer architectures: the
    gate against the model its blocks hold passes, and the file generates."""
    config = import_config(tmp_path, sources[kind])
    sets = ("--set", "export.checkpoint=init", "--set", "export.dtype=int4")
    result = cli("pipeline", "-c", config, "--to", "export", *sets, "--json", "-q")
    assert result.code == 0, result.stderr
    assert result.json()["stages"]["export"]["passed"]
    if kind in ("mixtral", "qwen3_moe", "olmoe"):
        assert result.json()["stages"]["export"]["experts"] == ("dense" if kind == "qwen3_moe" else "routed")
        # fp32 arithmetic on the blocks (accuracy level 0): the file computes exactly the model its blocks hold --
        # with OLMoE's unrenormalised scores too, which ONNX Runtime 1.32's QMoE renormalises regardless (0.18 here)
        exact = cli("export", "-c", config, *sets, "--set", "export.int4.accuracy_level=0", "--json", "-q")
        assert exact.code == 0 and exact.json()["relative_error"] <= 1e-4, exact.stderr
    generated = cli("infer", "-c", config, "--prompt", "The quick", "-n", "5", "-t", "0", "--json")
    assert generated.code == 0 and generated.json()["new_tokens"] == 5, generated.stderr
    graph = onnx.load(str(tmp_path / "run" / "export" / "model.onnx"), load_external_data=False).graph
    # a mixture's experts in 4-bit blocks of 16 (QMoE): qwen3_moe's 24-wide experts have no whole blocks (dense)
    routed = {"mixtral": 2, "olmoe": 2}.get(kind, 0)
    assert [node.op_type for node in graph.node].count("QMoE") == routed
    if kind == "gemma2":  # a tied table in two widths: the head's 4-bit blocks and the lookup's 8-bit ones
        widths = ("--set", "export.int4.head=int4", "--set", "export.int4.embeddings=int8")
        result = cli("export", "-c", config, *sets, *widths, "--json", "-q")
        assert result.code == 0 and result.json()["passed"], result.stderr


def test_fused_phi3_projections_split_at_import_and_partial_rotary_is_exact(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    """Phi-3's qkv_proj is our c_attn as it is; its gate_up_proj is split into gate and up (so LoRA and every
    later stage see the usual modules): the logits equal transformers'. A partial rotary factor (Phi-4-mini's
    0.75) turns that share of each head, as transformers does; one that leaves an odd count is refused."""
    from bigmodel import pretrained
    from bigmodel.pretrained import build

    ids = torch.tensor([[5, 9, 17, 3, 22, 8, 40, 11]])
    for kind, turned in (("phi3", None), ("phi3_partial", 6)):
        source = pretrained.describe(sources[kind])
        assert source.arch.rotary_dim == turned
        parts = {name.rpartition(".")[2] for name in source.targets if "gate_up_proj" in name}
        assert parts == {"weight#gate", "weight#up"}
        model = build.build(source, source.arch).eval()
        reference = transformers.AutoModelForCausalLM.from_pretrained(str(sources[kind])).eval()
        with torch.no_grad():
            assert (model(ids)[0] - reference(ids).logits).abs().max() < 1e-4, kind
    odd = Path(shutil.copytree(sources["phi3"], tmp_path / "odd"))
    config = json.loads((odd / "config.json").read_text())
    config["rope_parameters"]["partial_rotary_factor"] = 0.375  # 3 of 8 values
    (odd / "config.json").write_text(json.dumps(config))
    result = cli("pipeline", "-c", import_config(tmp_path, odd), "--to", "init")
    assert result.code == 2 and "partial_rotary_factor 0.375 turns 3" in result.stderr
    assert "Traceback" not in result.stderr


def test_hf_export_of_a_partial_rotary_model_is_refused_by_name() -> None:
    from bigmodel.arch import DecoderArch
    from bigmodel.errors import UserError
    from bigmodel.export.hf import hf_model_type

    arch = DecoderArch(
        vocab_size=50,
        n_layer=1,
        n_head=2,
        n_embd=16,
        block_size=8,
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        rotary_dim=4,
    )
    assert hf_model_type(arch.model_copy(update={"rotary_dim": None})) == "llama"
    with pytest.raises(UserError, match="rotary_dim 4"):
        hf_model_type(arch)


def test_a_gguf_tensor_type_gguf_cannot_dequantise_is_refused_by_name(sources: dict[str, Path], tmp_path: Path) -> None:
    from bigmodel import pretrained
    from bigmodel.errors import UserError

    # one tensor in float64, a type the gguf package does not dequantise
    path = hf_models.write_gguf(sources["llama"], tmp_path / "f64.gguf", {"output_norm.weight": np.float64})
    with pytest.raises(UserError, match="output_norm.weight is of type F64, which the installed gguf package cannot"):
        pretrained.describe(path)


def test_gguf_tokenizer_equals_the_folders(sources: dict[str, Path]) -> None:
    """The tokenizer rebuilt from GGUF vocabulary + merges encodes exactly like the original tokenizer.json."""
    from bigmodel import pretrained

    folder_tok = tokenizers.from_json(pretrained.describe(sources["llama"]).tokenizer_json)
    gguf_source = pretrained.describe(sources["gguf"])
    gguf_tok = tokenizers.from_json(gguf_source.tokenizer_json)
    for text in ["The quick brown fox", "0123456789 def add(a, b):", "<|im_start|>user\nhi<|im_end|>\n", "  x\n\n"]:
        assert gguf_tok.encode(text) == folder_tok.encode(text)
    assert gguf_source.special_tokens["eos"] == [2] and gguf_source.chat_template == hf_models.CHATML


def test_resume_of_an_imported_model_is_exact(sources: dict[str, Path], tmp_path: Path) -> None:
    straight, chunked = tmp_path / "straight", tmp_path / "chunked"
    for folder in (straight, chunked):
        folder.mkdir()
        config = import_config(
            folder,
            sources["llama"],
            train={"max_steps": 4, "batch_size": 4, "eval_every": 2, "eval_batches": 2, "lr": 1e-3},
        )
        assert cli("pipeline", "-c", config, "--to", "init", "-q").code == 0
    assert cli("train", "-c", straight / "import.yaml", "-q").code == 0
    assert cli("train", "-c", chunked / "import.yaml", "--until-step", "2", "-q").code == 0
    assert cli("train", "-c", chunked / "import.yaml", "--resume", "-q").code == 0
    a, _ = registry.load_model(straight / "run" / "train" / "last.safetensors")
    b, _ = registry.load_model(chunked / "run" / "train" / "last.safetensors")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_the_parity_gate_catches_a_wrong_weight(sources: dict[str, Path]) -> None:
    from bigmodel import pretrained, streaming
    from bigmodel.pretrained import build

    source = pretrained.describe(sources["qwen2"])
    model = build.build(source, source.arch)
    tok = tokenizers.from_json(source.tokenizer_json)
    weights = streaming.fetch_from(streaming.StateDict(model))
    clean = build.check_parity(weights, source.arch, source, tok, 1e-4)
    assert clean["passed"] and len(clean["layers_max_abs_diff"]) == source.arch.n_layer
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.bias[40] += 0.05  # one key bias, in the second layer
    report = build.check_parity(weights, source.arch, source, tok, 1e-4, 1e-5)  # init's defaults
    assert report["tolerance"] == pytest.approx(1e-4 + 1e-5 * report["max_abs_logit"])
    assert not report["passed"] and report["max_abs_diff"] > report["tolerance"]
    # the layer-by-layer report points at the layer that differs
    assert report["layers_max_abs_diff"][0] < 1e-4 < report["layers_max_abs_diff"][1]


def test_the_gates_reference_computed_beside_the_write_is_the_same_bit_for_bit(sources: dict[str, Path]) -> None:
    """init runs transformers' side of the gate in a background thread while it writes: same numbers as
    computed in the caller's thread, and an error there reaches the caller."""
    from bigmodel import pretrained
    from bigmodel.pretrained import build

    source = pretrained.describe(sources["llama"])
    ids = build.parity_ids(tokenizers.from_json(source.tokenizer_json), source.arch.block_size)
    (beside, beside_layers, _), (inline, inline_layers, _) = (
        build.Reference(source, ids).result(),
        build.Reference(source, ids, background=False).result(),
    )
    assert np.array_equal(beside, inline)
    assert all(np.array_equal(a, b) for a, b in zip(beside_layers, inline_layers, strict=True))
    with pytest.raises(IndexError):  # a token id outside the vocabulary: transformers' embedding raises
        build.Reference(source, np.array([[source.arch.vocab_size]])).result()


def test_unverified_import_is_recorded_as_such(sources: dict[str, Path], tmp_path: Path) -> None:
    config = import_config(tmp_path, sources["gpt2"], model={"block_size": 32})
    result = cli(
        "pipeline", "-c", config, "--to", "init", "--set", "init.verify=false", "--set", "init.dtype=bf16", "-q"
    )
    assert result.code == 0, result.stderr
    init = tmp_path / "run" / "init" / "model.safetensors"
    manifest = read_manifest(init)
    assert manifest.import_.parity == {"verified": False}
    assert manifest.architecture.block_size == 32  # the context may be shortened
    from safetensors import safe_open

    with safe_open(str(init), "pt") as handle:
        assert handle.get_tensor("model.transformer.wte.weight").dtype == torch.bfloat16
        assert handle.get_tensor("model.transformer.wpe.weight").shape[0] == 32


# ------------------------------------------------------------------------------------------ refusals


def one_line_error(result: object) -> str:
    """The single stderr line of an exit-2 refusal (no traceback)."""
    assert result.code == 2, result.stderr  # type: ignore[attr-defined]
    lines = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr  # type: ignore[attr-defined]
    return lines[0]


def _variant(source: Path, tmp: Path, **config_changes: object) -> Path:
    folder = tmp / "variant"
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_pickle_weights_are_refused(sources: dict[str, Path], tmp_path: Path) -> None:
    folder = _variant(sources["llama"], tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    line = one_line_error(cli("pipeline", "-c", import_config(tmp_path, folder), "--to", "init", "-q"))
    assert "pytorch_model.bin" in line and "safetensors" in line


@pytest.mark.parametrize(
    "change, words",
    [
        ({"model_type": "falcon"}, ("model_type 'falcon'", "gpt2, llama, mistral, qwen2")),
        ({"num_local_experts": 8}, ("mixture-of-experts",)),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, ("rope scaling 'yarn'",)),
        ({"num_hidden_layers": 3}, ("weights missing",)),
    ],
)
def test_what_cannot_be_represented_is_refused_by_name(
    sources: dict[str, Path], tmp_path: Path, change: dict, words: tuple[str, ...]
) -> None:
    folder = _variant(sources["llama"], tmp_path, **change)
    config = import_config(tmp_path, folder)
    assert cli("prepare", "-c", config, "-q").code in (0, 2)
    line = one_line_error(cli("init", "-c", config, "-q"))
    assert all(word in line for word in words), line
    assert not (tmp_path / "run" / "init" / "model.safetensors").exists()


@pytest.mark.slow
def test_a_mixture_of_experts_adapts_its_attention_and_refuses_the_rest_by_name(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    """LoRA all-linear on a mixture adapts the attention only; adapters named on its experts and structured
    pruning are each one line, exit 2, nothing written."""
    train = {"max_steps": 2, "batch_size": 4, "eval_every": 2, "eval_batches": 1, "lora": {"rank": 4}}
    config = import_config(tmp_path, sources["mixtral"], train=train)
    result = cli("pipeline", "-c", config, "--to", "train", "--json", "-q")
    assert result.code == 0, result.stderr
    init = result.json()["stages"]["init"]  # 2 of 4 experts per token: half of the experts' weights idle
    expert = 3 * 32 * 48
    assert init["active_parameters"] == init["parameters"] - 2 * 2 * expert
    assert init["active_flops_per_token"] == init["flops_per_token"] - 6 * 2 * 2 * expert
    from bigmodel import lora

    adapted, _ = registry.load_model(tmp_path / "run" / "train" / "best.safetensors", merge=False)
    adapters = lora.adapter_tensors(adapted)
    assert adapters and all(".attn." in name for name in adapters)
    named = import_config(tmp_path, sources["mixtral"], train={**train, "lora": {"rank": 4, "targets": ["mlp"]}})
    assert "mixture of experts' MLPs (mlp)" in one_line_error(cli("train", "-c", named, "-q"))
    prune = "compress.steps=[{method: prune, kind: structured, sparsity: 0.5}]"
    line = one_line_error(cli("compress", "-c", config, "--set", "compress.checkpoint=init", "--set", prune, "-q"))
    assert "mixture of experts" in line


@pytest.mark.slow
def test_a_mixture_exports_routed_or_dense_with_the_same_numbers(sources: dict[str, Path], tmp_path: Path) -> None:
    """export.experts routed (ONNX Runtime's MoE node per layer) and dense (every expert, standard operators)
    compute the same logits; the key on a dense model is refused by name."""
    config = import_config(tmp_path, sources["olmoe"])
    assert cli("pipeline", "-c", config, "--to", "init", "-q").code == 0
    ids = np.array([[5, 17, 42, 9, 33, 7, 101, 64]], dtype=np.int64)
    logits, kinds = {}, {}
    for form in ("routed", "dense"):
        sets = ("--set", "export.checkpoint=init", "--set", f"export.experts={form}")
        result = cli("export", "-c", config, *sets, "--json", "-q")
        assert result.code == 0 and result.json()["passed"], result.stderr
        path = tmp_path / "run" / "export" / "model.onnx"
        kinds[form] = {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
        session, meta = open_model(path, ["CPUExecutionProvider"], 1, DecoderMetadata)
        decoder = Decoder.from_session(session, meta, path)
        logits[form] = decoder.run(ids, decoder.empty_cache(1))[0]
    assert "MoE" in kinds["routed"] and "MoE" not in kinds["dense"] and "TopK" in kinds["dense"]
    assert np.abs(logits["routed"] - logits["dense"]).max() <= 1e-5
    (tmp_path / "llama").mkdir()
    dense = import_config(tmp_path / "llama", sources["llama"])
    assert cli("pipeline", "-c", dense, "--to", "init", "-q").code == 0
    line = one_line_error(
        cli("export", "-c", dense, "--set", "export.checkpoint=init", "--set", "export.experts=dense")
    )
    assert "export.experts" in line and "dense model" in line


def test_a_config_key_that_contradicts_the_checkpoint_is_an_error(sources: dict[str, Path], tmp_path: Path) -> None:
    config = import_config(tmp_path, sources["llama"], model={"n_layer": 6, "norm": "layernorm"})
    line = one_line_error(cli("pipeline", "-c", config, "--to", "init", "-q"))
    assert "model.n_layer is 6" in line and "model.norm" in line


# ------------------------------------------------------------------------------ export.format: hf


@pytest.mark.parametrize(
    "kind",
    [
        *("llama", "qwen2", "llama_tied_scaled", "qwen3", "phi3", "mistral_window", "qwen2_window", "gemma2"),
        *("gemma3", "mixtral", "qwen3_moe", "olmoe"),
    ],
)
def test_hf_export_of_an_imported_model_round_trips(kind: str, sources: dict[str, Path], tmp_path: Path) -> None:
    """export.format hf writes a folder transformers loads with bigmodel's logits; the written folder
    imports back into the same weights (and the same sliding windows, checked on 32 tokens past them)."""
    config = import_config(tmp_path, sources[kind], model={"block_size": 32})  # the source's context is 64
    result = cli(
        "pipeline",
        "-c",
        config,
        "--to",
        "export",
        "--set",
        "export.checkpoint=init",
        "--set",
        "export.format=hf",
        "--json",
        "-q",
    )
    assert result.code == 0, result.stderr
    folder = tmp_path / "run" / "export" / "hf"
    assert result.json()["stages"]["export"]["hf_max_abs_diff"] <= 1e-4
    written = {"llama_tied_scaled": "llama", "phi3": "llama", "mistral_window": "mistral", "gemma3": "gemma3_text"}
    assert result.json()["stages"]["export"]["hf_model_type"] == written.get(kind, kind.removesuffix("_window"))
    assert not (tmp_path / "run" / "export" / "model.onnx").exists()  # format hf writes only the folder
    # the folder keeps the model's own context: block_size 32 is what this run trains and serves at
    assert json.loads((folder / "config.json").read_text())["max_position_embeddings"] == 64
    served = cli("serve", "-c", config)
    assert served.code == 2 and "holds only a Hugging Face folder" in served.stderr
    assert "--set export.format=both" in served.stderr
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert hf_tok("The quick brown fox")["input_ids"] == tokenizers.from_json(
        (folder / "tokenizer.json").read_text()
    ).encode("The quick brown fox")
    assert (
        hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    from bigmodel import pretrained
    from bigmodel.pretrained import build

    again = pretrained.describe(folder)
    assert again.arch.windows == pretrained.describe(sources[kind]).arch.windows
    rebuilt = build.build(again, again.arch)
    original, _ = registry.load_model(tmp_path / "run" / "init" / "model.safetensors")
    for (name, a), (_, b) in zip(original.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), name


def test_hf_export_of_a_native_gpt_is_gpt2_with_zero_biases(tmp_path: Path) -> None:
    from tests.test_lm import lm_config

    config = lm_config(tmp_path, data={"tokenizer": {"kind": "bpe", "vocab_size": 300}}, max_steps=10)
    result = cli("pipeline", "-c", config, "--to", "export", "--set", "export.format=both", "--json", "-q")
    assert result.code == 0, result.stderr
    stages = result.json()["stages"]
    assert stages["export"]["hf_model_type"] == "gpt2" and stages["export"]["hf_max_abs_diff"] <= 1e-4
    assert (tmp_path / "run" / "export" / "model.onnx").exists()


def test_hf_export_refuses_what_transformers_cannot_compute(tmp_path: Path) -> None:
    from tests.test_lm import lm_config

    config = lm_config(tmp_path, max_steps=2)  # a char-level tokenizer
    assert cli("pipeline", "-c", config, "--to", "train", "-q").code == 0
    assert "character-level" in one_line_error(cli("export", "-c", config, "--set", "export.format=hf", "-q"))
    config = lm_config(tmp_path, data={"tokenizer": {"kind": "bpe", "vocab_size": 300}}, max_steps=2)
    overrides = ["--set", "model.position=rope", "--set", "model.norm=layernorm"]
    assert cli("pipeline", "-c", config, "--to", "train", "-q", *overrides).code == 0
    line = one_line_error(cli("export", "-c", config, "--set", "export.format=hf", "-q", *overrides))
    assert "no Hugging Face architecture" in line and "position rope" in line


def test_chat_prompt_is_rendered_as_transformers_renders_it(
    sources: dict[str, Path], imported_llama: Path, tmp_path: Path
) -> None:
    """--chat renders the imported template (in jinja2's sandbox) exactly as transformers does."""
    onnx_path = imported_llama.parent / "run" / "export" / "model.onnx"
    session, meta = open_model(onnx_path, ["CPUExecutionProvider"], 1, DecoderMetadata)
    decoder = Decoder.from_session(session, meta, onnx_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(sources["llama"]))
    assert decoder.chat_prompt(messages) == hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert decoder.eos_ids == {2}
    out = tmp_path / "chat.jsonl"
    (tmp_path / "in.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    result = cli("infer", "-m", onnx_path, "-i", tmp_path / "in.jsonl", "-o", out, "--chat", "-n", "5", "-t", "0")
    assert result.code == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["chat"] and record["prompt"] == messages and 1 <= record["new_tokens"] <= 5
    assert "--chat" in one_line_error(cli("infer", "-m", onnx_path, "-i", tmp_path / "in.jsonl", "-o", out, "-q"))


def test_compress_steps_work_on_an_imported_llama(imported_llama: Path, tmp_path: Path) -> None:
    """Structured MLP pruning of a SwiGLU model removes gate, up and down rows together (at sparsity 0 the
    logits are unchanged); static int8 calibrates on the graph's own cache layout; head pruning of a
    grouped-query model is refused by name. (The compress CLI itself is tested on native GPTs.)"""
    from bigmodel.compress import prune, quantize
    from bigmodel.config import QuantizeStep, load_config
    from bigmodel.errors import UserError

    run = imported_llama.parent / "run"
    model, manifest = registry.load_model(run / "init" / "model.safetensors")
    ids = torch.tensor([tokenizers.from_json(manifest.data.tokenizer).encode("The quick brown fox")])
    with torch.no_grad():
        same, _ = prune.prune_structured(model, manifest, 0.0)
        assert torch.allclose(same(ids)[0], model(ids)[0], atol=1e-6)
        smaller, smaller_manifest = prune.prune_structured(model, manifest, 0.5)
        assert torch.isfinite(smaller(ids)[0]).all()
    arch = smaller_manifest.architecture
    assert arch.mlp_hidden == (24, 24) and arch.original_widths == (48, 48)
    assert (
        smaller.transformer.h[0].mlp.c_gate.weight.shape == smaller.transformer.h[0].mlp.c_fc.weight.shape == (24, 32)
    )
    with pytest.raises(UserError, match="grouped-query attention"):
        prune.prune_heads(model, manifest, 0.5)

    config = load_config(imported_llama)
    int8 = quantize.run(
        QuantizeStep(mode="static", calibration_batches=1),
        config,
        run / "export" / "model.onnx",
        tmp_path / "model.int8.onnx",
    )
    assert ort_greedy(int8, ids[0].tolist(), 4)  # the quantised graph decodes with the n_kv_head cache


def test_serve_chat_completions_speak_the_models_template(imported_llama: Path, tmp_path: Path) -> None:
    """The official OpenAI client's chat call answers what `infer --chat` answers (greedy), streamed or not."""
    import openai

    from tests.test_serve import server

    onnx_path = imported_llama.parent / "run" / "export" / "model.onnx"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
    (tmp_path / "in.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    out = tmp_path / "chat.jsonl"
    assert (
        cli("infer", "-m", onnx_path, "-i", tmp_path / "in.jsonl", "-o", out, "--chat", "-n", "6", "-t", "0").code == 0
    )
    expected = json.loads(out.read_text())
    with server("--model", onnx_path) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        reply = client.chat.completions.create(model="run", messages=messages, max_tokens=6, temperature=0)
        assert reply.choices[0].message.content == expected["completion"]
        assert reply.choices[0].message.role == "assistant"
        assert reply.usage.completion_tokens == expected["new_tokens"]
        assert reply.choices[0].finish_reason == ("stop" if expected["stop_reason"] != "max_new_tokens" else "length")
        chunks = list(
            client.chat.completions.create(
                model="run",
                messages=messages,
                max_tokens=6,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["completion"]
        assert (
            chunks[0].choices[0].delta.role == "assistant"
            and chunks[-1].usage.completion_tokens == expected["new_tokens"]
        )
        # logprobs: each greedy token is the likeliest of its top_logprobs, in OpenAI's chat shape
        scored = client.chat.completions.create(
            model="run", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
        )
        content = scored.choices[0].logprobs.content
        assert scored.choices[0].message.content == expected["completion"]
        assert "".join(t.token for t in content) == expected["completion"] and len(content) <= 6
        for token in content:
            assert len(token.top_logprobs) == 2 and token.logprob == token.top_logprobs[0].logprob <= 0
            assert bytes(token.bytes) == token.token.encode()
