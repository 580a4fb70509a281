"""Small pieces of HTML the page shows: who answered and how fast, errors, the per-token view.

Everything that comes from a person or a model is escaped here, once.
"""

from __future__ import annotations

import html
import math
from typing import Optional

from model.types import Answer, Scores, Timings


def esc(text: str) -> str:
    return html.escape(str(text), quote=True)


def human_count(n: Optional[int]) -> str:
    """124439808 -> '124M'; None -> '?'."""
    if not n:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(n)


def info_html(model: str, t: Timings, extra: str = "") -> str:
    text = t.summary(model) + (f" · {extra}" if extra else "")
    return f'<div class="wwt-info">⚡ {esc(text)}</div>'


def error_html(message: str) -> str:
    return f'<div class="wwt-error-line" role="alert">⚠ {esc(message)}</div>'


def status_html(message: str, ready: bool) -> str:
    """A model's state: a green dot when it answers at once, a grey one when it loads on first use."""
    return f'<div class="wwt-info wwt-state {"ready" if ready else "idle"}">{esc(message)}</div>'


def warning_html(message: str) -> str:
    """Something the operator must fix (a Redis without a password), under the model's state."""
    return f'<div class="wwt-warning" role="alert">⚠ {esc(message)}</div>'


def prob_colour(prob: float) -> str:
    """Likely tokens green, unlikely red, on a log scale from 1e-6 to 1 (hue 0 to 130)."""
    p = min(max(prob, 1e-6), 1.0)
    x = 1.0 + math.log10(p) / 6.0  # 0 at 1e-6, 1 at 1
    return f"hsl({130 * x:.0f}, 75%, 82%)"


def token_view_html(scores: Scores) -> str:
    """The document as it was tokenized, each token on a background coloured by its probability."""
    spans = []
    for tok in scores.tokens:
        title = f"p = {tok.prob:.3g} · rank {tok.rank}" if tok.rank else "first token (nothing to predict it from)"
        text = esc(tok.text).replace("\n", "↵\n")
        spans.append(f'<span class="wwt-tok" style="background:{prob_colour(tok.prob)}" '
                     f'title="{esc(title)}">{text}</span>')
    legend = ('<div class="wwt-legend"><span>unlikely</span>'
              + "".join(f'<i style="background:{prob_colour(10 ** -e)}"></i>' for e in (6, 5, 4, 3, 2, 1, 0))
              + "<span>likely</span></div>")
    return f'<div class="wwt-tokens">{"".join(spans)}</div>{legend}'


def answer_spans(context: str, answer: Answer) -> list[tuple[str, Optional[str]]]:
    """The context cut into (text, label) pieces for gr.HighlightedText, the answer labelled."""
    if answer.generated or answer.start is None or answer.end is None:
        return [(context, None)]
    start, end = max(0, answer.start), min(len(context), answer.end)
    pieces = [(context[:start], None), (context[start:end], "answer"), (context[end:], None)]
    return [(text, label) for text, label in pieces if text]


def answer_html(context: str, answer: Answer) -> str:
    """The passage as flowing text (its line ends kept), the answer span marked in place."""
    pieces = "".join(f'<mark class="wwt-answer">{esc(text)}</mark>' if label else esc(text)
                     for text, label in answer_spans(context, answer))
    return (f'<div class="wwt-passage-label">Answer in the passage</div>'
            f'<div class="wwt-passage">{pieces}</div>')


def human_bytes(n) -> str:
    """1234567 -> '1.2 MB'."""
    n = float(n or 0)
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def compare_html(rows: list[dict]) -> str:
    """One card per model: its suggestions, latency, tokens/s and size, side by side."""
    cards = []
    for row in rows:
        if row.get("error"):
            body = error_html(row["error"])
            facts = ""
        else:
            items = "".join(f"<li>{esc(row['prompt_tail'])}<b>{esc(s)}</b></li>" for s in row["suggestions"])
            body = f"<ol>{items}</ol>"
            facts = (f'<div class="wwt-facts"><span>{row["ms"]:.0f} ms</span>'
                     f'<span>{row["tokens_per_s"]:.1f} tokens/s</span>'
                     f'<span>{human_count(row.get("parameters"))} parameters</span>'
                     + (f'<span>{esc(row["precision"])}</span>' if row.get("precision") else "")
                     + (f'<span>{human_bytes(row["weight_bytes"])} of weights</span>' if row.get("weight_bytes")
                        else "")
                     + (f'<span title="perplexity of the prompt">log p {row["mean_logprob"]:.2f}/token</span>'
                        if row.get("mean_logprob") is not None else "") + '</div>')
        cards.append(f'<div class="wwt-card"><h3>{esc(row["model"])}</h3>{facts}{body}</div>')
    return f'<div class="wwt-cards">{"".join(cards)}</div>'


# One colour per model, the same in every panel of the chart.
PALETTE = ("#6366f1", "#0ea5e9", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#14b8a6", "#f97316")

# (key, title, how a value reads, what is better): the chart's panels, in order.
CHART_METRICS = (
    ("parameters", "Parameters", lambda v: human_count(int(v)), "size"),
    ("weight_bytes", "Weight memory", human_bytes, "size"),
    ("ms", "Latency on this prompt", lambda v: f"{v:,.0f} ms", "lower is better"),
    ("tokens_per_s", "Tokens per second", lambda v: f"{v:,.1f}", "higher is better"),
    ("perplexity", "Perplexity of your text", lambda v: f"{v:,.1f}" if v < 1000 else human_count(int(v)),
     "lower: your text is likelier to it"),
)


def compare_chart_html(rows: list[dict]) -> str:
    """What model size buys, at a glance: one panel per measure, one bar per model (and precision).

    Bars are relative to the largest value in their panel; a model without a value (a
    failed request, a size the backend does not know) has no bar and a '?'.
    """
    rows = [r for r in rows if not r.get("error")]
    if not rows:
        return ""
    colour = {r["model"]: PALETTE[i % len(PALETTE)] for i, r in enumerate(rows)}
    panels = []
    for key, title, fmt, better in CHART_METRICS:
        values = [r.get(key) for r in rows]
        known = [v for v in values if isinstance(v, (int, float)) and v > 0 and math.isfinite(v)]
        if not known:
            continue
        top = max(known)
        bars = []
        for row, value in zip(rows, values):
            ok = isinstance(value, (int, float)) and value > 0 and math.isfinite(value)
            width = max(2.0, 100.0 * value / top) if ok else 0.0
            shown = fmt(value) if ok else "?"
            title_text = shown
            if key == "perplexity" and ok and row.get("mean_logprob") is not None:
                title_text = f"perplexity {shown} · mean log-probability {row['mean_logprob']:.2f} per token " \
                             f"over {row.get('scored_tokens', '?')} tokens"
            label = row["model"] + (f" ({row['precision']})" if row.get("precision") and "@" not in row["model"]
                                    else "")
            bars.append(f'<div class="wwt-bar" data-model="{esc(row["model"])}" title="{esc(title_text)}">'
                        f'<span class="wwt-bar-name">{esc(label)}</span>'
                        f'<span class="wwt-bar-value">{esc(shown)}</span>'
                        f'<span class="wwt-bar-track"><i style="width:{width:.1f}%;background:'
                        f'{colour[row["model"]]}"></i></span></div>')
        panels.append(f'<div class="wwt-chart-panel" data-metric="{key}"><h4>{esc(title)} '
                      f'<small>{esc(better)}</small></h4>{"".join(bars)}</div>')
    return f'<div class="wwt-chart" role="figure" aria-label="Model sizes compared">{"".join(panels)}</div>'
