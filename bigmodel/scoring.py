"""Scoring that training's validation and `eval` share, so both compute the same numbers the same way:
an encoder's outputs over length-sorted padded batches and its task metrics (classification, masked-LM,
retrieval), BERT's masking, and the padding of fine-tuning examples with their loss mask."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from bigmodel.datasets import TextSplit

IGNORE = -100  # F.cross_entropy's ignore_index
MASK_FRACTION = 0.15  # of the tokens of a text (specials and padding excluded)
EMBEDDING_SCALE = 20.0  # cosine similarities x 20: sentence-transformers' default for this loss
VAL_MASK_SEED = 1_000_003  # the fixed masking of the val split (any constant apart from training's)

Encode = Callable[[dict[str, np.ndarray]], np.ndarray]  # a padded batch -> the model's output, as numpy


def masked(
    ids: np.ndarray, specials: dict[str, int | None], vocab_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
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


def outputs(
    encode: Encode,
    texts: TextSplit,
    pad_id: int,
    batch_size: int = 64,
    transform: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> list[np.ndarray]:
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
    return {
        "loss": float(-np.log(np.clip(picked, 1e-12, 1.0)).mean()),
        "accuracy": float((probs.argmax(-1) == texts.y).mean()),
    }


def mlm_scores(
    encode: Encode, texts: TextSplit, pad_id: int, specials: dict[str, int | None], vocab_size: int, seed: int
) -> dict[str, float]:
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
            sums[i] = (
                (log_z - picked[np.arange(len(truth)), truth]).sum(),
                (picked.argmax(-1) == truth).sum(),
                len(truth),
            )
        return sums

    loss_sum, correct, count = np.sum(outputs(encode, masked_texts, pad_id, transform=per_text), axis=0)
    loss = float(loss_sum / count)
    return {
        "loss": loss,
        "accuracy": float(correct / count),
        "perplexity": math.exp(min(loss, 50.0)),
        "masked_tokens": int(count),
    }


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
    return {
        "loss": float((log_z - np.diag(logits)).mean()),
        "accuracy": float((rank == 0).mean()),
        "recall_at_5": float((rank < 5).mean()),
        "mrr": float((1.0 / (rank + 1)).mean()),
        "pairs": len(queries),
    }


def pad(rows: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples (ids, trained mask) -> x (B, T) inputs right-padded with pad_id, y (B, T) targets with
    IGNORE where the token is not trained or is padding. Causal attention never lets a real token see
    the padding after it, so padding changes no real position's output."""
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        tokens = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        targets = tokens[1:].clone()
        targets[torch.from_numpy(np.asarray(mask[1:]) == 0)] = IGNORE
        x[i, : len(tokens) - 1] = tokens[:-1]
        y[i, : len(tokens) - 1] = targets
    return x, y
