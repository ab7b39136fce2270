"""data.cleaning.redact: planted personal data and secrets are found, counted and gone from everything
prepare writes; near-misses of the same shapes are kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bigmodel import tokenizer as tokenizers
from bigmodel.prepare.redact import KINDS, Redactions, luhn
from tests.conftest import cli, write_config

PLANTED = {
    "email": ["john.doe@example.com", "a_b+tag@mail.co.uk"],
    "phone": ["+1 415-555-0132", "(020) 7946 0958"],
    "ip": ["192.168.1.20", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"],
    "credit_card": ["4111 1111 1111 1111", "5500000000000004"],
    "secret": [
        "AKIAIOSFODNN7EXAMPLE",
        "ghp_abcdefghijklmnopqrstuvwxyz0123456789AB",
        "sk-proj-abcdefghijklmnopqrstuvwxyz123456",
    ],
}
NEAR_MISSES = [
    "user@localhost",
    "256.1.1.1",
    "version 1.2.3",
    "year 2024",
    "id 12345",
    "4111111111111112",
    "pi 3.14159",
]


def test_luhn_and_near_misses() -> None:
    assert luhn("4111111111111111") and luhn("5500000000000004") and not luhn("4111111111111112")
    found = Redactions()
    kept = found.redact(" ".join(NEAR_MISSES), KINDS)
    assert kept == " ".join(NEAR_MISSES) and found.counts == {}


def test_prepare_redacts_counts_and_keeps_no_planted_value(tmp_path: Path) -> None:
    lines = []
    for i in range(40):
        kind = KINDS[i % len(KINDS)]
        value = PLANTED[kind][i // len(KINDS) % len(PLANTED[kind])]
        lines.append(f"Line {i}: reach me at {value} -- or not; {NEAR_MISSES[i % len(NEAR_MISSES)]}.")
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    expected = {kind: sum(1 for line in lines if any(v in line for v in PLANTED[kind])) for kind in KINDS}
    config = write_config(
        tmp_path / "c.yaml",
        {
            "seed": 0,
            "run_dir": "run",
            "data": {
                "format": "text",
                "path": "corpus.txt",
                "cleaning": {"redact": list(KINDS)},
                "split": "tail",
                "val_fraction": 0.2,
            },
        },
    )
    result = cli("prepare", "-c", config)
    assert result.code == 0, result.stderr
    assert "prepare: redacted 8 email, 8 phone, 8 ip, 8 credit_card, 8 secret" in result.stderr
    folder = tmp_path / "run" / "prepare"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["cleaning"]["redacted"] == expected
    tok = tokenizers.load(folder / "tokenizer.json")
    dtype = np.dtype(manifest.get("dtype", "uint16"))
    text = "".join(tok.decode(np.fromfile(folder / f"{split}.bin", dtype=dtype).tolist()) for split in ("train", "val"))
    for kind in KINDS:
        assert text.count(f"<{kind.upper()}>") == expected[kind]
    for miss in NEAR_MISSES:
        assert miss in text  # kept
    # no planted value anywhere prepare wrote: shards, tokenizer, manifest (its examples are masked)
    written = b"".join(path.read_bytes() for path in folder.iterdir() if path.is_file())
    decoded = text.encode()
    for values in PLANTED.values():
        for value in values:
            assert value.encode() not in written and value.encode() not in decoded
    shown = cli("inspect", folder, "--json")
    assert shown.code == 0
    examples = shown.json()["cleaning"]["redacted_examples"]
    assert set(examples) == set(KINDS) and all("<" in e and "*" in e for es in examples.values() for e in es)
    assert not any(value in json.dumps(shown.json()) for values in PLANTED.values() for value in values)


def _planted_lines(n: int) -> list[str]:
    lines = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        value = PLANTED[kind][i // len(KINDS) % len(PLANTED[kind])]
        lines.append(f"Note {i}: reach me at {value} -- or not; {NEAR_MISSES[i % len(NEAR_MISSES)]}.")
    return lines


def _no_planted_value_in(folder: Path) -> None:
    written = b"".join(path.read_bytes() for path in folder.iterdir() if path.is_file())
    for values in PLANTED.values():
        for value in values:
            assert value.encode() not in written, value


def test_sft_records_and_labelled_texts_are_redacted_before_anything_is_written(tmp_path: Path) -> None:
    from bigmodel.datasets import sft_files
    from tests import hf_models

    lines = _planted_lines(30)
    expected = {kind: sum(1 for line in lines if any(v in line for v in PLANTED[kind])) for kind in KINDS}

    # sft: every string of a record (prompt, completion, chat messages) is redacted before rendering
    records = [
        {"prompt": line, "completion": " ok"}
        if i % 2
        else {"messages": [{"role": "user", "content": line}, {"role": "assistant", "content": "ok"}]}
        for i, line in enumerate(lines)
    ]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    source = hf_models.make("llama", tmp_path / "hf", max_position_embeddings=256)  # (room for the long lines)
    sft = write_config(
        tmp_path / "sft.yaml",
        {
            "run_dir": "sft_run",
            "data": {"format": "sft", "path": "sft.jsonl", "val_fraction": 0.3, "cleaning": {"redact": list(KINDS)}},
            "init": {"from": str(source)},
        },
    )
    result = cli("prepare", "-c", sft)
    assert result.code == 0, result.stderr
    assert "prepare: redacted 6 email, 6 phone, 6 ip, 6 credit_card, 6 secret" in result.stderr
    folder = tmp_path / "sft_run" / "prepare"
    assert json.loads((folder / "manifest.json").read_text())["cleaning"]["redacted"] == expected
    tok = tokenizers.load(folder / "tokenizer.json")
    dtype = np.dtype(json.loads((folder / "manifest.json").read_text())["dtype"])
    shards = [sft_files(folder, split)["tokens"] for split in ("train", "val")]
    text = "".join(tok.decode(np.fromfile(f, dtype=dtype).tolist()) for f in shards)
    assert text.count("<EMAIL>") == expected["email"] and all(miss in text for miss in NEAR_MISSES)
    _no_planted_value_in(folder)

    # text_classification: the text column (not the label), in the shards and in test.jsonl alike
    with (tmp_path / "texts.jsonl").open("w") as handle:
        for i, line in enumerate(lines):
            handle.write(json.dumps({"text": line, "label": "ab"[i % 2]}) + "\n")
    labelled = write_config(
        tmp_path / "tc.yaml",
        {
            "run_dir": "tc_run",
            "data": {"format": "text_classification", "path": "texts.jsonl", "cleaning": {"redact": list(KINDS)}},
            "model": {"block_size": 64},
        },
    )
    result = cli("prepare", "-c", labelled)
    assert result.code == 0, result.stderr
    folder = tmp_path / "tc_run" / "prepare"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["cleaning"]["redacted"] == expected and manifest["labels"] == ["a", "b"]
    test_texts = [json.loads(line)["text"] for line in (folder / "test.jsonl").read_text().splitlines()]
    assert test_texts and all("Note" in t for t in test_texts)
    _no_planted_value_in(folder)
