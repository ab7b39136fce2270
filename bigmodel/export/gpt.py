"""Export the GPT as one decoder graph with a KV cache, and gate it on parity with PyTorch.

The graph's inputs, outputs, cache layout and metadata are bigmodel/decoder_graph.py's contract.

The tokenizer, the hyper-parameters, the bigmodel version and the checkpoint's sha256 travel in the
model's metadata: `infer` needs nothing but the .onnx file (and its .data file when weights are stored
as external data).
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel import __version__, console, decoder_graph, registry
from bigmodel import parity as gate
from bigmodel.arch import DecoderArch
from bigmodel.config import Config
from bigmodel.datasets import load_tokens
from bigmodel.decoder_graph import CacheLayout, KVCache
from bigmodel.export.onnx_file import export_dynamo, optimize_offline, publish_or_reject, stamp_and_check
from bigmodel.infer.session import open_model, open_session
from bigmodel.io import sha256_file, write_json
from bigmodel.models.gpt import CausalSelfAttention

TWO_GB = 2 * 1024**3


class DecoderStep(torch.nn.Module):
    """The GPT's forward with the cache as the graph carries it: one keys and one values tensor per layer."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, past_keys: list[torch.Tensor], past_values: list[torch.Tensor],
        left_padding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        logits, present = self.model(input_ids, list(zip(past_keys, past_values)), left_padding)
        return logits, [k for k, _ in present], [v for _, v in present]


def torch_cache(cache: KVCache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [torch.from_numpy(k) for k in cache.keys], [torch.from_numpy(v) for v in cache.values]


def export_checkpoint(config: Config, ckpt: Path, out_dir: Path) -> dict[str, Any]:
    """Export `ckpt` to out_dir/model.onnx through the checker and the parity gate."""
    xc = config.export
    model, manifest = registry.load_model(ckpt)
    model.eval()
    arch = registry.manifest_arch(manifest, ckpt)
    step = DecoderStep(model).eval()  # the fp32 reference of the parity gate, whatever the export's dtype
    traced = DecoderStep(copy.deepcopy(model).half()).eval() if xc.dtype == "fp16" else step
    atol = xc.fp16_atol if xc.dtype == "fp16" else xc.atol
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    external = xc.external_data or weight_bytes > TWO_GB

    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / "model.onnx"
    val_tokens = np.asarray(load_tokens(config, "val"), dtype=np.int64)
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        tmp = Path(work) / "model.onnx"
        _trace(traced, arch, tmp, xc.opset, xc.dtype)
        stamp_and_check(tmp, {
            **decoder_graph.metadata(arch, manifest["data"], xc.dtype),
            "version": __version__,
            "lineage": {"checkpoint": sha256_file(ckpt)},
        }, external_data=external)
        parity = check_parity(step, tmp, val_tokens, arch, (atol, xc.rtol), xc.parity_steps, config.threads, xc.dtype)
        report = {"checkpoint": str(ckpt), "model": str(final), "opset": xc.opset, "dtype": xc.dtype,
                  "external_data": external, **parity}
        write_json(out_dir / "parity.json", report)
        console.info(
            f"export: parity on a {parity['prompt_tokens']}-token prompt + {parity['decode_steps']} decode "
            f"steps (batch {parity['batch']}, held-out text; and left-padded rows of "
            f"{'/'.join(map(str, parity['padded']['prompt_tokens']))} tokens against each alone): max abs logit "
            f"diff {parity['max_abs_diff']:.3g} ({xc.dtype}, {gate.allowed(parity)}) -> "
            f"{'ok' if parity['passed'] else 'FAILED'}"
        )
        publish_or_reject(
            tmp, final, parity["passed"],
            f"export parity failed: max abs logit diff {parity['max_abs_diff']:.3g} > {gate.allowed(parity)} "
            f"(export.atol, export.rtol) at {parity['worst']}",
        )
    outputs: dict[str, Any] = {"model": str(final), "parity_report": str(out_dir / "parity.json"),
                               "max_abs_diff": parity["max_abs_diff"], "passed": True,
                               "external_data": external}
    if xc.optimize:
        optimized = optimize_offline(final, out_dir / "model.optimized.onnx")
        check = check_parity(step, optimized, val_tokens, arch, (atol, xc.rtol), xc.parity_steps, config.threads,
                             xc.dtype)
        outputs["optimized_model"] = str(optimized)
        outputs["optimized_max_abs_diff"] = check["max_abs_diff"]
        console.info(f"export: ORT-optimized graph -> {optimized} (max abs diff {check['max_abs_diff']:.3g})")
    console.info(f"export: {final} ({final.stat().st_size:,} bytes{', weights in model.onnx.data' if external else ''})")
    return outputs


def _trace(step: DecoderStep, arch: DecoderArch, path: Path, opset: int, dtype: str = "fp32") -> None:
    block = arch.block_size
    # Example sizes are arbitrary but distinct and > 1, so none of them is specialised into the graph.
    t_example, p_example = min(3, block - 1), min(2, max(block - 3, 0))
    ids = torch.zeros(2, t_example, dtype=torch.long)
    float_type = torch.float16 if dtype == "fp16" else torch.float32
    keys, values = ([torch.zeros(2, arch.n_kv_head, p_example, arch.head_size, dtype=float_type)
                     for _ in range(arch.n_layer)] for _ in range(2))  # distinct tensors, one per input
    left_padding = torch.zeros(2, dtype=torch.long)
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=block)
    past_len = torch.export.Dim("past", min=0, max=block)
    cache_dims = [{0: batch, 2: past_len}] * arch.n_layer
    with onnx_operators(step, opset >= 23):
        export_dynamo(
            step, (ids, keys, values, left_padding), path,
            list(decoder_graph.input_names(arch.n_layer)), list(decoder_graph.output_names(arch.n_layer)),
            {"input_ids": {0: batch, 1: seq}, "past_keys": cache_dims, "past_values": cache_dims,
             "left_padding": {0: batch}},
            opset,
        )


@contextlib.contextmanager
def onnx_operators(step: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Trace the attention with ONNX's opset-23 operators (RotaryEmbedding, Attention with the cache)
    instead of their PyTorch spelling, then restore it: the parity gate compares the graph against the
    model's own eager attention. Opset 18 has neither operator and keeps the spelled-out graph."""
    layers = [m for m in step.modules() if isinstance(m, CausalSelfAttention)]
    for layer in layers:
        layer.onnx_operators = enabled
    try:
        yield
    finally:
        for layer in layers:
            layer.onnx_operators = False


def held_out_windows(tokens: np.ndarray, batch: int, span: int) -> np.ndarray:
    """(batch, span) evenly spaced windows of held-out tokens for a parity check; tiny val splits are
    repeated (it is only a numeric check)."""
    if len(tokens) < span * batch:
        tokens = np.resize(tokens, span * batch)
    starts = np.linspace(0, len(tokens) - span, batch).astype(np.int64)
    return np.stack([tokens[s : s + span] for s in starts])


def check_parity(
    step: torch.nn.Module, path: Path, tokens: np.ndarray, arch: DecoderArch, tolerance: tuple[float, float],
    decode_steps: int, threads: int | None, dtype: str = "fp32",
) -> dict[str, Any]:
    """Prompt + decode steps on held-out text, through ORT and PyTorch with their own caches; then the
    same with rows of different lengths left-padded into one batch (`padded_parity`). Passes when the
    largest difference is within atol + rtol x the largest |logit| PyTorch gave (`tolerance`)."""
    atol, rtol = tolerance
    session = open_session(path, ["CPUExecutionProvider"], threads)
    block = arch.block_size
    decode_steps = min(decode_steps, block - 1)
    prompt_len = max(1, min(block - decode_steps, 32))
    batch = 2
    windows = held_out_windows(tokens, batch, prompt_len + decode_steps)

    torch_past = torch_cache(CacheLayout.of(arch).empty(batch))
    cache = CacheLayout.of(arch, dtype).empty(batch)
    diffs: list[float] = []
    scale = 0.0  # the largest |logit| of the reference
    for i in range(decode_steps + 1):
        chunk = windows[:, :prompt_len] if i == 0 else windows[:, prompt_len + i - 1 : prompt_len + i]
        logits, cache = decoder_graph.outputs(session.run(None, decoder_graph.feeds(chunk, cache)))
        with torch.no_grad():
            ref_logits, *torch_past = step(torch.from_numpy(chunk), *torch_past)
        diffs.append(float(np.abs(logits.astype(np.float32) - ref_logits.numpy()).max()))
        scale = max(scale, float(ref_logits.abs().max()))
    worst = int(np.argmax(diffs))
    padded = padded_parity(step, session, windows, arch, prompt_len, decode_steps, dtype)
    overall = max(max(diffs), padded["max_abs_diff"])
    return {
        "batch": batch,
        "prompt_tokens": prompt_len,
        "decode_steps": decode_steps,
        "max_abs_diff_per_step": diffs,
        "padded": padded,
        "max_abs_diff": overall,
        "worst": ("the prompt" if worst == 0 else f"decode step {worst}") if max(diffs) >= padded["max_abs_diff"]
        else "the left-padded batch",
        **gate.verdict(overall, scale, atol, rtol),
    }


def padded_parity(step: torch.nn.Module, session: Any, windows: np.ndarray, arch: DecoderArch, prompt_len: int,
                  decode_steps: int, dtype: str = "fp32") -> dict[str, Any]:
    """Rows of different prompt lengths left-padded into one batch and decoded together by the ONNX graph,
    against PyTorch on each row alone without padding: a batched server's numbers are each request's own."""
    lengths = [prompt_len, max(1, prompt_len // 2)]
    pad = np.array([prompt_len - n for n in lengths], dtype=np.int64)
    prompts = np.stack([np.concatenate([np.zeros(p, np.int64), w[prompt_len - n : prompt_len]])
                        for w, p, n in zip(windows, pad, lengths)])
    logits, cache = decoder_graph.outputs(session.run(None, decoder_graph.feeds(
        prompts, CacheLayout.of(arch, dtype).empty(len(lengths)), pad)))
    batched = [logits]  # the prompt's logits, then one (B, 1, V) per decode step
    for i in range(decode_steps):
        logits, cache = decoder_graph.outputs(session.run(None, decoder_graph.feeds(
            windows[:, prompt_len + i : prompt_len + i + 1], cache, pad)))
        batched.append(logits)
    diffs = []
    for row in range(len(lengths)):
        past = torch_cache(CacheLayout.of(arch).empty(1))
        for i, got in enumerate(batched):
            chunk = prompts[row : row + 1, pad[row] :] if i == 0 else windows[row : row + 1, prompt_len + i - 1 : prompt_len + i]
            with torch.no_grad():
                ref_logits, *past = step(torch.from_numpy(chunk), *past)
            real = got[row, pad[row] :] if i == 0 else got[row]
            diffs.append(float(np.abs(real.astype(np.float32) - ref_logits[0].numpy()).max()))
    return {"prompt_tokens": lengths, "max_abs_diff": max(diffs)}


def calibration_feeds(config: Config, model: Path, batches: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Static quantisation's calibration data: decoding as it happens. The fp32 graph reads the first
    half of each training window, and the second half is fed with that real cache (an empty cache
    would give the cache inputs no range). The cache is shaped as `model` says (pruning may change it)."""
    session, meta = open_model(model, ["CPUExecutionProvider"], config.threads, decoder_graph.KIND)
    tokens = load_tokens(config, "train")
    block, batch = int(meta["block_size"]), config.train.batch_size
    half = max(1, block // 2)
    empty = CacheLayout.from_metadata(meta).empty(batch)
    inputs = decoder_graph.session_inputs(session)
    feeds = []
    for _ in range(batches):
        starts = rng.integers(0, len(tokens) - block, size=batch)
        ids = np.stack([tokens[s : s + block] for s in starts]).astype(np.int64)
        _, cache = decoder_graph.outputs(session.run(None, decoder_graph.feeds(ids[:, :half], empty, inputs=inputs)))
        feeds.append(decoder_graph.feeds(ids[:, half:], cache, inputs=inputs))
    return feeds


def latency_feeds(session: Any, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """What compress times: one decode step at batch 1 with a 16-token past."""
    return decoder_graph.feeds(np.zeros((1, 1), np.int64), CacheLayout.from_metadata(meta).empty(1, past=16),
                               inputs=decoder_graph.session_inputs(session))
