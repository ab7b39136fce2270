from __future__ import annotations

from pathlib import Path

import pytest

from bigmodel.config import Config, json_schema, load_config
from bigmodel.errors import UserError
from tests.conftest import write_config

BASE = {"data": {"path": "data.csv", "target": "y"}}


def load(tmp_path: Path, config: dict, *overrides: str) -> Config:
    return load_config(write_config(tmp_path / "c.yaml", config), list(overrides))


def error_of(tmp_path: Path, config: dict, *overrides: str) -> str:
    with pytest.raises(UserError) as info:
        load(tmp_path, config, *overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_fill_in_and_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    config = load(tmp_path, BASE)
    assert config.train.optimizer == "adamw"
    assert config.data.path == tmp_path / "data.csv"
    assert config.run_dir == Path.cwd() / "runs" / "c"


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    message = error_of(tmp_path, {**BASE, "train": {"lrr": 0.1}})
    assert "train.lrr: unknown key (did you mean 'lr'?)" in message
    assert str(tmp_path / "c.yaml") in message


def test_bad_value_names_key_and_value(tmp_path: Path) -> None:
    message = error_of(tmp_path, {**BASE, "train": {"lr": -1}})
    assert "train.lr" in message and "greater than 0" in message and "-1" in message


def test_cross_field_problems_are_reported_together(tmp_path: Path) -> None:
    message = error_of(tmp_path, {**BASE, "train": {"optimizer": "adam", "nesterov": True, "lr": 0.1, "min_lr": 0.5}})
    assert "train.nesterov" in message and "train.min_lr" in message


def test_errors_across_sections_are_collected(tmp_path: Path) -> None:
    message = error_of(tmp_path, {**BASE, "model": {"dropout": 1.5}, "train": {"batch_size": 0}})
    assert "model.dropout" in message and "train.batch_size" in message


def test_set_parses_yaml_values(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        BASE,
        "train.lr=3e-4",
        "model.hidden_sizes=[8, 4]",
        "train.nesterov=false",
        "eval.fail_under.accuracy=0.5",
    )
    assert config.train.lr == pytest.approx(3e-4)
    assert config.model.hidden_sizes == [8, 4]
    assert config.eval.fail_under == {"accuracy": 0.5}


def test_set_is_validated_like_the_file(tmp_path: Path) -> None:
    assert "train.epochs" in error_of(tmp_path, BASE, "train.epochs=-3")
    assert "expected key.path=value" in error_of(tmp_path, BASE, "train.lr")
    assert "is a value, not a section" in error_of(tmp_path, BASE, "data.path.x=1")


def test_set_paths_are_relative_to_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    config = load_config(write_config(tmp_path / "sub" / "c.yaml", BASE), ["data.path=other.csv"])
    assert config.data.path == tmp_path / "other.csv"


def test_extends_merges_and_resolves_each_file_relative_to_itself(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    write_config(tmp_path / "base" / "base.yaml", {**BASE, "train": {"lr": 0.5, "epochs": 3}})
    config = load(tmp_path, {"extends": "base/base.yaml", "train": {"lr": 0.1}})
    assert config.train.lr == 0.1 and config.train.epochs == 3
    assert config.data.path == tmp_path / "base" / "data.csv"


def test_extends_cycle_is_refused(tmp_path: Path) -> None:
    write_config(tmp_path / "a.yaml", {"extends": "c.yaml"})
    assert "cycle" in error_of(tmp_path, {"extends": "a.yaml", **BASE})


def test_invalid_yaml_reports_the_line(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("data:\n  path: x\n  target: [unclosed\n")
    with pytest.raises(UserError, match="invalid YAML at line"):
        load_config(tmp_path / "c.yaml")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_section_hash_tracks_only_the_named_sections(tmp_path: Path) -> None:
    a = load(tmp_path, BASE)
    b = load(tmp_path, BASE, "train.lr=0.5")
    assert a.section_hash("train") != b.section_hash("train")
    assert a.section_hash("data", "model") == b.section_hash("data", "model")


def test_json_schema_carries_descriptions_and_forbids_unknown_keys() -> None:
    schema = json_schema()
    train = schema["$defs"]["TrainConfig"]
    assert train["additionalProperties"] is False
    assert "learning rate" in train["properties"]["lr"]["description"].lower()
    assert train["properties"]["lr"]["exclusiveMinimum"] == 0


def test_init_from_is_a_path_key_and_its_conflicts_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = {"data": {"format": "text", "path": "corpus.txt"}, "init": {"from": "models/llama"}}
    config = load(tmp_path, text)
    assert config.init.from_ == tmp_path / "models" / "llama"  # relative to the config file, like data.path
    monkeypatch.chdir(tmp_path / "..")
    assert load(tmp_path, text, "init.from=elsewhere").init.from_ == Path.cwd() / "elsewhere"
    assert "from" in json_schema()["$defs"]["InitConfig"]["properties"]
    message = error_of(
        tmp_path,
        {**text, "data": {**text["data"], "tokenizer": {"kind": "bpe"}}, "init": {"from": "m", "scheme": "normal"}},
    )
    assert "data.tokenizer: an imported model (init.from) brings its own tokenizer" in message
    assert "init.scheme: an imported model (init.from) keeps its pretrained weights" in message
    message = error_of(tmp_path, {**BASE, "init": {"from": "m"}, "export": {"format": "hf"}})
    assert (
        "init.from imports language models (model.family 'gpt' or 'bert')" in message
        and "export.format 'hf'" in message
    )
    assert "did you mean 'from'" in error_of(tmp_path, {**text, "init": {"frm": "m"}})


def test_fine_tuning_an_imported_model_defaults_to_gentle_training(tmp_path: Path) -> None:
    """From scratch: 50 epochs at 1e-3. An imported model (init.from): 3 epochs at 2e-5, 2e-4 with LoRA;
    what the config sets wins."""
    (tmp_path / "d.csv").write_text("text,label\na,x\n")
    (tmp_path / "bert").mkdir()
    data = {"format": "text_classification", "path": "d.csv"}
    scratch = load_config(write_config(tmp_path / "a.yaml", {"data": data}))
    assert (scratch.train.epochs, scratch.train.lr) == (50, 1e-3)
    imported = load_config(
        write_config(tmp_path / "b.yaml", {"data": data, "init": {"from": "bert"}, "model": {"task": "embedding"}})
    )
    assert (imported.train.epochs, imported.train.lr) == (3, 2e-5)
    adapted = load_config(
        write_config(tmp_path / "c.yaml", {"data": data, "init": {"from": "bert"}, "train": {"lora": {"rank": 4}}})
    )
    assert (adapted.train.epochs, adapted.train.lr) == (3, 2e-4)
    chosen = load_config(
        write_config(tmp_path / "d.yaml", {"data": data, "init": {"from": "bert"}, "train": {"epochs": 7, "lr": 0.01}})
    )
    assert (chosen.train.epochs, chosen.train.lr) == (7, 0.01)


def test_the_summary_says_when_the_best_came_at_the_first_evaluation() -> None:
    from bigmodel.train.state import LoopState

    loop = LoopState()
    for step, loss in [(10, 1.0), (20, 1.2), (30, 1.5)]:
        loop.step = step
        loop.scored(loss)
    assert loop.best_note(10) == (
        " -- the first evaluation; the 2 after it were all worse (try a lower train.lr or fewer train.epochs)"
    )
    loop.step = 40
    loop.scored(0.5)
    assert loop.best_note(10) == ""  # a later evaluation was the best: nothing to say


def test_a_train_key_the_familys_recipe_never_reads_is_refused_by_name(tmp_path: Path) -> None:
    """The epoch loop of mlp and bert has no bf16 autocast, micro-batches or torchrun: setting those keys
    would do nothing, silently; each family's train keys come from the family table."""
    from bigmodel.families import FAMILIES

    (tmp_path / "d.csv").write_text("text,label\na,x\n")
    bert = {
        "data": {"format": "text_classification", "path": "d.csv"},
        "train": {"precision": "bf16", "grad_accum_steps": 2, "save_every": 5},
    }
    message = error_of(tmp_path, bert)
    assert (
        "train.grad_accum_steps, train.precision are not read when training model.family 'bert' "
        "(bigmodel.train.encoder does not use them); remove them"
    ) in message
    assert load(tmp_path, {**bert, "train": {"save_every": 5}}).train.save_every == 5  # every loop saves
    assert load(tmp_path, {**BASE, "train": {"precision": "fp32"}}).train.precision == "fp32"  # the default: fine
    assert "precision" in FAMILIES["gpt"].train_keys and "augment" in FAMILIES["mlp"].train_keys


def test_the_checked_in_key_reference_is_the_schemas() -> None:
    from bigmodel.config import key_reference

    page = Path(__file__).parent.parent / "docs" / "config-reference.md"
    assert page.read_text() == key_reference(), "stale: run 'bigmodel config reference > docs/config-reference.md'"


def test_which_families_read_a_train_key_is_derived_not_written_by_hand() -> None:
    """--help tags a train key with the families whose recipe reads it, from the family table; no
    description carries a hand-written family tag that could go stale."""
    import re

    from bigmodel.config import TrainConfig, section_help

    help_text = section_help("train")
    assert "train.grad_accum_steps  (int, default 1) [gpt]" in help_text
    assert 'train.monitor  (one of loss|accuracy, default "loss") [mlp, bert]' in help_text
    assert "train.lr  (float, default 0.001)\n" in help_text  # every family reads it: no tag
    for name, field in TrainConfig.model_fields.items():
        assert not re.match(r"(gpt|bert|mlp|tabular)\b", (field.description or "").lower()), name
