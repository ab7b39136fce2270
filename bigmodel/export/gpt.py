"""Export the GPT as one decoder graph with a KV cache, written weight by weight, and gate it.

The graph's inputs, outputs, cache layout and metadata are bigmodel/decoder_graph.py's contract.

The graph is traced from the model built on the meta device (export/weightless.py): no weights are in
memory while the exporter runs. The weights are then read from the checkpoint one tensor at a time and
written into the external-data file -- as they are (fp32, fp16), or quantised to int4 blocks as each
matrix is written (dtype int4). The parity gate compares ONNX Runtime with the PyTorch model in fp32,
computed one layer at a time (`reference_logits`): every decode step of every sequence the gate checks
passes through layer i before layer i+1 is loaded, so the weights are read once and the gate holds one
layer. A small model's file is then made one self-contained .onnx (export.external_data: false).

The tokenizer, the hyper-parameters, the bigmodel version and the checkpoint's sha256 travel in the
model's metadata: `infer` needs nothing but the .onnx file (and its .data file when weights are stored
as external data).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch

from bigmodel import console, decoder_graph, memory, registry, streaming
from bigmodel import parity as gate
from bigmodel.arch import DecoderArch
from bigmodel.background import Background
from bigmodel.config import Config, Int4Export
from bigmodel.datasets import load_tokens
from bigmodel.decoder_graph import CacheLayout
from bigmodel.errors import UserError
from bigmodel.export.fusion import fuse_skip_norms
from bigmodel.export.onnx_file import optimize_offline, output_head, publish_or_reject, stamp
from bigmodel.export.weightless import GATHER, GraphWeights, Initializers, dequantize, int8_block, trace
from bigmodel.infer.session import open_model, open_session
from bigmodel.io import sha256_file, write_json
from bigmodel.manifests import DecoderMetadata
from bigmodel.models.gpt import GPT, CausalSelfAttention, GroupQueryInputs, MixtureOfExperts, rope_cos_sin
from bigmodel.runtime import peak_rss_bytes
from bigmodel.weights import check_free_space

INLINE_LIMIT = 256 * 2**20  # weights up to this many bytes go into the .onnx itself (one file to copy)
FLOAT_TYPES = {"fp32": torch.float32, "fp16": torch.float16, "int4": torch.float32}
BITS = {"int4": 4, "int8": 8, "fp32": None}
# A quantised matrix's RMS rounding error over its RMS: ~0.08-0.12 for 4-bit blocks of 32, ~0.005 for 8-bit;
# blocks that do not stand for their matrix (a wrong layout, another matrix) give ~1 or more.
MAX_ROUNDING = 0.35


class DecoderStep(torch.nn.Module):
    """The GPT's forward with the cache as the graph carries it: one keys and one values tensor per layer."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        past_keys: list[torch.Tensor],
        past_values: list[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        logits, present = self.model(input_ids, list(zip(past_keys, past_values)), attention_mask=attention_mask)
        return logits, [k for k, _ in present], [v for _, v in present]


ROTARY_TABLES = ("rotary_cos", "rotary_sin")  # GroupQueryStep's tables: weights computed, not read


class GroupQueryStep(DecoderStep):
    """The step with every layer's attention one com.microsoft GroupQueryAttention node (export.attention
    ort): the same inputs and outputs, rows padded on the right (bigmodel/decoder_graph.py). The node reads
    each row's length (the attention mask's sum, minus one) and the mask's width, and rotates with tables
    of every position up to block_size, written into the file like weights (`rotary_tables`)."""

    model: GPT

    def __init__(self, model: GPT) -> None:
        super().__init__(model)
        arch = model.arch
        if arch.position == "rope":  # (on the meta device with the model: values only when written)
            for name in ROTARY_TABLES:
                self.register_buffer(
                    name, torch.empty(arch.block_size, arch.rope_dim // 2, dtype=model.lm_head.weight.dtype)
                )

    def forward(
        self,
        input_ids: torch.Tensor,
        past_keys: list[torch.Tensor],
        past_values: list[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        assert attention_mask is not None  # (the graph always takes it)
        inputs = GroupQueryInputs(
            seqlens_k=attention_mask.sum(1, dtype=torch.int32) - 1,
            total=torch.ones_like(attention_mask[0], dtype=torch.int32).sum(dtype=torch.int32),
            cos=getattr(self, "rotary_cos", None),
            sin=getattr(self, "rotary_sin", None),
        )
        blocks = self.model.layers()
        for block in blocks:
            block.attn.group_query = dataclasses.replace(inputs, window=block.window)
        try:
            return super().forward(input_ids, past_keys, past_values, attention_mask)
        finally:
            for block in blocks:
                block.attn.group_query = None


def rotary_tables(arch: DecoderArch) -> dict[str, torch.Tensor]:
    """GroupQueryAttention's cos and sin caches (block_size, r/2) in fp32: the model's own tables of
    positions 0 .. block_size - 1 (its rope scaling included), one half of the rotate-half layout."""
    cos, sin = rope_cos_sin(arch, torch.arange(arch.block_size))
    half = arch.rope_dim // 2
    return dict(zip(ROTARY_TABLES, (cos[:, :half].contiguous(), sin[:, :half].contiguous())))


def attends_group_query(arch: DecoderArch, opset: int, choice: str) -> bool:
    """Whether the graph attends with ONNX Runtime's GroupQueryAttention (export.attention): `ort` asks for
    it (an error where it cannot compute this model), `auto` takes it where it can, `onnx` never."""
    if choice == "onnx":
        return False
    cannot = [
        *(["opset 18 (no in-graph attention operators)"] if opset < 23 else []),
        *([f"head size {arch.head_size} (it takes multiples of 16)"] if arch.head_size % 16 else []),
        *(["a rotary base of the local layers' own"] if arch.local_rope_theta else []),
        *(
            [f"rotary on {arch.rope_dim} values per head (it takes multiples of 16)"]
            if arch.position == "rope" and arch.rope_dim % 16
            else []
        ),
    ]
    if cannot and choice == "ort":
        raise UserError(
            f"export.attention ort: ONNX Runtime's GroupQueryAttention cannot compute this model ({'; '.join(cannot)}); "
            "set export.attention to auto or onnx"
        )
    return not cannot


def export_checkpoint(config: Config, ckpt: Path, out_dir: Path) -> dict[str, Any]:
    """Export `ckpt` to out_dir/model.onnx through the checker and the parity gate."""
    xc = config.export
    memory.map_large_allocations()
    start = time.perf_counter()
    checkpoint_sha256 = Background(lambda: sha256_file(ckpt))  # for the lineage: hashed while the graph is traced
    weights, manifest = registry.open_weights(ckpt)
    arch = manifest.architecture
    if not isinstance(arch, DecoderArch):
        raise UserError(f"{ckpt} holds a {arch.family} model, not a decoder")
    if xc.experts != "routed" and not arch.n_experts:
        raise UserError(
            f"export.experts {xc.experts!r} applies to a mixture of experts; {ckpt} holds a dense model: remove it"
        )
    group_query = attends_group_query(arch, xc.opset, xc.attention)  # (refused before anything is written)
    attention: Literal["onnx", "group_query"] = "group_query" if group_query else "onnx"
    with torch.device("meta"):
        parameters = sum(p.numel() for p in GPT(arch).parameters())
    stored = manifest.stored_dtype
    memory.guard(memory.export_peak(arch, parameters, stored, xc.dtype, xc.int4, group_query), config.memory_limit)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_free_space(
        out_dir,
        int(1.1 * memory.export_file_bytes(arch, parameters, xc.dtype, xc.int4, group_query)),
        "export",
    )
    final = out_dir / "model.onnx"
    val_tokens = np.asarray(load_tokens(config, "val"), dtype=np.int64)

    def run_gate(path: Path, blocks: Blocks | None) -> dict[str, Any]:
        return check_parity(
            weights,
            path,
            val_tokens,
            arch,
            _tolerance(xc),
            xc.parity_steps,
            config.threads,
            xc.dtype,
            blocks,
            group_query,
        )

    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        tmp = Path(work) / "model.onnx"
        written = write_decoder(
            arch,
            weights,
            tmp,
            xc.opset,
            xc.dtype,
            xc.int4,
            lambda: decoder_graph.metadata(
                arch,
                manifest.data,
                "fp16" if xc.dtype == "fp16" else "fp32",
                weights=weight_format(xc.dtype, xc.int4, arch.n_embd),
                lineage={"checkpoint": checkpoint_sha256.result()},
                attention=attention,
            ),
            routed=xc.experts == "routed",
            group_query=group_query,
        )
        external = xc.external_data or written["weight_bytes"] > INLINE_LIMIT
        if not external:
            onnx.save(onnx.load(str(tmp)), str(tmp))  # a small model: one self-contained file
            tmp.with_name(f"{tmp.name}.data").unlink()
        onnx.checker.check_model(str(tmp), full_check=True)
        seconds = time.perf_counter() - start
        layout = written.pop("layout")
        blocks = Blocks(layout, Initializers(tmp)) if xc.dtype == "int4" else None
        parity = run_gate(tmp, blocks)
        report = {
            "checkpoint": str(ckpt),
            "model": str(final),
            "opset": xc.opset,
            "attention": attention,
            "dtype": xc.dtype,
            "weights": weight_format(xc.dtype, xc.int4, arch.n_embd),
            "external_data": external,
            **written,
            **parity,
            "seconds": round(seconds, 2),
            "gate_seconds": round(time.perf_counter() - start - seconds, 2),
            "peak_rss_bytes": peak_rss_bytes(),
        }
        write_json(out_dir / "parity.json", report)
        console.info(f"export: {gate_line(parity, xc.dtype)} -> {'ok' if parity['passed'] else 'FAILED'}")
        publish_or_reject(
            tmp,
            final,
            parity["passed"],
            f"export parity failed: {gate_line(parity, xc.dtype)} ({_knobs(xc.dtype)}) at {parity['worst']}",
        )
    outputs: dict[str, Any] = {
        "model": str(final),
        "parity_report": str(out_dir / "parity.json"),
        "max_abs_diff": parity["max_abs_diff"],
        "passed": True,
        "external_data": external,
        "weights": report["weights"],
        "seconds": report["seconds"],
        "gate_seconds": report["gate_seconds"],
        "peak_rss_bytes": report["peak_rss_bytes"],
    }
    if xc.dtype == "int4":
        outputs.update(relative_error=parity["relative_error"], against_fp32=parity["against_fp32"])
    if "experts" in report:  # a mixture: routed (ONNX Runtime's MoE node) or dense
        outputs["experts"] = report["experts"]
    if xc.optimize:
        optimized = optimize_offline(final, out_dir / "model.optimized.onnx")
        if blocks is not None:  # the published file's blocks (the optimised graph may store them otherwise)
            blocks = Blocks(blocks.layout, Initializers(final))
        check = run_gate(optimized, blocks)
        outputs["optimized_model"] = str(optimized)
        outputs["optimized_max_abs_diff"] = check["max_abs_diff"]
        console.info(f"export: ORT-optimized graph -> {optimized} (max abs diff {check['max_abs_diff']:.3g})")
    console.info(
        f"export: {final} ({memory.onnx_file_bytes(final):,} bytes{', weights in model.onnx.data' if external else ''}; "
        f"{report['seconds']:.1f} s + gate {report['gate_seconds']:.1f} s, peak RSS "
        f"{(report['peak_rss_bytes'] or 0) / 2**20:,.0f} MiB)"
    )
    return outputs


def weight_format(dtype: str, int4: Int4Export, width: int) -> str:
    if dtype != "int4":
        return dtype
    wide = f" in blocks of {int8_block(width, int4.int8_block_size)}"
    return (
        f"int4 (block {int4.block_size}, head {int4.head}{wide if int4.head == 'int8' else ''}, embeddings "
        f"{int4.embedding_format}{wide if int4.embedding_format == 'int8' else ''}, accuracy level "
        f"{int4.accuracy_level or 0})"
    )


def _tolerance(xc: Any) -> tuple[float, float]:
    if xc.dtype == "fp16":
        return xc.fp16_atol, xc.rtol
    if xc.dtype == "int4":
        return xc.int4_max_error, 0.0
    return xc.atol, xc.rtol


def _knobs(dtype: str) -> str:
    return {
        "fp32": "export.atol, export.rtol",
        "fp16": "export.fp16_atol, export.rtol",
        "int4": "export.int4_max_error",
    }[dtype]


def gate_line(parity: dict[str, Any], dtype: str) -> str:
    """The gate's measure in words: the max abs logit difference (fp32, fp16); for int4, the relative error
    against the model its blocks hold, then its distance from the fp32 model (relative error, top-1
    agreement, held-out loss)."""
    where = (
        f"parity on a {parity['prompt_tokens']}-token prompt + {parity['decode_steps']} decode steps (batch "
        f"{parity['batch']}, held-out text; and {parity['padded'].get('side', 'left')}-padded rows of "
        f"{'/'.join(map(str, parity['padded']['prompt_tokens']))} tokens against each alone)"
    )
    if dtype == "int4":
        fp32 = parity["against_fp32"]
        return (
            f"{where} against the model its int4 blocks hold: relative logit error {parity['relative_error']:.4f} "
            f"(limit {parity['tolerance']:g}); against the fp32 model: relative error {fp32['relative_error']:.3f}, "
            f"top-1 agreement {fp32['top1_agreement']:.3f}, held-out loss {fp32['nll']:.4f} vs {fp32['nll_fp32']:.4f}"
        )
    return f"{where}: max abs logit diff {parity['max_abs_diff']:.3g} ({dtype}, {gate.allowed(parity)})"


def write_decoder(
    arch: DecoderArch,
    weights: streaming.Readable,
    path: Path,
    opset: int,
    dtype: str = "fp32",
    int4: Int4Export | None = None,
    metadata: Callable[[], DecoderMetadata] | None = None,
    repeat_layers: bool = True,
    routed: bool = True,
    group_query: bool = False,
) -> dict[str, Any]:
    """The decoder graph of `arch` at `path` (+ `path.data`), its weights read from `weights` (names as a
    checkpoint stores them, 'model.<parameter>') one at a time; returns what was written. `repeat_layers`:
    trace two layers and repeat the second (False: trace every layer). `routed`: a mixture of experts' layers
    as ONNX Runtime's MoE operator where it computes them (SwiGLU experts), else as the dense graph.
    `group_query`: attend with ONNX Runtime's GroupQueryAttention (`GroupQueryStep`). `metadata` is asked
    for once the graph is traced (the checkpoint's hash, in its lineage, is computed meanwhile)."""
    float_type = FLOAT_TYPES[dtype]
    settings = int4 or Int4Export()
    routed_block = expert_block(arch, settings.block_size) if dtype == "int4" else settings.block_size
    if routed and arch.n_experts and (arch.mlp != "swiglu" or routed_block is None):
        reason = "ONNX Runtime's MoE takes SwiGLU experts" if arch.mlp != "swiglu" else "QMoE needs whole blocks of 16"
        console.info(
            f"export: the experts are written dense ({reason}; widths {arch.n_embd} and {max(arch.mlp_hidden)})"
        )
        routed = False
    routed = routed and arch.n_experts > 0
    kind = GroupQueryStep if group_query else DecoderStep
    with torch.device("meta"):
        step = kind(GPT(arch).to(float_type)).eval()
    aliases = {name: names for names in streaming.aliases_of(step).values() for name in names}
    graph, traced = (
        _trace(step, arch, opset, float_type, routed)
        if repeat_layers
        else _trace_all(step, arch, opset, float_type, routed)
    )
    for node in graph.graph.node:  # the exporter's module scopes were for repeat_layers only
        del node.metadata_props[:]
    fused = fuse_skip_norms(graph.graph) if group_query else 0  # (an ONNX Runtime graph already)
    fetch = streaming.fetch_from(weights)
    computed = rotary_tables(arch) if group_query and arch.position == "rope" else {}

    def read(name: str) -> torch.Tensor:  # in the checkpoint's dtype: converted once it is laid out
        if name in computed:
            return computed[name]
        if name.endswith(ROUTED_WEIGHTS):
            return routed_experts_weight(fetch, name, arch.n_experts)
        return fetch(aliases.get(name, [name]))

    plan = GraphWeights(graph, traced, read, float_type)
    plan.fold_transposes()
    # A GroupQueryAttention graph keeps a SwiGLU's gate and up apart: on a 1B Llama's int4 decode step the
    # merged product and its Split measured 2.1-2.6% slower than two products in two interleaved runs
    # (docs/big-models.md), where the ONNX Attention graph saw no difference.
    merged = 0 if group_query else plan.merge_shared_input_matmuls()
    counts: dict[str, int] = {}
    if dtype == "int4":  # (the table is then blocks, which the lookup and the head read alike)
        block_sizes = {4: settings.block_size, 8: int8_block(arch.n_embd, settings.int8_block_size)}
        counts = plan.quantize(
            4,
            block_sizes,
            settings.accuracy_level,
            output_head(graph),
            BITS[settings.head],
            BITS[settings.embedding_format],
        )
        if routed and routed_block is not None:
            counts["experts"] = plan.quantize_experts(4, routed_block, settings.accuracy_level, expert_rows(arch))
    else:
        plan.gather_from_transposed()
    stamp(graph, None if metadata is None else metadata())
    weight_bytes = plan.write(path)
    written = {
        "weight_bytes": weight_bytes,
        "merged_matmuls": merged,
        "fused_norms": fused,
        "quantized": counts,
        "layout": plan.layout,
    }
    return {**written, "experts": "routed" if routed else "dense"} if arch.n_experts else written


# The routed experts' weights as ONNX Runtime's MoE operator reads them (models/gpt.py, route_for_onnx)
ROUTED_WEIGHTS = (".mlp.experts_gate_up", ".mlp.experts_down")


def routed_experts_weight(fetch: streaming.Fetch, name: str, n_experts: int) -> torch.Tensor:
    """A layer's experts stacked as the MoE operator reads them, from the checkpoint's expert matrices:
    `experts_gate_up` (E, 2 I, C) with each expert's gate and up rows interleaved (g0, u0, g1, u1, ...),
    `experts_down` (E, C, I). One layer's experts in memory at a time."""
    module, _, kind = name.rpartition(".")
    parts = ["c_proj"] if kind == "experts_down" else ["c_gate", "c_fc"]
    stacked: torch.Tensor | None = None  # (E, rows, parts, K), filled in place: one matrix read at a time
    for e in range(n_experts):
        for p, part in enumerate(parts):
            matrix = fetch([f"{module}.experts.{e}.{part}.weight"])
            if stacked is None:
                stacked = matrix.new_empty(n_experts, matrix.shape[0], len(parts), matrix.shape[1])
            stacked[e, :, p] = matrix
    assert stacked is not None
    return stacked.flatten(1, 2)  # gate_up: row i's gate, then its up


def expert_block(arch: DecoderArch, block_size: int) -> int | None:
    """The QMoE block of an int4 mixture: export.int4.block_size, or the widest power of 2 from 16 up that
    divides both inner widths (C and I: QMoE's blocks are whole rows); None: no such block (dense then)."""
    widths = (arch.n_embd, max(arch.mlp_hidden))
    for size in (block_size, *(s for s in (128, 64, 32, 16) if s < block_size)):
        if all(width % size == 0 for width in widths):
            return size
    return None


def expert_rows(arch: DecoderArch) -> dict[str, tuple[int, list[list[str]]]]:
    """Where each expert matrix of the checkpoint is in the routed weights (for the int4 gate's layout):
    stacked weight -> (row step, per expert the checkpoint matrices its rows interleave, in order)."""
    rows: dict[str, tuple[int, list[list[str]]]] = {}
    for layer in range(arch.n_layer):
        module = f"model.transformer.h.{layer}.mlp"
        experts = range(arch.n_experts)
        rows[f"{module}.experts_gate_up"] = (
            2,
            [[f"{module}.experts.{e}.c_gate.weight", f"{module}.experts.{e}.c_fc.weight"] for e in experts],
        )
        rows[f"{module}.experts_down"] = (1, [[f"{module}.experts.{e}.c_proj.weight"] for e in experts])
    return rows


def _trace(
    step: DecoderStep, arch: DecoderArch, opset: int, float_type: torch.dtype, routed: bool = False
) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """The decoder graph, weightless. A deep model of identical layers (widths and windows) is traced with two and the second
    is repeated (`repeat_layers`): the exporter's time grows with the layers traced (~1.5 s each here),
    and 32 identical layers need not be traced 32 times."""
    kinds = {(arch.is_local(layer), arch.window(layer)) for layer in range(arch.n_layer)}
    if arch.n_layer > 2 and len(set(arch.mlp_hidden)) == 1 and len(kinds) == 1:
        local = None if arch.local_layers is None else arch.local_layers[:2]
        short = arch.model_copy(update={"n_layer": 2, "mlp_hidden": arch.mlp_hidden[:2], "local_layers": local})
        with torch.device("meta"):
            two = type(step)(GPT(short).to(float_type)).eval()
        graph, weights = _trace_all(two, short, opset, float_type, routed)
        return repeat_layers(graph, weights, arch.n_layer)
    return _trace_all(step, arch, opset, float_type, routed)


def repeat_layers(
    model: onnx.ModelProto, weights: dict[str, list[int]], n_layer: int
) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """A two-layer decoder graph made n_layer deep: the second layer's nodes (those between the first and
    the last node the exporter scoped to `model.transformer.h.1`) are copied for layers 2.. with their
    weights, cache inputs and outputs and intermediate values renamed; each copy reads the previous
    layer's output where layer 1 reads layer 0's, and what layer 1 reads from elsewhere (the mask, the
    rotary tables, constants) it shares. The final norm then reads the last layer. Checked by every
    export's parity gate, and against a full trace in the tests."""
    graph = model.graph
    nodes = list(graph.node)
    scoped = [i for i, node in enumerate(nodes) if _layer_of(node) == 1]
    first, last = scoped[0], scoped[-1]
    template = nodes[first : last + 1]
    if any(_layer_of(node) not in (1, None) for node in template):
        raise RuntimeError("the traced layers interleave; cannot repeat the second")
    made = {out for node in template for out in node.output}
    chain = nodes[first - 1].output[0]  # layer 0's last node: the hidden state layer 1 reads
    layer_out = template[-1].output[0]
    if not any(chain in node.input for node in template):
        raise RuntimeError("the second layer does not read the first's output; cannot repeat it")

    def renamed(name: str, i: int, previous_out: str) -> str:
        if name == chain:
            return previous_out
        if name.startswith("model.transformer.h.1."):
            return f"model.transformer.h.{i}." + name.removeprefix("model.transformer.h.1.")
        for kind in ("past_keys", "past_values", "present_keys", "present_values"):
            if name == f"{kind}.1":
                return f"{kind}.{i}"
        return f"{name}__layer{i}" if name in made else name

    copies, previous_out = [], layer_out
    for i in range(2, n_layer):
        for node in template:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{node.name}__layer{i}"
            copy.input[:] = [renamed(name, i, previous_out) if name else name for name in node.input]
            copy.output[:] = [renamed(name, i, previous_out) for name in node.output]
            copies.append(copy)
        previous_out = f"{layer_out}__layer{i}"
    for node in nodes[last + 1 :]:  # the final norm reads the last layer
        node.input[:] = [previous_out if name == layer_out else name for name in node.input]
    del graph.node[:]
    graph.node.extend([*nodes[: last + 1], *copies, *nodes[last + 1 :]])
    _repeat_io(graph.input, "past", n_layer)
    _repeat_io(graph.output, "present", n_layer)
    layer_weights = {name: dims for name, dims in weights.items() if name.startswith("model.transformer.h.1.")}
    for i in range(2, n_layer):
        weights.update(
            {
                f"model.transformer.h.{i}." + name.removeprefix("model.transformer.h.1."): dims
                for name, dims in layer_weights.items()
            }
        )
    return model, weights


def _layer_of(node: onnx.NodeProto) -> int | None:
    """The transformer block the exporter scoped a node to, or None (outside any block, or unscoped)."""
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
    found = [int(part) for part in re.findall(r"'model\.transformer\.h\.(\d+)'", scopes)]
    return found[0] if found else None


def _repeat_io(values: Any, kind: str, n_layer: int) -> None:
    """Graph inputs (past_*) or outputs (present_*) for every layer, in decoder_graph's order."""
    by_name = {value.name: value for value in values}
    ordered = []
    for name in [value.name for value in values]:
        if not name.startswith(f"{kind}_"):
            ordered.append(by_name[name])
        elif name.endswith(".0"):
            base = name.removesuffix(".0")
            for i in range(n_layer):
                value = onnx.ValueInfoProto()
                value.CopyFrom(by_name[f"{base}.{min(i, 1)}"])
                value.name = f"{base}.{i}"
                ordered.append(value)
    del values[:]
    values.extend(ordered)


def _trace_all(
    step: DecoderStep, arch: DecoderArch, opset: int, float_type: torch.dtype, routed: bool = False
) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    block = arch.block_size
    # Example sizes are arbitrary but distinct and > 1, so none of them is specialised into the graph.
    t_example, p_example = min(3, block - 1), min(2, max(block - 3, 0))
    with torch.device("meta"):  # inputs where the weights are: nothing in the trace has a value
        ids = torch.zeros(2, t_example, dtype=torch.long)
        keys, values = (
            [torch.zeros(2, arch.n_kv_head, p_example, arch.head_size, dtype=float_type) for _ in range(arch.n_layer)]
            for _ in range(2)
        )  # distinct tensors, one per input
        attention_mask = torch.ones(2, p_example + t_example, dtype=torch.long)
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=block)
    past_len = torch.export.Dim("past", min=0, max=block - 1)  # (and at least one new token)
    cache_dims = [{0: batch, 2: past_len}] * arch.n_layer
    with onnx_operators(step, opset >= 23), routed_experts(step, routed):
        graph, weights = trace(
            step,
            (ids, keys, values, attention_mask),
            list(decoder_graph.input_names(arch.n_layer)),
            list(decoder_graph.output_names(arch.n_layer)),
            {
                "input_ids": {0: batch, 1: seq},
                "past_keys": cache_dims,
                "past_values": cache_dims,
                "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},  # (past + seq)
            },
            opset,
        )
    mask = next(value for value in graph.graph.input if value.name == "attention_mask")
    mask.type.tensor_type.shape.dim[1].dim_param = "past+seq"  # (the exporter's name for it is a serial number)
    if isinstance(step, GroupQueryStep):  # bound as both past and present, a present is the past's buffer
        for value in graph.graph.output:
            if value.name.startswith("present_"):
                value.type.tensor_type.shape.dim[2].dim_param = "present"
    return graph, weights


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


@contextlib.contextmanager
def routed_experts(step: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Trace each mixture of experts as ONNX Runtime's routed MoE node (MixtureOfExperts.route_for_onnx),
    then restore the dense form."""
    mixtures = [m for m in step.modules() if isinstance(m, MixtureOfExperts)] if enabled else []
    for mixture in mixtures:
        mixture.route_for_onnx(True)
    try:
        yield
    finally:
        for mixture in mixtures:
            mixture.route_for_onnx(False)


def held_out_windows(tokens: np.ndarray, batch: int, span: int) -> np.ndarray:
    """(batch, span) evenly spaced windows of held-out tokens for a parity check; tiny val splits are
    repeated (it is only a numeric check)."""
    if len(tokens) < span * batch:
        tokens = np.resize(tokens, span * batch)
    starts = np.linspace(0, len(tokens) - span, batch).astype(np.int64)
    return np.stack([tokens[s : s + span] for s in starts])


@dataclass
class Sequence:
    """Token chunks fed one after another with a growing cache (the prompt, then one token per decode
    step), optionally padded rows: `padding` positions per row, in front (or at the end: `right_padded`)."""

    chunks: list[np.ndarray]  # each (B, T)
    padding: np.ndarray | None = None
    right_padded: bool = False


@dataclass
class Blocks:
    """Where an int4 file keeps each quantised matrix (GraphWeights.layout), and its initializers: the model
    the file holds, for the gate to compute with."""

    layout: dict[str, dict[str, Any]]
    initializers: Initializers
    weight_errors: dict[str, float] = field(default_factory=dict)  # per matrix: RMS(rounding) / RMS(weight)
    _recent: dict[str, np.ndarray] = field(default_factory=dict)

    def apply(self, module: torch.nn.Module, names: list[str]) -> None:
        """Replace the module's loaded fp32 weight by what the file's blocks hold (when it has blocks): a
        Linear's from its MatMulNBits, an Embedding's from its GatherBlockQuantized."""
        role = GATHER if isinstance(module, torch.nn.Embedding) else ""
        where = next((self.layout[name + role] for name in names if name + role in self.layout), None)
        if where is None:
            return
        step = where.get("row_step", 1)  # (a routed mixture's gate and up rows alternate)
        rows = slice(where["first_row"], where["first_row"] + where["rows"] * step, step)
        blocks, scales = self._read(where["blocks"]), self._read(where["scales"])
        if "expert" in where:  # QMoE's blocks: (E, N, K bits/8), one expert's matrices at a time
            blocks, scales = blocks[where["expert"]], scales[where["expert"]]
        blocks, scales = blocks[rows], scales[rows]
        weight = module.get_parameter("weight").data
        total, error = float(torch.linalg.vector_norm(weight)) ** 2, 0.0
        # In place, a band of rows at a time: no second copy of a vocabulary-sized table, and bands of ~1 MB
        # stay in cache between dequantising, comparing and copying (~15% faster than 1024-row bands).
        band = max(16, 2**18 // weight.shape[1])
        for start in range(0, weight.shape[0], band):
            part = slice(start, start + band)
            held = dequantize(blocks[part], scales[part], where["bits"], where["block_size"], where["K"])
            exact = weight[part]
            error += float(torch.linalg.vector_norm(exact.sub_(held))) ** 2  # (norms allocate nothing)
            exact.copy_(held)
        self.weight_errors[names[0]] = (error / total) ** 0.5 if total else 0.0

    def _read(self, name: str) -> np.ndarray:
        """An initializer, the last four read kept: a routed layer's experts read their gate and up rows from
        one stacked tensor's blocks and scales and their down rows from another's, expert after expert."""
        if name not in self._recent:
            self._recent = {**dict(list(self._recent.items())[-3:]), name: self.initializers.read(name)}
        return self._recent[name]


def reference_logits(
    weights: streaming.Readable,
    arch: DecoderArch,
    sequences: dict[str, list[Sequence]],
    blocks: Blocks | None = None,
) -> dict[str, list[list[np.ndarray]]]:
    """The PyTorch model's fp32 logits for every chunk of every sequence of `sequences["fp32"]`, computed
    layer by layer: the embeddings of all chunks, then layer 0 over every sequence (its own cache per
    sequence), then layer 1, ..., then the head -- each layer's weights loaded once, in fp32, and dropped
    before the next. With `blocks` (an int4 file's), the same pass also computes the model the file holds
    on `sequences["int4"]`: each loaded matrix replaced by the file's own blocks, dequantised -- the graph
    is checked against exactly what it should compute, and the fp32 numbers measure what the rounding
    costs (each variant runs only the sequences asked of it: every sequence costs a pass over the model)."""
    with torch.device("meta"):
        model = GPT(arch).eval()
    fetch = streaming.fetch_from(weights, "model.")
    aliases = streaming.aliases_of(model)  # (of the meta parameters: a loaded weight is a new tensor)
    names = {
        id(m): [f"model.{name}" for name in aliases[id(m.weight)]]
        for m in model.modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
    }
    variants = [variant for variant in ("fp32", "int4") if variant in sequences]
    if ("int4" in variants) != (blocks is not None):
        raise ValueError("the int4 model's sequences need the file's blocks, and blocks need sequences")

    def to_blocks(modules: list[torch.nn.Module]) -> None:
        for module in modules:
            assert blocks is not None
            blocks.apply(module, names[id(module)])

    states: dict[str, list[list[Any]]] = {variant: [] for variant in variants}  # per sequence, chunk: [x, ropes, masks]
    embeddings = [model.transformer["wte"], *([model.transformer["wpe"]] if "wpe" in model.transformer else [])]
    convert = streaming.Converted()  # each layer's fp32 copies reuse the previous layer's
    with streaming.materialized(model, embeddings, fetch, convert):
        for variant in variants:
            if variant == "int4":
                to_blocks(embeddings)
            for sequence in sequences[variant]:
                past, row = 0, []
                assert not sequence.right_padded  # (the reference reads each row alone)
                padding = None if sequence.padding is None else torch.from_numpy(sequence.padding)
                for chunk in sequence.chunks:
                    row.append(list(model.embed(torch.from_numpy(chunk), past, padding)))
                    past += chunk.shape[1]
                states[variant].append(row)
    for block in model.blocks:
        with streaming.materialized(model, [block], fetch, convert):
            for variant in variants:
                if variant == "int4":
                    to_blocks([m for m in block.modules() if isinstance(m, torch.nn.Linear)])
                for row in states[variant]:
                    cache = None
                    for state in row:
                        x, ropes, masks = state
                        state[0], cache = block(x, cache, ropes, masks)
    logits: dict[str, list[list[np.ndarray]]] = {}
    with streaming.materialized(model, [model.transformer["ln_f"], model.lm_head], fetch, convert):
        for variant in variants:
            if variant == "int4":
                to_blocks([model.lm_head])
            logits[variant] = [[model.head(state[0]).numpy() for state in row] for row in states[variant]]
    return logits


def check_parity(
    weights: streaming.Readable,
    path: Path,
    tokens: np.ndarray,
    arch: DecoderArch,
    tolerance: tuple[float, float],
    decode_steps: int,
    threads: int | None,
    dtype: str = "fp32",
    blocks: Blocks | None = None,
    right_padded: bool = False,
) -> dict[str, Any]:
    """Prompt + decode steps on held-out text through ORT with its own cache, against PyTorch computing
    the same (`reference_logits`); then the same with rows of different lengths padded into one batch (on
    the left; on the right for a GroupQueryAttention graph, `right_padded`), against PyTorch on each row
    alone. fp32/fp16 are compared with the fp32 model and pass when the largest difference is within
    atol + rtol x the largest |logit| PyTorch gave (`tolerance`). int4 is compared with
    the model its blocks hold and passes when the relative error (RMS of the difference over the RMS of the
    reference logits around their mean) is within tolerance[0]; its distance from the fp32 model is
    measured beside (`against_fp32`: relative error, mean and max abs diff, top-1 agreement, held-out loss)."""
    atol, rtol = tolerance
    decode_steps = min(decode_steps, arch.block_size - 1)
    prompt_len = max(1, min(arch.block_size - decode_steps, 32))
    batch = 2
    windows = held_out_windows(tokens, batch, prompt_len + decode_steps)
    main = Sequence(
        [windows[:, :prompt_len]] + [windows[:, prompt_len + i : prompt_len + i + 1] for i in range(decode_steps)]
    )
    lengths = [prompt_len, max(1, prompt_len // 2)]
    pad = np.array([prompt_len - n for n in lengths], dtype=np.int64)
    side = "right" if right_padded else "left"
    prompts = [w[prompt_len - n : prompt_len] for w, n in zip(windows, lengths)]
    padded = Sequence(
        [np.stack([np.pad(p, (0, k) if right_padded else (k, 0)) for p, k in zip(prompts, pad)])] + main.chunks[1:],
        pad,
        right_padded,
    )
    # Each padded row alone: row 0 keeps its whole prompt (main's row 0); row 1 is its shorter prompt.
    short = Sequence([windows[1:2, prompt_len - lengths[1] : prompt_len]] + [chunk[1:2] for chunk in main.chunks[1:]])
    # The reference reads each sequence's tokens in one pass (the same logits as decoding them one by one,
    # up to rounding: one matrix product per layer instead of one per step), split back into the steps.
    # With int4, the fp32 model is only measured against, on the main sequence.
    asked = {"fp32": [main, short]} if dtype != "int4" else {"fp32": [main], "int4": [main, short]}
    computed = {
        variant: [_split(logits[0], sequence) for logits, sequence in zip(found, asked[variant])]
        for variant, found in reference_logits(
            weights, arch, {variant: [_joined(s) for s in seqs] for variant, seqs in asked.items()}, blocks
        ).items()
    }
    reference, short_reference = computed["int4" if dtype == "int4" else "fp32"]
    reference_alone = [[logits[:1] for logits in reference], short_reference]
    # ONNX Runtime only now: the reference's layers are gone, so the two never share the memory
    session = open_session(path, ["CPUExecutionProvider"], threads)
    ours = [o.astype(np.float32) for o in ort_logits(session, arch, main, dtype)]
    batched = ort_logits(session, arch, padded, dtype)
    del session
    diffs = [float(np.abs(o - r).max()) for o, r in zip(ours, reference)]
    padded_diffs = [
        float(
            np.abs(
                (_real(got[row], pad[row], right_padded) if i == 0 else got[row]).astype(np.float32) - want[i][0]
            ).max()
        )
        for row, want in enumerate(reference_alone)
        for i, got in enumerate(batched)
    ]
    overall = max(max(diffs), max(padded_diffs))
    scale = max(float(np.abs(r).max()) for r in reference)
    worst = int(np.argmax(diffs))
    report: dict[str, Any] = {
        "batch": batch,
        "prompt_tokens": prompt_len,
        "decode_steps": decode_steps,
        "max_abs_diff_per_step": diffs,
        "padded": {"prompt_tokens": lengths, "max_abs_diff": max(padded_diffs), "side": side},
        "max_abs_diff": overall,
        "worst": ("the prompt" if worst == 0 else f"decode step {worst}")
        if max(diffs) >= max(padded_diffs)
        else f"the {side}-padded batch",
    }
    if dtype != "int4":
        return {**report, **gate.verdict(overall, scale, atol, rtol)}
    got, want = np.concatenate(ours, axis=1), np.concatenate(reference, axis=1)
    relative = _relative_error(got, want)
    fp32 = np.concatenate(computed["fp32"][0], axis=1)
    targets = windows[:, 1:]  # the next token of every position but the last
    errors = blocks.weight_errors if blocks is not None else {}
    worst_matrix, rounding = max(errors.items(), key=lambda item: item[1]) if errors else ("", 0.0)
    held = rounding <= MAX_ROUNDING  # the blocks stand for the checkpoint's matrices
    return {
        **report,
        "relative_error": relative,
        "tolerance": atol,
        "passed": relative <= atol and held,
        "max_abs_logit": scale,
        "matrices": len(errors),
        "worst_rounding": {"matrix": worst_matrix, "relative_error": rounding, "limit": MAX_ROUNDING},
        "against_fp32": {
            "relative_error": _relative_error(got, fp32),
            "max_abs_diff": float(np.abs(got - fp32).max()),
            "mean_abs_diff": float(np.abs(got - fp32).mean()),
            "top1_agreement": float((got.argmax(-1) == fp32.argmax(-1)).mean()),
            "nll": _mean_nll(got[:, :-1], targets),
            "nll_fp32": _mean_nll(fp32[:, :-1], targets),
        },
    }


def _joined(sequence: Sequence) -> Sequence:
    return Sequence([np.concatenate(sequence.chunks, axis=1)], sequence.padding, sequence.right_padded)


def _real(logits: np.ndarray, pad: int, right_padded: bool) -> np.ndarray:
    """A padded prompt row's (T, V) logits at its real positions."""
    return logits[: len(logits) - pad] if right_padded else logits[pad:]


def _split(logits: np.ndarray, sequence: Sequence) -> list[np.ndarray]:
    """(B, T, V) logits of a joined sequence, as its chunks' logits."""
    bounds = np.cumsum([chunk.shape[1] for chunk in sequence.chunks])[:-1]
    return np.split(logits, bounds, axis=1)


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """RMS(got - want) / RMS(want around each position's mean logit): 0 for equal logits, ~1.4 for
    unrelated ones of the same spread."""
    return float(np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean((want - want.mean(-1, keepdims=True)) ** 2)))


def ort_logits(session: Any, arch: DecoderArch, sequence: Sequence, dtype: str) -> list[np.ndarray]:
    """An exported decoder's logits for each chunk of `sequence`, run in order through its own KV cache."""
    cache = CacheLayout.of(arch, "fp16" if dtype == "fp16" else "fp32").empty(len(sequence.chunks[0]))
    found = []
    for chunk in sequence.chunks:
        logits, cache = decoder_graph.outputs(
            session.run(None, decoder_graph.feeds(chunk, cache, sequence.padding, right=sequence.right_padded))
        )
        found.append(logits)
    return found


def _mean_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean next-token negative log-likelihood (nats) of `targets` (B, T) under `logits` (B, T, V)."""
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(-np.take_along_axis(log_probs, targets[..., None], -1).mean())


def calibration_feeds(config: Config, model: Path, batches: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Static quantisation's calibration data: decoding as it happens. The fp32 graph reads the first
    half of each training window, and the second half is fed with that real cache (an empty cache
    would give the cache inputs no range). The cache is shaped as `model` says (pruning may change it).
    A GroupQueryAttention graph reads several new tokens after a cache one row at a time (its operator's
    rule), so its windows come as batches of one."""
    session, meta = open_model(model, ["CPUExecutionProvider"], config.threads, DecoderMetadata)
    tokens = load_tokens(config, "train")
    block, batch = meta.block_size, config.train.batch_size
    half = max(1, block // 2)
    inputs = decoder_graph.session_inputs(session)
    feeds = []
    for _ in range(batches):
        starts = rng.integers(0, len(tokens) - block, size=batch)
        ids = np.stack([tokens[s : s + block] for s in starts]).astype(np.int64)
        for rows in np.split(ids, batch) if meta.attention == "group_query" else [ids]:
            empty = CacheLayout.from_metadata(meta).empty(len(rows))
            _, cache = decoder_graph.outputs(
                session.run(None, decoder_graph.feeds(rows[:, :half], empty, inputs=inputs))
            )
            feeds.append(decoder_graph.feeds(rows[:, half:], cache, inputs=inputs))
    return feeds


def latency_feeds(session: Any, meta: DecoderMetadata) -> dict[str, np.ndarray]:
    """What compress times: one decode step at batch 1 with a 16-token past."""
    return decoder_graph.feeds(
        np.zeros((1, 1), np.int64),
        CacheLayout.from_metadata(meta).empty(1, past=16),
        inputs=decoder_graph.session_inputs(session),
    )
