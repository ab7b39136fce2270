"""Export an encoder: input_ids, attention_mask, token_type_ids (B, T) in, the task's output out --
class probabilities (B, L), MLM logits (B, T, V) or unit sentence embeddings (B, C) -- with dynamic batch
and sequence axes. The tokenizer, labels and special ids are in the file's metadata, so infer and serve
need nothing else.

The parity gate runs ONNX Runtime on held-out texts in one padded batch and one by one (which also
checks that padding does not change a text's numbers) against PyTorch, and fails the export when the
largest absolute difference exceeds export.atol.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel import console, registry
from bigmodel.arch import EncoderArch
from bigmodel.config import Config
from bigmodel.datasets import load_texts
from bigmodel.export.onnx_file import export_dynamo, publish_or_reject, stamp_and_check
from bigmodel.infer.session import open_session
from bigmodel.io import sha256_file, write_json
from bigmodel.manifests import EncoderMetadata
from bigmodel.models.bert import BERT

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = {"classification": "probabilities", "mlm": "logits", "embedding": "embeddings"}


class Deployed(torch.nn.Module):
    """What the graph computes: the model's output, as probabilities for a classifier."""

    def __init__(self, model: BERT) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        out = self.model(input_ids, attention_mask, token_type_ids)
        return torch.softmax(out, dim=-1) if self.model.arch.task == "classification" else out


def export_checkpoint(config: Config, ckpt: Path, out_dir: Path) -> dict[str, Any]:
    """Export `ckpt` to out_dir/model.onnx through the checker and the parity gate."""
    xc = config.export
    model, manifest = registry.load_model(ckpt)
    assert isinstance(model, BERT)  # (stage_checkpoint checked the family)
    deployed = Deployed(model.eval()).eval()
    arch = manifest.architecture
    assert isinstance(arch, EncoderArch)  # (stage_checkpoint checked the family)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / "model.onnx"
    texts = load_texts(config, "test")
    rows = np.arange(min(len(texts), xc.parity_rows))
    batch = texts.batch(rows, arch.pad_id)
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        tmp = Path(work) / "model.onnx"
        example = texts.batch(rows[: max(2, min(len(rows), 4))], arch.pad_id)
        dims = {"batch": torch.export.Dim("batch"), "seq": torch.export.Dim("seq", min=1, max=arch.block_size)}
        export_dynamo(
            deployed,
            tuple(torch.from_numpy(example[name]) for name in INPUTS),
            tmp,
            list(INPUTS),
            [OUTPUTS[arch.task]],
            {name: {0: dims["batch"], 1: dims["seq"]} for name in INPUTS},
            xc.opset,
        )
        data = manifest.data
        stamp_and_check(
            tmp,
            EncoderMetadata(
                task=arch.task,
                labels=data.labels,
                text=data.text,
                text_pair=data.text_pair,
                target=data.target,
                tokenizer=data.tokenizer,
                special_ids=data.special_ids,
                architecture=arch,
                lineage={"checkpoint": sha256_file(ckpt)},
            ),
        )
        parity = check_parity(deployed, tmp, batch, xc.atol, config.threads)
        write_json(out_dir / "parity.json", {"checkpoint": str(ckpt), "model": str(final), "opset": xc.opset, **parity})
        console.info(
            f"export: parity on {parity['texts']} held-out texts (one padded batch, and one by one): max "
            f"abs diff {parity['max_abs_diff']:.3g} (atol {xc.atol}) -> {'ok' if parity['passed'] else 'FAILED'}"
        )
        publish_or_reject(
            tmp,
            final,
            parity["passed"],
            f"export parity failed: max abs diff {parity['max_abs_diff']:.3g} > atol {xc.atol}",
        )
    console.info(f"export: {final} ({final.stat().st_size:,} bytes)")
    return {
        "model": str(final),
        "parity_report": str(out_dir / "parity.json"),
        "max_abs_diff": parity["max_abs_diff"],
        "passed": True,
    }


def check_parity(
    deployed: torch.nn.Module, path: Path, batch: dict[str, np.ndarray], atol: float, threads: int | None
) -> dict[str, Any]:
    """ONNX Runtime against PyTorch on the padded batch, and on each text alone (unpadded)."""
    session = open_session(path, ["CPUExecutionProvider"], threads)
    with torch.no_grad():
        reference = deployed(*(torch.from_numpy(batch[name]) for name in INPUTS)).numpy()
    together = session.run(None, {name: batch[name] for name in INPUTS})[0]
    worst = float(np.abs(together - reference).max())
    lengths = batch["attention_mask"].sum(1)
    for i, length in enumerate(lengths):
        alone = session.run(None, {name: batch[name][i : i + 1, :length] for name in INPUTS})[0][0]
        want = reference[i, :length] if reference.ndim == 3 else reference[i]
        worst = max(worst, float(np.abs(alone - want).max()))
    return {"texts": len(lengths), "max_abs_diff": worst, "atol": atol, "passed": bool(worst <= atol)}


def calibration_feeds(config: Config, model: Path, batches: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Padded batches of training texts in the graph's input format (static int8 calibration)."""
    from bigmodel.infer.session import metadata

    meta = metadata(open_session(model, ["CPUExecutionProvider"], config.threads), model)
    assert isinstance(meta, EncoderMetadata)  # (the family table sends only encoders here)
    texts = load_texts(config, "train")
    return [
        dict(texts.batch(rng.choice(len(texts), size=min(8, len(texts)), replace=False), meta.architecture.pad_id))
        for _ in range(batches)
    ]


def latency_feeds(session: Any, meta: EncoderMetadata) -> dict[str, np.ndarray]:
    """What compress times: one text of 64 tokens (or the context, if shorter)."""
    width = min(64, meta.architecture.block_size)
    ids = np.full((1, width), (meta.special_ids or {}).get("[UNK]") or 0, dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
