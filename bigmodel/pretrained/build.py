"""Build bigmodel's model from a described pretrained source, one parameter at a time, and check it
against transformers, layer by layer.

`WeightPlan` checks the source's weight plan against the model's parameter shapes (the model is built on
the meta device: no memory) before anything is read, then `assemble(name)` makes one parameter from its
file tensors (the fused q/k/v from three, a shortened position table from one) in the dtype asked for.
`init` writes those straight into the checkpoint file, so an import holds one parameter at a time;
`build` fills an in-memory model the same way (small models, tests).

The parity gate (`check_parity`) runs both implementations with streamed weights (bigmodel/streaming.py):
bigmodel's model reading the checkpoint just written, transformers' own model reading the source files by
its own parameter names, each module's weights loaded in fp32 just before it runs. The logits are the
whole model's, as if both were in memory; each layer's hidden states are compared on the way.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from bigmodel import console, parity, registry, streaming
from bigmodel.arch import AnyArch, DecoderArch, EncoderArch
from bigmodel.background import Background
from bigmodel.errors import GateFailed, UserError
from bigmodel.models.bert import BERT
from bigmodel.models.gpt import GPT
from bigmodel.pretrained import POSITIONS, Source, check_plan
from bigmodel.weights import ShardedWeights

PARITY_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four papers that "
    "changed physics; the third introduced special relativity.\n    def add(a, b):\n        return a + b\n"
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SOURCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype(requested: str, source: Source) -> torch.dtype:
    """init.dtype: `auto` keeps the source's float dtype (bf16 stays bf16: no fp32 copy of a bf16 model);
    a quantised GGUF, or a file of mixed dtypes, becomes fp32, so its values stay exact."""
    if requested != "auto":
        return DTYPES[requested]
    return SOURCE_DTYPES.get(source.dtype, torch.float32) if source.format == "hf" else torch.float32


class WeightPlan:
    """Where each parameter of bigmodel's model comes from: file tensors (and the rows they fill), or a
    fresh initialisation (a task head the file lacks). Shapes are checked before anything is read."""

    def __init__(self, source: Source, arch: AnyArch, seed: int = 0) -> None:
        self.source, self.arch = source, arch
        with torch.device("meta"):
            model = registry.build_model(arch)
        tied = getattr(model, "tied_weights", {})
        self.shapes = {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}
        fresh = check_plan(source, self.shapes)
        self.parts: dict[str, list[tuple[str, int]]] = {}
        for file_name, (target, row) in source.targets.items():
            self.parts.setdefault(target, []).append((file_name, row))
        self.fresh = _fresh_values(arch, fresh, seed)
        if fresh:
            source.notes.append(f"new task head, initialised: {', '.join(sorted(fresh))}")

    def assemble(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Parameter `name` (contiguous, `dtype`), read from its file tensors now."""
        if name in self.fresh:
            return self.fresh[name].to(dtype)
        shape = self.shapes[name]
        parts = self.parts[name]
        if len(parts) == 1 and self.source.shapes[parts[0][0]][0] >= shape[0]:  # the whole of one tensor
            tensor = self.source.fetch(parts[0][0])
            if name in POSITIONS:
                tensor = tensor[: shape[0]]  # learned positions cut to a shorter context
            return tensor.to(dtype).contiguous()
        out = torch.empty(shape, dtype=dtype)
        for file_name, row in parts:
            tensor = self.source.fetch(file_name)
            out[row : row + tensor.shape[0]].copy_(tensor)
        return out


def _fresh_values(arch: AnyArch, fresh: set[str], seed: int) -> dict[str, torch.Tensor]:
    """The family's initialisation of the parameters the file lacks, seeded (only an encoder's task head:
    small, so the model it comes from is built in memory)."""
    if not fresh:
        return {}
    model = registry.build_model(arch)
    torch.manual_seed(seed)
    registry.init_weights(model, arch.family, None, 0.02)
    state = model.state_dict()
    return {name: state[name].detach().clone() for name in fresh}


def build(source: Source, arch: AnyArch, seed: int = 0) -> torch.nn.Module:
    """bigmodel's model with the source's weights (fp32), in memory, filled parameter by parameter."""
    plan = WeightPlan(source, arch, seed)
    model = registry.build_model(arch)
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name in plan.shapes:
            state[name].copy_(plan.assemble(name, torch.float32))
    return model.eval()


def parity_ids(tokenizer: Any, block_size: int) -> np.ndarray:
    """(1, T) token ids of a fixed text: prose, digits and code, at most 32 tokens and the context."""
    ids = tokenizer.encode(PARITY_TEXT)[: min(32, block_size)]
    return np.asarray([ids], dtype=np.int64)


def _quiet_transformers() -> ModuleType:
    """transformers, its logging and progress bars turned down (the extra's absence: one line, exit 2)."""
    try:
        import transformers
    except ImportError as exc:
        raise UserError(
            "checking against transformers needs the verification extra: pip install 'bigmodel[hf]' "
            "(for an import, --set init.verify=false skips the check and records the checkpoint "
            "as unverified)"
        ) from exc
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def load_transformers(
    folder: Path, gguf_file: str | None = None, auto_class: str = "AutoModelForCausalLM"
) -> tuple[ModuleType, torch.nn.Module]:
    """transformers and its own model for a folder (or a GGUF file in it) in memory: fp32, local files, no
    remote code."""
    transformers = _quiet_transformers()
    options: dict[str, Any] = {"dtype": torch.float32, "local_files_only": True, "trust_remote_code": False}
    if gguf_file is not None:
        options["gguf_file"] = gguf_file
    # Its GGUF loader draws a progress bar that no setting turns off: the reference's chatter is dropped
    # (failures still raise).
    with console.stdout_to_stderr(), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, auto_class).from_pretrained(str(folder), **options)
    return transformers, model.eval()


def transformers_skeleton(folder: Path, auto_class: str) -> tuple[ModuleType, torch.nn.Module]:
    """transformers' own model for a folder, built from its config.json with every parameter on the meta
    device (buffers such as rotary frequencies are computed for real): no weights, no memory."""
    transformers = _quiet_transformers()
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    with init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, auto_class).from_config(config, dtype=torch.float32, trust_remote_code=False)
    return transformers, model.eval()


def _transformers_fetch(model: Any, weights: ShardedWeights) -> streaming.Fetch:
    """transformers' parameters read from the folder's files by transformers' own names (not through
    bigmodel's import plan, which the gate is checking): a file may store them with or without the base
    model's prefix (`transformer.`, `bert.`), and a tied output head is the input embedding."""
    have = set(weights.names())
    prefix = f"{model.base_model_prefix}."
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = {id(output.weight)} if output is not None and tied else set()
    embedding_names = [
        n for n, p in model.named_parameters(remove_duplicate=False) if p is model.get_input_embeddings().weight
    ]
    by_name = dict(model.named_parameters(remove_duplicate=False))

    def fetch(names: list[str]) -> torch.Tensor:
        candidates = [c for name in names for c in (name, name.removeprefix(prefix), prefix + name)]
        if any(id(by_name.get(name)) in head for name in names):
            candidates += [c for name in embedding_names for c in (name, name.removeprefix(prefix), prefix + name)]
        for candidate in candidates:
            if candidate in have:
                return weights.read(candidate)
        experts = _expert_tensor(names[0], have, weights)
        if experts is not None:
            return experts
        # Not in the files: what transformers' from_pretrained would initialise at random. It cannot be a
        # weight bigmodel's model uses (the import plan refused that), only a part of transformers' class
        # outside the output compared (BertModel's pooler over an MLM folder): zeros.
        return torch.zeros(by_name[names[0]].shape)

    return fetch


def reference_outputs(source: Source, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], str]:
    """What transformers' own implementation computes from the same files (a decoder's logits, an
    encoder's last hidden states), each layer's hidden states, and its version. A folder's weights are
    streamed into transformers' model module by module; a GGUF file is loaded by transformers whole
    (dequantised in fp32: its own GGUF reader is the reference)."""
    auto_class, output = source.reference
    n_layer = source.arch.n_layer
    if source.format == "gguf":
        transformers, model = load_transformers(source.path.parent, source.path.name, auto_class)
        running: Any = contextlib.nullcontext(model)
    else:
        from bigmodel.pretrained import hf

        transformers, model = transformers_skeleton(source.path, auto_class)
        fetch = _transformers_fetch(model, hf.weights(source.path))
        running = streaming.streamed(model, fetch)
    with running as live, torch.no_grad(), streaming.layer_outputs(streaming.layer_list(live, n_layer)) as layers:
        reference = getattr(live(torch.from_numpy(ids)), output).float().numpy()
    return reference, [layer.numpy() for layer in layers], f"transformers {transformers.__version__}"


def bigmodel_outputs(
    arch: DecoderArch | EncoderArch, fetch: streaming.Fetch, ids: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray]]:
    """bigmodel's output on `ids` (the model's `reference_output`) with its weights streamed from `fetch`
    in fp32, and each layer's hidden states."""
    with torch.device("meta"):
        model = registry.build_model(arch).eval()
    with (
        streaming.streamed(model, fetch) as live,
        streaming.layer_outputs(streaming.layer_list(live, arch.n_layer)) as layers,
    ):
        assert isinstance(live, (GPT, BERT))  # (registry builds these for a decoder or an encoder)
        ours = live.reference_output(torch.from_numpy(ids)).float().numpy()
    return ours, [layer.numpy() for layer in layers]


class Reference:
    """transformers' outputs on the parity prompt (`reference_outputs`). They come from the source's own
    files, not from the checkpoint being written, so for a folder they are computed in the background
    while the import writes (each takes seconds at 1B; the write is mostly the kernel copying bytes). That
    thread only builds and runs transformers' model, which no other thread touches; a GGUF source is
    computed when asked, since transformers' GGUF loader redirects the process's stdout and stderr."""

    def __init__(self, source: Source, ids: np.ndarray, background: bool = True) -> None:
        self.source, self.ids = source, ids
        self._running: Background[tuple[np.ndarray, list[np.ndarray], str]] | None = None
        if background and source.format != "gguf":
            self._running = Background(functools.partial(self._compute, torch.get_num_threads()))

    def _compute(self, threads: int) -> tuple[np.ndarray, list[np.ndarray], str]:
        torch.set_num_threads(threads)  # (per thread under OpenMP: the caller's count, the same arithmetic)
        return reference_outputs(self.source, self.ids)

    def result(self) -> tuple[np.ndarray, list[np.ndarray], str]:
        return reference_outputs(self.source, self.ids) if self._running is None else self._running.result()


def check_parity(
    fetch: streaming.Fetch,
    arch: DecoderArch | EncoderArch,
    source: Source,
    tokenizer: Any,
    atol: float,
    rtol: float = 0.0,
    reference: Reference | None = None,
) -> dict[str, Any]:
    """bigmodel's numbers (weights from `fetch`: the checkpoint being written) against transformers' on the
    same files and prompt (`reference`, when already started on `parity_ids`), and how far apart each
    layer's hidden states are."""
    ids = parity_ids(tokenizer, arch.block_size) if reference is None else reference.ids
    expected, reference_layers, version = (reference or Reference(source, ids, background=False)).result()
    ours, our_layers = bigmodel_outputs(arch, fetch, ids)
    return {
        "verified": True,
        "prompt_tokens": ids.shape[1],
        **compare(ours, expected, version, atol, rtol),
        "layers_max_abs_diff": [float(np.abs(a - b).max()) for a, b in zip(our_layers, reference_layers)],
    }


def compare(ours: np.ndarray, reference: np.ndarray, version: str, atol: float, rtol: float = 0.0) -> dict[str, Any]:
    """bigmodel's output against a reference's: the max abs difference, passing within atol + rtol x the
    reference's largest |value| (fp32 rounding grows with the scale), and whether the argmax along the
    last axis agrees everywhere (greedy tokens, for logits)."""
    diff = float(np.abs(ours - reference).max())
    return {
        "reference": version,
        "max_abs_diff": diff,
        **parity.verdict(diff, float(np.abs(reference).max()), atol, rtol),
        "same_greedy_tokens": bool((ours.argmax(-1) == reference.argmax(-1)).all()),
    }


def enforce(report: dict[str, Any], stage: str, checked: str, unpublished: str) -> None:
    """Print a transformers comparison's verdict; exit 1 (GateFailed, with the report) when it failed."""
    verdict = "ok" if report["passed"] else "FAILED"
    allowed = parity.allowed(report)
    console.info(f"{stage}: {checked}: max abs logit diff {report['max_abs_diff']:.3g} ({allowed}) -> {verdict}")
    if not report["passed"]:
        raise GateFailed(
            f"{stage} parity with {report['reference']} failed: max abs logit diff "
            f"{report['max_abs_diff']:.3g} > {allowed}; {unpublished}",
            {"parity": report},
        )


def _expert_tensor(name: str, have: set[str], weights: ShardedWeights) -> torch.Tensor | None:
    """A mixture's router or experts as transformers (>= 5) holds them, gathered from files that keep one
    tensor per expert (pretrained.hf.EXPERT_FILES): the experts of a layer as (E, 2I, C) gate_up_proj (each
    expert's gate rows, then its up rows) and (E, C, I) down_proj, under `mlp` whatever the file calls the
    module (Mixtral's block_sparse_moe). None for any other name."""
    from bigmodel.pretrained.hf import EXPERT_FILES

    layer, found, leaf = name.rpartition(".mlp.")
    if not found:
        return None
    for module, gate, up, down in EXPERT_FILES.values():
        base = f"{layer}.{module}"
        if leaf == "gate.weight" and f"{base}.gate.weight" in have:
            return weights.read(f"{base}.gate.weight")
        count = 0
        while f"{base}.experts.{count}.{down}.weight" in have:
            count += 1
        if count and leaf == "experts.down_proj":
            return torch.stack([weights.read(f"{base}.experts.{e}.{down}.weight") for e in range(count)])
        if count and leaf == "experts.gate_up_proj":
            return torch.stack(
                [
                    torch.cat([weights.read(f"{base}.experts.{e}.{part}.weight") for part in (gate, up)])
                    for e in range(count)
                ]
            )
    return None
