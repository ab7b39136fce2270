"""What bigmodel's files say about themselves, as typed, versioned records read and written only here.

A checkpoint's manifest travels in its safetensors header (key `bigmodel`, one JSON object); an ONNX
model's metadata travels in the model's `metadata_props` (one `bigmodel.<field>` entry per field). Both
are validated on read, so a stage gets the architecture as its typed object and a field that is missing
or of the wrong type is one line naming the file, not a KeyError three calls later. In the manner of
litgpt's `Config.from_checkpoint`: the description lives beside the weights, typed.

Versions. Checkpoint format 1 is what every bigmodel release has written. ONNX metadata format 2
stores every value as JSON (format 1, which has no `format_version` entry, stored strings raw and
everything else as JSON: a column named "1" came back as a number); format 1 files stay readable.
"""

from __future__ import annotations

import datetime
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bigmodel import __version__
from bigmodel.arch import DecoderArch, EncoderArch, TabularArch
from bigmodel.errors import UserError

CHECKPOINT_FORMAT = 1
ONNX_FORMAT = 2
MANIFEST_KEY = "bigmodel"  # the safetensors header entry holding a checkpoint's manifest
ONNX_PREFIX = "bigmodel."  # the prefix of an ONNX model's metadata entries

# The architecture, by its `family` field.
StoredArch = Annotated[DecoderArch | TabularArch | EncoderArch, Field(discriminator="family")]


class Record(BaseModel):
    """A stored record: unknown fields are refused (a typo or a newer format is said, not dropped).
    Infinite and NaN floats are written as JSON's common extension (Infinity, NaN), as Python's json
    writes them: a loop that has no best score yet holds inf, and a diverged loss is NaN."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, ser_json_inf_nan="constants")


class DataInfo(Record):
    """What later stages must know about the data a model learned from (init's `data_info`)."""

    task: str | None = None
    vocab_size: int | None = None
    tokenizer: str | None = None  # the tokenizer itself, as HF tokenizers' JSON (text models)
    special_tokens: dict[str, Any] | None = None  # decoders: bos, eos (a list), pad
    chat_template: str | None = None
    text: str | None = None  # encoders: the text column(s) and the target column
    text_pair: str | None = None
    target: str | None = None
    labels: list[Any] | None = None
    special_ids: dict[str, int | None] | None = None  # encoders: [CLS], [SEP], [PAD], [MASK], [UNK]
    pad_id: int | None = None
    features: list[str] | None = None  # tabular: the feature columns, in order


class ImportRecord(Record):
    """An imported checkpoint's origin (init.from) and its parity gate."""

    source: str
    format: str
    model_type: str
    parameters: int
    source_dtype: str
    dtype: str
    sha256: str | None = None  # of a single-file source (GGUF); a folder is not hashed
    notes: list[str] = []
    context: int | None = None  # the model's own context (model.block_size may be shorter)
    parity: dict[str, Any] | None = None
    seconds: float | None = None
    peak_rss_bytes: int | None = None
    gate_seconds: float | None = None


class AdapterBase(Record):
    path: str
    sha256: str


class AdapterRecord(Record):
    """A LoRA checkpoint holds only its adapters: enough to rebuild them on the right base."""

    rank: int
    alpha: float
    dropout: float
    targets: list[str]
    trainable_parameters: int
    trains_also: list[str] = []
    base: AdapterBase


class ResumeRecord(Record):
    """A resumable checkpoint's training state beside its tensors (optimizer moments and RNG states are
    tensors in the same file)."""

    loop: dict[str, Any]
    param_groups: list[dict[str, Any]]
    optimizer_scalars: dict[str, dict[str, Any]]


class PrivacyRecord(Record):
    """What a differentially private run (train.privacy) has spent when its checkpoint was written. The
    accountant's history travels with it: a resumed run continues the same account."""

    epsilon: float | None  # spent so far, at delta (None: no noise, no guarantee)
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float  # each example's probability of being in a step (Poisson sampling)
    steps: int  # private steps taken
    accountant: str  # rdp or prv
    unit: str  # what the guarantee protects: a training row, text or example
    # Opacus's accountant history: [noise_multiplier, sample_rate, steps] per stretch of equal settings
    history: list[tuple[float, float, int]]


class PruningRecord(Record):
    kind: str
    sparsity: float
    per_layer: dict[str, Any]


class CheckpointManifest(Record):
    """A checkpoint's description: family and architecture, the data it learned from, the resolved config,
    where training stood, and lineage (sha256 of the inputs it was made from)."""

    format_version: Literal[1] = 1  # CHECKPOINT_FORMAT
    kind: Literal["checkpoint"] = "checkpoint"
    bigmodel_version: str = __version__
    created: str = Field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )
    family: str
    architecture: StoredArch
    data: DataInfo
    config: dict[str, Any]
    step: int | None = 0
    metrics: dict[str, float] = {}
    lineage: dict[str, str] = {}
    init_scheme: str | None = None
    import_: ImportRecord | None = Field(None, alias="import")
    adapter: AdapterRecord | None = None
    resume: ResumeRecord | None = None
    precision: str | None = None
    resumed_with_changes: list[dict[str, Any]] | None = None
    pruning: PruningRecord | None = None
    privacy: PrivacyRecord | None = None

    def header(self) -> dict[str, str]:
        """The safetensors metadata that makes a file a bigmodel checkpoint."""
        fields = self.model_dump(mode="json", by_alias=True)
        kept = {key: value for key, value in fields.items() if value is not None}  # optional parts absent
        return {MANIFEST_KEY: json.dumps(kept, sort_keys=True)}

    @property
    def stored_dtype(self) -> str:
        """The dtype the weights are stored in: an import's (bf16 for a bf16 model), else fp32."""
        return self.import_.dtype if self.import_ is not None else "float32"

    def renewed(self, **changes: Any) -> CheckpointManifest:
        """A copy for a new file made from this one (a new creation time), with `changes` (validated)."""
        fields = {**self.model_dump(by_alias=True, exclude={"created"}), **changes}
        return CheckpointManifest.model_validate(fields)


def read_checkpoint_manifest(header: dict[str, str] | None, origin: str) -> CheckpointManifest:
    """The manifest in a safetensors header; one line naming `origin` if there is none or it is invalid."""
    text = (header or {}).get(MANIFEST_KEY)
    if text is None:
        raise UserError(f"{origin} is a safetensors file but not a bigmodel checkpoint (no manifest)")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{origin}: the checkpoint manifest is corrupt ({exc}); re-create it") from exc
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != CHECKPOINT_FORMAT:
        raise UserError(
            f"{origin}: checkpoint format version {version} is not supported by bigmodel {__version__} "
            f"(expects {CHECKPOINT_FORMAT}); re-create it with this version"
        )
    manifest: CheckpointManifest = _validated(CheckpointManifest, raw, f"{origin}: the checkpoint manifest")
    return manifest


# ------------------------------------------------------------------------------------ ONNX metadata


class OnnxMetadata(Record):
    """What every exported model carries: `infer` and `serve` need nothing but the .onnx file."""

    format_version: int = ONNX_FORMAT
    kind: str
    version: str = __version__  # the bigmodel that exported it
    lineage: dict[str, str] = {}

    def entries(self) -> dict[str, str]:
        """The `bigmodel.*` metadata entries, each value as JSON."""
        fields = self.model_dump(mode="json")
        return {f"{ONNX_PREFIX}{key}": json.dumps(value, sort_keys=True) for key, value in fields.items()}


class DecoderMetadata(OnnxMetadata):
    """A decoder graph (bigmodel/decoder_graph.py): its tokenizer, shapes, cache and weight formats."""

    kind: Literal["gpt"] = "gpt"
    architecture: DecoderArch
    dtype: Literal["fp32", "fp16"] = "fp32"  # the float type of activations and the KV cache
    tokenizer: str
    special_tokens: dict[str, Any] = {}
    chat_template: str | None = None
    block_size: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int | None = None  # files exported before grouped-query attention cache n_head heads
    head_size: int
    weights: str | None = None  # fp32, fp16 or int4's blocks (export/gpt.py weight_format)
    # group_query: ONNX Runtime's GroupQueryAttention, rows padded on the right, the cache writable in place
    # (export.attention ort); onnx: ONNX's Attention or its spelled-out form, rows padded on the left
    attention: Literal["onnx", "group_query"] = "onnx"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @model_validator(mode="before")
    @classmethod
    def _shapes_only(cls, raw: Any) -> Any:
        """Files exported before the typed architecture (2026-11-28) record only the shapes: enough for
        the architecture's shape fields, which is all a reader of such a file uses."""
        if (
            isinstance(raw, dict)
            and "architecture" not in raw
            and isinstance(raw.get("n_head"), int)
            and isinstance(raw.get("head_size"), int)
        ):
            shapes = {key: raw.get(key) for key in ("n_layer", "n_head", "n_kv_head", "block_size", "vocab_size")}
            raw = {
                **raw,
                "architecture": {
                    "family": "gpt",
                    **{k: v for k, v in shapes.items() if v is not None},
                    "n_embd": raw["n_head"] * raw["head_size"],
                    "head_size": raw["head_size"],
                },
            }
        return raw


class EncoderMetadata(OnnxMetadata):
    kind: Literal["encoder"] = "encoder"
    architecture: EncoderArch
    task: str
    labels: list[Any] | None = None
    text: str | None = None
    text_pair: str | None = None
    target: str | None = None
    tokenizer: str
    special_ids: dict[str, int | None] | None = None


class TabularMetadata(OnnxMetadata):
    kind: Literal["tabular"] = "tabular"
    architecture: TabularArch
    task: str
    target: str
    features: list[str]
    labels: list[Any] | None = None


AnyMetadata = DecoderMetadata | EncoderMetadata | TabularMetadata
METADATA: dict[str, type[AnyMetadata]] = {
    "gpt": DecoderMetadata,
    "encoder": EncoderMetadata,
    "tabular": TabularMetadata,
}


def read_onnx_metadata(entries: dict[str, str], origin: str) -> AnyMetadata:
    """A model's `bigmodel.*` metadata entries as their typed record; one line if they are missing or
    invalid (a model bigmodel did not export, or one from a newer bigmodel)."""
    raw = {key.removeprefix(ONNX_PREFIX): value for key, value in entries.items() if key.startswith(ONNX_PREFIX)}
    if "kind" not in raw:
        raise UserError(f"{origin} has no bigmodel metadata; export it with 'bigmodel export'")
    version = int(json.loads(raw["format_version"])) if "format_version" in raw else 1
    if version > ONNX_FORMAT:
        raise UserError(
            f"{origin}: metadata format {version} is newer than this bigmodel {__version__} reads "
            f"({ONNX_FORMAT}); upgrade bigmodel or re-export with this version"
        )
    values = {key: _decoded(value, version) for key, value in raw.items()}
    kind = values.get("kind")
    if kind not in METADATA:
        raise UserError(f"{origin}: unknown model kind {kind!r} in its metadata; known: {', '.join(METADATA)}")
    model = METADATA[kind]
    if version == 1:
        values = _format1(model, values)
    metadata: AnyMetadata = _validated(model, values, f"{origin}: its bigmodel metadata")
    return metadata


def _decoded(value: str, version: int) -> Any:
    if version >= 2:
        return json.loads(value)
    try:  # format 1: JSON for structured values, raw text for strings
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _format1(model: type[OnnxMetadata], values: dict[str, Any]) -> dict[str, Any]:
    """Format 1 stored strings raw, so a string that reads as JSON (a tokenizer, a column named "1") came
    back decoded: turn those back into the strings they were."""
    fields = model.model_fields
    for key, value in values.items():
        text_field = key in fields and fields[key].annotation in (str, str | None)
        if text_field and value is not None and not isinstance(value, str):
            values[key] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    values["format_version"] = ONNX_FORMAT  # read into this version's record
    return values


def _validated(model: type[Any], raw: Any, origin: str) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in exc.errors()[:5])
        raise UserError(f"{origin} is not valid ({problems}); re-create it with this version of bigmodel") from None
