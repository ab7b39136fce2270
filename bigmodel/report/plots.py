"""The report's figures: matplotlib on its headless Agg backend, one PNG per figure, fixed size.

Each function takes plain data read from a run's artifacts and returns the PNG bytes.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display needed, same pixels everywhere

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

# Large counts (tokens, tokens/s, steps) read as 160,000, not 160000 or 1.6e5.
THOUSANDS = FuncFormatter(lambda value, _: f"{value:,.0f}")

WIDTH_IN, HEIGHT_IN, DPI = 8.0, 4.5, 100  # every PNG is 800 x 450 pixels
SIZE_PX = (int(WIDTH_IN * DPI), int(HEIGHT_IN * DPI))


def _png(figure: Any) -> bytes:
    for axes in figure.axes:
        for axis, (low, high) in ((axes.xaxis, axes.get_xlim()), (axes.yaxis, axes.get_ylim())):
            if max(abs(low), abs(high)) >= 10_000:
                axis.set_major_formatter(THOUSANDS)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    plt.close(figure)
    return buffer.getvalue()


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    figure, axes = plt.subplots(figsize=(WIDTH_IN, HEIGHT_IN), layout="constrained")
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def loss_curves(records: list[dict[str, Any]], x_key: str, x_label: str) -> bytes:
    """Train loss (a line) and val loss (points joined) against `x_key` (step, tokens or epoch)."""
    figure, axes = _figure(f"loss against {x_label}", x_label, "loss")
    train = [(r[x_key], r["train_loss"]) for r in records if "train_loss" in r and "val_loss" not in r]
    if not train:  # tabular runs log train loss only with each evaluation
        train = [(r[x_key], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r[x_key], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        axes.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        axes.plot(*zip(*val), "o-", label="val", markersize=4)
    axes.legend()
    return _png(figure)


def series(records: list[dict[str, Any]], key: str, title: str, ylabel: str) -> bytes:
    figure, axes = _figure(title, "step", ylabel)
    points = [(r["step"], r[key]) for r in records if key in r]
    axes.plot(*zip(*points), linewidth=1.2)
    return _png(figure)


def confusion_matrix(matrix: list[list[int]], labels: list[str]) -> bytes:
    """Rows (true class) normalised to 1, so each row reads as that class's recall spread."""
    figure, axes = plt.subplots(figsize=(WIDTH_IN, HEIGHT_IN), layout="constrained")
    totals = [max(1, sum(row)) for row in matrix]
    normalised = [[count / total for count in row] for row, total in zip(matrix, totals)]
    image = axes.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, label="share of the row")
    ticks = range(len(labels))
    axes.set_xticks(ticks, labels, rotation=45 if max(map(len, labels)) > 3 else 0)
    axes.set_yticks(ticks, labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title("confusion matrix (test split, row-normalised)")
    if len(labels) <= 12:
        for i, row in enumerate(normalised):
            for j, value in enumerate(row):
                if value > 0:
                    axes.text(
                        j,
                        i,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if value > 0.5 else "black",
                    )
    return _png(figure)


def per_class(per_class: dict[str, dict[str, float]]) -> bytes:
    figure, axes = _figure("precision and recall per class", "class", "score")
    labels = list(per_class)
    positions = range(len(labels))
    axes.bar([p - 0.2 for p in positions], [per_class[c]["precision"] for c in labels], 0.4, label="precision")
    axes.bar([p + 0.2 for p in positions], [per_class[c]["recall"] for c in labels], 0.4, label="recall")
    axes.set_xticks(list(positions), labels)
    # Bars start at 0 (a cut axis makes 0.95 look like half of 1.0); the band above 1 holds the legend.
    axes.set_ylim(0.0, 1.15)
    axes.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axes.legend(loc="upper center", ncol=2, frameon=False)
    return _png(figure)


def compression_tradeoff(rows: list[dict[str, Any]]) -> bytes:
    """The main metric of every compression step against its weight bytes and its latency."""
    metric = rows[0]["metric"]
    figure, (by_size, by_latency) = plt.subplots(1, 2, figsize=(WIDTH_IN, HEIGHT_IN), layout="constrained")
    for axes, key, label in ((by_size, "weight_bytes", "weights (KiB)"), (by_latency, "latency_ms", "latency (ms)")):
        xs = [row[key] / (1024 if key == "weight_bytes" else 1) for row in rows]
        ys = [row["metrics"][metric] for row in rows]
        axes.plot(xs, ys, "o")
        for x, y, row in zip(xs, ys, rows):
            axes.annotate(row["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        axes.set_xlabel(label)
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
    figure.suptitle(f"compression: {metric} against size and latency")
    return _png(figure)
