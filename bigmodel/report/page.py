"""The one-page HTML report: self-contained (images inline as base64), no scripts, no network."""

from __future__ import annotations

import base64
import datetime
import html
import json
from typing import Any

from bigmodel import __version__
from bigmodel.config import Config, dump_yaml
from bigmodel.metrics import HEADLINE

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; max-width: 1240px; margin: 2em auto; padding: 0 1em; color: #222; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 560px), 1fr)); gap: 0 1.5em; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 0.2em 0.8em; border-bottom: 1px solid #eee; }
th { text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f8fa; padding: 0.8em; overflow: auto; font-size: 12px; white-space: pre-wrap; }
figure { margin: 1em 0; } summary { cursor: pointer; color: #555; } figcaption { color: #555; } img { max-width: 100%; border: 1px solid #eee; }
.bar { display: inline-block; height: 0.8em; vertical-align: middle; } .pos { background: #1a7f37; } .neg { background: #cf222e; }
.tokens { line-height: 1.9; } .tokens span { padding: 0.1em 0.15em; border-radius: 3px; white-space: pre-wrap; }
.pass { color: #1a7f37; font-weight: bold; } .fail { color: #cf222e; font-weight: bold; } .dim { color: #777; }
"""


def render(config: Config, artifacts: dict[str, Any], figures: dict[str, tuple[str, bytes]]) -> str:
    run_dir = config.stage_dir("report").parent
    sections = [
        _summary(artifacts),
        _figures(figures),
        _stage_metrics(artifacts),
        _explanations(artifacts.get("explain")),
        _samples(artifacts),
        _section("Config", _folded("the resolved config", dump_yaml(config))),
        _section(
            "Data manifest",
            _folded("the prepared data's manifest", compact_json(_readable_manifest(artifacts.get("prepare", {})))),
        )
        if "prepare" in artifacts
        else "",
    ]
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>bigmodel report: {_e(run_dir.name)}</title><style>{STYLE}</style></head><body>\n"
        f"<h1>bigmodel report: {_e(run_dir.name)}</h1>\n"
        f'<p class="dim">{_e(str(run_dir))} &middot; {created} &middot; bigmodel {__version__}</p>\n'
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
        ordered = sorted(counts.items(), key=lambda item: SPLIT_ORDER.get(item[0], len(SPLIT_ORDER)))
        rows.append(
            ("data", ", ".join(f"{split} {n:,}" for split, n in ordered) + (" tokens" if "tokens" in data else " rows"))
        )
    train = artifacts.get("train", {})
    records = train.get("records", [])
    if records:
        evals = [r for r in records if "val_loss" in r]
        best = min(evals, key=lambda r: r["val_loss"]) if evals else None
        rows.append(
            (
                "training",
                f"{records[-1]['step']:,} steps"
                + (f"; best val loss {best['val_loss']:.4f} at step {best['step']:,}" if best else ""),
            )
        )
    privacy = train.get("privacy")
    if privacy:
        spent = privacy["epsilon"]
        rows.append(
            (
                "privacy",
                (
                    f"(epsilon {spent:.3g}, delta {privacy['delta']:.2g})"
                    if spent is not None
                    else "no noise: no guarantee"
                )
                + f"-differentially private per training {privacy['unit']} (DP-SGD, {privacy['accountant']} "
                f"accountant): noise multiplier {privacy['noise_multiplier']:.3g}, clip {privacy['max_grad_norm']:g}, "
                f"sample rate {privacy['sample_rate']:.3g}, {privacy['steps']:,} steps",
            )
        )
    evaluation = artifacts.get("eval")
    if evaluation:
        scores = evaluation.get("metrics", {})
        headline = [(k, scores[k]) for k in HEADLINE_ORDER if isinstance(scores.get(k), float)]
        rows.append(
            (
                f"eval ({evaluation.get('split') or evaluation.get('source', '')})",
                ", ".join(f"{k} {v:.4g}" for k, v in headline),
            )
        )
    parity = artifacts.get("export")
    if parity:
        verdict = '<span class="pass">passed</span>' if parity.get("passed") else '<span class="fail">FAILED</span>'
        rows.append(
            (
                "export parity",
                f"{verdict}: max |ONNX - PyTorch| {parity.get('max_abs_diff', float('nan')):.2e} "
                f"(tolerance {parity.get('atol')})",
            )
        )
    compress = artifacts.get("compress")
    if compress and compress.get("steps"):
        first, last = compress["steps"][0], compress["steps"][-1]
        metric = first["metric"]
        rows.append(
            (
                "compress",
                f"{last['name']}: {metric} {first['metrics'][metric]:.4g} -> "
                f"{last['metrics'][metric]:.4g}, weights {first['weight_bytes'] / 1024:,.0f} -> "
                f"{last['weight_bytes'] / 1024:,.0f} KiB",
            )
        )
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v if k == 'export parity' else _e(v)}</td></tr>" for k, v in rows)
    return _section("Summary", f"<table>{body}</table>")


def _figures(figures: dict[str, tuple[str, bytes]]) -> str:
    if not figures:
        return ""
    items = [
        f'<figure id="{_e(name)}"><img alt="{_e(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"><figcaption>{_e(caption)} <span class="dim">({_e(name)})</span>'
        "</figcaption></figure>"
        for name, (caption, png) in figures.items()
    ]
    return _section("Plots", '<div class="plots">' + "\n".join(items) + "</div>")


def _stage_metrics(artifacts: dict[str, Any]) -> str:
    parts = []
    evaluation = artifacts.get("eval")
    if evaluation:
        scalars = {k: v for k, v in evaluation.get("metrics", {}).items() if isinstance(v, (int, float))}
        order = sorted(
            scalars, key=lambda k: (HEADLINE_ORDER.index(k) if k in HEADLINE_ORDER else len(HEADLINE_ORDER), k)
        )
        parts.append("<h3>eval</h3>" + _table(["metric", "value"], [[k, _num(scalars[k])] for k in order]))
    compress = artifacts.get("compress")
    if compress and compress.get("steps"):
        metric = compress["steps"][0]["metric"]
        rows = [
            [
                r["name"],
                f"{r['parameters']:,}",
                f"{r['nonzeros']:,}",
                f"{r['weight_bytes'] / 1024:,.1f}",
                _num(r["metrics"][metric]),
                f"{r['latency_ms']:.3f}",
            ]
            for r in compress["steps"]
        ]
        parts.append(
            "<h3>compress</h3>" + _table(["step", "parameters", "non-zero", "weights KiB", metric, "latency ms"], rows)
        )
    parity = artifacts.get("export")
    if parity:
        parts.append(
            "<h3>export parity</h3>" + _table(["", "value"], [[k, _cell(v)] for k, v in sorted(parity.items())])
        )
    return _section("Metrics of every stage", "\n".join(parts)) if parts else ""


EXPLAINED = 4  # items of explain's output the page shows
BAR_PX = 240  # the longest attribution bar


def _explanations(found: dict[str, Any] | None) -> str:
    """explain's attributions: bars per feature (tabular), tokens shaded by attribution (text): green for
    towards the output explained, red against, the stronger the more."""
    if not found or not found.get("items"):
        return ""
    head = (
        f"<p>{_e(found['method'])}; baseline: {_e(found['baseline'])}. "
        f'<span class="dim">({_e(len(found["items"]))} {_e(found["unit"])} in explain/attributions.json)</span></p>'
    )
    items = found["items"][:EXPLAINED]
    if found["kind"] == "tabular":
        parts = _explained_rows(found.get("importance", []), items)
    elif found["kind"] == "text_classification":
        parts = [
            f"<h3>{_e(item['prediction'])} ({item['probability']:.2f})</h3>"
            f'<p class="tokens">{_shaded([(t["token"], t["attribution"]) for t in item["tokens"]], " ")}</p>'
            f'<p class="dim">{_e(item["explains"])}; convergence delta {item["delta"]:.2e}</p>'
            for item in items
        ]
    else:  # a decoder: the prompt's tokens shaded, then what the model said
        parts = [
            f'<p class="tokens">{_shaded(list(zip(item["prompt_tokens"], item["sequence_attributions"], strict=False)), "")}'
            f"<b> &rarr; </b>{_e(item['generated'])}</p>"
            for item in items
        ]
    return _section("Explanations", "\n".join([head, *parts]))


def _explained_rows(importance: list[dict[str, Any]], items: list[dict[str, Any]]) -> list[str]:
    """The features by mean |attribution| over the rows explained, then each row's strongest features."""
    ranked = importance[:20]
    top = max((r["mean_abs_attribution"] for r in ranked), default=0.0)
    parts = [
        "<h3>features by mean |attribution|</h3>" + _bars([(r["name"], r["mean_abs_attribution"]) for r in ranked], top)
    ]
    for item in items:
        features = sorted(item["features"], key=lambda f: -abs(f["attribution"]))[:12]
        top = max((abs(f["attribution"]) for f in features), default=0.0)
        parts.append(
            f"<h3>row {_e(item['index'])}: {_e(item['prediction'])}</h3>"
            f'<p class="dim">{_e(item["explains"])}: {item["f_input"]:.4g} vs {item["f_baseline"]:.4g} at the '
            f"baseline; convergence delta {item['delta']:.2e}</p>"
            + _bars([(f"{f['name']} = {f['value']:.4g}", f["attribution"]) for f in features], top)
        )
    return parts


def _bars(rows: list[tuple[str, float]], top: float) -> str:
    body = [
        [
            _e(name),
            _num(value),
            f'<span class="bar {"pos" if value >= 0 else "neg"}" style="width: '
            f'{round(BAR_PX * abs(value) / top) if top else 0}px"></span>',
        ]
        for name, value in rows
    ]
    return _table(["", "attribution", ""], body, escape=False)


def _shaded(tokens: list[tuple[str, float]], gap: str) -> str:
    top = max((abs(value) for _, value in tokens), default=0.0) or 1.0
    spans = []
    for token, value in tokens:
        colour = "26,127,55" if value >= 0 else "207,34,46"
        spans.append(
            f'<span title="{value:.4g}" style="background: rgba({colour},{abs(value) / top:.2f})">{_e(token)}</span>'
        )
    return gap.join(spans)


def _samples(artifacts: dict[str, Any]) -> str:
    generated = artifacts.get("eval", {}).get("samples") or []
    texts = [str(s) for s in generated]
    rows = artifacts.get("infer", [])
    if rows and "completion" in rows[0]:
        texts += [str(r.get("prompt", "")) + str(r["completion"]) for r in rows]
    if texts:
        return _section("Samples", "\n".join(f"<pre>{_e(t)}</pre>" for t in texts[:4]))
    if rows:
        return _section("Predictions (first rows)", _predictions(rows))
    return ""


def _predictions(rows: list[dict[str, str]]) -> str:
    """The given columns and the prediction, with the probability the model gave its prediction (the
    prob_<label> columns, one per class, are too many to show)."""
    plain = [k for k in rows[0] if not k.startswith("prob_")]
    has_probs = any(k.startswith("prob_") for k in rows[0])
    header = plain + (["p(prediction)"] if has_probs else [])
    body = [
        [_cell(r[k]) for k in plain] + ([_cell(r.get(f"prob_{r.get('prediction')}", ""))] if has_probs else [])
        for r in rows
    ]
    return _table(header, body)


def _cell(value: Any) -> str:
    """A table cell: floats to 4 significant digits, true/false/null as JSON writes them, the rest as is."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit()):
        return str(value)
    return f"{number:.4g}"


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def compact_json(value: Any, indent: str = "") -> str:
    """JSON with one key per line but lists of numbers or strings on one line (a manifest's class counts
    would otherwise take a line per number)."""
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k))}: {compact_json(v, inner)}" for k, v in sorted(value.items())]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + compact_json(v, inner) for v in value) + f"\n{indent}]"
    return json.dumps(value, default=str)


def _table(header: list[str], rows: list[list[str]], escape: bool = True) -> str:
    """escape False: the cells are HTML already (the caller escaped what came from the artifacts)."""
    cell = _e if escape else str
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        f"<tr><td>{cell(row[0])}</td>"
        + "".join(f'<td class="num">{cell(c)}</td>' if _is_number(c) else f"<td>{cell(c)}</td>" for c in row[1:])
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


# Splits in the order a reader expects them, and the metrics a run is judged by first.
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
HEADLINE_ORDER = list(dict.fromkeys(name for names in HEADLINE.values() for name in names))


def _folded(what: str, text: str) -> str:
    """Long text folded away (a click opens it), so the page stays about the results."""
    lines = text.count("\n") + 1
    return f"<details><summary>{_e(what)} ({lines} lines)</summary><pre>{_e(text)}</pre></details>"


def _section(title: str, body: str) -> str:
    return f"<h2>{_e(title)}</h2>\n{body}"


def _num(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.6g}"


def _readable_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without the fitted per-feature statistics (long lists of numbers)."""
    return {k: v for k, v in manifest.items() if k != "statistics"}


def _e(text: Any) -> str:
    return html.escape(str(text))
