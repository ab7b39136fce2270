"""A BERT-style encoder (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for
Language Understanding"), and the head of its task.

Embeddings: word + learned absolute position + token type (segment A or B of a pair), summed, then
LayerNorm and dropout. Blocks are post-LayerNorm, the original Transformer's order (Vaswani et al. 2017):
x = LN(x + attention(x)), x = LN(x + MLP(x)). Attention is bidirectional; padding keys are masked, so a
sequence's numbers do not depend on how much padding its batch adds. The MLP uses exact (erf) GELU.
Heads, by `arch.task`:
- mlm: transform (Linear, GELU, LayerNorm), then a decoder onto the vocabulary tied to the word
  embeddings, with its own bias (BERT's pre-training head);
- classification: the pooler (Linear + tanh on the first token, [CLS]), dropout, a Linear to the labels
  (as BertForSequenceClassification);
- embedding: the mean of the last hidden states over real tokens, L2-normalised (Sentence-BERT, Reimers &
  Gurevych 2019; what all-MiniLM-L6-v2 was trained for).
Module names follow the decoder's (`c_attn` holds queries, keys and values at once), so LoRA, pruning and
plan read both alike. Shapes: B batch, T tokens, C n_embd, nh heads, hs head size, V vocab, L labels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigmodel.arch import EncoderArch


class Embeddings(nn.Module):
    def __init__(self, arch: EncoderArch) -> None:
        super().__init__()
        self.wte = nn.Embedding(arch.vocab_size, arch.n_embd)
        self.wpe = nn.Embedding(arch.block_size, arch.n_embd)
        self.wtt = nn.Embedding(arch.type_vocab_size, arch.n_embd)
        self.ln = nn.LayerNorm(arch.n_embd, eps=arch.norm_eps)
        self.drop = nn.Dropout(arch.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        # (B, T): each row its own positions, so per-example gradients (train.privacy) see the batch
        positions = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
        x = self.wte(input_ids) + self.wpe(positions) + self.wtt(token_type_ids)  # (B, T, C)
        return self.drop(self.ln(x))


class SelfAttention(nn.Module):
    def __init__(self, arch: EncoderArch) -> None:
        super().__init__()
        self.n_head, self.head_size, self.dropout = arch.n_head, arch.head_size, arch.dropout
        self.c_attn = nn.Linear(arch.n_embd, 3 * arch.n_embd)  # q, k, v at once
        self.c_proj = nn.Linear(arch.n_embd, arch.n_embd)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, C), key_mask (B, 1, T, T) True for real keys -> (B, T, C)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3 * self.n_head, self.head_size).transpose(1, 2).chunk(3, dim=1)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, arch: EncoderArch, layer: int) -> None:
        super().__init__()
        self.attn = SelfAttention(arch)
        self.ln_1 = nn.LayerNorm(arch.n_embd, eps=arch.norm_eps)
        self.mlp = MLP(arch, arch.mlp_hidden[layer])
        self.ln_2 = nn.LayerNorm(arch.n_embd, eps=arch.norm_eps)
        self.drop = nn.Dropout(arch.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(x + self.drop(self.attn(x, key_mask)))  # post-LN: the residual sum is normalised
        return self.ln_2(x + self.drop(self.mlp(x)))


class MLP(nn.Module):
    def __init__(self, arch: EncoderArch, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(arch.n_embd, hidden)
        self.c_proj = nn.Linear(hidden, arch.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class MaskedLMHead(nn.Module):
    """transform (Linear, GELU, LayerNorm) -> vocabulary logits through the tied word embeddings + bias."""

    def __init__(self, arch: EncoderArch, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(arch.n_embd, arch.n_embd)
        self.ln = nn.LayerNorm(arch.n_embd, eps=arch.norm_eps)
        self.decoder = nn.Linear(arch.n_embd, arch.vocab_size)
        self.decoder.weight = word_embeddings.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.ln(F.gelu(self.dense(hidden))))  # (B, T, V)


class ClassifierHead(nn.Module):
    """What the text is taken to be -- BERT's pooler (tanh of a Linear on the [CLS] token's state), or the
    mean of the token states (the reading a sentence-transformers model is trained for, Reimers &
    Gurevych 2019) -- then dropout and the labels' scores."""

    def __init__(self, arch: EncoderArch) -> None:
        super().__init__()
        self.pooler = nn.Linear(arch.n_embd, arch.n_embd) if arch.pooling == "cls" else None
        self.drop = nn.Dropout(arch.dropout)
        self.out = nn.Linear(arch.n_embd, arch.n_outputs)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooler is not None:
            pooled = torch.tanh(self.pooler(hidden[:, 0]))  # (B, C): the [CLS] token
        else:
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, C)
        return self.out(self.drop(pooled))  # (B, L)


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C) states, (B, T) 1/0 mask -> (B, C) unit vectors: the mean over real tokens, normalised."""
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return F.normalize(mean, p=2.0, dim=-1)


class BERT(nn.Module):
    def __init__(self, arch: EncoderArch) -> None:
        super().__init__()
        self.arch = arch
        self.block_size: int = arch.block_size
        self.embeddings = Embeddings(arch)
        self.h = nn.ModuleList([Block(arch, i) for i in range(arch.n_layer)])
        self.tied_weights: dict[str, str] = {}
        self.head: nn.Module | None = None
        if arch.task == "mlm":
            self.head = MaskedLMHead(arch, self.embeddings.wte)
            self.tied_weights = {"head.decoder.weight": "embeddings.wte.weight"}
        elif arch.task == "classification":
            self.head = ClassifierHead(arch)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (what LoRA adapts)."""
        return self.h

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids (B, T), attention_mask (B, T) 1 for real tokens, token_type_ids (B, T) -> states (B, T, C)."""
        if input_ids.size(1) > self.block_size:
            raise ValueError(f"input of {input_ids.size(1)} tokens exceeds block_size {self.block_size}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # (B, 1, T, T): every query sees the real keys. Spelled out over the queries (a view here) because
        # ONNX Runtime's Attention kernel (opset 23) does not broadcast the mask along the query axis.
        T = input_ids.size(1)
        key_mask = attention_mask.bool()[:, None, None, :].expand(-1, 1, T, T)
        x = self.embeddings(input_ids, token_type_ids)
        for block in self.h:
            x = block(x, key_mask)
        return x

    def neuron_groups(self) -> list[tuple[list[str], str]]:
        """Each block's MLP for structured pruning: the layer making its neurons and the layer reading them."""
        return [([f"h.{i}.mlp.c_fc"], f"h.{i}.mlp.c_proj") for i in range(len(self.h))]

    def reference_output(self, input_ids: torch.Tensor) -> torch.Tensor:
        """What an import is checked on against transformers' BertModel: the last hidden states."""
        return self.encode(input_ids, torch.ones_like(input_ids))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The task's output: mlm (B, T, V) logits, classification (B, L) logits, embedding (B, C) unit vectors."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        if self.head is None:
            return mean_pooled(hidden, attention_mask)
        if isinstance(self.head, ClassifierHead):
            return self.head(hidden, attention_mask)
        return self.head(hidden)


def build(arch: EncoderArch) -> BERT:
    return BERT(arch)


def architecture(model_cfg: Any, data_manifest: dict[str, Any]) -> EncoderArch:
    """The architecture a `model:` section describes, with the prepared data's vocabulary and labels."""
    task = model_cfg.task or ("classification" if data_manifest.get("labels") else "mlm")
    return EncoderArch(
        task=task,
        vocab_size=data_manifest["vocab_size"],
        n_layer=model_cfg.n_layer,
        n_head=model_cfg.n_head,
        n_embd=model_cfg.n_embd,
        block_size=model_cfg.block_size,
        mlp_hidden=[model_cfg.intermediate_size or 4 * model_cfg.n_embd] * model_cfg.n_layer,
        n_outputs=len(data_manifest["labels"]) if task == "classification" else 0,
        dropout=model_cfg.dropout,
        pad_id=data_manifest.get("pad_id", 0),
        pooling=model_cfg.pooling or "cls",
    )


def init_weights(model: BERT, scheme: str, std: float) -> None:
    """`bert`: N(0, std) for Linear and Embedding weights (BERT's initializer_range, 0.02), zero biases,
    LayerNorms at identity."""
    if scheme != "bert":
        raise ValueError(f"unknown init scheme {scheme!r} for a BERT model (known: bert)")
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
