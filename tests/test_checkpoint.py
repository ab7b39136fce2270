from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bigmodel import registry
from bigmodel.arch import TabularArch
from bigmodel.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from bigmodel.errors import UserError
from bigmodel.io import atomic_open
from bigmodel.manifests import CHECKPOINT_FORMAT, CheckpointManifest, DataInfo

ARCH = {
    "family": "mlp",
    "task": "classification",
    "n_inputs": 4,
    "n_outputs": 3,
    "hidden_sizes": [5],
    "activation": "relu",
    "dropout": 0.0,
}


def manifest_of(arch: dict = ARCH, **fields: object) -> CheckpointManifest:
    return CheckpointManifest(family="mlp", architecture=arch, data=DataInfo(), config={}, **fields)  # type: ignore[arg-type]


def write(path: Path, arch: dict = ARCH) -> torch.nn.Module:
    model = registry.build_model(arch)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(path, tensors, manifest_of(arch, step=7))
    return model


def test_round_trip_keeps_weights_and_manifest(tmp_path: Path) -> None:
    model = write(tmp_path / "c.safetensors")
    loaded, manifest = registry.load_model(tmp_path / "c.safetensors")
    assert manifest.step == 7 and manifest.format_version == CHECKPOINT_FORMAT
    assert manifest.architecture == TabularArch(**ARCH) and read_manifest(tmp_path / "c.safetensors") == manifest
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    write(path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(UserError, match="truncated or corrupt|not a readable"):
        load_checkpoint(path)


def test_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    path.write_text("hello, not a checkpoint")
    with pytest.raises(UserError, match="not a readable safetensors checkpoint"):
        read_manifest(path)


def test_safetensors_without_manifest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(UserError, match="not a bigmodel checkpoint"):
        read_manifest(path)


def test_other_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"bigmodel": json.dumps({"format_version": 99})})
    with pytest.raises(UserError, match="format version 99"):
        read_manifest(path)


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    model = write(path, {**ARCH, "hidden_sizes": [9]})
    # A manifest that claims [5] while the weights are [9] wide: the shapes give it away.
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(path, tensors, manifest_of(ARCH))
    with pytest.raises(UserError, match="does not match its architecture.*shape mismatch"):
        registry.load_model(path)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="checkpoint not found"):
        registry.load_model(tmp_path / "none.safetensors")


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(path) as handle:
        handle.write("half")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_manifest_header_is_plain_json_not_pickle(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    write(path)
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_len])
    assert json.loads(header["__metadata__"]["bigmodel"])["architecture"] == TabularArch(**ARCH).to_dict()


def _rewrite_forever(path: str, stop: object) -> None:
    import time

    i = 0
    while not stop.is_set():  # type: ignore[attr-defined]
        save_checkpoint(
            Path(path), {"model.w": torch.full((500,), float(i))}, manifest_of(step=i, lineage={"pad": "x" * (i % 40)})
        )
        i += 1
        time.sleep(0.002)  # hundreds of rewrites a second; a training run writes every few seconds


def test_reading_while_a_run_replaces_the_checkpoint_is_consistent(tmp_path: Path) -> None:
    """safetensors opens the path twice; a rename in between must not pair one file's header with
    another's data (it did: 'smaller than the required mapping size', or worse, wrong tensors)."""
    import multiprocessing
    import time

    path = tmp_path / "last.safetensors"
    save_checkpoint(path, {"model.w": torch.zeros(500)}, manifest_of(step=0))
    stop = multiprocessing.Event()
    writer = multiprocessing.Process(target=_rewrite_forever, args=(str(path), stop))
    writer.start()
    reads, deadline = 0, time.time() + 3
    try:
        while time.time() < deadline:
            manifest, tensors = load_checkpoint(path)
            assert torch.equal(tensors["model.w"], torch.full((500,), float(manifest.step or 0)))
            reads += 1
    finally:
        stop.set()
        writer.join()
    assert reads > 100


def test_an_unknown_family_or_a_broken_architecture_is_one_line(tmp_path: Path) -> None:
    from bigmodel.arch import parse

    with pytest.raises(UserError, match="unknown model family 't5'; known: bert, gpt, mlp"):
        parse({"family": "t5"}, "x.safetensors")
    with pytest.raises(UserError, match="n_kv_head .3. must divide n_head .4."):
        parse(
            {
                "family": "gpt",
                "vocab_size": 10,
                "n_layer": 1,
                "n_head": 4,
                "n_kv_head": 3,
                "n_embd": 8,
                "block_size": 8,
            },
            "x.safetensors",
        )
