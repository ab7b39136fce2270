from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from bigmodel import prepare
from bigmodel.config import load_config
from bigmodel.errors import UserError
from tests.conftest import CONFIGS, write_config


def prepared(tmp_path: Path, csv_text: str | None = None, **data: object) -> Path:
    if csv_text is not None:
        (tmp_path / "d.csv").write_text(csv_text)
    path = data.pop("path", tmp_path / "d.csv")
    config = write_config(
        tmp_path / "c.yaml",
        {
            "run_dir": "run",
            "data": {"path": str(path), "target": "label", **data},
        },
    )
    prepare.run(load_config(config))
    return tmp_path / "run" / "prepare"


def test_digits_split_is_stratified_seeded_and_fitted_on_train(tmp_path: Path) -> None:
    out = prepared(tmp_path, path=CONFIGS / "data" / "digits.csv.gz")
    arrays = load_file(str(out / "data.safetensors"))
    assert len(arrays["train_y"]) + len(arrays["val_y"]) + len(arrays["test_y"]) == 1797
    # Every class appears in each split in about the overall proportion (about 20% in test).
    test_share = np.bincount(arrays["test_y"]) / (
        np.bincount(arrays["train_y"]) + np.bincount(arrays["val_y"]) + np.bincount(arrays["test_y"])
    )
    assert np.all(np.abs(test_share - 0.2) < 0.01)
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert np.allclose(manifest["statistics"]["feature_mean"], arrays["train_x"].mean(0), atol=1e-4)
    assert manifest["labels"] == [str(i) for i in range(10)]
    # The same seed gives the same bytes.
    again = prepared(
        tmp_path / "again" if (tmp_path / "again").mkdir() is None else tmp_path,
        path=CONFIGS / "data" / "digits.csv.gz",
    )
    assert (again / "data.safetensors").read_bytes() == (out / "data.safetensors").read_bytes()


def test_missing_value_names_row_and_column(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"missing value at row 3, column 'b'"):
        prepared(tmp_path, "a,b,label\n1,2,x\n3,,y\n")


def test_non_numeric_value_names_row_and_column(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"non-numeric value 'abc' at row 2, column 'a'"):
        prepared(tmp_path, "a,b,label\nabc,2,x\n3,4,y\n")


def test_unknown_target_suggests_the_close_column(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,lable\n1,x\n")
    with pytest.raises(UserError, match=r"target column 'label'.*did you mean 'lable'"):
        prepared(tmp_path)


def test_ragged_row_and_missing_file_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="row 3 has 2 cells but the header has 3"):
        prepared(tmp_path, "a,b,label\n1,2,x\n3,4\n")
    with pytest.raises(UserError, match="data.path not found"):
        prepared(tmp_path, path=tmp_path / "missing.csv")


def test_regression_target_must_be_numeric(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="column 'label'"):
        prepared(tmp_path, "a,label\n1,2\n2,x\n", task="regression")


def test_a_header_naming_a_column_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="the header names column 'b' 2 times"):
        prepared(tmp_path, "a,b,b,label\n1,2,3,x\n3,4,5,y\n")


def test_a_utf8_byte_order_mark_on_a_jsonl_file_is_dropped(tmp_path: Path) -> None:
    from bigmodel.io import jsonl_objects

    path = tmp_path / "t.jsonl"
    path.write_text('\ufeff{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    with open(path, encoding="utf-8") as handle:
        assert [record for _, record in jsonl_objects(handle, path)] == [{"text": "a"}, {"text": "b"}]
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        list(jsonl_objects(['{"text": "a"}', '\ufeff{"text": "b"}'], path))  # (only a file's first line has one)
