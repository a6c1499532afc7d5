"""Log error against log h for an order-of-accuracy experiment (matplotlib, imported only when plotting)."""
from __future__ import annotations

import math
from pathlib import Path

from .engine import RuleOrder
from .order import OrderResult


def plot_order(result: OrderResult | RuleOrder, path: str | Path, *, title: str | None = None) -> Path:
    """Write a PNG of each approximation's error against h on log-log axes, with slope-1 and slope-2 guides.

    Uses matplotlib's Agg canvas directly, so it neither needs a display nor
    changes the process-wide pyplot backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    if isinstance(result, RuleOrder):
        title = title or f"{result.rule} on {result.problem}"
        result = result.result
    hs = result.hs
    fig = Figure(figsize=(5.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, errors in result.errors.items():
        slope = result.slopes(name)[-1] if len(hs) > 1 else math.nan
        ax.loglog(hs, errors, "o-", label=f"{name} (last slope {slope:.2f})")
    firsts = [e[0] for e in result.errors.values()]
    for order, anchor, style in ((1, max(firsts), ":"), (2, min(firsts), "--")):  # guides through the series' ends
        ax.loglog(hs, [anchor * (h / hs[0]) ** order for h in hs], style, color="gray", label=f"slope {order}")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(hs, [f"{h:g}" for h in hs])
    ax.set_xlabel("step size h")
    ax.set_ylabel("max distance to the memory path")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
