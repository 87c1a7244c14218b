"""The sweep's report.html: one self-contained page with the trial history (value by trial, pruned
and failed ones marked), the best trial, the parameters' importances (Optuna's fANOVA when enough
trials finished) and a parallel-coordinates view of every finished trial, drawn as inline SVG."""

from __future__ import annotations

import html
import math
from pathlib import Path

from optuna.trial import TrialState


def _svg_history(rows, direction: str) -> str:
    """Values by trial number: dots (completed), crosses (pruned: their last reported value), the
    best-so-far line."""
    pts = [(n, v, state) for n, v, state in rows if v is not None and math.isfinite(v)]
    if not pts:
        return "<p>No trial reported a value yet.</p>"
    w, h, pad = 640, 240, 36
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x):
        return pad + (x - x0) / (x1 - x0) * (w - 2 * pad)

    def sy(y):
        return h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)

    out = [f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="trial values">',
           f'<text x="4" y="14" font-size="11">{y1:.4g}</text><text x="4" y="{h - pad}" font-size="11">{y0:.4g}</text>']
    best, line = None, []
    for n, v, state in sorted(pts):
        if state == "COMPLETE":
            best = v if best is None else (min(best, v) if direction == "minimize" else max(best, v))
            line.append(f"{sx(n):.1f},{sy(best):.1f}")
            out.append(f'<circle cx="{sx(n):.1f}" cy="{sy(v):.1f}" r="4" fill="#2a6fdb"><title>trial {n}: {v:.5g}</title></circle>')
        else:
            x, y = sx(n), sy(v)
            out.append(f'<path d="M{x - 4:.1f},{y - 4:.1f}L{x + 4:.1f},{y + 4:.1f}M{x - 4:.1f},{y + 4:.1f}L{x + 4:.1f},'
                       f'{y - 4:.1f}" stroke="#c0392b" stroke-width="2"><title>trial {n} pruned: {v:.5g}</title></path>')
    if len(line) > 1:
        out.append(f'<polyline points="{" ".join(line)}" fill="none" stroke="#2a6fdb" stroke-dasharray="4 3"/>')
    out.append("</svg>")
    return "".join(out)


def _svg_parallel(trials, names) -> str:
    """One axis per parameter (numbers scaled to the axis; choices spread evenly), a line per trial."""
    if not trials or not names:
        return ""
    w, h, pad = 160 * len(names) + 80, 220, 30
    axes = {}
    for name in names:
        vals = [t.params.get(name) for t in trials if name in t.params]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            lo, hi = min(vals), max(vals)
            axes[name] = lambda v, lo=lo, hi=hi: 0.5 if hi == lo else (v - lo) / (hi - lo)
        else:
            order = sorted({str(v) for v in vals})
            axes[name] = lambda v, order=order: (order.index(str(v)) + 0.5) / len(order)
    out = [f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="parallel coordinates">']
    for i, name in enumerate(names):
        x = 40 + i * 160
        out.append(f'<line x1="{x}" y1="{pad}" x2="{x}" y2="{h - pad}" stroke="#999"/>'
                   f'<text x="{x - 30}" y="{h - 8}" font-size="11">{html.escape(name)}</text>')
    for t in trials:
        pts = [f"{40 + i * 160},{h - pad - axes[n](t.params[n]) * (h - 2 * pad):.1f}"
               for i, n in enumerate(names) if n in t.params]
        out.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="#2a6fdb" stroke-opacity="0.6">'
                   f'<title>trial {t.number}: {t.value:.5g}</title></polyline>')
    out.append("</svg>")
    return "".join(out)


def render(study, sweep_dir: Path, metric: str, direction: str) -> str:
    """The HTML text of the sweep report."""

    trials = study.get_trials(deepcopy=False)
    rows, table = [], []
    for t in trials:
        value = t.value if t.state == TrialState.COMPLETE else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        rows.append((t.number, value, t.state.name))
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        run = sweep_dir / f"trial-{t.number:03d}" / "report.html"
        link = f'<a href="trial-{t.number:03d}/report.html">run</a>' if run.is_file() else ""
        shown = "" if value is None else f"{value:.5g}"
        rss = t.user_attrs.get("rss_gib", "")
        retry = f" (retry of {t.user_attrs['retry_of']})" if "retry_of" in t.user_attrs else ""
        table.append(f"<tr><td>{t.number}{retry}</td><td>{t.state.name.lower()}</td><td>{shown}</td>"
                     f"<td>{html.escape(params)}</td><td>{rss}</td><td>{link}</td></tr>")
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    best = ""
    if done:
        b = study.best_trial
        best = (f"<p><b>Best: trial {b.number}</b>, {metric} {b.value:.5g}, {html.escape(str(b.params))}. "
                f'Re-run it with <code>qfine train {html.escape(str(sweep_dir / "best.yaml"))}</code>; '
                f'<a href="trial-{b.number:03d}/report.html">its curves</a>.</p>')
    importance = "<p>Importances need at least two completed trials.</p>"
    if len(done) >= 2:
        try:
            import optuna

            imp = optuna.importance.get_param_importances(study)
            importance = "<table><tr><th>parameter</th><th>importance (fANOVA)</th></tr>" + "".join(
                f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td></tr>" for k, v in imp.items()) + "</table>"
        except Exception as e:  # noqa: BLE001 — too few distinct values, a single-parameter space, ...
            importance = f"<p>Importances not computed: {html.escape(str(e))}</p>"
    names = sorted({k for t in done for k in t.params})
    counts = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    summary = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>qfine sweep · {html.escape(sweep_dir.name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:60em}}td,th{{padding:2px 10px;text-align:left}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f4f4f4}}</style></head><body>
<h1>qfine sweep · {html.escape(sweep_dir.name)}</h1>
<p>{len(trials)} trials ({summary}); metric <code>{html.escape(metric)}</code>, {direction}d.</p>
{best}
<h2>History</h2>{_svg_history(rows, direction)}
<p>Dots: completed trials; crosses: pruned trials at their last reported value; dashed: best so far.</p>
<h2>Parameter importances</h2>{importance}
<h2>Parallel coordinates (completed trials)</h2>{_svg_parallel(done, names)}
<h2>Trials</h2><table><tr><th>trial</th><th>state</th><th>{html.escape(metric)}</th><th>parameters</th>
<th>RSS after (GiB)</th><th></th></tr>{''.join(table)}</table></body></html>
"""
