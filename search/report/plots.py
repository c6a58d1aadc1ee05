"""The report's plots as inline SVG: the two similarity histograms of a score column, and the replication
rate across checkpoints. Every string from the data is escaped (and cut *before* escaping, so an entity is
never split); hovering a bin or a checkpoint shows its values through SVG ``<title>`` elements."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from copyscan.search.report import stats

COLOURS = {"gen_train": "#c0392b", "train_train": "#2c7fb8"}
LABELS = {"gen_train": "gen→train top-1", "train_train": "train→train"}
CHECKPOINT_LABEL_CHARS = 18  # a longer checkpoint name is cut to this many characters, "…" included


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def shorten(text: str, chars: int) -> str:
    """``text`` cut to at most ``chars`` characters, the last one "…" when it was cut. Cut the raw text,
    then escape: cutting escaped text can split an entity (``&amp;`` → ``&am``)."""
    return text if len(text) <= chars else text[: chars - 1] + "…"


def nice_ticks(vmax: float, count: int = 5) -> list[float]:
    """Ticks 0, step, 2·step, … up to the first ≥ ``vmax``; step is 1, 2, 2.5 or 5 × 10^e, chosen so
    that about ``count`` ticks cover [0, vmax]. [0, 1] when vmax ≤ 0."""
    if not vmax > 0:
        return [0.0, 1.0]
    raw = vmax / count
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    n = math.ceil(vmax / step - 1e-9)
    return [round(i * step, 12) for i in range(n + 1)]


def histogram_svg(
    gen: np.ndarray,
    train: np.ndarray,
    title: str,
    x_label: str = "similarity",
    width: int = 640,
    height: int = 270,
) -> str:
    """Density of gen→train and train→train (``stats.histogram``: 0.005 bins on [0, 1]) as two step lines.

    Axis titles, tick labels on both axes, each non-empty bin's counts and densities on hover (a
    transparent ``rect.bin`` with a ``<title>``), and per distribution its n and how many values fall
    outside [0, 1] (counted, not plotted: whitened scores can be negative).
    """
    hists = {"gen_train": stats.histogram(gen), "train_train": stats.histogram(train)}
    left, right, top, bottom = 56, 12, 46, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    y_ticks = nice_ticks(max(float(h["density"].max(initial=0)) for h in hists.values()))
    ymax = y_ticks[-1]
    edges = hists["gen_train"]["edges"]

    def px(v: float) -> float:
        return left + plot_w * v

    def py(v: float) -> float:
        return top + plot_h * (1 - v / ymax)

    def path(density: np.ndarray) -> str:
        return " ".join(
            f"{px(edges[i]):.1f},{py(d):.1f} {px(edges[i + 1]):.1f},{py(d):.1f}"
            for i, d in enumerate(density)
        )

    parts = [
        f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{_e(title)}"><title>{_e(title)}</title>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#bbb"/>',
    ]
    for t in y_ticks:
        parts.append(
            f'<line x1="{left - 4}" y1="{py(t):.1f}" x2="{left + plot_w}" y2="{py(t):.1f}" stroke="#e4e4e4"/>'
            f'<text x="{left - 6}" y="{py(t) + 3.5:.1f}" text-anchor="end" font-size="10">{t:g}</text>'
        )
    for t in np.linspace(0, 1, 11):
        parts.append(
            f'<line x1="{px(t):.1f}" y1="{top + plot_h}" x2="{px(t):.1f}" y2="{top + plot_h + 4}" '
            f'stroke="#444"/><text x="{px(t):.1f}" y="{top + plot_h + 15}" text-anchor="middle" '
            f'font-size="10">{t:.1f}</text>'
        )
    for name in ("train_train", "gen_train"):
        parts.append(
            f'<polyline fill="none" stroke="{COLOURS[name]}" stroke-width="1.2" '
            f'points="{path(hists[name]["density"])}"/>'
        )
    parts.append(_bins(hists, x_label, px, top, plot_h))
    parts.append(
        f'<text class="axis-title" x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle" '
        f'font-size="11">{_e(x_label)} (bins of {stats.BIN_WIDTH:g})</text>'
        f'<text class="axis-title" transform="rotate(-90)" x="{-(top + plot_h / 2):.1f}" y="14" '
        'text-anchor="middle" font-size="11">density</text>'
    )
    for row, name in enumerate(("gen_train", "train_train")):
        h = hists[name]
        n = int(h["counts"].sum()) + h["below"] + h["above"]
        y = 14 + 15 * row
        parts.append(
            f'<line x1="{left}" y1="{y - 4}" x2="{left + 16}" y2="{y - 4}" stroke="{COLOURS[name]}" '
            f'stroke-width="2"/><text class="legend" x="{left + 22}" y="{y}" font-size="11" '
            f'fill="{COLOURS[name]}">{LABELS[name]} (n = {n}); outside [0, 1], not plotted: '
            f"{h['below']} below 0, {h['above']} above 1</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _bins(hists: dict[str, dict[str, Any]], x_label: str, px: Any, top: float, plot_h: float) -> str:
    """Hover targets: one transparent full-height rect per bin that holds a value of either distribution,
    its ``<title>`` the bin's range, counts and densities (empty bins get none, to keep the page small)."""
    edges = hists["gen_train"]["edges"]
    last = len(edges) - 2
    out = []
    for i in np.flatnonzero(hists["gen_train"]["counts"] + hists["train_train"]["counts"]):
        closing = "]" if i == last else ")"  # numpy's last bin holds 1.0
        values = "; ".join(
            f"{LABELS[name]}: {int(hists[name]['counts'][i])} (density {hists[name]['density'][i]:.3g})"
            for name in ("gen_train", "train_train")
        )
        out.append(
            f'<rect class="bin" x="{px(edges[i]):.2f}" y="{top}" width="{px(edges[i + 1]) - px(edges[i]):.2f}" '
            f'height="{plot_h}" fill="#000" fill-opacity="0"><title>{_e(x_label)} in [{edges[i]:.3f}, '
            f"{edges[i + 1]:.3f}{closing}: {values}</title></rect>"
        )
    return "".join(out)


def trend_svg(history: Sequence[dict[str, Any]], width: int = 640, height: int = 200) -> str:
    """Replication rate per checkpoint with its 95 % Wilson interval (oldest left); a checkpoint's name is
    cut to ``CHECKPOINT_LABEL_CHARS`` under its point, and shown in full with its rate on hover."""
    left, bottom, top = 50, 40, 15
    plot_w, plot_h = width - left - 20, height - bottom - top
    ymax = max(max((r["rate_high"] for r in history), default=0.0), 1e-6) * 1.1
    n = len(history)

    def x(i: int) -> float:
        return left + (plot_w * (i + 0.5) / n)

    def y(v: float) -> float:
        return top + plot_h * (1 - v / ymax)

    parts = [
        f'<svg class="trend" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="replication rate per checkpoint"><title>replication rate per checkpoint</title>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#bbb"/>',
    ]
    for i, r in enumerate(history):
        name = str(r["checkpoint"])
        hover = (
            f"<title>{_e(name)}: {r['rate']:.2%} [{r['rate_low']:.2%}, {r['rate_high']:.2%}], "
            f"{r['flagged']} of {r['queries']}</title>"
        )
        parts.append(
            f'<g class="checkpoint">{hover}'
            f'<line x1="{x(i):.1f}" y1="{y(r["rate_low"]):.1f}" x2="{x(i):.1f}" y2="{y(r["rate_high"]):.1f}" '
            'stroke="#888" stroke-width="3"/>'
            f'<circle cx="{x(i):.1f}" cy="{y(r["rate"]):.1f}" r="3.5" fill="#c0392b"/>'
            f'<text x="{x(i):.1f}" y="{top + plot_h + 14}" font-size="10" text-anchor="middle">'
            f"{_e(shorten(name, CHECKPOINT_LABEL_CHARS))}</text></g>"
        )
    points = " ".join(f"{x(i):.1f},{y(r['rate']):.1f}" for i, r in enumerate(history))
    parts.append(f'<polyline fill="none" stroke="#c0392b" points="{points}"/>')
    parts.append(f'<text x="4" y="{top + 10}" font-size="10">{ymax:.2%}</text>')
    parts.append(f'<text x="4" y="{top + plot_h}" font-size="10">0%</text></svg>')
    return "".join(parts)
