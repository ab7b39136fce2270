"""Recipe regression tests: each family's training recipe, from a fixed seed, gives these first losses.

A refactor that changes the numbers a recipe computes (the order of operations, an initialisation, the
data order, the schedule) fails here, where it is seen, instead of drifting unseen (torchtune's
`tests/recipes` do the same). The values were recorded on an AMD EPYC (Zen 4); fp32 on another x86 CPU
differs in the last bits of a sum, hence the relative tolerance -- far below what any real change moves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli, tiny_digits, write_config
from tests.test_lm import lm_config
from tests.test_text_classification import labelled_csv

TOLERANCE = 1e-4  # relative


def first_losses(config: Path, steps: int = 5) -> list[float]:
    assert cli("pipeline", "-c", config, "--to", "train", "-q").code == 0
    log = [json.loads(line) for line in (config.parent / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    losses = {record["step"]: record["train_loss"] for record in log if "train_loss" in record}
    return [losses[step] for step in range(1, steps + 1)]


def test_the_gpt_recipe(tmp_path: Path) -> None:
    config = lm_config(tmp_path, max_steps=5, log_every=1, eval_every=5)
    assert first_losses(config) == pytest.approx(GPT, rel=TOLERANCE)


def test_the_tabular_recipe(tmp_path: Path) -> None:
    config = tiny_digits(tmp_path, max_steps=5, eval_every=1)
    assert first_losses(config) == pytest.approx(MLP, rel=TOLERANCE)


def test_the_encoder_recipe(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.yaml",
        {
            "seed": 0,
            "threads": 1,
            "run_dir": "run",
            "data": {"format": "text_classification", "path": str(labelled_csv(tmp_path / "d.csv"))},
            "model": {"n_layer": 2, "n_embd": 32, "n_head": 4, "block_size": 32},
            "train": {"lr": 1e-3, "batch_size": 16, "max_steps": 5, "eval_every": 1},
        },
    )
    assert first_losses(config) == pytest.approx(BERT, rel=TOLERANCE)


# train_loss of steps 1-5 (AMD EPYC Zen 4, torch 2.13.0 CPU, 1 thread)
GPT = [5.010228157043457, 4.999156475067139, 4.944948196411133, 4.8368988037109375, 4.717543125152588]
MLP = [3.479149341583252, 2.671220302581787, 2.6782145500183105, 2.348134994506836, 2.073472023010254]
BERT = [1.0979176759719849, 1.1016817092895508, 1.099721074104309, 1.096086859703064, 1.0981932878494263]
