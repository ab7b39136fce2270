"""bigmodel report: plots and a self-contained HTML page from a run's artifacts; TensorBoard logging."""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli
from tests.test_lm import lm_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (the first one, right after the signature)."""
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_report_is_complete(config: Path, expected_plots: set[str]) -> str:
    result = cli("report", "-c", config, "--json", "-q")
    assert result.code == 0, result.stderr
    out = result.json()
    report_dir = Path(out["report"]).parent
    assert {Path(p).name for p in out["plots"]} == expected_plots
    page = Path(out["report"]).read_text()
    inline = dict(re.findall(r'<figure id="([^"]+)"><img alt="[^"]+" src="data:image/png;base64,([^"]+)"', page))
    assert set(inline) == expected_plots  # the page shows every plot, embedded
    for name in expected_plots:
        data = (report_dir / name).read_bytes()
        assert png_size(data) == (800, 450)
        assert base64.b64decode(inline[name]) == data
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched
    return page


def test_report_of_a_classifier_run(fresh_run: Path) -> None:
    page = assert_report_is_complete(
        fresh_run,
        {
            "loss_vs_step.png",
            "loss_vs_epoch.png",
            "lr.png",
            "val_accuracy.png",
            "confusion_matrix.png",
            "per_class.png",
        },
    )
    for section in (
        "Summary",
        "Plots",
        "Metrics of every stage",
        "Predictions (first rows)",
        "Config",
        "Data manifest",
    ):
        assert f"<h2>{section}</h2>" in page
    assert '<span class="pass">passed</span>' in page  # the export parity verdict
    assert "accuracy" in page and "parameters" in page


@pytest.mark.slow
def test_report_of_a_language_model_with_compression(tmp_path: Path) -> None:
    config = lm_config(tmp_path, max_steps=20)
    steps = "compress.steps=[{method: quantize}]"
    for stage in ("prepare", "init", "train", "eval", "export", "infer"):
        overrides = ["--set", "infer.prompt=def ", "--set", "infer.max_new_tokens=20"] if stage == "infer" else []
        result = cli(stage, "-c", config, "-q", *overrides)
        assert result.code == 0, result.stderr
    assert cli("compress", "-c", config, "-q", "--set", steps).code == 0
    page = assert_report_is_complete(
        config,
        {
            "loss_vs_step.png",
            "loss_vs_tokens.png",
            "lr.png",
            "tokens_per_s.png",
            "compress_tradeoff.png",
        },
    )
    assert "<h2>Samples</h2>" in page and "<pre>def" in page
    assert "quantize dynamic" in page


def test_report_needs_matplotlib_and_something_to_report(tmp_path: Path) -> None:
    config = lm_config(tmp_path)
    empty = cli("report", "-c", config)
    assert empty.code == 2 and "nothing to report" in empty.stderr
    # The same command where matplotlib cannot be imported (None in sys.modules makes import fail).
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.argv = ['bigmodel', 'report', '-c', sys.argv[1]];"
        "from bigmodel.cli import main; main()"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("install the extra: pip install 'bigmodel[report]'")
    assert "Traceback" not in proc.stderr


def test_tensorboard_logs_what_metrics_jsonl_logs(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = lm_config(tmp_path, max_steps=20, tensorboard=True)
    for stage in ("prepare", "init", "train"):
        assert cli(stage, "-c", config, "-q").code == 0
    board = EventAccumulator(str(tmp_path / "run" / "train" / "tensorboard"))
    board.Reload()
    records = [json.loads(line) for line in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert [(e.step, pytest.approx(e.value)) for e in board.Scalars("val_loss")] == val
    assert {"train_loss", "lr", "tokens_per_s"} <= set(board.Tags()["scalars"])

    code = (
        "import sys; sys.modules['torch.utils.tensorboard'] = None;"
        "sys.argv = ['bigmodel', 'train', '-c', sys.argv[1]]; from bigmodel.cli import main; main()"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pip install 'bigmodel[tensorboard]'" in proc.stderr


def test_no_color_is_respected(tmp_path: Path) -> None:
    config = lm_config(tmp_path)
    command = [sys.executable, "-m", "bigmodel", "plan", "-c", str(config), "--set", "plan.vocab_size=50"]
    colored = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "FORCE_COLOR": "1"})
    plain = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "FORCE_COLOR": "1", "NO_COLOR": "1"}
    )
    assert colored.returncode == plain.returncode == 0
    color = re.compile(r"\x1b\[[0-9;]*3[0-7][;m]")  # an SGR sequence setting a foreground colour
    assert color.search(colored.stdout)
    assert not color.search(plain.stdout)


def screenshot(page: Path, shot: Path, height: int) -> Any:
    """Headless Chromium's picture of the page, 1280 pixels wide (skips where no Chromium is installed:
    apt-get install chromium)."""
    import shutil

    from PIL import Image

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium installed")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    command += [f"--window-size=1280,{height}", f"--screenshot={shot}", page.as_uri()]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return Image.open(shot)


@pytest.mark.slow
def test_the_report_renders_in_a_real_browser(fresh_run: Path, tmp_path: Path) -> None:
    """Chromium (headless) loads the page from disk and paints it: not blank, plots side by side on a
    laptop-wide window."""
    assert cli("report", "-c", fresh_run, "-q").code == 0
    pixels = screenshot(fresh_run.parent / "run" / "report" / "index.html", tmp_path / "page.png", 3000).convert("L")
    assert pixels.size == (1280, 3000)
    histogram = pixels.histogram()
    assert sum(histogram[:200]) / sum(histogram) > 0.02  # text and plots, not an empty page
    # Two plots side by side: the first plot row has ink in both halves of the page.
    band = pixels.crop((0, 400, 1280, 700))
    left, right = band.crop((0, 0, 640, 300)), band.crop((640, 0, 1280, 300))
    assert min(sum(half.histogram()[:200]) for half in (left, right)) > 1000


@pytest.mark.slow
def test_explanations_paint_in_a_real_browser(fresh_run: Path, tmp_path: Path) -> None:
    """explain's feature bars and shaded tokens, as Chromium paints the report: the bars' green (towards the
    explained output) and red (against) are on the page."""
    pytest.importorskip("captum")
    assert cli("explain", "-c", fresh_run, "-q", "--rows", "2").code == 0
    assert cli("report", "-c", fresh_run, "-q").code == 0
    page = fresh_run.parent / "run" / "report" / "index.html"
    colours = screenshot(page, tmp_path / "page.png", 9000).convert("RGB").getcolors(maxcolors=1 << 24)
    painted = {rgb: n for n, rgb in colours}
    assert painted.get((0x1A, 0x7F, 0x37), 0) > 500 and painted.get((0xCF, 0x22, 0x2E), 0) > 500
