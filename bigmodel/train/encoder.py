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
from torch import nn

from bigmodel import lora, registry
from bigmodel.config import Config
from bigmodel.datasets import DATA_FILE, TextSplit, load_texts
from bigmodel.errors import UserError
from bigmodel.io import sha256_file
from bigmodel.runtime import setup_torch
from bigmodel.train import epochs
from bigmodel.train.epochs import EpochTask
from bigmodel.train.optim import build_optimizer
from bigmodel.train.state import check_matches_config

MASK_FRACTION = 0.15  # of the tokens of a text (specials and padding excluded)
EMBEDDING_SCALE = 20.0  # cosine similarities x 20: sentence-transformers' default for this loss
GROUPED_BATCHES = 50  # batches per length-sorted run
VAL_MASK_SEED = 1_000_003  # the fixed masking of the val split (any constant apart from training's)

Encode = Callable[[dict[str, np.ndarray]], np.ndarray]  # a padded batch -> the model's output, as numpy


def train(config: Config, resume: bool, out_dir: Path, start_from: Path | None = None,
          after_step: Callable[[torch.nn.Module], None] | None = None,
          loss_hook: Callable[[torch.Tensor, Any, torch.Tensor], torch.Tensor] | None = None,
          until_step: int | None = None, allow_changes: bool = False) -> dict[str, Any]:
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
    arch = init_manifest["architecture"]
    adapter = None
    if tc.lora is not None:  # freeze the encoder; the adapters train, and a classifier's new head with them
        trains_also = ("head.",) if arch["task"] == "classification" else ()
        trainable = lora.apply(model, tc.lora, config.seed, trains_also)
        adapter = lora.manifest_record(tc.lora, trainable, init_path, sha256_file(init_path), trains_also)
    model.to(device)
    optimizer = build_optimizer(model, tc)
    specials = init_manifest["data"]["special_ids"]

    # ---- data
    train_set, val_set = load_texts(config, "train"), load_texts(config, "val")
    # an embedding model's pairs: the second text of each, by split
    partners = {split: load_texts(config, split, "b_") for split in ("train", "val")} if arch["task"] == "embedding" else {}

    def tensors(texts: TextSplit, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v).to(device) for k, v in texts.batch(rows, arch["pad_id"]).items()}

    # ---- the task's loss (a batch is an array of training rows) and its validation scores
    if loss_hook is not None and arch["task"] != "classification":  # the config refuses it; a caller might not
        raise UserError(f"a training loss hook (distillation) needs a classifier, not an encoder for {arch['task']}")
    if arch["task"] == "classification":
        def loss(rows: np.ndarray, step: int) -> torch.Tensor:
            inputs, labels = tensors(train_set, rows), torch.from_numpy(train_set.y[rows]).to(device)
            if loss_hook is not None:
                return loss_hook(model(**inputs), inputs, labels)
            return F.cross_entropy(model(**inputs), labels)

        def evaluate() -> dict[str, float]:
            return classifier_scores(torch_encoder(model, device), val_set, arch["pad_id"])
    elif arch["task"] == "mlm":
        def loss(rows: np.ndarray, step: int) -> torch.Tensor:
            batch = tensors(train_set, rows)
            rng = np.random.default_rng([config.seed, step])
            inputs, targets = masked(batch["input_ids"].cpu().numpy(), specials, arch["vocab_size"], rng)
            batch["input_ids"] = torch.from_numpy(inputs).to(device)
            logits = model(**batch)
            return F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(targets).to(device).flatten(),
                                   ignore_index=-100)

        def evaluate() -> dict[str, float]:
            return mlm_scores(torch_encoder(model, device), val_set, arch["pad_id"], specials, arch["vocab_size"],
                              config.seed)
    else:
        def loss(rows: np.ndarray, step: int) -> torch.Tensor:
            a, b = model(**tensors(train_set, rows)), model(**tensors(partners["train"], rows))  # (B, C) each
            return F.cross_entropy(a @ b.T * EMBEDDING_SCALE, torch.arange(len(rows), device=device))

        def evaluate() -> dict[str, float]:
            return retrieval_scores(torch_encoder(model, device), val_set, partners["val"], arch["pad_id"])

    lengths = train_set.lengths()
    task = EpochTask(
        examples=len(train_set), unit="pairs" if partners else "texts",
        steps_per_epoch=math.ceil(len(train_set) / tc.batch_size),
        batches=lambda epoch: length_grouped_batches(lengths, tc.batch_size, config.seed, epoch),
        loss=loss, evaluate=evaluate)
    lineage = {"init": sha256_file(init_path), "data": sha256_file(config.stage_dir("prepare") / DATA_FILE)}

    # ---- loop
    return epochs.run(config, model, optimizer, task, out_dir, resume, init_manifest, lineage,
                      until_step=until_step, allow_changes=allow_changes, after_step=after_step, adapter=adapter)


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


def masked(ids: np.ndarray, specials: dict[str, int | None], vocab_size: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking of a (B, T) batch: (inputs, targets), targets -100 where nothing is predicted. Every
    text gets at least one prediction, so no batch has an empty loss."""
    special_ids = np.array([i for i in specials.values() if i is not None])
    candidates = ~np.isin(ids, special_ids)  # padding is [PAD], a special
    scores = np.where(candidates, rng.random(ids.shape), -1.0)
    chosen = candidates & (scores >= 1.0 - MASK_FRACTION)
    chosen[np.arange(len(ids)), scores.argmax(1)] |= candidates.any(1)
    action = rng.random(ids.shape)
    random_tokens = rng.integers(0, vocab_size, ids.shape)
    inputs = ids.copy()
    inputs[chosen & (action < 0.8)] = specials["[MASK]"]
    swap = chosen & (action >= 0.8) & (action < 0.9)
    inputs[swap] = random_tokens[swap]
    return inputs, np.where(chosen, ids, -100)


def torch_encoder(model: nn.Module, device: torch.device) -> Encode:
    """A PyTorch encoder as a function of a padded batch (eval mode, no gradients)."""
    def encode(batch: dict[str, np.ndarray]) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            out = model(**{k: torch.from_numpy(v).to(device) for k, v in batch.items()})
        return out.float().cpu().numpy()
    return encode


def outputs(encode: Encode, texts: TextSplit, pad_id: int, batch_size: int = 64,
            transform: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> list[np.ndarray]:
    """The model's output for every text, in order, in batches padded to their own longest text (texts of
    similar length together); transform(output, rows) is applied per batch before it is kept."""
    order = np.argsort(texts.lengths(), kind="stable")
    parts: dict[int, np.ndarray] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        out = encode(texts.batch(rows, pad_id))
        out = transform(out, rows) if transform else out
        for row, value in zip(rows, out):
            parts[int(row)] = value
    return [parts[row] for row in range(len(texts))]


def probabilities(encode: Encode, texts: TextSplit, pad_id: int) -> np.ndarray:
    """(N, L) class probabilities of every text."""
    logits = np.stack(outputs(encode, texts, pad_id)).astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def classifier_scores(encode: Encode, texts: TextSplit, pad_id: int) -> dict[str, float]:
    assert texts.y is not None
    probs = probabilities(encode, texts, pad_id)
    picked = probs[np.arange(len(texts)), texts.y]
    return {"loss": float(-np.log(np.clip(picked, 1e-12, 1.0)).mean()),
            "accuracy": float((probs.argmax(-1) == texts.y).mean())}


def mlm_scores(encode: Encode, texts: TextSplit, pad_id: int, specials: dict[str, int | None], vocab_size: int,
               seed: int) -> dict[str, float]:
    """Cross-entropy and accuracy on the masked tokens of `texts`, masked once by (seed, VAL_MASK_SEED):
    the same positions at every evaluation."""
    rng = np.random.default_rng([seed, VAL_MASK_SEED])
    inputs, targets = [], []
    for row in range(len(texts)):
        ids = texts.batch(np.array([row]), pad_id)["input_ids"]
        masked_ids, target = masked(ids, specials, vocab_size, rng)
        inputs.append(masked_ids[0])
        targets.append(target[0])
    masked_texts = TextSplit(np.concatenate(inputs).astype(np.int32), texts.offsets, texts.types, None)

    def per_text(logits: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(loss summed, correct, predicted) over the masked tokens of each text of the batch."""
        sums = np.zeros((len(rows), 3))
        for i, row in enumerate(rows):
            where = targets[row] != -100
            picked = logits[i, : len(where)][where].astype(np.float64)  # (masked, V)
            top = picked.max(-1)
            log_z = top + np.log(np.exp(picked - top[:, None]).sum(-1))
            truth = targets[row][where]
            sums[i] = ((log_z - picked[np.arange(len(truth)), truth]).sum(), (picked.argmax(-1) == truth).sum(),
                       len(truth))
        return sums

    loss_sum, correct, count = np.sum(outputs(encode, masked_texts, pad_id, transform=per_text), axis=0)
    loss = float(loss_sum / count)
    return {"loss": loss, "accuracy": float(correct / count), "perplexity": math.exp(min(loss, 50.0)),
            "masked_tokens": int(count)}


def retrieval_scores(encode: Encode, queries: TextSplit, partners: TextSplit, pad_id: int) -> dict[str, float]:
    """Each text looks for its partner among all partners of the split by cosine similarity: recall@1 (as
    "accuracy"), recall@5, mean reciprocal rank, and the contrastive loss over the whole split."""
    a = np.stack(outputs(encode, queries, pad_id)).astype(np.float64)
    b = np.stack(outputs(encode, partners, pad_id)).astype(np.float64)
    similarity = a @ b.T
    truth = np.diag(similarity)
    rank = (similarity > truth[:, None]).sum(1)  # 0 = the partner is the best match
    logits = similarity * EMBEDDING_SCALE
    top = logits.max(1)
    log_z = top + np.log(np.exp(logits - top[:, None]).sum(1))
    return {"loss": float((log_z - np.diag(logits)).mean()), "accuracy": float((rank == 0).mean()),
            "recall_at_5": float((rank < 5).mean()), "mrr": float((1.0 / (rank + 1)).mean()),
            "pairs": len(queries)}
