"""The one-page HTML report: self-contained (images inline as base64), no scripts, no network."""

from __future__ import annotations

import base64
import datetime
import html
from typing import Any

from bigmodel import __version__
from bigmodel.config import Config, dump_yaml
from bigmodel.report import jsonable

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; max-width: 960px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 0.2em 0.8em; border-bottom: 1px solid #eee; }
th { text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f8fa; padding: 0.8em; overflow: auto; max-height: 24em; font-size: 12px; }
figure { margin: 1em 0; } figcaption { color: #555; } img { max-width: 100%; border: 1px solid #eee; }
.pass { color: #1a7f37; font-weight: bold; } .fail { color: #cf222e; font-weight: bold; } .dim { color: #777; }
"""


def render(config: Config, artifacts: dict[str, Any], figures: dict[str, tuple[str, bytes]]) -> str:
    run_dir = config.stage_dir("report").parent
    sections = [
        _summary(artifacts),
        _figures(figures),
        _stage_metrics(artifacts),
        _samples(artifacts),
        _section("Config", f"<pre>{_e(dump_yaml(config))}</pre>"),
        _section("Data manifest", f"<pre>{_e(jsonable(_readable_manifest(artifacts.get('prepare', {}))))}</pre>")
        if "prepare" in artifacts else "",
    ]
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>bigmodel report: {_e(run_dir.name)}</title><style>{STYLE}</style></head><body>\n"
        f"<h1>bigmodel report: {_e(run_dir.name)}</h1>\n"
        f"<p class=\"dim\">{_e(str(run_dir))} &middot; {created} &middot; bigmodel {__version__}</p>\n"
        + "\n".join(s for s in sections if s)
        + "\n</body></html>\n"
    )


def _summary(artifacts: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    model = next((artifacts[k] for k in ("train", "init") if "parameters" in artifacts.get(k, {})), None)
    if model:
        arch = model.get("architecture") or {}
        rows.append(("model", f"{arch.get('family', '?')} with {model['parameters']:,} parameters"))
    data = artifacts.get("prepare")
    if data:
        counts = data.get("tokens") or data.get("splits") or {}
        rows.append(("data", ", ".join(f"{split} {n:,}" for split, n in counts.items())
                     + (" tokens" if "tokens" in data else " rows")))
    train = artifacts.get("train", {})
    records = train.get("records", [])
    if records:
        evals = [r for r in records if "val_loss" in r]
        best = min(evals, key=lambda r: r["val_loss"]) if evals else None
        rows.append(("training", f"{records[-1]['step']:,} steps"
                     + (f"; best val loss {best['val_loss']:.4f} at step {best['step']:,}" if best else "")))
    evaluation = artifacts.get("eval")
    if evaluation:
        headline = {k: v for k, v in evaluation.get("metrics", {}).items() if isinstance(v, float)}
        rows.append((f"eval ({evaluation.get('split') or evaluation.get('source', '')})",
                     ", ".join(f"{k} {v:.4g}" for k, v in sorted(headline.items()))))
    parity = artifacts.get("export")
    if parity:
        verdict = "<span class=\"pass\">passed</span>" if parity.get("passed") else "<span class=\"fail\">FAILED</span>"
        rows.append(("export parity", f"{verdict}: max |ONNX - PyTorch| {parity.get('max_abs_diff', float('nan')):.2e} "
                     f"(tolerance {parity.get('atol')})"))
    compress = artifacts.get("compress")
    if compress and compress.get("steps"):
        first, last = compress["steps"][0], compress["steps"][-1]
        metric = first["metric"]
        rows.append(("compress", f"{last['name']}: {metric} {first['metrics'][metric]:.4g} -> "
                     f"{last['metrics'][metric]:.4g}, weights {first['weight_bytes'] / 1024:,.0f} -> "
                     f"{last['weight_bytes'] / 1024:,.0f} KiB"))
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v if k == 'export parity' else _e(v)}</td></tr>" for k, v in rows)
    return _section("Summary", f"<table>{body}</table>")


def _figures(figures: dict[str, tuple[str, bytes]]) -> str:
    if not figures:
        return ""
    items = [
        f"<figure id=\"{_e(name)}\"><img alt=\"{_e(name)}\" src=\"data:image/png;base64,"
        f"{base64.b64encode(png).decode()}\"><figcaption>{_e(caption)} <span class=\"dim\">({_e(name)})</span>"
        "</figcaption></figure>"
        for name, (caption, png) in figures.items()
    ]
    return _section("Plots", "\n".join(items))


def _stage_metrics(artifacts: dict[str, Any]) -> str:
    parts = []
    evaluation = artifacts.get("eval")
    if evaluation:
        scalars = {k: v for k, v in evaluation.get("metrics", {}).items() if isinstance(v, (int, float))}
        parts.append("<h3>eval</h3>" + _table(["metric", "value"], [[k, _num(v)] for k, v in sorted(scalars.items())]))
    compress = artifacts.get("compress")
    if compress and compress.get("steps"):
        metric = compress["steps"][0]["metric"]
        rows = [[r["name"], f"{r['parameters']:,}", f"{r['nonzeros']:,}", f"{r['weight_bytes'] / 1024:,.1f}",
                 _num(r["metrics"][metric]), f"{r['latency_ms']:.3f}"] for r in compress["steps"]]
        parts.append("<h3>compress</h3>" + _table(
            ["step", "parameters", "non-zero", "weights KiB", metric, "latency ms"], rows))
    parity = artifacts.get("export")
    if parity:
        parts.append("<h3>export parity</h3><pre>" + _e(jsonable(parity)) + "</pre>")
    return _section("Metrics of every stage", "\n".join(parts)) if parts else ""


def _samples(artifacts: dict[str, Any]) -> str:
    generated = artifacts.get("eval", {}).get("samples") or []
    texts = [str(s) for s in generated]
    rows = artifacts.get("infer", [])
    if rows and "completion" in rows[0]:
        texts += [str(r.get("prompt", "")) + str(r["completion"]) for r in rows]
    if texts:
        return _section("Samples", "\n".join(f"<pre>{_e(t)}</pre>" for t in texts[:4]))
    if rows:
        header = list(rows[0])[:6]
        return _section("Predictions (first rows)", _table(header, [[str(r[k]) for k in header] for r in rows]))
    return ""


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(f"<tr><td>{_e(row[0])}</td>" + "".join(f"<td class=\"num\">{_e(c)}</td>" for c in row[1:])
                   + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _section(title: str, body: str) -> str:
    return f"<h2>{_e(title)}</h2>\n{body}"


def _num(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.6g}"


def _readable_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without the fitted per-feature statistics (long lists of numbers)."""
    return {k: v for k, v in manifest.items() if k != "statistics"}


def _e(text: Any) -> str:
    return html.escape(str(text))
