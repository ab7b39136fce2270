"""Open `bigmodel report` pages in a real (headless) browser and save screenshots; prints JSON.

    apt-get install chromium                 # Debian's headless Chromium (/usr/bin/chromium)
    python scripts/screenshot_reports.py [--work DIR] [--runs DIR ...]

Without --runs it makes two small runs to look at: digits (MLP classifier, pipeline to infer) and a
character-level GPT on a slice of Python's standard library (pipeline to infer, with samples). Each
run's report is rendered, then Chromium loads `report/index.html` from disk (the page must need
nothing from the network) and writes a full-page PNG per viewport width: a laptop (1280) and a phone
(390). Reported per page: the screenshot files, their size in pixels, and how much of the picture is
not background (an empty or broken page is almost all background).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
WIDTHS = {"laptop": 1280, "phone": 390}


def bigmodel(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bigmodel", *args, "-q"], cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"bigmodel {' '.join(args)} failed: {proc.stderr.strip()}")


def make_runs(work: Path) -> list[Path]:
    digits = work / "digits.yaml"
    digits.write_text(
        yaml.safe_dump(
            {
                "run_dir": "runs/digits",
                "threads": 1,
                "data": {"path": str(REPO / "configs" / "data" / "digits.csv.gz"), "target": "label"},
                "model": {"hidden_sizes": [64]},
                "train": {"epochs": 8, "lr": 0.01, "eval_every": 10},
            }
        )
    )
    lm = work / "lm.yaml"
    lm.write_text(
        yaml.safe_dump(
            {
                "run_dir": "runs/lm",
                "threads": 1,
                "data": {"format": "text", "path": "{stdlib}/json/*.py"},
                "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
                "train": {"max_steps": 150, "batch_size": 16, "lr": 3e-3, "eval_every": 25, "log_every": 10},
                "eval": {"samples": 1, "max_new_tokens": 120},
                "infer": {"prompt": "def ", "max_new_tokens": 80},
            }
        )
    )
    for config in (digits, lm):
        bigmodel("pipeline", "-c", str(config), cwd=work)
    return [work / "runs" / "digits", work / "runs" / "lm"]


def screenshot(page: Path, png: Path, width: int, browser: str) -> None:
    # --virtual-time-budget lets the page finish layout; the height is generous, then trimmed below.
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={width},16000",
            f"--screenshot={png}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def trim_and_measure(png: Path) -> dict[str, object]:
    """Cut the empty bottom of the tall window; measure how much of the page is not background."""
    import numpy as np
    from PIL import Image

    image = np.asarray(Image.open(png).convert("RGB")).astype(np.int16)
    background = image[-1, -1]
    busy_rows = np.nonzero((np.abs(image - background).sum(-1) > 30).any(1))[0]
    bottom = int(busy_rows[-1]) + 24 if len(busy_rows) else image.shape[0]
    Image.fromarray(image[:bottom].astype(np.uint8)).save(png)
    content = float((np.abs(image[:bottom] - background).sum(-1) > 30).mean())
    return {"file": str(png), "width": image.shape[1], "height": bottom, "non_background": round(content, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("screenshots"))
    parser.add_argument("--runs", type=Path, nargs="*", help="existing run folders (default: make two)")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("no Chromium found: apt-get install chromium")
    args.work.mkdir(parents=True, exist_ok=True)
    runs = [run.resolve() for run in args.runs] if args.runs else make_runs(args.work.resolve())
    pages = []
    for run in runs:
        bigmodel("report", "--run-dir", str(run), cwd=args.work)
        page = run / "report" / "index.html"
        shots = []
        for name, width in WIDTHS.items():
            png = args.work / f"{run.name}-{name}.png"
            screenshot(page, png, width, browser)
            shots.append(trim_and_measure(png))
        pages.append({"run": str(run), "page": str(page), "bytes": page.stat().st_size, "screenshots": shots})
    print(json.dumps({"browser": browser, "pages": pages}, indent=2))


if __name__ == "__main__":
    main()
