"""The on-disk contracts (bigmodel/manifests.py): files written by earlier versions stay readable, new ones
read back as written, and a broken or newer file is one line naming it.

tests/fixtures/formats/ holds tiny runs of every family written by bigmodel at f8aa259 (checkpoint format 1,
ONNX metadata format 1; make.py says how), kept as they were written.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import save_file

from bigmodel import registry
from bigmodel.arch import DecoderArch, EncoderArch, TabularArch
from bigmodel.checkpoint import read_manifest
from bigmodel.errors import UserError
from bigmodel.export.onnx_file import stamp
from bigmodel.infer.session import file_metadata
from bigmodel.manifests import (
    ONNX_FORMAT,
    CheckpointManifest,
    DataInfo,
    DecoderMetadata,
    EncoderMetadata,
    ResumeRecord,
    TabularMetadata,
    read_onnx_metadata,
)
from tests.conftest import cli

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
ARCHES = {"gpt": DecoderArch, "bert": EncoderArch, "mlp": TabularArch}


def as_format_1(model: onnx.ModelProto, drop: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Rewrite a model's metadata as bigmodel wrote it before format 2: strings raw, other values as JSON,
    no format_version entry (and without the entries in `drop`)."""
    entries = [
        (p.key, json.loads(p.value))
        for p in model.metadata_props
        if p.key not in drop and p.key != "bigmodel.format_version"
    ]
    del model.metadata_props[:]
    for key, value in entries:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value, sort_keys=True)


@pytest.mark.parametrize("name", ["gpt.init", "gpt.last", "gpt.lora", "bert.best", "mlp.best"])
def test_format_1_checkpoints_read_as_typed_manifests(name: str) -> None:
    path = FIXTURES / f"{name}.safetensors"
    manifest = read_manifest(path)
    family = name.split(".")[0]
    assert manifest.format_version == 1 and manifest.family == family
    assert isinstance(manifest.architecture, ARCHES[family])
    assert (manifest.resume is not None) == (name == "gpt.last")
    assert (manifest.adapter is not None) == (name == "gpt.lora")
    if name == "gpt.last":
        assert manifest.resume.loop["step"] == manifest.step == 2 and manifest.precision == "fp32"
    if name == "gpt.lora":
        assert manifest.adapter.rank == 2 and len(manifest.adapter.base.sha256) == 64
    else:  # the weights match the recorded architecture (an adapter's base is not kept here)
        model, again = registry.load_model(path)
        assert again == manifest and registry.count_parameters(model) > 0
    if family == "bert":
        assert manifest.data.special_ids is not None and manifest.data.labels == ["code", "fruit", "weather"]


@pytest.mark.parametrize("name,kind", [("gpt", DecoderMetadata), ("bert", EncoderMetadata), ("mlp", TabularMetadata)])
def test_format_1_onnx_metadata_reads_typed(name: str, kind: type) -> None:
    meta = file_metadata(FIXTURES / f"{name}.onnx")
    assert isinstance(meta, kind) and meta.format_version == ONNX_FORMAT  # read into this version's record
    assert isinstance(meta.architecture, ARCHES[name]) and len(meta.lineage["checkpoint"]) == 64
    if isinstance(meta, DecoderMetadata):
        assert json.loads(meta.tokenizer)["type"] == "bigmodel-char"  # the tokenizer: back as the text it was


def test_format_1_models_still_infer(tmp_path: Path) -> None:
    generated = cli(
        "infer",
        "--model",
        FIXTURES / "gpt.onnx",
        "--prompt",
        "def ",
        "-n",
        "4",
        "-t",
        "0",
        "--json",
        "-o",
        tmp_path / "g.jsonl",
    )
    assert generated.code == 0, generated.stderr
    assert json.loads((tmp_path / "g.jsonl").read_text())["new_tokens"] == 4
    (tmp_path / "rows.csv").write_text("a,b\n1.0,2.0\n-3.0,-1.0\n")
    predicted = cli(
        "infer", "--model", FIXTURES / "mlp.onnx", "-i", tmp_path / "rows.csv", "-o", tmp_path / "p.jsonl", "--json"
    )
    assert predicted.code == 0, predicted.stderr
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2
    (tmp_path / "texts.csv").write_text("text\napple pear fig plum\n")
    classified = cli(
        "infer", "--model", FIXTURES / "bert.onnx", "-i", tmp_path / "texts.csv", "-o", tmp_path / "c.jsonl", "--json"
    )
    assert classified.code == 0, classified.stderr
    assert json.loads((tmp_path / "c.jsonl").read_text())["prediction"] in ("code", "fruit", "weather")


def test_format_2_stores_every_value_as_json_so_strings_stay_strings(tmp_path: Path) -> None:
    """Format 1 stored strings raw and read back anything that parsed as JSON: a target column named "1"
    came back as the number 1. Format 2 reads back what was written; format 1 files are still read right."""
    arch = TabularArch(task="classification", n_inputs=2, n_outputs=2, hidden_sizes=(4,))
    written = TabularMetadata(
        task="classification",
        target="1",
        features=["2", "null"],
        labels=["0", "1"],
        architecture=arch,
        lineage={"checkpoint": "ab"},
    )
    model = onnx.load(str(FIXTURES / "mlp.onnx"))
    stamp(model, written)
    entries = {p.key: p.value for p in model.metadata_props}
    assert entries["bigmodel.target"] == '"1"' and entries["bigmodel.format_version"] == "2"
    assert read_onnx_metadata(entries, "m.onnx") == written
    as_format_1(model)
    old = {p.key: p.value for p in model.metadata_props}
    assert old["bigmodel.target"] == "1" and "bigmodel.format_version" not in old
    assert read_onnx_metadata(old, "m.onnx").target == "1"


def test_a_manifest_reads_back_as_written(tmp_path: Path) -> None:
    arch = DecoderArch(vocab_size=10, n_layer=1, n_head=2, n_embd=8, block_size=8)
    model = registry.build_model(arch)
    manifest = CheckpointManifest(
        family="gpt",
        architecture=arch,
        data=DataInfo(task="lm", vocab_size=10),
        config={"seed": 0},
        step=3,
        metrics={"val_loss": 1.5},
        lineage={"data": "ab"},
        resume=ResumeRecord(loop={"best_score": math.inf}, param_groups=[], optimizer_scalars={}),
    )
    from bigmodel.checkpoint import model_tensors, save_checkpoint

    save_checkpoint(tmp_path / "c.safetensors", model_tensors(model), manifest)
    again = read_manifest(tmp_path / "c.safetensors")
    assert again == manifest and again.resume.loop["best_score"] == math.inf  # no best yet: inf, not null
    nan = manifest.model_copy(update={"metrics": {"loss": math.nan}})
    save_checkpoint(tmp_path / "d.safetensors", model_tensors(model), nan)
    assert math.isnan(read_manifest(tmp_path / "d.safetensors").metrics["loss"])  # a diverged loss says so
    header = json.loads(_header(tmp_path / "c.safetensors"))
    assert "adapter" not in header and "import" not in header and "resume" in header  # absent parts: absent


def test_broken_or_newer_files_are_one_line_naming_the_file(tmp_path: Path) -> None:
    fields = json.loads(_header(FIXTURES / "mlp.best.safetensors"))
    cases = {
        "typo.safetensors": ({**fields, "stpe": 3}, "stpe: Extra inputs are not permitted"),
        "type.safetensors": ({**fields, "step": "three"}, "step: Input should be a valid integer"),
        "newer.safetensors": ({**fields, "format_version": 2}, "format version 2 is not supported"),
    }
    for name, (manifest, message) in cases.items():
        save_file({"model.w": torch.zeros(1)}, str(tmp_path / name), metadata={"bigmodel": json.dumps(manifest)})
        with pytest.raises(UserError, match=message) as error:
            read_manifest(tmp_path / name)
        assert name in str(error.value) and "\n" not in str(error.value)
    entries = {p.key: p.value for p in onnx.load(str(FIXTURES / "mlp.onnx")).metadata_props}
    with pytest.raises(UserError, match="metadata format 3 is newer"):
        read_onnx_metadata({**entries, "bigmodel.format_version": "3"}, "m.onnx")
    with pytest.raises(UserError, match="m.onnx has no bigmodel metadata"):
        read_onnx_metadata({}, "m.onnx")
    with pytest.raises(UserError, match="m.onnx: its bigmodel metadata is not valid .features"):
        read_onnx_metadata({k: v for k, v in entries.items() if k != "bigmodel.features"}, "m.onnx")
    shutil.copy(FIXTURES / "mlp.onnx", tmp_path / "m.onnx")
    result = cli("inspect", tmp_path / "m.onnx", "--json")
    assert result.code == 0 and result.json()["metadata"]["features"] == ["a", "b"]


def _header(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return str(handle.metadata()["bigmodel"])
