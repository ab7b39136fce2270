"""Tiny random Hugging Face models written by transformers itself, for the import tests.

Each is saved with `save_pretrained(safe_serialization=True)` next to a small byte-level BPE tokenizer
(trained here with HF tokenizers) and a tokenizer_config.json with a ChatML template. Weights are drawn
with a large initializer range so that logits are O(1): a wrong rotation or a swapped projection then
moves them far beyond the 1e-4 parity tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

TEXT = (
    "The quick brown fox jumps over the lazy dog. 0123456789 def add(a, b): return a + b\n" * 20
    + "Sphinx of black quartz, judge my vow. Pack my box with five dozen liquor jugs.\n" * 20
)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_tokenizer(folder: Path, vocab_size: int = 300) -> int:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json); returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None, "pad_token": "<|endoftext|>"}
        )
    )
    return tok.get_vocab_size()


def make(kind: str, folder: Path, **overrides: object) -> Path:
    """gpt2, llama (GQA 4/2, untied), llama_tied_scaled (llama3 rope scaling), mistral, mistral_window (a
    sliding window of 8 on every layer), qwen2_window (window 8 on layer 1 only), gemma2 and gemma3 (their
    norms, caps, scales, windows and rotary bases; tied heads), mixtral, qwen3_moe and olmoe (4 experts, 2
    per token), qwen2 (q/k/v bias,
    untied head), qwen3 (QK-norm, tied head, and a head size of its own: 128, Qwen3Config's default, which is
    what transformers' GGUF reader assumes), phi3 (q/k/v and gate/up fused in the file), phi3_partial (rope
    on 6 of each head's 8 values, tied head: Phi-4-mini's options)."""
    import transformers

    vocab = write_tokenizer(folder) + 12  # a model vocabulary larger than the tokenizer's, as real ones often are
    common = {"vocab_size": vocab, "initializer_range": 0.3, "eos_token_id": 2, "bos_token_id": None}
    llama_shape = {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
    }
    configs = {
        "gpt2": lambda: transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, **common),
        "llama": lambda: transformers.LlamaConfig(**llama_shape, rope_theta=500.0, tie_word_embeddings=False, **common),
        "llama_tied_scaled": lambda: transformers.LlamaConfig(
            **llama_shape,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            **common,
        ),
        "mistral": lambda: transformers.MistralConfig(
            **llama_shape, sliding_window=4096, head_dim=16, tie_word_embeddings=False, **common
        ),
        "mistral_window": lambda: transformers.MistralConfig(  # a window shorter than the context
            **llama_shape, sliding_window=8, head_dim=16, tie_word_embeddings=False, **common
        ),
        "qwen2": lambda: transformers.Qwen2Config(**llama_shape, tie_word_embeddings=False, **common),
        "qwen2_window": lambda: transformers.Qwen2Config(  # layer 0 global, layer 1 local (window 8)
            **llama_shape,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
            tie_word_embeddings=False,
            **common,
        ),
        "qwen3": lambda: transformers.Qwen3Config(**llama_shape, head_dim=128, tie_word_embeddings=True, **common),
        # Gemma 2: soft caps low enough to bend these scores and logits, its own attention scale and head size,
        # layer 0 local (window 8), layer 1 global
        "gemma2": lambda: transformers.Gemma2Config(
            **llama_shape,
            head_dim=16,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            sliding_window=8,
            **common,
        ),
        # Gemma 3 (text): QK-norm, a local rotary base on the sliding layer, linear scaling on the global one
        "gemma3": lambda: transformers.Gemma3TextConfig(
            **llama_shape,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
            },
            **common,
        ),
        # mixtures of 4 experts, 2 per token: Mixtral renormalises the picked scores, this Qwen3-MoE does not
        "mixtral": lambda: transformers.MixtralConfig(
            **llama_shape, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False, **common
        ),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
            **llama_shape,
            head_dim=16,
            moe_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            tie_word_embeddings=False,
            **common,
        ),
        # OLMoE: QK-norm over all heads at once, the picked scores not renormalised
        "olmoe": lambda: transformers.OlmoeConfig(
            **llama_shape,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            tie_word_embeddings=False,
            **common,
        ),
        "phi3": lambda: transformers.Phi3Config(**llama_shape, tie_word_embeddings=False, pad_token_id=0, **common),
        "phi3_partial": lambda: transformers.Phi3Config(  # Phi-4-mini's partial rotary (its 0.75, of 8 values: 6)
            **llama_shape,
            tie_word_embeddings=True,
            pad_token_id=0,
            **common,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
        ),
    }
    config = configs[kind]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # biases and norm weights away from their 0 / 1 init, so a dropped one shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def imported_run(
    tmp: Path, kind: str, run_dir: str, export: dict[str, Any], stages: tuple[str, ...] = (), **overrides: object
) -> Path:
    """A config importing a tiny random `kind` model (written by transformers; `overrides` of its config)
    over a small Python corpus, with these export settings; `stages` run now (each must succeed). Returns
    the config's path."""
    from tests.conftest import cli, write_config

    source = make(kind, tmp / kind, **overrides)
    (tmp / "corpus.txt").write_text("def add(a, b):\n    return a + b\n" * 20)
    config = write_config(
        tmp / f"{run_dir}.yaml",
        {
            "seed": 0,
            "threads": 1,
            "run_dir": run_dir,
            "data": {"format": "text", "path": "corpus.txt"},
            "init": {"from": str(source)},
            "export": {"checkpoint": "init", **export},
        },
    )
    for stage in stages:
        result = cli(stage, "-c", config, "-q")
        assert result.code == 0, f"{stage}: {result.stderr}"
    return config


def write_gguf(folder: Path, path: Path, dtypes: dict[str, Any] | None = None) -> Path:
    """A llama.cpp-style GGUF file (F32 tensors) of a llama, qwen2, qwen3, phi3, qwen3_moe, gemma2 or gemma3_text
    folder `folder`, written with the `gguf` package as llama.cpp's converter writes it: its names, a llama's
    q/k rows permuted for its RoPE layout, Gemma's norms as 1 + w, a mixture's experts stacked, and the
    tokenizer as vocabulary + merges + token types. `dtypes`: a tensor's numpy type
    other than float32, or a K-quant type (Q4_K, Q5_K, Q6_K: random blocks in place of its values), by its
    GGUF name."""
    import gguf
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    spec = json.loads((folder / "tokenizer.json").read_text())
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    # llama, qwen2, qwen3 or phi3: llama.cpp's architecture names too; qwen3_moe is its qwen3moe
    architecture = {"qwen3_moe": "qwen3moe", "gemma3_text": "gemma3"}.get(config["model_type"], config["model_type"])
    gemma = architecture.startswith("gemma")
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    experts = config.get("num_experts") or config.get("num_local_experts") or 0
    if experts:  # (stacked per layer below, as llama.cpp's converter writes them)
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    rope = config["rope_parameters"]
    writer.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])  # (gemma3's: the global layers')
    if gemma:  # what llama.cpp's Gemma converters write beside the common keys
        writer.add_sliding_window(config["sliding_window"])
        if config.get("attn_logit_softcapping"):
            writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    factor = config["rope_parameters"].get("partial_rotary_factor", 1.0)  # (phi3: llama.cpp's n_rot)
    writer.add_rope_dimension_count(int(head_dim * factor))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    tokens += [f"<unused{i}>" for i in range(config["vocab_size"] - len(tokens))]  # the model's padded rows
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_eos_token_id(2)
    if config.get("pad_token_id") is not None:  # (transformers' Phi3Config otherwise pads with id 32000)
        writer.add_pad_token_id(config["pad_token_id"])
    writer.add_chat_template(CHATML)

    def permute(weight: torch.Tensor, heads: int) -> torch.Tensor:  # llama.cpp's convert_hf_to_gguf
        return (
            weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape)
        )

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "self_attn.qkv_proj": "attn_qkv",  # phi3's fused projections, kept fused as llama.cpp does
        "mlp.gate_up_proj": "ffn_up",
        "mlp.gate": "ffn_gate_inp",  # a mixture's router
    }
    stacked = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
    tensors = load_file(str(folder / "model.safetensors"))
    for name in [n for n in tensors if ".mlp.experts.0." in n]:  # experts x rows x columns, one per projection
        index, projection = name.removeprefix("model.layers.").split(".")[0], name.split(".")[-2]
        parts = [tensors.pop(name.replace(".experts.0.", f".experts.{e}.")) for e in range(experts)]
        tensors[f"model.layers.{index}.{stacked[projection]}.weight"] = torch.stack(parts)
    if gemma:  # Gemma's sandwich norms; its pre-MLP norm is llama.cpp's ffn_norm
        layer.update(
            post_attention_layernorm="post_attention_norm",
            pre_feedforward_layernorm="ffn_norm",
            post_feedforward_layernorm="post_ffw_norm",
        )
        tensors.pop("lm_head.weight", None)  # (tied: llama.cpp's converter leaves it out)
    for name, tensor in tensors.items():
        if gemma and name.endswith("norm.weight"):  # llama.cpp stores Gemma's (1 + w) norm weights with the 1
            tensor = tensor + 1
        if name.endswith("_exps.weight"):
            gguf_name = name.replace("model.layers.", "blk.")
        elif name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            module, _, kind = rest.rpartition(".")
            if architecture == "llama" and module == "self_attn.q_proj":  # (qwen's are written unpermuted)
                tensor = permute(tensor, n_head)
            elif architecture == "llama" and module == "self_attn.k_proj":
                tensor = permute(tensor, n_kv)
            gguf_name = f"blk.{index}.{layer[module]}.{kind}"
        else:
            gguf_name = names[name]
        kind = (dtypes or {}).get(gguf_name, np.float32)
        if isinstance(kind, gguf.GGMLQuantizationType):  # blocks of that type, at random (see k_quant_blocks)
            blocks = k_quant_blocks(kind, tensor.numel(), tensor.shape[0]).reshape(*tensor.shape[:-1], -1)
            writer.add_tensor(gguf_name, blocks, raw_dtype=kind)  # (stacked experts: experts x rows x bytes)
        else:
            writer.add_tensor(gguf_name, tensor.float().numpy().astype(kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_wordpiece(folder: Path, vocab_size: int = 200) -> int:
    """A BERT-style WordPiece tokenizer.json ([CLS] text [SEP], lower-cased); returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        [TEXT],
        trainer=trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS, show_progress=False),
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    # As sentence-transformers ships them (all-MiniLM-L6-v2: every text padded to 128, cut at 128): what
    # bigmodel must not inherit.
    tok.enable_padding(length=64, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=64)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "BertTokenizer",
                "pad_token": "[PAD]",
                "cls_token": "[CLS]",
                "sep_token": "[SEP]",
                "mask_token": "[MASK]",
                "unk_token": "[UNK]",
                "do_lower_case": True,
            }
        )
    )
    return tok.get_vocab_size()


def make_bert(folder: Path, head: str = "none", labels: int = 3) -> Path:
    """A tiny random BERT saved by transformers: head none (BertModel), mlm (BertForMaskedLM) or
    classifier (BertForSequenceClassification with `labels` labels)."""
    import transformers

    vocab = write_wordpiece(folder)
    config = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        initializer_range=0.3,
        pad_token_id=0,
        num_labels=labels,
    )
    classes = {
        "none": transformers.BertModel,
        "mlm": transformers.BertForMaskedLM,
        "classifier": transformers.BertForSequenceClassification,
    }
    torch.manual_seed(0)
    model = classes[head](config)
    with torch.no_grad():  # biases and LayerNorms away from their 0 / 1 init, so a dropped one shows
        for name, param in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def k_quant_blocks(kind: object, values: int, rows: int) -> np.ndarray:
    """(rows, bytes per row) uint8: random blocks of a K-quant type (256 values each) whose f16 scales are
    small and finite, as a real file's are. The gguf package dequantises K-quants but cannot make them, so
    the quants and sub-block scales are random bytes; what is tested is that a file of such blocks imports
    to exactly what gguf dequantises, and to what transformers reads from it."""
    import gguf

    per_block, size = gguf.GGML_QUANT_SIZES[kind]
    blocks = np.random.default_rng(0).integers(0, 256, size=(values // per_block, size), dtype=np.uint8)
    scale = np.array([2e-4, 1e-4], np.float16).view(np.uint8)  # d, dmin
    if kind == gguf.GGMLQuantizationType.Q6_K:  # d last, after ql, qh and int8 sub-block scales
        blocks[:, -2:] = np.array([3e-5], np.float16).view(np.uint8)
    else:  # Q4_K, Q5_K: d and dmin first
        blocks[:, :4] = scale
    return blocks.reshape(rows, -1)
