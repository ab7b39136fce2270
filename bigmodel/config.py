"""The experiment config: one pydantic schema for defaults, help text, validation and the JSON Schema.

A config is one YAML file with shared top-level keys (run_dir, seed, threads, device), a `data` and a
`model` section, and one section per stage. Loading does, in order:

1. read the YAML (`yaml.safe_load` only) and merge the files it `extends` (a base first, this file on top);
2. resolve relative paths against the folder of the file that wrote them;
3. apply `--set key.path=value` overrides (value parsed as YAML; relative paths against the current dir);
4. validate: unknown keys are errors (with a did-you-mean), values are typed and range-checked, and
   cross-field checks are collected into one message.

Every failure is a UserError whose one line names the file, the key path, the problem and what is allowed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sysconfig
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from bigmodel.errors import UserError, did_you_mean
from bigmodel.metrics import SCALARS as SCALAR_METRICS

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, not silently dropped."""

    # Finite numbers only: `lr: .inf` or `.nan` is a typo, never a setting.
    model_config = ConfigDict(extra="forbid", validate_default=True, populate_by_name=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------- data


class TabularDataConfig(Section):
    format: Literal["tabular"] = Field("tabular", description="Kind of data: 'tabular' (a CSV file).")
    path: Path = Field(description="CSV file with a header row (may be gzip-compressed, *.csv.gz).")
    target: str = Field(description="Name of the column to predict.")
    features: list[str] | None = Field(
        None, description="Feature columns, in order. Default: every column except the target."
    )
    task: Literal["classification", "regression"] = Field(
        "classification", description="'classification' (target is a label) or 'regression' (a number)."
    )
    val_fraction: Fraction = Field(0.1, description="Fraction of rows held out for validation.")
    test_fraction: Fraction = Field(0.2, description="Fraction of rows held out for the final test.")
    train_subset: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Keep this fraction of the training rows (seeded; per class when "
        "stratified); val and test stay whole. For small-data experiments and learning curves.",
    )
    stratify: bool = Field(True, description="Keep class proportions equal across splits (classification only).")

    @model_validator(mode="after")
    def _fractions_leave_training_rows(self) -> TabularDataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"data.val_fraction ({self.val_fraction}) + data.test_fraction ({self.test_fraction}) "
                "must be < 0.9 so that training keeps at least 10% of the rows"
            )
        return self


class TokenizerConfig(Section):
    kind: Literal["char", "bpe", "file"] = Field(
        "char",
        description="char: one token per character (vocabulary from the data); bpe: byte-level BPE "
        "trained on the corpus (HF tokenizers); file: an existing tokenizer.json.",
    )
    vocab_size: int = Field(4096, ge=260, le=4_294_967_295, description="BPE vocabulary size.")
    path: Path | None = Field(None, description="tokenizer.json for kind 'file'.")

    @model_validator(mode="after")
    def _file_needs_path(self) -> TokenizerConfig:
        if self.kind == "file" and self.path is None:
            raise ValueError("data.tokenizer.kind 'file' needs data.tokenizer.path (a tokenizer.json)")
        return self


class RedactionConfig(Section):
    """What every text format's prepare can take out of the texts before they are tokenised."""

    redact: list[Literal["email", "phone", "ip", "credit_card", "secret"]] = Field(
        [],
        description="Replace these by a typed placeholder (<EMAIL>, <PHONE>, <IP>, <CREDIT_CARD>, <SECRET>) "
        "before tokenising: emails, phone numbers, IPv4/IPv6 addresses, card numbers (Luhn-checked) and common "
        "key shapes (AWS, GitHub, Slack, OpenAI, Google keys, private key blocks); counted per kind in the "
        "prepare report and manifest, with masked examples (bigmodel inspect).",
    )


class CleaningConfig(RedactionConfig):
    normalize: Literal["NFC", "NFKC", "none"] = Field("NFC", description="Unicode normalisation form.")
    strip_control: bool = Field(True, description="Drop control characters other than newline and tab.")
    dedupe: bool = Field(True, description="Drop exact duplicate documents (after cleaning).")
    min_chars: int = Field(1, ge=0, description="Drop documents shorter than this (after cleaning).")
    max_chars: int | None = Field(None, gt=0, description="Drop documents longer than this.")


class BPEDropoutAugment(Section):
    """Subword regularisation (Provilkov et al. 2020, BPE-dropout): extra copies of the training text,
    each segmented with every BPE merge skipped with probability `dropout` (seeded)."""

    kind: Literal["bpe_dropout"] = Field("bpe_dropout", description="Augmentation kind.")
    dropout: float = Field(0.1, gt=0.0, lt=1.0, description="Probability that a BPE merge is skipped.")
    copies: int = Field(
        1, ge=1, le=16, description="Differently segmented copies of the train text added to train.bin."
    )


class TextDataConfig(Section):
    format: Literal["text"] = Field("text", description="Kind of data: 'text' (files or JSONL).")
    path: Path | None = Field(
        None,
        description="A text file, a glob ('corpus/*.txt'), a .jsonl or .parquet file (a document per record), "
        "or a Hugging Face datasets folder (Dataset.save_to_disk). '{stdlib}' expands to this Python's "
        "standard-library folder.",
    )
    paths: list[Path] = Field([], description="More files or globs, read after data.path.")
    jsonl_field: str = Field(
        "text", description="Field (column) holding the text in .jsonl, .parquet and datasets-folder sources."
    )
    encoding: str = Field(
        "utf-8",
        description="Text encoding of the source files, e.g. latin-1 or cp1252 (any Python codec name).",
    )
    document: Literal["file", "paragraph", "line"] = Field(
        "file",
        description="What one document is in plain-text files (JSONL: one record). Cleaning filters, "
        "dedupe and the 'document' split work per document.",
    )
    cleaning: CleaningConfig = Field(default_factory=CleaningConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    split: Literal["tail", "document"] = Field(
        "tail",
        description="tail: the last val_fraction of the text is val (as nanoGPT); document: each "
        "document goes to val with probability val_fraction (seeded).",
    )
    val_fraction: Fraction = Field(0.1, description="Fraction of the text held out for validation.")
    chunk_chars: int = Field(
        1 << 20, ge=1024, description="Characters read at a time; peak memory follows this, not the corpus."
    )
    augment: list[BPEDropoutAugment] = Field(
        [], description="Applied by prepare to the train split only: [{kind: bpe_dropout, dropout: 0.1, copies: 1}]."
    )

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        import codecs

        try:
            return codecs.lookup(value).name
        except LookupError:
            raise ValueError(f"unknown text encoding {value!r}; e.g. utf-8, latin-1, cp1252") from None

    @model_validator(mode="after")
    def _has_a_source(self) -> TextDataConfig:
        if self.path is None and not self.paths:
            raise ValueError("set data.path (a file or glob) or data.paths")
        if self.augment and self.tokenizer.kind == "char":
            raise ValueError(
                "data.augment bpe_dropout needs a BPE tokenizer (data.tokenizer.kind: bpe): a "
                "character-level tokenizer has no merges to drop"
            )
        return self


class SFTDataConfig(Section):
    """Supervised fine-tuning examples in JSONL (one per line), Parquet or a datasets folder (one per row),
    in any of three shapes:
    {"prompt", "completion"}; Alpaca {"instruction", "input", "output"}; or chat {"messages": [{"role",
    "content"}, ...]} (system/user/assistant, OpenAI style)."""

    format: Literal["sft"] = Field("sft", description="Kind of data: 'sft' (instruction or chat examples, JSONL).")
    path: Path = Field(
        description="JSONL or Parquet file, or datasets folder (save_to_disk), of training examples (a val "
        "split is held out of it unless data.val_path is set)."
    )
    val_path: Path | None = Field(
        None,
        description="Validation examples (JSONL, Parquet or a datasets folder). Default: hold out data.val_fraction of data.path (seeded).",
    )
    val_fraction: Fraction = Field(0.1, description="Fraction of the examples held out for validation (no val_path).")
    template: Literal["auto", "model", "chatml", "plain"] = Field(
        "auto",
        description="How an example becomes text: model (the imported model's own chat template), "
        "chatml (built in), plain (prompt + completion, Alpaca's prompt for Alpaca records; single-turn only); "
        "auto: model when the model has a chat template, else chatml.",
    )
    train_on: Literal["completion", "all", "last_turn"] = Field(
        "completion",
        description="Tokens the loss covers: completion (every assistant turn, never the prompt), "
        "all (the whole rendered example), last_turn (the last assistant turn only).",
    )
    too_long: Literal["truncate", "error"] = Field(
        "truncate",
        description="An example longer than model.block_size tokens: truncate (cut its end; counted "
        "and reported) or error (refuse the data, naming the line).",
    )
    cleaning: RedactionConfig = Field(
        default_factory=RedactionConfig,
        description="Redaction of every text of the records (messages, prompts, completions) before rendering.",
    )


class TextClassificationDataConfig(Section):
    """Texts for an encoder: a CSV (header row) or JSONL file with a text column, optionally a second text
    column for sentence pairs, and a label column (classification); or a plain-text corpus (.txt) for
    masked-LM pre-training, cut into windows of model.block_size tokens."""

    format: Literal["text_classification"] = Field(
        "text_classification",
        description="Kind of data: 'text_classification' (texts for an encoder: labelled "
        "CSV or JSONL, or a .txt corpus for masked-LM pre-training).",
    )
    path: Path = Field(
        description="CSV file (header row; .csv.gz too), .jsonl or .parquet file, or datasets folder "
        "(save_to_disk) of texts, or a .txt corpus (masked-LM pre-training: split in order into train, val and "
        "test windows)."
    )
    text: str = Field("text", description="Column (CSV) or field (JSONL) holding the text.")
    text_pair: str | None = Field(
        None, description="Column holding the second text of a sentence pair (segment B), if the task has pairs."
    )
    label: str = Field(
        "label", description="Column holding each text's class label (read for model.task classification only)."
    )
    val_fraction: Fraction = Field(0.1, description="Fraction of the texts held out for validation.")
    test_fraction: Fraction = Field(0.1, description="Fraction of the texts held out for the final test.")
    stratify: bool = Field(True, description="Keep class proportions equal across splits.")
    too_long: Literal["truncate", "error"] = Field(
        "truncate",
        description="A text longer than model.block_size tokens ([CLS] and [SEP] included): "
        "truncate (cut its end; counted and reported) or error (refuse the data, naming the row).",
    )
    vocab_size: int = Field(
        8000,
        ge=100,
        description="Size of the WordPiece vocabulary trained on the training texts when no "
        "init.from brings the model's own tokenizer.",
    )
    cleaning: RedactionConfig = Field(
        default_factory=RedactionConfig,
        description="Redaction of the text column(s) (not the label) before tokenising, in every file prepare writes.",
    )

    @model_validator(mode="after")
    def _fractions_leave_training_rows(self) -> TextClassificationDataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"data.val_fraction ({self.val_fraction}) + data.test_fraction ({self.test_fraction}) "
                "must be < 0.9 so that training keeps at least 10% of the texts"
            )
        return self


def _tag_of(key: str, default: str) -> Any:
    """Pick a union member by `key`, defaulting when the config leaves it out."""
    return lambda value: value.get(key, default) if isinstance(value, dict) else getattr(value, key, default)


DataConfig = Annotated[
    Annotated[TabularDataConfig, Tag("tabular")]
    | Annotated[TextDataConfig, Tag("text")]
    | Annotated[SFTDataConfig, Tag("sft")]
    | Annotated[TextClassificationDataConfig, Tag("text_classification")],
    Discriminator(_tag_of("format", "tabular")),
]


# -------------------------------------------------------------------------------------------- model


class MLPConfig(Section):
    family: Literal["mlp"] = Field("mlp", description="Model family: 'mlp' (tabular).")
    hidden_sizes: list[Annotated[int, Field(gt=0)]] = Field(
        [256], description="Width of each hidden layer; [] gives a linear model."
    )
    activation: Literal["relu", "gelu", "tanh", "silu"] = Field("relu", description="Nonlinearity between layers.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout after each hidden layer.")


class GPTConfig(Section):
    family: Literal["gpt"] = Field("gpt", description="Model family: 'gpt' (decoder-only language model).")
    n_layer: int = Field(4, gt=0, description="Transformer blocks.")
    n_head: int = Field(4, gt=0, description="Attention (query) heads per block.")
    n_kv_head: int | None = Field(
        None, gt=0, description="Key/value heads (grouped-query attention, must divide n_head). Default: n_head."
    )
    n_embd: int = Field(128, gt=0, description="Embedding width (a multiple of n_head unless head_size is set).")
    head_size: int | None = Field(None, gt=0, description="Width of one head. Default: n_embd / n_head.")
    block_size: int = Field(64, gt=0, description="Context length in tokens.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on attention, residuals, embeddings.")
    bias: bool = Field(False, description="Biases in Linear layers and LayerNorms.")
    qkv_bias: bool | None = Field(
        None, description="Bias in the query/key/value projection (Qwen2 has it alone). Default: bias."
    )
    qk_norm: bool = Field(
        False, description="RMSNorm of each query and key head before the rotation (QK-norm: Qwen3, OLMo 2)."
    )
    position: Literal["learned", "rope"] = Field(
        "learned", description="Position encoding: learned embeddings (GPT-2) or rotary (rope, Llama)."
    )
    rope_theta: float = Field(10000.0, gt=0.0, description="rope: base of the rotation frequencies.")
    sliding_window: int | None = Field(
        None,
        gt=0,
        description="Sliding-window attention on every layer: a token sees itself and the sliding_window - 1 "
        "tokens before it (Mistral). Default: the whole context.",
    )
    rotary_dim: int | None = Field(
        None,
        gt=0,
        description="rope: turn only the first rotary_dim values of each head (partial rotary, as "
        "Phi-4-mini and GPT-NeoX). Default: the whole head.",
    )
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="layernorm (GPT-2) or rmsnorm (Llama).")
    norm_eps: float = Field(1e-5, gt=0.0, description="Epsilon of the norms.")
    mlp: Literal["gelu", "gelu_tanh", "swiglu"] = Field(
        "gelu", description="MLP: gelu, gelu_tanh (GPT-2's approximation) or swiglu (Llama: gate, up, down)."
    )
    intermediate_size: int | None = Field(None, gt=0, description="MLP hidden width. Default: 4 x n_embd.")
    tie_embeddings: bool = Field(True, description="The output head shares the token embedding's weights.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTConfig:
        problems = []
        if self.head_size is None and self.n_embd % self.n_head:
            problems.append(
                f"model.n_embd ({self.n_embd}) must be a multiple of model.n_head ({self.n_head}) "
                "(or set model.head_size)"
            )
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            problems.append(f"model.n_kv_head ({self.n_kv_head}) must divide model.n_head ({self.n_head})")
        if self.position == "rope" and (self.head_size or self.n_embd // self.n_head) % 2:
            problems.append("model.position 'rope' needs an even head size")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class BERTConfig(Section):
    family: Literal["bert"] = Field("bert", description="Model family: 'bert' (bidirectional encoder).")
    task: Literal["classification", "mlm", "embedding"] | None = Field(
        None,
        description="The head: classification (the data's labels), mlm (masked-token pre-training) or "
        "embedding (mean-pooled, normalised sentence vectors). Default: mlm for a .txt corpus, else classification.",
    )
    n_layer: int = Field(4, gt=0, description="Transformer blocks.")
    n_head: int = Field(4, gt=0, description="Attention heads per block (must divide n_embd).")
    n_embd: int = Field(128, gt=0, description="Hidden width.")
    block_size: int = Field(128, gt=0, description="Longest input in tokens ([CLS] and [SEP] included).")
    intermediate_size: int | None = Field(None, gt=0, description="MLP hidden width. Default: 4 x n_embd.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on embeddings, attention and residuals.")
    pooling: Literal["cls", "mean"] | None = Field(
        None,
        description="What a classifier reads: the [CLS] token through BERT's pooler (cls), or the mean of "
        "the token states (mean). Default: the imported model's own (a sentence-transformers folder declares "
        "it in 1_Pooling/config.json), else cls.",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> BERTConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be a multiple of model.n_head ({self.n_head})")
        return self


ModelConfig = Annotated[
    Annotated[MLPConfig, Tag("mlp")] | Annotated[GPTConfig, Tag("gpt")] | Annotated[BERTConfig, Tag("bert")],
    Discriminator(_tag_of("family", "mlp")),
]
# Union members are picked by these keys; pydantic puts the member's tag into error locations.
TAG_KEYS = {"data": "format", "model": "family", "steps": "method", "augment": "kind"}


# --------------------------------------------------------------------------------------- the stages

InitScheme = Literal["gpt2", "normal", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"]


class InitConfig(Section):
    scheme: InitScheme | None = Field(
        None,
        description="Weight init: gpt2 (gpt only), normal, xavier_uniform, xavier_normal, "
        "kaiming_uniform, kaiming_normal (biases zero). Default: the family's own (mlp: "
        "kaiming_uniform, gpt: gpt2).",
    )
    std: float = Field(0.02, gt=0.0, description="Standard deviation for scheme 'normal'.")
    from_: Path | None = Field(
        None,
        alias="from",
        description="Import a pretrained decoder instead of initialising one: a Hugging Face model folder "
        "(config.json + safetensors; gpt2, llama, mistral, qwen2, qwen3, phi3, bert) or a llama, qwen2 or "
        "qwen3 GGUF file. Its tokenizer is "
        "used by prepare, and the model section is filled from it.",
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Import: dtype of the written init checkpoint. auto keeps the source's (a bf16 model "
        "stays bf16: no fp32 copy of it is ever made); a quantised GGUF is dequantised to fp32. Training upcasts "
        "to fp32.",
    )
    verify: bool = Field(
        True,
        description="Import: check the model's logits against transformers loading the same files "
        "(needs the 'hf' extra); false records the checkpoint as unverified.",
    )
    atol: float = Field(1e-4, gt=0.0, description="Import parity gate: max abs logit difference allowed (fp32).")
    rtol: float = Field(
        1e-5,
        ge=0.0,
        description="Import parity gate: also allow rtol x transformers' largest |logit| (atol + "
        "rtol x max|logit|): fp32 rounding grows with the logits' scale.",
    )


class NoiseAugment(Section):
    """Gaussian noise on the features, scaled by each feature's training standard deviation."""

    kind: Literal["noise"] = Field("noise", description="Augmentation kind.")
    std: float = Field(0.1, gt=0.0, description="Noise std in units of each feature's training std.")
    p: float = Field(1.0, gt=0.0, le=1.0, description="Probability that a training row is augmented.")


class FeatureDropoutAugment(Section):
    """Each feature of a row is replaced by its training mean (0 after standardisation) with probability rate."""

    kind: Literal["feature_dropout"] = Field("feature_dropout", description="Augmentation kind.")
    rate: float = Field(0.1, gt=0.0, lt=1.0, description="Probability that a feature is dropped.")
    p: float = Field(1.0, gt=0.0, le=1.0, description="Probability that a training row is augmented.")


class MixupAugment(Section):
    """mixup (Zhang et al. 2018): a row and its one-hot label become a convex combination with another
    row of the batch and its label, with weight lambda ~ Beta(alpha, alpha). Classification only."""

    kind: Literal["mixup"] = Field("mixup", description="Augmentation kind.")
    alpha: float = Field(0.2, gt=0.0, description="Beta(alpha, alpha) parameter of the mixing weight.")
    p: float = Field(1.0, gt=0.0, le=1.0, description="Probability that a training row is mixed.")


TabularAugment = Annotated[
    Annotated[NoiseAugment, Tag("noise")]
    | Annotated[FeatureDropoutAugment, Tag("feature_dropout")]
    | Annotated[MixupAugment, Tag("mixup")],
    Discriminator(_tag_of("kind", "noise")),
]


class FSDPConfig(Section):
    param_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="dtype the gathered parameters compute in (bf16 halves all-gather traffic)."
    )
    reduce_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="dtype gradients are reduce-scattered in (fp32 keeps the sum exact enough)."
    )
    reshard_after_forward: bool = Field(
        True, description="Free gathered parameters after forward (less memory, one more all-gather)."
    )


LORA_GROUPS = {
    "attention": ("q", "k", "v", "o"),
    "mlp": ("gate", "up", "down"),
    "all-linear": ("q", "k", "v", "o", "gate", "up", "down"),
}
LoRATarget = Literal["q", "k", "v", "o", "gate", "up", "down", "attention", "mlp", "all-linear"]


class LoRAConfig(Section):
    """Low-rank adapters (Hu et al. 2021): W x + (alpha / rank) B A x on the targeted projections, with the
    base weights frozen. A is Kaiming-initialised and B zero, so training starts from the base model."""

    rank: int = Field(8, gt=0, description="Rank r of each adapter (A: r x in, B: out x r).")
    alpha: float = Field(16.0, gt=0.0, description="Scale: the update is multiplied by alpha / rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    targets: list[LoRATarget] = Field(
        ["all-linear"],
        min_length=1,
        description="Projections that get adapters, the same names for GPT-2 and Llama-style models: q, k, v, o "
        "(attention), gate, up, down (MLP; GPT-2's MLP has up and down), or the groups attention, mlp, all-linear "
        "(every projection but the output head; QLoRA, Dettmers et al. 2023, found this matches full fine-tuning).",
    )

    def projections(self) -> tuple[str, ...]:
        """The targets with groups expanded, in a fixed order."""
        wanted = {name for target in self.targets for name in LORA_GROUPS.get(target, (target,))}
        return tuple(name for name in LORA_GROUPS["all-linear"] if name in wanted)


class PrivacyConfig(Section):
    """Differentially private training: DP-SGD (Abadi et al. 2016) through Opacus. Each step draws its
    examples by Poisson sampling (each with probability batch_size / examples), clips every example's
    gradient to max_grad_norm and adds Gaussian noise of std noise_multiplier x max_grad_norm; the
    accountant turns (sample rate, noise, steps) into the (epsilon, delta) the run has spent."""

    target_epsilon: float | None = Field(
        None, gt=0.0, description="Pick the noise so the whole schedule spends this epsilon (at delta)."
    )
    noise_multiplier: float | None = Field(
        None, ge=0.0, description="Or set the noise directly: std of the noise / max_grad_norm."
    )
    delta: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="The delta of (epsilon, delta). Default: 1 / (10 x training examples), below the "
        "1 / examples that a meaningful guarantee needs.",
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="Each example's gradient is clipped to this L2 norm.")
    accountant: Literal["rdp", "prv"] = Field(
        "rdp",
        description="rdp: Renyi DP (Mironov 2017), Opacus's default; prv: privacy random variables "
        "(Gopi et al. 2021), a tighter epsilon for the same noise.",
    )

    @model_validator(mode="after")
    def _one_noise_setting(self) -> PrivacyConfig:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "train.privacy: set exactly one of target_epsilon (the noise is chosen to spend it) and "
                "noise_multiplier"
            )
        return self


# Fine-tuning a pretrained model wants far gentler defaults than training from scratch (HF Trainer's 3 epochs;
# 2e-5 is BERT's and full fine-tuning's usual rate, 2e-4 LoRA's, as in QLoRA and most SFT recipes).
FINE_TUNE_EPOCHS, FINE_TUNE_LR, FINE_TUNE_LORA_LR = 3, 2e-5, 2e-4


class TrainConfig(Section):
    optimizer: Literal["sgd", "adam", "adamw"] = Field("adamw", description="sgd, adam or adamw.")
    lr: float = Field(
        1e-3,
        gt=0.0,
        description="Peak learning rate. Fine-tuning an imported model (init.from) "
        f"defaults to {FINE_TUNE_LR} ({FINE_TUNE_LORA_LR} with train.lora) instead.",
    )
    weight_decay: float = Field(0.0, ge=0.0, description="Weight decay (decoupled for adamw).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd with momentum > 0).")
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        (0.9, 0.999), description="Adam/AdamW betas."
    )
    schedule: Literal["constant", "cosine", "linear"] = Field(
        "cosine",
        description="LR schedule after warmup: constant, cosine (decay to min_lr) or linear (to min_lr).",
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to lr.")
    min_lr: float = Field(0.0, ge=0.0, description="LR at the end of cosine/linear decay.")
    batch_size: int = Field(64, gt=0, description="Rows per optimizer step.")
    epochs: int | None = Field(
        50,
        gt=0,
        description="Passes over the training rows. Fine-tuning an imported "
        f"model (init.from) defaults to {FINE_TUNE_EPOCHS} instead.",
    )
    max_steps: int | None = Field(
        None, gt=0, description="Stop after this many optimizer steps (overrides epochs when set)."
    )
    eval_every: int | None = Field(None, gt=0, description="Evaluate on val every N steps. Default: once per epoch.")
    patience: int | None = Field(
        None, gt=0, description="Early stopping: stop after N evaluations without improvement."
    )
    monitor: Literal["loss", "accuracy"] = Field(
        "loss", description="Val metric that picks the best checkpoint and drives early stopping."
    )
    grad_clip: float | None = Field(None, gt=0.0, description="Clip the global gradient norm.")
    grad_accum_steps: int = Field(
        1, gt=0, description="Micro-batches per optimizer step; the step sees batch_size x this."
    )
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32",
        description="bf16: autocast matmuls to bfloat16 (CPU and CUDA); weights stay fp32. auto: bf16 where "
        "the device multiplies bf16 natively (CUDA GPUs that support it; CPUs with AVX512-BF16 or AMX), fp32 "
        "elsewhere (emulated bf16 is many times slower); train prints and records which it used.",
    )
    compile: bool = Field(False, description="torch.compile the model.")
    eval_batches: int = Field(
        50,
        gt=0,
        description="Val batches per evaluation (the same fixed batches every time). If that "
        "many would cover more than the val split, the split is tiled instead: each token scored once.",
    )
    log_every: int | None = Field(
        None,
        gt=0,
        description="Append train loss, lr and tokens/s every N steps. "
        "Default: often enough for about 50 points over the run (every step of a run of "
        "50 steps or fewer), at most every 50 steps.",
    )
    save_every: int | None = Field(
        None, gt=0, description="Write the resumable 'last' checkpoint every N steps. Default: eval_every."
    )
    loss: Literal["auto", "cross_entropy", "mse"] = Field(
        "auto", description="auto: cross_entropy for classification, mse for regression."
    )
    augment: list[TabularAugment] = Field(
        [],
        description="Transforms applied, in order, to training batches only (never val/test), "
        "e.g. [{kind: noise, std: 0.1}, {kind: mixup, alpha: 0.2}]. Text: see data.augment.",
    )
    tensorboard: bool = Field(
        False, description="Also log metrics to TensorBoard in <run_dir>/train/tensorboard (the 'tensorboard' extra)."
    )
    mlflow: bool | str = Field(
        False,
        description="Also record the run in MLflow (the 'mlflow' extra): the resolved config as parameters, "
        "every metrics.jsonl line, metrics.jsonl and config.yaml as artifacts. true: $MLFLOW_TRACKING_URI, else "
        "a local store, sqlite:///<run_dir>/mlflow.db; or a tracking URI (http://host:5000, sqlite:///path.db). "
        "The experiment is the run folder's name; a resumed run continues its MLflow run.",
    )

    @field_validator("mlflow")
    @classmethod
    def _a_tracking_uri(cls, value: bool | str) -> bool | str:
        if isinstance(value, str) and not value.strip():
            raise ValueError("train.mlflow '' names no tracking URI: set true (a local store) or a URI")
        return value

    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun: ddp replicates the model on every rank; fsdp (FSDP2) shards "
        "parameters, gradients and optimizer state. The global batch stays batch_size x grad_accum_steps.",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend. auto: nccl on CUDA, gloo on CPU."
    )
    timeout_s: int = Field(
        1800, gt=0, description="Seconds a rank waits for the others in a collective before failing."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each block's activations in backward (less memory, ~1/3 more compute)."
    )
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig, description="FSDP2 settings (train.distributed: fsdp).")
    lora: LoRAConfig | None = Field(
        None,
        description="Train low-rank adapters instead of every weight, e.g. {rank: 8, alpha: 16, targets: "
        "[attention]}; checkpoints then hold the adapter only, tied to the init checkpoint by its sha256.",
    )
    privacy: PrivacyConfig | None = Field(
        None,
        description="Train with differential privacy (DP-SGD through Opacus, the 'privacy' extra), e.g. "
        "{target_epsilon: 3} or {noise_multiplier: 1.0, max_grad_norm: 1.0}: the MLP, an encoder classifier, "
        "or LoRA adapters of a decoder on sft data. The epsilon spent is logged at every evaluation and kept "
        "in every checkpoint.",
    )

    @model_validator(mode="after")
    def _optimizer_settings_agree(self) -> TrainConfig:
        problems = []
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            problems.append(
                f"train.nesterov needs train.optimizer 'sgd' with train.momentum > 0 "
                f"(got optimizer '{self.optimizer}', momentum {self.momentum})"
            )
        if self.min_lr > self.lr:
            problems.append(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        if self.epochs is None and self.max_steps is None:
            problems.append("set train.epochs or train.max_steps")
        if self.privacy is not None:
            problems += self._private_training_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _private_training_problems(self) -> list[str]:
        """What DP-SGD cannot be combined with, by name (each example's gradient must be its own,
        clipped once per step; the step's examples drawn by Poisson sampling)."""
        problems = []
        if self.grad_clip is not None:
            problems.append(
                "train.grad_clip with train.privacy: DP-SGD clips each example's gradient at "
                "train.privacy.max_grad_norm instead; remove train.grad_clip"
            )
        if self.grad_accum_steps != 1:
            problems.append(
                "train.grad_accum_steps with train.privacy: a private step's examples are one Poisson "
                "draw; set grad_accum_steps 1 and raise train.batch_size"
            )
        if self.compile:
            problems.append("train.compile with train.privacy: Opacus's per-example hooks need eager mode")
        if self.activation_checkpointing:
            problems.append(
                "train.activation_checkpointing with train.privacy: recomputed forwards would be seen "
                "twice by Opacus's hooks; remove it"
            )
        if self.precision == "bf16":
            problems.append("train.precision 'bf16' with train.privacy: private training runs in fp32")
        mixing = [augment.kind for augment in self.augment if augment.kind == "mixup"]
        if mixing:
            problems.append(
                "train.augment mixup with train.privacy: a mixed row carries two examples, so one "
                "example's gradient is no longer its own; remove mixup"
            )
        return problems


CheckpointRef = Annotated[
    str,
    Field(description="Which checkpoint: 'best', 'last', 'init', or a path to a .safetensors file."),
]


class EvalConfig(Section):
    split: Literal["val", "test"] | None = Field(
        None, description="Which held-out split to evaluate. Default: test (tabular), val (text has only val)."
    )
    checkpoint: CheckpointRef = "best"
    output: Path | None = Field(
        None,
        description="Where the metrics go. Default: <run_dir>/eval/metrics.json for the run's best "
        "checkpoint; metrics.<name>.json beside it for any other (metrics.last.json, metrics.model.int8.json), "
        "so evaluating another artifact never overwrites the run's result.",
    )
    fail_under: dict[str, float] = Field(
        {}, description="Gate: exit 1 when a metric is below its value, e.g. {accuracy: 0.97}."
    )
    fail_above: dict[str, float] = Field(
        {}, description="Gate: exit 1 when a metric is above its value, e.g. {loss: 2.0}."
    )
    text_file: Path | None = Field(
        None, description="gpt: score this text file (encoded with the run's tokenizer) instead of val."
    )
    samples: int = Field(0, ge=0, description="gpt: print this many samples generated from the prompt.")
    prompt: str = Field("\n", description="gpt: prompt the samples start from.")
    max_new_tokens: int = Field(200, gt=0, description="gpt: tokens generated per sample.")
    temperature: float = Field(0.8, ge=0.0, description="gpt: sampling temperature (0 = greedy).")
    top_k: int | None = Field(200, gt=0, description="gpt: sample only among the k likeliest tokens.")


class Int4Export(Section):
    """export.dtype int4: symmetric block quantisation with onnxruntime.quantization's kernel, as compress
    quantize bits 4 does, made as each matrix is written."""

    block_size: int = Field(32, ge=16, description="Weights per quantisation block (a power of 2).")
    accuracy_level: int | None = Field(
        4,
        ge=0,
        le=4,
        description="The precision MatMulNBits computes in (4: int8 activations per block, as "
        "llama.cpp, several times faster on CPU; 0/None: fp32).",
    )
    head: Literal["int4", "int8", "fp32"] = Field(
        "int8",
        description="The output head's weights: int8 blocks (closest to the scores), int4, or fp32.",
    )
    embeddings: Literal["int4", "int8", "fp32"] | None = Field(
        None,
        description="The token-embedding table (GatherBlockQuantized): int8 or int4 blocks, or fp32. "
        "Default: as the head (a tied embedding is then stored once, read by both).",
    )
    int8_block_size: int | None = Field(
        None,
        ge=16,
        description="Weights per block of the 8-bit matrices (head, embeddings; a power of 2). Default: "
        "the widest of 256, 128, 64, 32 that divides the model width (8 bits in blocks of 256 round ~10x closer "
        "than 4 bits in blocks of 32, and read faster than 8 bits in blocks of 32).",
    )

    @property
    def embedding_format(self) -> str:
        return self.embeddings or self.head

    @model_validator(mode="after")
    def _power_of_two(self) -> Int4Export:
        for key, size in (("block_size", self.block_size), ("int8_block_size", self.int8_block_size or 16)):
            if size & (size - 1):
                raise ValueError(f"export.int4.{key} {size} must be a power of 2 (16, 32, 64, 128, 256)")
        return self


ExportFormat = Literal["onnx", "hf", "genai", "gguf"]
FORMATS_OF = {"onnx": ["onnx"], "hf": ["hf"], "genai": ["onnx", "genai"], "gguf": ["gguf"], "both": ["onnx", "hf"]}
WRITE_ORDER = ("onnx", "hf", "genai", "gguf")


class GGUFExport(Section):
    dtype: Literal["f32", "f16", "bf16", "q8_0", "q4_k_m"] = Field(
        "f16",
        description="format gguf: the matrices' type (norms and biases stay f32, as llama.cpp writes them); "
        "q8_0 is llama.cpp's 8-bit blocks of 32 (a matrix whose rows are not whole blocks: f16); q4_k_m is "
        "llama.cpp's 4-bit K-quant mix, made by its own quantizer from the f16 file (needs llama-cpp-python).",
    )


class ExportConfig(Section):
    checkpoint: CheckpointRef = "best"
    format: Literal["onnx", "hf", "genai", "gguf", "both"] | list[ExportFormat] = Field(
        "onnx",
        description="onnx: model.onnx for ONNX Runtime; hf: a Hugging Face folder (export/hf: gpt2, llama, "
        "qwen2 or qwen3, checked by loading it in transformers); genai: model.onnx and export/genai, the folder "
        "onnxruntime-genai's runtime loads (genai_config.json, tokenizer files; checked by generating with it); "
        "gguf: model.gguf for llama.cpp (llama, qwen2, qwen3; export.gguf.dtype); both: onnx and hf; or a list, "
        "e.g. [onnx, hf, genai, gguf].",
    )
    gguf: GGUFExport = Field(default_factory=lambda: GGUFExport(), description="format gguf: how it is written.")
    opset: int = Field(
        23,
        ge=18,
        le=23,
        description="ONNX opset. 23: a decoder's attention is one Attention node per layer "
        "(ONNX Runtime >= 1.23 runs it on CPU as one kernel: faster decoding); 18 for older runtimes or "
        "providers without that op (attention written out as MatMul and Softmax nodes).",
    )
    attention: Literal["auto", "onnx", "ort"] = Field(
        "auto",
        description="gpt: how the decoder graph attends. ort: one ONNX Runtime GroupQueryAttention node per "
        "layer, rows padded on the right and the KV cache written in place (infer and onnxruntime-genai bind "
        "one buffer per layer as past and present: no copy of the cache per token); onnx: ONNX's own "
        "Attention (opset 23), for any ONNX runtime; auto: ort where ONNX Runtime's operator computes the "
        "model (opset 23, head size and rotary width multiples of 16, no separate local rotary base), else onnx.",
    )
    atol: float = Field(1e-4, gt=0.0, description="Parity gate: max abs difference allowed between ONNX and PyTorch.")
    rtol: float = Field(
        1e-5,
        ge=0.0,
        description="gpt and format hf: the parity gates also allow rtol x the largest |logit| of "
        "the reference (atol + rtol x max|logit|): fp32 rounding grows with the logits' scale, and a deep model's "
        "logits of +-30 differ by ~1e-4 between two correct runtimes.",
    )
    parity_rows: int = Field(256, gt=0, description="mlp: held-out rows used by the parity check.")
    parity_steps: int = Field(
        8, ge=1, description="gpt: decode steps after the prompt in the parity check (held-out text)."
    )
    optimize: bool = Field(
        False, description="gpt: also save ONNX Runtime's offline-optimised graph (model.optimized.onnx)."
    )
    external_data: bool = Field(
        False, description="Store weights in model.onnx.data (always done past 2 GB of weights)."
    )
    peft: bool = Field(
        False,
        description="A LoRA checkpoint: also write its adapter as a PEFT folder (export/peft: "
        "adapter_config.json + adapter_model.safetensors) for the Hugging Face ecosystem; with format gguf, "
        "also export/base.gguf + export/lora.gguf for llama.cpp (--lora).",
    )
    dtype: Literal["fp32", "fp16", "int4"] = Field(
        "fp32",
        description="gpt: the ONNX model's weights. fp16 halves the file and the cache (computation in "
        "fp16), for GPU providers (cuda, tensorrt); ONNX Runtime's CPU provider runs it too, slower than fp32; "
        "its gate uses fp16_atol. int4: weight-only 4-bit blocks (MatMulNBits) quantised as each matrix is "
        "written, fp32 activations and cache, the head and embedding as export.int4 says; its gate holds the file "
        "to the model its blocks hold (int4_max_error) and reports the distance from the fp32 model.",
    )
    experts: Literal["routed", "dense"] = Field(
        "routed",
        description="gpt, a mixture of experts: routed writes each layer's experts as one ONNX Runtime MoE "
        "node (QMoE in int4, the router kept float) that computes only the picked experts (4x faster decoding "
        "than dense on an OLMoE-shaped model, 8 of 64: docs/benchmarks.md); dense computes every expert on every "
        "token and weights the "
        "unpicked ones by 0 in standard ONNX operators, for runtimes without com.microsoft's MoE. The same "
        "numbers either way (each through the gate).",
    )
    int4: Int4Export = Field(
        default_factory=lambda: Int4Export(), description="dtype int4: how the weights are quantised."
    )
    int4_max_error: float = Field(
        0.3,
        gt=0.0,
        description="dtype int4: the gate's limit on the relative error of the file's logits against "
        "the PyTorch model with the same int4 blocks, RMS(diff) / RMS(reference around its mean) on held-out text. "
        "Measured when correct: 0.002 on a trained model, 0.03-0.10 on random 1B-8B models (accuracy level 4 "
        "rounds activations to int8, and random deep networks amplify it); a wrong layout gives ~1.4. The "
        "distance from the fp32 model (what int4 costs) is measured and reported beside.",
    )
    fp16_atol: float = Field(
        0.1,
        gt=0.0,
        description="dtype fp16: max abs logit difference allowed against the fp32 PyTorch model "
        "(fp16 keeps ~3 significant digits; logits of 10-30 differ by a few hundredths).",
    )

    @property
    def formats(self) -> list[str]:
        """What the export writes, in the order it writes them (genai is made from the ONNX file)."""
        chosen = self.format if isinstance(self.format, list) else [self.format]
        wanted = {written for name in chosen for written in FORMATS_OF[name]}
        return [name for name in WRITE_ORDER if name in wanted]

    @field_validator("format")
    @classmethod
    def _some_format(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("export.format [] writes nothing: name one or more of onnx, hf, genai, gguf")
        return value

    @model_validator(mode="after")
    def _settings_of_another_dtype(self) -> ExportConfig:
        # By value, not by what was written: a run's resolved config (config.yaml) spells every key out.
        for key, dtype in (("int4", "int4"), ("int4_max_error", "int4"), ("fp16_atol", "fp16")):
            if (
                getattr(self, key) != type(self).model_fields[key].get_default(call_default_factory=True)
                and self.dtype != dtype
            ):
                raise ValueError(
                    f"export.{key} applies to export.dtype {dtype} (the dtype is {self.dtype}); "
                    f"set export.dtype={dtype} or remove it"
                )
        if self.gguf != GGUFExport() and "gguf" not in self.formats:
            raise ValueError(
                f"export.gguf applies to export.format gguf (the format is {self.format!r}); add gguf or remove it"
            )
        return self


class QuantizeStep(Section):
    """int8 through onnxruntime.quantization on the exported graph (quant_pre_process first)."""

    method: Literal["quantize"] = Field("quantize", description="Step kind.")
    mode: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="dynamic: int8 weights, activations quantised on the fly (no data needed); static: "
        "activations too, with ranges calibrated on training batches (needs the prepared data).",
    )
    calibration: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="static: how activation ranges are chosen from the calibration batches."
    )
    calibration_batches: int = Field(8, gt=0, description="static: training batches used for calibration.")
    per_channel: bool = Field(False, description="One scale per output channel of each weight matrix.")
    bits: Literal[8, 4] = Field(
        8,
        description="8: int8 (mode dynamic or static); 4: int4 weight-only, block-wise (onnxruntime's "
        "MatMulNBits), for the matrix products of a language model.",
    )
    block_size: int = Field(32, ge=16, description="bits 4: weights per quantisation block (a power of 2).")
    symmetric: bool = Field(True, description="bits 4: symmetric blocks (no zero point).")
    accuracy_level: int | None = Field(
        4,
        ge=0,
        le=4,
        description="bits 4: the precision MatMulNBits computes in (4: int8 activations per "
        "block, as llama.cpp, and several times faster on CPU; 0/None: fp32).",
    )
    head: Literal["int4", "int8", "fp32"] = Field(
        "int8",
        description="bits 4, language models: the output head's weights (the largest matrix of a "
        "small model with a big vocabulary, and the one closest to the scores): int8 blocks (weight-only, "
        "like the rest), int4 like the rest, or left in fp32.",
    )
    embeddings: bool = Field(
        False,
        description="bits 4, language models: store the token-embedding table in 4-bit blocks too "
        "(GatherBlockQuantized); otherwise it stays fp32.",
    )
    int8_block_size: int | None = Field(
        None,
        ge=16,
        description="bits 4, head int8: weights per block of the head (a power of 2). Default: the "
        "widest of 256, 128, 64, 32 that divides the model width, as export.int4 does.",
    )
    keep_grids: bool = Field(
        True,
        description="bits 4: weights already on a 4-bit grid of 32-blocks (a model imported from a "
        "Q4_0/Q4_1 GGUF) keep that grid exactly instead of being rounded onto another one.",
    )

    @property
    def needs_data(self) -> bool:
        return self.mode == "static"

    @model_validator(mode="after")
    def _int4_is_weight_only(self) -> QuantizeStep:
        if self.bits == 4 and self.mode == "static":
            raise ValueError("compress quantize bits 4 is weight-only: use mode 'dynamic'")
        if self.bits == 8 and (self.head != "int8" or self.embeddings or not self.keep_grids):
            raise ValueError(
                "compress quantize head, embeddings and keep_grids are bits 4 options (int8 "
                "quantises every matrix product, the head included)"
            )
        for key, size in (("block_size", self.block_size), ("int8_block_size", self.int8_block_size or 16)):
            if size & (size - 1):
                raise ValueError(f"compress quantize {key} {size} must be a power of 2 (16, 32, 64, 128, 256)")
        if self.bits == 8 and self.int8_block_size:
            raise ValueError("compress quantize int8_block_size is a bits 4 option (the int8 head's blocks)")
        return self


class PruneStep(Section):
    """Magnitude pruning of a checkpoint, optionally fine-tuned by the normal training loop."""

    method: Literal["prune"] = Field("prune", description="Step kind.")
    kind: Literal["unstructured", "structured"] = Field(
        "unstructured",
        description="unstructured: zero the smallest weights; structured: remove whole MLP neurons (gpt, bert) "
        "or hidden units (mlp), so the saved model is smaller and faster.",
    )
    scope: Literal["global", "layer"] = Field(
        "global", description="unstructured: one threshold over all weight matrices, or one per matrix."
    )
    structure: Literal["mlp", "heads"] = Field(
        "mlp",
        description="structured: what is removed — mlp: MLP neurons (gpt, bert) or hidden units (mlp); heads: "
        "attention heads (gpt; the same number in every layer, so the KV cache keeps one shape).",
    )
    sparsity: float = Field(
        0.5, ge=0.0, lt=1.0, description="Fraction of weights (unstructured) or neurons (structured) removed."
    )
    schedule: Literal["one_shot", "gradual"] = Field(
        "one_shot", description="gradual: prune in `rounds` steps of a cubic schedule (Zhu & Gupta 2017)."
    )
    rounds: int = Field(4, gt=0, description="gradual: pruning rounds; fine-tuning is split between them.")
    finetune_steps: int = Field(
        0, ge=0, description="Training steps after pruning (normal loop; pruned weights stay zero)."
    )
    finetune_lr: float | None = Field(
        None, gt=0.0, description="Constant LR for fine-tuning. Default: train.min_lr, or train.lr / 10."
    )

    @property
    def needs_data(self) -> bool:
        return self.finetune_steps > 0

    @model_validator(mode="after")
    def _options_of_its_kind(self) -> PruneStep:
        """A setting of the other kind would be ignored: refused instead (no key is silently ignored)."""
        other = {"unstructured": ("structure",), "structured": ("scope",)}[self.kind]
        given = [key for key in other if key in self.model_fields_set]
        if given:
            kind = "structured" if self.kind == "unstructured" else "unstructured"
            raise ValueError(f"{given[0]} is an option of kind '{kind}' pruning; set kind: {kind} or remove {given[0]}")
        if self.schedule == "one_shot" and "rounds" in self.model_fields_set:
            raise ValueError("rounds is an option of schedule 'gradual'; set schedule: gradual or remove rounds")
        if self.finetune_steps == 0 and self.finetune_lr is not None:
            raise ValueError("finetune_lr needs finetune_steps > 0")
        return self


class DistillStep(Section):
    """Knowledge distillation (Hinton et al. 2015) into a smaller student, trained by the normal loop."""

    method: Literal["distill"] = Field("distill", description="Step kind.")
    student: dict[str, Any] = Field(
        description="The student: model settings that differ from the teacher's, e.g. {n_layer: 2}."
    )
    alpha: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Weight of the soft loss: alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy.",
    )
    temperature: float = Field(2.0, gt=0.0, description="Softening temperature T for both distributions.")
    steps: int = Field(1000, gt=0, description="Training steps for the student.")
    lr: float | None = Field(None, gt=0.0, description="Student peak LR. Default: train.lr.")

    @property
    def needs_data(self) -> bool:
        return True


CompressStep = Annotated[
    Annotated[QuantizeStep, Tag("quantize")]
    | Annotated[PruneStep, Tag("prune")]
    | Annotated[DistillStep, Tag("distill")],
    Discriminator(_tag_of("method", "quantize")),
]


class CompressConfig(Section):
    checkpoint: CheckpointRef = "best"
    steps: list[CompressStep] = Field(
        [], description="Ordered compression steps, e.g. [{method: prune, sparsity: 0.5}, {method: quantize}]."
    )

    @model_validator(mode="after")
    def _onnx_steps_come_last(self) -> CompressConfig:
        kinds = [step.method for step in self.steps]
        if "quantize" in kinds and kinds.index("quantize") != len(kinds) - 1:
            raise ValueError("compress.steps: 'quantize' makes an ONNX model, so it must be the last step")
        return self


PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}  # short names for infer.providers / --provider


class InferConfig(Section):
    model: Path | None = Field(None, description="ONNX model. Default: <run_dir>/export/model.onnx.")
    input: Path | None = Field(
        None,
        description='mlp: CSV or JSONL rows to predict; gpt: prompts, one per line or JSONL {"prompt": ...}; '
        "'-' for stdin. Default (mlp): the prepared test split (<run_dir>/prepare/test.csv).",
    )
    output: Path | None = Field(
        None,
        description="Where predictions go (CSV or JSONL; gpt: text or JSONL), or '-' for stdout. "
        "Default: <run_dir>/infer/predictions.csv (mlp) or generations.jsonl (gpt).",
    )
    format: Literal["auto", "csv", "jsonl"] = Field(
        "auto",
        description="Input/output format; auto goes by the file extension (.jsonl, else csv); on stdin a "
        "first line starting with '{' means jsonl.",
    )
    batch_size: int = Field(1024, gt=0, description="Rows per ONNX Runtime call.")
    threads: int | None = Field(
        None, gt=0, description="ONNX Runtime intra-op threads. Default: the top-level threads."
    )
    providers: list[str] = Field(
        ["CPUExecutionProvider"],
        description="ONNX Runtime execution providers in priority order: cpu, cuda, tensorrt (the GPU ones "
        "need onnxruntime-gpu), or any provider's full name (CUDAExecutionProvider...).",
    )

    @field_validator("providers")
    @classmethod
    def _provider_names(cls, names: list[str]) -> list[str]:
        """Short names to ONNX Runtime's; whether one is installed is checked when a model is opened."""
        if not names:
            raise ValueError("give at least one provider (cpu, cuda, tensorrt)")
        full = []
        for name in names:
            long = PROVIDERS.get(name.lower(), name)
            if not long.endswith("ExecutionProvider"):
                raise ValueError(
                    f"unknown provider {name!r}: use {', '.join(PROVIDERS)} or an ONNX Runtime "
                    "provider name (...ExecutionProvider)"
                )
            full.append(long)
        return full

    prompt: str | None = Field(None, description="gpt: one prompt (else infer.input: one per line, or JSONL).")
    max_new_tokens: int = Field(200, gt=0, description="gpt: tokens to generate per prompt.")
    temperature: float = Field(0.8, ge=0.0, description="gpt: sampling temperature; 0 is greedy.")
    top_k: int | None = Field(None, gt=0, description="gpt: sample among the k likeliest tokens only.")
    top_p: float | None = Field(
        None, gt=0.0, le=1.0, description="gpt: sample from the smallest set of tokens with this much probability."
    )
    seed: int | None = Field(None, ge=0, description="gpt: sampling seed. Default: the top-level seed.")
    stop: list[str] = Field([], description="gpt: stop generating when one of these strings appears.")
    chat: bool = Field(
        False,
        description="gpt: each prompt is a user message, rendered with the model's chat template (an "
        'imported model\'s); JSONL input may give {"messages": [{"role", "content"}, ...]} instead.',
    )
    system: str | None = Field(None, description="gpt, chat: a system message put before each conversation.")


class ServeConfig(Section):
    model: Path | None = Field(
        None, description="ONNX model to serve. Default: infer.model, else <run_dir>/export/model.onnx."
    )
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0: every interface).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")
    name: str | None = Field(
        None,
        description="The model's id in the API (/v1/models). Default: the run folder's name, else the ONNX file's.",
    )
    api_key: str | None = Field(
        None,
        description="Require 'Authorization: Bearer KEY' on /v1 routes. Default: "
        "the BIGMODEL_API_KEY environment variable, else no key.",
    )
    max_queue: int = Field(
        64,
        gt=0,
        description="Requests allowed to wait; beyond that the server answers "
        "503 with Retry-After instead of queueing without bound.",
    )
    max_tokens: int = Field(
        256,
        gt=0,
        description="gpt: tokens generated when a request gives no max_tokens "
        "(fewer when the prompt leaves less room in the model's context).",
    )
    max_batch: int = Field(
        16,
        gt=0,
        description="gpt: requests decoded together in one batch (continuous "
        "batching); more wait in the queue. 1: one at a time.",
    )
    context_shift: bool = Field(
        False,
        description="gpt: let a request's max_tokens run past the model's context: "
        "once it is full, each new token re-reads the last block_size tokens (as `bigmodel "
        "infer` does; quality drops, the model never saw text cut mid-way). Default: a "
        "max_tokens that does not fit after the prompt is refused (400).",
    )
    max_body_bytes: int = Field(
        4 * 2**20,
        gt=0,
        description="Largest request body accepted; a larger one is answered 413 at once, before it is read.",
    )
    drain_seconds: float = Field(
        30.0,
        ge=0.0,
        description="On SIGTERM or Ctrl-C: how long in-flight requests "
        "may finish; then they are cut (streams end with an error event, others get 503) "
        "and the server exits 0.",
    )
    cors_origins: list[str] = Field(
        [],
        description="Origins whose browser pages may call the API (CORS), e.g. "
        "['https://app.example.com'], or ['*'] for any. Default: none.",
    )


HARDWARE = ("local", "a10", "l4", "a100-80gb", "h100-sxm", "h200", "mi300x")


class PlanConfig(Section):
    tokens: int | None = Field(
        None,
        gt=0,
        description="Training tokens to plan for. Default: train.max_steps x tokens per step, "
        "else epochs x the prepared train tokens, else the compute-optimal 20 per parameter.",
    )
    hardware: Literal[HARDWARE] = Field(  # type: ignore[valid-type]
        "h100-sxm",
        description="Accelerator profile (published dense peak and board power), or 'local': "
        "measure this machine's matmul peak.",
    )
    devices: int = Field(1, gt=0, description="Devices training together (train.distributed shards across them).")
    mfu: float = Field(
        0.4, gt=0.0, le=1.0, description="Assumed model FLOPs utilisation (large, well-tuned runs reach 0.35-0.55)."
    )
    power_w: float | None = Field(
        None, gt=0.0, description="Power per device in watts. Default: the profile's board power."
    )
    pue: float = Field(
        1.0, ge=1.0, description="Facility overhead multiplying the devices' energy (datacenters: ~1.1-1.5)."
    )
    vocab_size: int | None = Field(
        None,
        gt=0,
        description="Vocabulary size before the data is prepared. Default: the prepared data's, or "
        "data.tokenizer.vocab_size for BPE.",
    )
    inference_batch: int = Field(1, gt=0, description="Sequences generated at once, for the inference memory.")
    inference_context: int | None = Field(
        None, gt=0, description="Tokens of context held in the KV cache. Default: model.block_size."
    )
    days: float | None = Field(
        None, gt=0.0, description="Finish training within this many days: plan says how many devices that takes."
    )
    price: float | None = Field(
        None,
        ge=0.0,
        description="USD per device-hour. Default: the hardware profile's on-demand price (the "
        "report names its source and date); 'local' has none.",
    )
    price_per_kwh: float = Field(
        0.09,
        ge=0.0,
        description="USD per kWh for the energy bill (default: the US industrial average, EIA "
        "Electric Power Monthly, 8.2-9.3 cents through 2025 and January 2026).",
    )
    storage_bandwidth: float = Field(
        2e9,
        gt=0.0,
        description="Bytes/s the training data is read from and checkpoints are written to (default: "
        "2 GB/s, one NVMe drive's sequential rate; a parallel file system gives more).",
    )


class ExplainConfig(Section):
    """bigmodel explain: Captum's attributions on a checkpoint (tabular: Integrated Gradients per feature;
    an encoder classifier: Layer Integrated Gradients per token; a decoder: LLMAttribution per prompt token)."""

    checkpoint: CheckpointRef = "best"
    input: Path | None = Field(
        None,
        description="What to explain: a CSV of rows (mlp: the feature columns by name), a JSONL/CSV of texts "
        "(bert: the data's text column), or prompts, one per line or a .jsonl's 'prompt' (gpt). Default: the "
        "prepared test split (mlp, bert).",
    )
    rows: int = Field(5, gt=0, description="How many inputs to explain (from the first).")
    steps: int = Field(
        50, gt=0, description="mlp, bert: Integrated Gradients' steps along the path (more: a smaller delta)."
    )
    baseline: Literal["mean", "zeros"] = Field(
        "mean", description="mlp: the baseline row, the training rows' mean or all zeros."
    )
    prompts: list[str] = Field([], description="gpt: prompts to explain (instead of explain.input).")
    max_new_tokens: int = Field(
        16, gt=0, description="gpt: tokens of the model's greedy continuation that the prompt tokens are scored for."
    )
    baseline_token: str | None = Field(
        None,
        description="gpt: the token a prompt token is replaced by when it is ablated. Default: the tokenizer's "
        "pad or end-of-text token (a character vocabulary: the space).",
    )
    output: Path | None = Field(
        None, description="Where the attributions go. Default: <run_dir>/explain/attributions.json."
    )


class Config(Section):
    """One experiment, from raw data to predictions."""

    extends: str | list[str] | None = Field(
        None,
        description="Base config file(s) merged under this one (paths relative to this file).",
        exclude=True,
    )
    run_dir: Path | None = Field(
        None,
        description="Folder for every artifact, one sub-folder per stage. "
        "Default: runs/<config file name> in the current directory.",
    )
    seed: int = Field(0, ge=0, description="Seed for splits, init, shuffling and sampling.")
    threads: int | None = Field(None, gt=0, description="CPU threads for PyTorch and ONNX Runtime. Default: all cores.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="Where PyTorch runs: auto picks cuda when available, else cpu."
    )
    memory_limit: int | None = Field(
        None,
        gt=0,
        description="The most memory (bytes, or e.g. 8GiB, 500MB) a stage may take. A stage whose "
        "predicted peak (bigmodel plan shows it) exceeds it stops before allocating, with the fix. Default: what "
        "the machine (or its container) has available.",
    )
    data: DataConfig
    model: ModelConfig = Field(
        default_factory=MLPConfig, description="The model; its family defaults to gpt for text data, mlp for tabular."
    )
    init: InitConfig = Field(default_factory=InitConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _a_size(cls, value: Any) -> Any:
        from bigmodel.memory import parse_size

        return parse_size(value)

    @field_validator("run_dir", mode="before")
    @classmethod
    def _run_dir_is_a_folder(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty; give a folder, e.g. runs/try1")
        return value

    @model_validator(mode="before")
    @classmethod
    def _defaults_follow_the_data(cls, raw: Any) -> Any:
        """Text data means a GPT unless the config says otherwise; eval.split defaults to the split
        the data has (test for tabular, val for text); fine-tuning an imported model defaults to a few
        epochs at a fine-tuning learning rate."""
        if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
            return raw
        data_format = raw["data"].get("format")
        text = data_format in ("text", "sft")
        model = raw.get("model") or {}  # an empty `model:` in YAML is None
        if isinstance(model, dict) and "family" not in model:
            family = {"text": "gpt", "sft": "gpt", "text_classification": "bert"}.get(data_format, "mlp")
            raw = {**raw, "model": {"family": family, **model}}
        evaluation = raw.get("eval") or {}
        if isinstance(evaluation, dict) and evaluation.get("split") is None:
            raw = {**raw, "eval": {**evaluation, "split": "val" if text else "test"}}
        init, train = raw.get("init") or {}, raw.get("train") or {}
        if isinstance(init, dict) and init.get("from") is not None and isinstance(train, dict):
            lr = FINE_TUNE_LORA_LR if train.get("lora") is not None else FINE_TUNE_LR
            gentle = {"epochs": FINE_TUNE_EPOCHS, "lr": lr}
            raw = {**raw, "train": {**gentle, **train}}
        return raw

    def _private_task_problems(self, task: str) -> list[str]:
        """Which models and data DP-SGD trains here: the MLP, an encoder classifier, a decoder's LoRA
        adapters on sft examples (the unit the guarantee is about must be one example)."""
        if task == "embedding":
            return [
                "train.privacy with model.task 'embedding': its in-batch negatives make each text's gradient "
                "depend on the others in the batch; train a classifier, or train without privacy"
            ]
        if task == "mlm":
            return ["train.privacy with model.task 'mlm' is not supported; train a classifier privately"]
        if task != "lm":
            return []
        problems = []
        if self.data.format != "sft":
            problems.append(
                "train.privacy on data.format 'text': a random window of a token stream is not an example "
                "the guarantee could be about; use data.format 'sft' (one example per record)"
            )
        if self.train.lora is None:
            problems.append(
                "train.privacy for a decoder trains LoRA adapters (per-example gradients of the whole model "
                "are too big to keep); set train.lora"
            )
        return problems

    @property
    def task(self) -> str:
        """classification, regression (tabular data), lm (text data for a decoder); an encoder's
        classification (text_classification data), mlm (text data) or embedding."""
        if isinstance(self.model, BERTConfig):
            corpus = isinstance(self.data, TextClassificationDataConfig) and self.data.path.suffix == ".txt"
            return self.model.task or ("mlm" if corpus else "classification")
        if self.data.format in ("text", "sft"):
            return "lm"
        # (a text_classification file under a decoder or an MLP: _sections_agree refuses the family)
        return self.data.task if isinstance(self.data, TabularDataConfig) else "classification"

    @model_validator(mode="after")
    def _sections_agree(self) -> Config:
        problems = []
        task = self.task
        learners = {"tabular": ("mlp",), "text": ("gpt",), "sft": ("gpt",), "text_classification": ("bert",)}
        if self.model.family not in learners[self.data.format]:
            problems.append(
                f"model.family '{self.model.family}' cannot learn data.format '{self.data.format}' "
                f"(use model.family '{' or '.join(learners[self.data.format])}')"
            )
        if self.init.scheme == "gpt2" and self.model.family != "gpt":
            problems.append("init.scheme 'gpt2' is for model.family 'gpt'")
        if self.init.from_ is not None:
            if self.model.family not in ("gpt", "bert"):
                problems.append(
                    f"init.from imports language models (model.family 'gpt' or 'bert'), not '{self.model.family}'"
                )
            elif "tokenizer" in self.data.model_fields_set:
                problems.append(
                    "data.tokenizer: an imported model (init.from) brings its own tokenizer; remove data.tokenizer"
                )
            if self.init.scheme is not None:
                problems.append(
                    "init.scheme: an imported model (init.from) keeps its pretrained weights; remove init.scheme"
                )
        if self.data.format == "sft" and self.init.from_ is None:
            problems.append(
                "data.format 'sft' fine-tunes a pretrained model and uses its tokenizer: set init.from "
                "(a Hugging Face model folder or a GGUF file)"
            )
        if self.train.lora is not None:
            if self.model.family not in ("gpt", "bert"):
                problems.append(
                    f"train.lora adapts transformers (model.family 'gpt' or 'bert'), not '{self.model.family}'"
                )
            elif self.train.distributed == "fsdp":
                problems.append(
                    "train.lora trains under DDP only (the adapters are small: sharding them saves "
                    "nothing); set train.distributed 'ddp'"
                )
        problems += self._unread_explain_keys()
        if self.train.privacy is not None:
            problems += self._private_task_problems(task)
            problems += [
                f"compress.steps[{i}] ({step.method}) uses the training data outside train.privacy's "
                "account, so the model's epsilon would no longer hold; compress without data (prune with "
                "finetune_steps 0, dynamic or weight-only quantize) or train without privacy"
                for i, step in enumerate(self.compress.steps)
                if getattr(step, "needs_data", False)
            ]
        if self.export.formats != ["onnx"] and self.model.family != "gpt":
            problems.append(
                f"export.format {self.export.format!r} writes decoder language models; use 'onnx' for "
                f"model.family '{self.model.family}'"
            )
        if self.export.dtype == "fp16" and self.model.family != "gpt":
            problems.append(
                f"export.dtype 'fp16' is for decoder language models; model.family '{self.model.family}' exports fp32"
            )
        if task == "lm" and self.eval.split == "test":
            problems.append("eval.split 'test': text data has a val split only; use 'val'")
        if self.train.loss == "mse" and task == "classification":
            problems.append("train.loss 'mse' needs data.task 'regression' (got 'classification')")
        if self.train.loss == "cross_entropy" and task == "regression":
            problems.append("train.loss 'cross_entropy' needs data.task 'classification'")
        if self.train.monitor == "accuracy" and task == "regression":
            problems.append("train.monitor 'accuracy' needs data.task 'classification'; use 'loss'")
        for name in [*self.eval.fail_under, *self.eval.fail_above]:
            if name not in SCALAR_METRICS[task]:
                problems.append(
                    f"eval gate '{name}': not a {task} metric{did_you_mean(name, SCALAR_METRICS[task])}; "
                    f"available: {', '.join(SCALAR_METRICS[task])}"
                )
        for number, augment in enumerate(self.train.augment):
            if task == "lm":
                problems.append(
                    f"train.augment.{number} ({augment.kind}) is for tabular data; text is "
                    "augmented by prepare (data.augment: [{kind: bpe_dropout}])"
                )
            elif augment.kind == "mixup" and task != "classification":
                problems.append(f"train.augment.{number}: mixup mixes class labels; for regression use noise")
        problems += self._unread_train_keys(problems)
        for number, step in enumerate(self.compress.steps):
            if step.method == "prune" and step.structure == "heads" and self.model.family != "gpt":
                problems.append(
                    f"compress.steps.{number}.structure 'heads' needs model.family 'gpt' (an MLP "
                    "has no attention heads; use 'mlp')"
                )
            if step.method != "distill":
                continue
            if task in ("regression", "mlm", "embedding"):
                problems.append(
                    f"compress.steps.{number}: distill needs class probabilities or a language "
                    f"model; {task} has neither (an encoder distils as a classifier)"
                )
            try:
                self.student_model(step)
            except ValidationError as exc:
                within = ("model", self.model.family)
                problems.append(f"compress.steps.{number}.student: {format_validation_error(exc, within)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _unread_explain_keys(self) -> list[str]:
        """explain.* keys set to something other than their default that this family's explainer never reads."""
        from bigmodel.families import FAMILIES

        family = FAMILIES[self.model.family]
        unread = [
            key
            for key, field in ExplainConfig.model_fields.items()
            if key not in family.explain_keys
            and getattr(self.explain, key) != field.get_default(call_default_factory=True)
        ]
        if not unread:
            return []
        return [
            f"explain.{unread[0]} is not read when explaining model.family '{family.name}' (it reads "
            f"{', '.join(sorted(family.explain_keys))}); remove it"
        ]

    def _unread_train_keys(self, problems: list[str]) -> list[str]:
        """train.* keys set to something other than their default that this family's recipe never reads
        (those with a check of their own, already in `problems`, are not repeated)."""
        from bigmodel.families import FAMILIES

        family = FAMILIES[self.model.family]
        unread = [
            f"train.{key}"
            for key, field in TrainConfig.model_fields.items()
            if key not in family.train_keys
            and getattr(self.train, key) != field.get_default(call_default_factory=True)
            and not any(f"train.{key}" in problem for problem in problems)
        ]
        if not unread:
            return []
        return [
            f"{', '.join(unread)} {'is' if len(unread) == 1 else 'are'} not read when training model.family "
            f"'{family.name}' ({family.recipe} does not use {'it' if len(unread) == 1 else 'them'}); remove "
            f"{'it' if len(unread) == 1 else 'them'}"
        ]

    def student_model(self, step: DistillStep) -> MLPConfig | GPTConfig | BERTConfig:
        """The student's model settings: the teacher's, with the step's overrides (validated)."""
        if "family" in step.student and step.student["family"] != self.model.family:
            raise ValidationError.from_exception_data(
                "student",
                [
                    {
                        "type": "value_error",
                        "loc": ("family",),
                        "input": step.student["family"],
                        "ctx": {"error": "a student is of the teacher's family"},
                    }
                ],
            )
        return type(self.model).model_validate({**self.model.model_dump(), **step.student})

    def derive(self, source: str, **sections: dict[str, Any] | BaseModel) -> Config:
        """This config with some sections replaced or updated, validated like a loaded one (model_copy
        would skip every check). `source` names who derived it, for the error message."""
        # What was set, not every default spelled out: a key some other setting forbids (data.tokenizer
        # beside init.from) is not set by deriving.
        raw = self.model_dump(by_alias=True, exclude_unset=True)
        for name, update in sections.items():
            raw[name] = (
                update.model_dump(by_alias=True, exclude_unset=True)
                if isinstance(update, BaseModel)
                else {**raw.get(name, {}), **update}
            )
        return validate_config(raw, source)

    def stage_dir(self, stage: str) -> Path:
        """`<run_dir>/<stage>`: where a stage writes its artifacts."""
        return (self.run_dir or Path("runs")) / stage

    def eval_output(self) -> Path:
        """Where eval writes its metrics (see eval.output)."""
        if self.eval.output is not None:
            return self.eval.output
        ref = self.eval.checkpoint
        name = "metrics.json" if ref == "best" else f"metrics.{ref if ref in ('init', 'last') else Path(ref).stem}.json"
        return self.stage_dir("eval") / name

    def checkpoint_path(self, ref: str) -> Path:
        """'init' / 'best' / 'last' name the run's own checkpoints; anything else is a file path."""
        named = {
            "init": self.stage_dir("init") / "model.safetensors",
            "best": self.stage_dir("train") / "best.safetensors",
            "last": self.stage_dir("train") / "last.safetensors",
        }
        return named.get(ref, Path(ref))

    def section_hash(self, *names: str) -> str:
        """Fingerprint of some sections, so a pipeline knows when a stage's settings changed."""
        dumped = self.model_dump(mode="json")
        picked = {}
        for name in names:  # a section, or one key of it ("init.from_")
            value: Any = dumped
            for part in name.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            picked[name] = value
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ loading

STDIO = "-"


def load_config(path: str | Path, overrides: list[str] | None = None, run_dir: str | Path | None = None) -> Config:
    """Read, merge, resolve, override and validate a config file. Raises UserError on any mistake; a
    problem with a key given by --set names that --set, not the file."""
    path = Path(path)
    raw = _read_with_extends(path, chain=())
    set_keys: dict[str, str] = {}
    for override in overrides or []:
        set_keys[apply_override(raw, override)] = override
    if run_dir is not None:
        if not str(run_dir).strip():
            raise UserError("--run-dir is empty; give a folder, e.g. --run-dir runs/try1")
        raw["run_dir"] = str(Path(run_dir).absolute())
    elif raw.get("run_dir") is None:
        raw["run_dir"] = str(Path.cwd() / "runs" / path.name.split(".")[0])
    raw.pop("extends", None)
    return validate_config(raw, str(path), set_keys)


def validate_config(raw: dict[str, Any], source: str, set_keys: dict[str, str] | None = None) -> Config:
    """Config.model_validate with one-line errors: each problem is attributed to the --set that gave
    its key (set_keys: key path -> the --set text), else to `source` (the config file)."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        by_source: dict[str, list[str]] = {}
        for where, message in validation_problems(exc):
            # The --set of this key (or of a section holding it); a section's own check names the keys
            # it is about in its message.
            given = [
                text
                for key, text in (set_keys or {}).items()
                if where == key or where.startswith(key + ".") or (key.startswith(where + ".") and key in message)
            ]
            by_source.setdefault(f"--set {given[0]}" if given else source, []).append(message)
        raise UserError(
            "; ".join(f"{origin}: {'; '.join(messages)}" for origin, messages in by_source.items())
        ) from exc


def _read_yaml(path: Path, named_by: Path | None = None) -> dict[str, Any]:
    if not path.is_file():
        if named_by is not None:
            raise UserError(
                f"{named_by}: extends {path.name!r}: file not found: {path} (paths in extends are "
                "relative to the file that names them)"
            )
        raise UserError(f"config file not found: {path} (check the path given to -c/--config)")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: invalid YAML{where}: {problem}") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a UTF-8 text file; a config must be YAML text") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: a config must be a YAML mapping of keys, got {type(loaded).__name__}")
    return loaded


def _read_with_extends(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise UserError(f"{path}: 'extends' forms a cycle: {cycle}; remove one of the links")
    raw = _read_yaml(path, named_by=chain[-1] if chain else None)
    _resolve_paths(raw, base=path.parent)
    bases = raw.pop("extends", None)
    if bases is None:
        return raw
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise UserError(f"{path}: extends must be a file name or a list of them")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, _read_with_extends(path.parent / base, (*chain, resolved)))
    return deep_merge(merged, raw)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Merge mappings recursively; anything else in `top` replaces what `base` had."""
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def section_sets(overrides: list[str] | None, section: str, example: str) -> dict[str, Any]:
    """Without -c a command has one section to set (infer, serve): its --set keys, parsed as a config's
    are; a key of any other section is one line naming the fix."""
    raw: dict[str, Any] = {}
    for override in overrides or []:
        key = override.partition("=")[0].strip()
        if not key.startswith(f"{section}.") or key.count(".") != 1:
            raise UserError(
                f"--set {override!r}: without -c only {section} keys can be set (--set {example}); "
                "other keys need -c CONFIG"
            )
        apply_override(raw, override)
    return dict(raw.get(section, {}))


def apply_override(raw: dict[str, Any], override: str) -> str:
    """Set one key from a --set; returns its key path."""
    key_path, sep, text = override.partition("=")
    if not sep or not key_path.strip():
        raise UserError(f"--set {override!r}: expected key.path=value, e.g. --set train.lr=0.001")
    try:
        # '-' (stdin/stdout) would parse as a YAML list item; keep it the string it means.
        value = text.strip() if text.strip() == STDIO else (yaml.safe_load(text) if text.strip() else None)
    except yaml.YAMLError as exc:
        raise UserError(f"--set {override!r}: the value is not valid YAML ({exc})") from exc
    keys = key_path.strip().split(".")
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            where = ".".join(keys[: i + 1])
            raise UserError(f"--set {override!r}: {where} is a value, not a section")
        node = child
    # Paths given on the command line are relative to where the user runs the command.
    node[keys[-1]] = resolve_path(value, Path.cwd()) if tuple(keys) in PATH_KEYS else value
    return ".".join(keys)


# ---------------------------------------------------------------------------- path-valued settings


def _is_path_annotation(annotation: Any) -> bool:
    return annotation is Path or Path in typing.get_args(annotation)


def _sections_in(annotation: Any) -> list[type[BaseModel]]:
    """The section classes an annotation can hold (through Optional, unions and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [section for arg in typing.get_args(annotation) for section in _sections_in(arg)]


def _path_keys(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every key path whose value is a filesystem path, read off the schema itself."""
    keys: set[tuple[str, ...]] = set()
    for name, field in model.model_fields.items():
        key = field.alias or name  # what a config file writes (init.from)
        if _is_path_annotation(field.annotation):
            keys.add((*prefix, key))
        for section in _sections_in(field.annotation):
            keys |= _path_keys(section, (*prefix, key))
    return keys


PATH_KEYS = _path_keys(Config)


STDLIB = "{stdlib}"


def resolve_path(value: Any, base: Path) -> Any:
    """A path string made absolute against `base`; '{stdlib}' is this Python's standard library
    folder (text that exists on every machine with Python); '-' (stdin/stdout) stays as it is."""
    if isinstance(value, list):
        return [resolve_path(v, base) for v in value]
    if not isinstance(value, str) or value in (STDIO, ""):  # "" is refused by validation, never "here"
        return value
    value = value.replace(STDLIB, sysconfig.get_paths()["stdlib"])
    return value if Path(value).is_absolute() else str((base / value).absolute())


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Make relative paths written in a config file relative to that file's folder."""
    for keys in PATH_KEYS:
        node: Any = raw
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and keys[-1] in node:
            node[keys[-1]] = resolve_path(node[keys[-1]], base)


# ------------------------------------------------------------------------------- error formatting


def format_validation_error(exc: ValidationError, within: tuple[str, ...] = ()) -> str:
    """All problems of one validation in one line: 'key.path: what is wrong (what is allowed)'.
    `within`: the config section the validated data belongs to (for the allowed keys)."""
    return "; ".join(message for _, message in validation_problems(exc, within))


def validation_problems(exc: ValidationError, within: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(key path, 'key.path: what is wrong (what is allowed)') for each problem of a validation."""
    problems = []
    for error in exc.errors():
        raw_loc = [str(part) for part in error["loc"]]
        # pydantic names the union member in the location (data.text.path): users wrote data.path.
        loc = [p for i, p in enumerate(raw_loc) if not (i > 0 and p in UNION_TAGS and _is_union_slot(raw_loc[i - 1]))]
        where = ".".join(loc) if loc else "config"
        kind = error["type"]
        if kind == "union_tag_invalid":
            container = next((p for p in reversed(loc) if not p.isdigit()), "")
            key = TAG_KEYS.get(container, "kind")
            ctx = error.get("ctx", {})
            where = f"{where}.{key}"
            message = f"{where}: unknown value {ctx.get('tag')!r}; allowed: {ctx.get('expected_tags')}"
        elif kind == "extra_forbidden":
            allowed = _allowed_keys([*within, *raw_loc[:-1]])
            hint = did_you_mean(loc[-1], allowed)
            message = f"{where}: unknown key{hint}; allowed here: {', '.join(sorted(allowed))}"
        elif kind == "missing":
            message = f"{where}: required key is missing"
        elif kind == "finite_number":
            message = f"{where}: must be a finite number (got {error.get('input')!r})"
        elif kind == "value_error" and not loc:
            message = str(error["msg"]).removeprefix("Value error, ")
        else:
            msg = str(error["msg"]).removeprefix("Value error, ")
            value = error.get("input")
            # A section's own check (its input is the whole section) says everything in its message.
            message = f"{where}: {msg}" if isinstance(value, dict) else f"{where}: {msg} (got {value!r})"
        problems.append((".".join([*within, *loc]) if within else where, message))
    return problems


def _all_sections(model: type[BaseModel]) -> set[type[BaseModel]]:
    found = {model}
    for field in model.model_fields.values():
        for section in _sections_in(field.annotation):
            if section not in found:
                found |= _all_sections(section)
    return found


def _is_union_slot(parent: str) -> bool:
    return parent in TAG_KEYS or parent.isdigit()


def _allowed_keys(loc: list[str]) -> set[str]:
    """Keys allowed at a location; a union member named in `loc` (data.text) selects that member."""
    model: type[BaseModel] | None = Config
    choices: list[type[BaseModel]] = []
    for part in loc:
        if part.isdigit():  # a list index: the list's item type stays the candidate
            continue
        tagged = [c for c in choices if _tag_default(c) == part]
        if tagged:
            model, choices = tagged[0], []
            continue
        fields = {field.alias or name: field for name, field in model.model_fields.items()} if model else {}
        if part not in fields:
            return set()
        choices = _sections_in(fields[part].annotation)
        model = choices[0] if choices else None
    return {field.alias or name for name, field in model.model_fields.items()} if model else set()


def _tag_default(section: type[BaseModel]) -> str | None:
    """A union member's tag: its tag-key field (TAG_KEYS: format, family, method, kind) when that is a
    Literal of exactly one value."""
    for key in dict.fromkeys(TAG_KEYS.values()):
        field = section.model_fields.get(key)
        if field is not None and len(typing.get_args(field.annotation)) == 1:
            return str(field.default)
    return None


# The config sections each command reads (its --help lists their keys), after the shared top-level keys.
COMMAND_SECTIONS = {
    "prepare": ("data",),
    "init": ("model", "init"),
    "train": ("train",),
    "eval": ("eval",),
    "compress": ("compress",),
    "export": ("export",),
    "infer": ("infer",),
    "plan": ("plan",),
    "serve": ("serve",),
    "explain": ("explain",),
}
SHARED_KEYS = ("run_dir", "seed", "threads", "device")


def section_help(command: str) -> str:
    """The config keys a command reads, for its --help: one key per line, grouped by section, with type,
    default and description. Each block starts with click's no-rewrap marker (\\b) so it keeps its lines."""
    sections = COMMAND_SECTIONS.get(command)
    if sections is None:
        return ""
    blocks = ["Config keys it reads (in the YAML, or --set KEY=VALUE); see also 'bigmodel config schema':"]
    blocks.append(_key_block("shared", [(name, Config.model_fields[name]) for name in SHARED_KEYS], ""))
    for section in sections:
        for title, prefix, model in _groups(section, Config.model_fields[section].annotation):
            fields = [(f.alias or n, f) for n, f in model.model_fields.items()]
            blocks.append(_key_block(title, fields, prefix + "."))
    return "\n\n".join("\b\n" + block for block in blocks)


# The config's sections, in the order of the pipeline (the key reference and --set completion list them so).
CONFIG_SECTIONS = ("data", "model", "init", "train", "eval", "compress", "export", "infer", "serve", "plan", "explain")


def key_reference() -> str:
    """docs/config-reference.md: every key, grouped by section, with its type, default and description,
    and for train.* the families whose recipe reads it (from the family table). tests/test_config.py
    fails when the checked-in page differs from this."""
    from bigmodel.families import FAMILIES

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    def table(fields: list[tuple[str, Any]], prefix: str, readers: bool = False) -> list[str]:
        rows = [
            "| key | type | default | description |" + (" read by |" if readers else ""),
            "|---|---|---|---|" + ("---|" if readers else ""),
        ]
        for name, field in fields:
            if _sections_in(field.annotation):
                continue  # a nested section: a group of its own
            default = (
                "required"
                if field.is_required()
                else f"`{json.dumps(field.get_default(call_default_factory=True), default=str)}`"
            )
            row = f"| `{prefix}{name}` | {cell(_type_name(field.annotation))} | {cell(default)} | {cell(field.description or '')} |"
            if readers:
                row += " " + ", ".join(f for f, family in FAMILIES.items() if name in family.train_keys) + " |"
            rows.append(row)
        return rows

    lines = [
        "# Config key reference",
        "",
        "Every key of an experiment config, generated from the schema in `bigmodel/config.py` by",
        "`bigmodel config reference > docs/config-reference.md` (a test fails when this page is stale).",
        "`bigmodel <command> --help` lists the keys a command reads; `bigmodel config schema` prints the",
        "JSON Schema. A `train.*` key that the model family's recipe does not read is refused when set.",
        "",
        "## shared",
        "",
        *table([(name, Config.model_fields[name]) for name in SHARED_KEYS], ""),
    ]
    for section in CONFIG_SECTIONS:
        for title, prefix, model in _groups(section, Config.model_fields[section].annotation):
            fields = [(f.alias or n, f) for n, f in model.model_fields.items()]
            lines += ["", f"## {title}", "", *table(fields, prefix + ".", readers=title == "train")]
    return "\n".join(lines) + "\n"


def config_keys() -> list[str]:
    """Every settable key path (train.lr, data.cleaning.dedupe, ...), for shell completion of --set."""
    keys = set(SHARED_KEYS)
    for section in CONFIG_SECTIONS:
        for _, prefix, model in _groups(section, Config.model_fields[section].annotation):
            if "[]" in prefix:
                continue  # list items are set as a whole list
            keys |= {f"{prefix}.{f.alias or n}" for n, f in model.model_fields.items()}
    return sorted(keys)


def _groups(prefix: str, annotation: Any) -> list[tuple[str, str, type[BaseModel]]]:
    """(title, key prefix, section class) for a section and the sections nested in it; a union gives one
    group per member, titled by its tag (data (format: text))."""
    members = _sections_in(annotation)
    groups = []
    for model in members:
        tag = _tag_default(model)
        tag_key = next((k for k in TAG_KEYS.values() if tag is not None and k in model.model_fields), None)
        title = f"{prefix} ({tag_key}: {tag})" if len(members) > 1 and tag_key else prefix
        groups.append((title, prefix, model))
        for name, field in model.model_fields.items():
            inner = "[]" if typing.get_origin(field.annotation) is list else ""
            if _sections_in(field.annotation):
                groups += _groups(f"{prefix}.{field.alias or name}{inner}", field.annotation)
    return groups


def _key_block(title: str, fields: list[tuple[str, Any]], prefix: str) -> str:
    import textwrap

    lines = [f"{title}:"]
    for name, field in fields:
        if _sections_in(field.annotation):
            continue  # a nested section: its keys are a group of their own
        default = (
            "required"
            if field.is_required()
            else f"default {json.dumps(field.get_default(call_default_factory=True), default=str)}"
        )
        readers = train_key_readers(name) if prefix == "train." else None
        lines.append(
            f"  {prefix}{name}  ({_type_name(field.annotation)}, {default})"
            + (f" [{', '.join(readers)}]" if readers is not None else "")
        )
        lines += textwrap.wrap(field.description or "", width=96, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def train_key_readers(key: str) -> list[str] | None:
    """The families whose recipe reads train.`key` (from the family table), or None when every one does."""
    from bigmodel.families import FAMILIES

    readers = [name for name, family in FAMILIES.items() if key in family.train_keys]
    return None if len(readers) == len(FAMILIES) else readers


def _type_name(annotation: Any) -> str:
    """A short, human name for a field's type: 'float', 'one of a|b', 'path or null', 'list of int'."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        named = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "bigmodel config"
    return schema


def dump_yaml(config: Config) -> str:
    """The resolved config as YAML (what `bigmodel config` prints and a run records), loadable again. An
    import's model shape and tokenizer come from its files: its `model:` holds only what was set, and
    `data.tokenizer` only when set, not defaults that would contradict the import."""
    raw = config.model_dump(mode="json", by_alias=True)
    if config.init.from_ is not None:
        raw["model"] = {
            "family": config.model.family,
            **config.model.model_dump(mode="json", by_alias=True, exclude_unset=True),
        }
        if "tokenizer" not in config.data.model_fields_set:
            raw["data"].pop("tokenizer", None)
    return str(yaml.safe_dump(raw, sort_keys=False))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: a config as key paths (lists are values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


# Every tag a union member answers to (data.format, model.family, compress step method), read off the
# schema, so new members need no list kept by hand.
UNION_TAGS = {tag for section in _all_sections(Config) if (tag := _tag_default(section)) is not None}
