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
