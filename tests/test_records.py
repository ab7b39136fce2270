"""prepare reads corpora as they come: JSONL, Parquet (pyarrow) and Hugging Face `datasets` folders
(save_to_disk). The oracle is `datasets` itself: what bigmodel reads from each file equals what
`datasets.load_dataset` / `load_from_disk` read from it, and the three files of the same records prepare
into the same shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigmodel import records
from tests import hf_models
from tests.conftest import cli, write_config
from tests.test_finetune import records as sft_records

datasets = pytest.importorskip("datasets")
pyarrow = pytest.importorskip("pyarrow")

TEXTS = [
    f"Record {i}: {'héllo wörld ' * (i % 4)}the quick brown fox {i * 7}.\n{'second line' if i % 3 else ''}"
    for i in range(60)
] + ["Record 3: duplicate kept once", "Record 3: duplicate kept once", ""]


def write_all(folder: Path, rows: list[dict]) -> dict[str, Path]:
    """The same rows as a JSONL file, a Parquet file and a datasets folder."""
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = folder / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    table = datasets.load_dataset("json", data_files=str(jsonl), split="train")  # (every row's fields: a union)
    table.to_parquet(str(folder / "rows.parquet"))
    table.save_to_disk(str(folder / "saved"))
    return {"jsonl": jsonl, "parquet": folder / "rows.parquet", "datasets": folder / "saved"}


def test_each_format_reads_what_datasets_reads(tmp_path: Path) -> None:
    rows = [{"text": text, "id": i} for i, text in enumerate(TEXTS)]
    files = write_all(tmp_path, rows)
    theirs = {
        "jsonl": datasets.load_dataset("json", data_files=str(files["jsonl"]), split="train"),
        "parquet": datasets.load_dataset("parquet", data_files=str(files["parquet"]), split="train"),
        "datasets": datasets.load_from_disk(str(files["datasets"])),
    }
    for kind, path in files.items():
        assert records.is_records(path)
        ours = [record for _, record in records.read(path, ["text"])]
        assert [r["text"] for r in ours] == theirs[kind]["text"] == TEXTS  # texts equal, counts equal
        assert [record["id"] for _, record in records.read(path, None)] == theirs[kind]["id"]


def prepare_text(tmp: Path, path: Path) -> dict:
    config = write_config(
        tmp / f"{path.name}.yaml",
        {
            "seed": 0,
            "run_dir": f"run-{path.name}",
            "data": {"format": "text", "path": str(path)},
        },
    )
    result = cli("prepare", "-c", config, "--json", "-q")
    assert result.code == 0, result.stderr
    return result.json()


def test_text_from_jsonl_parquet_and_a_datasets_folder_prepares_the_same_shards(tmp_path: Path) -> None:
    files = write_all(tmp_path, [{"text": text, "source": "web"} for text in TEXTS])
    outputs = {kind: prepare_text(tmp_path, path) for kind, path in files.items()}
    shards = {
        kind: {
            name: (tmp_path / f"run-{files[kind].name}" / "prepare" / name).read_bytes()
            for name in ("train.bin", "val.bin")
        }
        for kind in files
    }
    assert shards["jsonl"] == shards["parquet"] == shards["datasets"]
    manifests = {
        kind: json.loads((tmp_path / f"run-{files[kind].name}" / "prepare" / "manifest.json").read_text())
        for kind in files
    }
    cleaning = {kind: manifest["cleaning"] for kind, manifest in manifests.items()}
    assert cleaning["jsonl"] == cleaning["parquet"] == cleaning["datasets"]
    assert cleaning["jsonl"]["documents_seen"] == len(TEXTS) and cleaning["jsonl"]["dropped"]["duplicate"] == 1
    assert cleaning["jsonl"]["dropped"]["too_short"] == 1 and all(output["ok"] for output in outputs.values())
    # a datasets folder is tracked by its files: its description and Arrow data
    assert {Path(s["path"]).name for s in manifests["datasets"]["sources"]} >= {"state.json", "dataset_info.json"}


def test_sft_and_text_classification_read_parquet_and_datasets_folders(tmp_path: Path) -> None:
    # SFT: three example shapes in one table (a null is a field the row does not have)
    source = hf_models.make("llama", tmp_path / "llama")
    files = write_all(tmp_path / "sft", sft_records(16))
    prepared = {}
    for kind, path in files.items():
        config = write_config(
            tmp_path / f"sft-{kind}.yaml",
            {
                "seed": 0,
                "run_dir": f"sft-{kind}",
                "data": {"format": "sft", "path": str(path), "val_fraction": 0.2},
                "init": {"from": str(source)},
            },
        )
        result = cli("prepare", "-c", config, "-q")
        assert result.code == 0, result.stderr
        prepared[kind] = {
            p.name: p.read_bytes()
            for p in sorted((tmp_path / f"sft-{kind}" / "prepare").iterdir())
            if p.suffix != ".json"
        }
    assert prepared["jsonl"] == prepared["parquet"] == prepared["datasets"] and prepared["jsonl"]
    # text classification: a labelled table
    rows = [
        {"sentence": f"{'good' if i % 2 else 'bad'} movie number {i}", "label": "pos" if i % 2 else "neg"}
        for i in range(80)
    ]
    files = write_all(tmp_path / "cls", rows)
    arrays = {}
    for kind, path in files.items():
        config = write_config(
            tmp_path / f"cls-{kind}.yaml",
            {
                "seed": 0,
                "run_dir": f"cls-{kind}",
                "data": {"format": "text_classification", "path": str(path), "text": "sentence", "vocab_size": 100},
                "model": {"family": "bert", "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16},
            },
        )
        result = cli("prepare", "-c", config, "-q")
        assert result.code == 0, result.stderr
        arrays[kind] = (tmp_path / f"cls-{kind}" / "prepare" / "data.safetensors").read_bytes()
    assert arrays["jsonl"] == arrays["parquet"] == arrays["datasets"]


def test_tables_without_the_named_column_or_with_several_splits_are_refused(tmp_path: Path) -> None:
    files = write_all(tmp_path, [{"body": text} for text in TEXTS[:5]])
    for kind in ("parquet", "datasets"):
        result = cli(
            "prepare", "-c", write_config(tmp_path / "c.yaml", {"data": {"format": "text", "path": str(files[kind])}})
        )
        assert result.code == 2, result.stderr
        assert "no column 'text' (its columns: body; set data.jsonl_field" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}])}).save_to_disk(str(splits))
    result = cli("prepare", "-c", write_config(tmp_path / "d.yaml", {"data": {"format": "text", "path": str(splits)}}))
    assert result.code == 2 and "holds a DatasetDict (train): point data.path at one split's folder" in result.stderr
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    result = cli(
        "prepare",
        "-c",
        write_config(tmp_path / "e.yaml", {"data": {"format": "text", "path": str(tmp_path / "broken.parquet")}}),
    )
    assert result.code == 2 and "not a readable Parquet file" in result.stderr
