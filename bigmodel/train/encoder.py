"""Training recipe for the encoder family, by model.task. Reads top to bottom: setup, data, the task's loss
and scores, loop (the shared epoch loop, train/epochs.py).

- classification: cross-entropy on the labels (fine-tuning an imported encoder in full or with LoRA adapters
  (train.lora; the new head trains in full beside them), or from scratch).
- mlm: masked-LM pre-training (Devlin et al. 2018, sec. 3.1): 15% of the tokens of each text are chosen, of
  those 80% become [MASK], 10% a random token and 10% stay; the loss is cross-entropy on the chosen ones.
  The choice is seeded by (seed, step), so a resumed run masks the same way; validation uses one fixed
  masking, so its scores are comparable between evaluations.
- embedding: contrastive learning on pairs with in-batch negatives (the multiple-negatives ranking loss of
  Henderson et al. 2017, as sentence-transformers trains): each text must pick its partner among the batch's
  partners by cosine similarity x 20.

Batches are grouped by length (the idea of Hugging Face's group_by_length): each epoch's seeded permutation
is cut into runs of 50 batches, each run sorted by length and cut into batches, and the batches shuffled;
padding to each batch's longest text then costs little.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bigmodel import lora, registry
from bigmodel.arch import EncoderArch
from bigmodel.config import Config
from bigmodel.datasets import DATA_FILE, TextSplit, load_texts
from bigmodel.errors import UserError
from bigmodel.io import sha256_file
from bigmodel.runtime import setup_torch
from bigmodel.scoring import (
    EMBEDDING_SCALE,
    classifier_scores,
    masked,
    mlm_scores,
    retrieval_scores,
    torch_encoder,
)
from bigmodel.train import epochs
from bigmodel.train.epochs import EpochTask
from bigmodel.train.optim import build_optimizer
from bigmodel.train.state import check_matches_config

GROUPED_BATCHES = 50  # batches per length-sorted run


def train(
    config: Config,
    resume: bool,
    out_dir: Path,
    start_from: Path | None = None,
    after_step: Callable[[torch.nn.Module], None] | None = None,
    loss_hook: Callable[[torch.Tensor, Any, torch.Tensor], torch.Tensor] | None = None,
    until_step: int | None = None,
    allow_changes: bool = False,
) -> dict[str, Any]:
    """until_step: stop (resumably) after this step without changing the schedule (chunked jobs);
    start_from: train from this checkpoint instead of init (compress fine-tunes and distils this way);
    after_step: called after every optimizer step (compress keeps pruned weights at zero with it);
    loss_hook(logits, inputs, labels): a classifier's training loss instead of cross-entropy (distillation;
    inputs are the batch's tensors by name). Validation always scores the task's own way."""
    # ---- setup
    device = setup_torch(config)
    tc = config.train
    init_path = start_from or config.stage_dir("init") / "model.safetensors"
    model, init_manifest = registry.load_model(init_path)
    if start_from is None:
        check_matches_config(config, init_manifest)
    arch = init_manifest.architecture
    assert isinstance(arch, EncoderArch)  # the family table sends only encoders here
    adapter = None
    if tc.lora is not None:  # freeze the encoder; the adapters train, and a classifier's new head with them
        trains_also = ("head.",) if arch.task == "classification" else ()
        trainable = lora.apply(model, tc.lora, config.seed, trains_also)
        adapter = lora.manifest_record(tc.lora, trainable, init_path, sha256_file(init_path), trains_also, arch)
    model.to(device)
    optimizer = build_optimizer(model, tc)
    specials = init_manifest.data.special_ids or {}

    # ---- data
    train_set, val_set = load_texts(config, "train"), load_texts(config, "val")
    # an embedding model's pairs: the second text of each, by split
    partners = (
        {split: load_texts(config, split, "b_") for split in ("train", "val")} if arch.task == "embedding" else {}
    )

    def tensors(texts: TextSplit, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v).to(device) for k, v in texts.batch(rows, arch.pad_id).items()}

    # ---- the task's loss (a batch is an array of training rows) and its validation scores
    if loss_hook is not None and arch.task != "classification":  # the config refuses it; a caller might not
        raise UserError(f"a training loss hook (distillation) needs a classifier, not an encoder for {arch.task}")
    if arch.task == "classification":
        assert train_set.y is not None  # a classifier's splits have labels
        train_labels = train_set.y

        def loss(rows: np.ndarray, step: int) -> torch.Tensor:
            inputs, labels = tensors(train_set, rows), torch.from_numpy(train_labels[rows]).to(device)
            if loss_hook is not None:
                return loss_hook(model(**inputs), inputs, labels)
            return F.cross_entropy(model(**inputs), labels)

        def evaluate() -> dict[str, float]:
            return classifier_scores(torch_encoder(model, device), val_set, arch.pad_id)
    elif arch.task == "mlm":

        def loss(rows: np.ndarray, step: int) -> torch.Tensor:
            batch = tensors(train_set, rows)
            rng = np.random.default_rng([config.seed, step])
            inputs, targets = masked(batch["input_ids"].cpu().numpy(), specials, arch.vocab_size, rng)
            batch["input_ids"] = torch.from_numpy(inputs).to(device)
            logits = model(**batch)
            return F.cross_entropy(
                logits.flatten(0, 1), torch.from_numpy(targets).to(device).flatten(), ignore_index=-100
            )

        def evaluate() -> dict[str, float]:
            return mlm_scores(
                torch_encoder(model, device), val_set, arch.pad_id, specials, arch.vocab_size, config.seed
            )
    else:

        def loss(rows: np.ndarray, step: int) -> torch.Tensor:
            a, b = model(**tensors(train_set, rows)), model(**tensors(partners["train"], rows))  # (B, C) each
            return F.cross_entropy(a @ b.T * EMBEDDING_SCALE, torch.arange(len(rows), device=device))

        def evaluate() -> dict[str, float]:
            return retrieval_scores(torch_encoder(model, device), val_set, partners["val"], arch.pad_id)

    lengths = train_set.lengths()
    task = EpochTask(
        examples=len(train_set),
        unit="pairs" if partners else "texts",
        steps_per_epoch=math.ceil(len(train_set) / tc.batch_size),
        batches=lambda epoch: length_grouped_batches(lengths, tc.batch_size, config.seed, epoch),
        loss=loss,
        evaluate=evaluate,
    )
    lineage = {"init": sha256_file(init_path), "data": sha256_file(config.stage_dir("prepare") / DATA_FILE)}

    # ---- loop
    return epochs.run(
        config,
        model,
        optimizer,
        task,
        out_dir,
        resume,
        init_manifest,
        lineage,
        until_step=until_step,
        allow_changes=allow_changes,
        after_step=after_step,
        adapter=adapter,
    )


def length_grouped_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """ceil(N / batch_size) batches of row numbers, texts of similar length together; from (seed, epoch) alone."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    run = batch_size * GROUPED_BATCHES  # a multiple of batch_size: only the epoch's last batch can be short
    batches = []
    for start in range(0, len(order), run):
        chunk = order[start : start + run]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]
