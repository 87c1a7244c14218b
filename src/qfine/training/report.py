"""``report.html``: one self-contained page per run (plots inlined as PNG, no external assets).

It shows the loss curves and learning-rate schedule, throughput and memory, the config, and sample
generations before vs after training on held-out prompts.
"""

from __future__ import annotations

import base64
import html
import io
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from qfine.training.callbacks import read_metrics


@dataclass
class ReportFacts:
    """What the training recipe knows that metrics.jsonl does not."""

    title: str
    model: str
    device: str
    footprint: str  # memory footprint + trainable parameters line
    data: str  # rows/tokens/truncation line
    config_yaml: str
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (prompt, before, after)
    samples_note: str = ""
    status: str = "finished"
    confusion: tuple[list[str], list[list[int]]] | None = None  # seq-cls: (labels, counts[true][predicted]) on eval
    sensitivity: tuple[str, list] | None = None  # adaptive quantization: (summary line, LayerSensitivity rows)
    adapter: str = ""  # whose weights RUN_DIR/adapter holds: "step 15 (the last step)"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(rows: list[dict]) -> list[tuple[str, str]]:
    """(caption, base64 PNG) for the loss, learning-rate, grad-norm and throughput curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    out = []
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    x, y = series("loss")
    ax.plot(x, y, label="train loss", color="#1f77b4", lw=1.6)
    ex, ey = series("eval_loss")
    if ex:
        ax.plot(ex, ey, "o-", label="eval loss", color="#d62728", lw=1.6)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    out.append(("Loss", _png(fig)))
    plt.close(fig)
    for key, caption, color in (("lr", "Learning rate", "#2ca02c"), ("grad_norm", "Gradient norm (before clipping)", "#9467bd"),
                                ("tokens_per_s", "Throughput (tokens/s)", "#ff7f0e")):
        x, y = series(key)
        if not x:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 2.6))
        ax.plot(x, y, color=color, lw=1.6)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        out.append((caption, _png(fig)))
        plt.close(fig)
    out += _preference_plots(series, plt)
    out += _grpo_plots(series, plt, rows)
    return out


def _grpo_plots(series, plt, rows: list[dict]) -> list[tuple[str, str]]:
    """A GRPO run's rewards (the weighted sum with its spread, each reward's mean, eval as dots), completion
    lengths, KL, clipped fraction, and rollout against training throughput."""
    if not series("reward")[0]:
        return []
    out = []

    def figure(caption, lines, ylabel=""):
        fig, ax = plt.subplots(figsize=(6.4, 2.6))
        for key, label, style in lines:
            x, y = series(key)
            if x:
                ax.plot(x, y, style, lw=1.4, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        out.append((caption, _png(fig)))
        plt.close(fig)

    names = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    x, y = series("reward")
    spread = dict(zip(*series("reward_std")))
    ax.plot(x, y, lw=1.8, color="#1f77b4", label="reward (weighted sum)")
    ax.fill_between(x, [v - spread.get(s, 0.0) for s, v in zip(x, y)], [v + spread.get(s, 0.0) for s, v in zip(x, y)],
                    color="#1f77b4", alpha=0.15, label="± spread")
    for name in names:
        ax.plot(*series(f"rewards/{name}/mean"), lw=1.1, label=name)
    ex, ey = series("eval_reward")
    if ex:
        ax.plot(ex, ey, "o-", lw=1.2, color="#d62728", label="eval reward")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out.append(("Rewards of the rollouts (mean over the step's completions)", _png(fig)))
    plt.close(fig)
    figure("Completion length (tokens)", [("completions/mean_length", "mean", "-"),
                                         ("completions/max_length", "max", "--")], "tokens")
    figure("Completions cut at max_completion_len (fraction)", [("completions/clipped_ratio", "clipped", "-")])
    if series("kl")[0]:
        figure("KL to the reference (adapter off)", [("kl", "kl", "-")], "nats/token")
    figure("Ratio clipped (fraction of tokens)", [("clip_ratio/region_mean", "region", "-"),
                                                 ("clip_ratio/low_mean", "low", "--"),
                                                 ("clip_ratio/high_mean", "high", ":")])
    figure("Rollout against training throughput (tokens/s)", [("rollout_tokens_per_s", "rollout (generated)", "-"),
                                                              ("tokens_per_s", "training", "-")], "tokens/s")
    return out


def _preference_plots(series, plt) -> list[tuple[str, str]]:
    """A preference run's rewards of chosen and rejected, margin and accuracy (train, and eval as dots)."""
    out = []
    for keys, caption in ((("rewards/chosen", "rewards/rejected"), "Rewards of chosen and rejected"),
                          (("rewards/margins",), "Reward margin (chosen − rejected)"),
                          (("rewards/accuracies",), "Preference accuracy (chosen rewarded above rejected)")):
        if not series(keys[0])[0]:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 2.6))
        for key in keys:
            x, y = series(key)
            ax.plot(x, y, lw=1.6, label=f"train {key.split('/')[1]}")
            ex, ey = series("eval_" + key)
            if ex:
                ax.plot(ex, ey, "o-", lw=1.2, label=f"eval {key.split('/')[1]}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        out.append((caption, _png(fig)))
        plt.close(fig)
    return out


_CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1100px;margin:0 auto;padding:28px}
h1{font-size:24px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 10px}
.sub{color:#5b6475;margin-bottom:18px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:12px}
.card{background:#fff;border:1px solid #e3e6eb;border-radius:10px;padding:12px 14px}
.card b{display:block;font-size:20px} .card span{color:#5b6475;font-size:13px}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:14px}
figure{margin:0;background:#fff;border:1px solid #e3e6eb;border-radius:10px;padding:10px}
figure img{width:100%} figcaption{color:#5b6475;font-size:13px}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #e3e6eb;border-radius:10px;overflow:hidden}
td,th{padding:10px 12px;border-bottom:1px solid #eef0f3;vertical-align:top;text-align:left}
th{background:#f0f2f5;font-size:13px;color:#3a4150} td{white-space:pre-wrap;font-size:14px}
pre{background:#fff;border:1px solid #e3e6eb;border-radius:10px;padding:14px;overflow:auto;font-size:13px}
.note{color:#5b6475;font-size:13px}
.bad{color:#b42318;font-weight:600}
"""


def _cards(rows: list[dict], facts: ReportFacts) -> list[tuple[str, str]]:
    train = [r for r in rows if "loss" in r and "eval_loss" not in r]
    evals = [r for r in rows if "eval_loss" in r]
    final = next((r for r in reversed(rows) if "train_runtime" in r), {})
    tps = [r["tokens_per_s"] for r in train if isinstance(r.get("tokens_per_s"), (int, float))]
    cards = [("status", facts.status), ("optimizer steps", f"{max((r['step'] for r in rows), default=0)}")]
    if facts.adapter:
        cards.append(("saved adapter", facts.adapter))
    if train:
        cards.append(("train loss first → last", f"{train[0]['loss']:.3f} → {train[-1]['loss']:.3f}"))
    if evals:
        best = min(evals, key=lambda r: r["eval_loss"])
        cards.append(("eval loss start → best", f"{evals[0]['eval_loss']:.3f} → {best['eval_loss']:.3f} (step {best['step']})"))
    accuracy = [r for r in evals if isinstance(r.get("eval_rewards/accuracies"), (int, float))]
    if accuracy:
        cards.append(("eval preference accuracy start → last",
                      f"{100 * accuracy[0]['eval_rewards/accuracies']:.0f} % → "
                      f"{100 * accuracy[-1]['eval_rewards/accuracies']:.0f} %"))
    rewards = [r for r in train if isinstance(r.get("reward"), (int, float))]
    if rewards:
        cards.append(("rollout reward first → last", f"{rewards[0]['reward']:.3f} → {rewards[-1]['reward']:.3f}"))
    eval_rewards = [r for r in rows if isinstance(r.get("eval_reward"), (int, float))]
    if eval_rewards:
        cards.append(("eval reward start → last", f"{eval_rewards[0]['eval_reward']:.3f} → "
                                                  f"{eval_rewards[-1]['eval_reward']:.3f}"))
    if tps:
        cards.append(("throughput (median)", f"{statistics.median(tps):,.0f} tokens/s"))
    if "train_runtime" in final:
        cards.append(("training time", f"{final['train_runtime']:.0f} s"))
    peak = [r["peak_gpu_mem_gib"] for r in rows if "peak_gpu_mem_gib" in r]
    if peak:
        cards.append(("peak GPU memory", f"{max(peak):.2f} GiB"))
    return cards


def _num(x) -> str:
    return "–" if x is None else f"{x:.3g}"


def render(run_dir: Path, facts: ReportFacts) -> str:
    """The report page for ``run_dir`` as HTML text."""
    rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    e = html.escape
    status_cls = "" if facts.status == "finished" else " class=bad"
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>{e(facts.title)}</title>",
             f"<style>{_CSS}</style></head><body><main>",
             f"<h1>{e(facts.title)}</h1><div class=sub>{e(facts.model)} · {e(facts.device)} · "
             f"<span{status_cls}>{e(facts.status)}</span></div>",
             "<div class=cards>" + "".join(f"<div class=card><span>{e(k)}</span><b>{e(v)}</b></div>"
                                          for k, v in _cards(rows, facts)) + "</div>",
             f"<p class=note>{e(facts.footprint)}<br>{e(facts.data)}</p>"]
    if rows:
        parts.append("<h2>Training curves</h2><div class=plots>")
        parts += [f"<figure><img alt='{e(c)}' src='data:image/png;base64,{b64}'><figcaption>{e(c)}</figcaption></figure>"
                  for c, b64 in _plots(rows)]
        parts.append("</div>")
    if facts.samples:
        parts.append(f"<h2>Sample answers</h2><p class=note>{e(facts.samples_note)}</p>")
        parts.append("<table><tr><th style='width:26%'>input</th><th>before training</th><th>after training</th></tr>")
        parts += [f"<tr><td>{e(p)}</td><td>{e(b)}</td><td>{e(a)}</td></tr>" for p, b, a in facts.samples]
        parts.append("</table>")
    if facts.confusion is not None:
        labels, counts = facts.confusion
        right, total = sum(counts[i][i] for i in range(len(labels))), sum(map(sum, counts))
        parts.append(f"<h2>Confusion matrix (eval data)</h2><p class=note>rows: true label, columns: predicted; "
                     f"accuracy {100.0 * right / max(total, 1):.1f}% of {total}</p><table><tr><th>true \\ predicted</th>"
                     + "".join(f"<th>{e(n)}</th>" for n in labels) + "</tr>")
        parts += ["<tr><th>" + e(labels[g]) + "</th>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
                  for g, row in enumerate(counts)]
        parts.append("</table>")
    if facts.sensitivity is not None:
        line, layers = facts.sensitivity
        parts.append(f"<h2>Adaptive quantization</h2><p class=note>{e(line)}. Per linear layer: the relative "
                     "output error ‖X(W − Ŵ)ᵀ‖/‖XWᵀ‖ on the calibration rows' activations, and the loss increase "
                     "it alone would cause (second order, empirical Fisher of the outputs), largest NF4 loss "
                     "increase first.</p><table><tr><th>layer</th><th>weights</th><th>NF4 error</th>"
                     "<th>int8 error</th><th>NF4 loss +</th><th>int8 loss +</th><th>kept in</th></tr>")
        parts += [f"<tr><td>{e(s.name)}</td><td>{s.params:,}</td><td>{s.err_nf4:.4f}</td><td>{s.err_int8:.4f}</td>"
                  f"<td>{_num(s.loss_nf4)}</td><td>{_num(s.loss_int8)}</td><td>{'int8' if s.int8 else 'NF4'}</td></tr>"
                  for s in sorted(layers, key=lambda s: -(s.loss_nf4 if s.loss_nf4 is not None else s.err_nf4))]
        parts.append("</table>")
    parts.append(f"<h2>Configuration</h2><pre>{e(facts.config_yaml)}</pre>")
    parts.append("</main></body></html>")
    return "".join(parts)
