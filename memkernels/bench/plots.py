"""The PNG figures of the three suites (matplotlib's Agg canvas: no display, no global pyplot state)."""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

# path -> (color, marker); probe and exact often coincide: the probe's crosses stay visible over exact's dots
PATH_STYLE = {"uncorrected": ("tab:red", "o"), "exact": ("tab:blue", "o"), "trajectory": ("tab:green", "s"),
              "probe": ("tab:orange", "x"), "engine": ("tab:purple", "o")}
# experiment -> (line style, short legend name)
EXPERIMENT_STYLE = {"memoryless approximation": ("-", "approx."), "memory cancellation": ("--", "cancel"),
                    "memoryless approximation (engine)": ("-", "engine")}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def speed(result: dict[str, Any], out: Path) -> list[Path]:
    """Per shape set, achieved GB/s of every row against the bandwidth kernel of the same run."""
    sets = result["shape_sets"]
    rows = result["rows"]
    height = 1.2 + 0.32 * max((sum(r["shape_set"] == s["name"] for r in rows) for s in sets), default=1)
    fig = _figure(6.5 * len(sets), height)
    for i, shape_set in enumerate(sets, 1):
        ax = fig.add_subplot(1, len(sets), i)
        mine = [r for r in rows if r["shape_set"] == shape_set["name"]][::-1]
        labels = [f"{r['name']} [{r['backend']}]" for r in mine]
        colors = ["tab:blue" if r["kind"] == "memkernels" else "tab:gray" for r in mine]
        ax.barh(range(len(mine)), [r["gb_s"] for r in mine], color=colors)
        ax.set_yticks(range(len(mine)), labels, fontsize=7)
        bw = shape_set["bandwidth"]
        ax.axvline(bw["gb_s"], color="black", linestyle="--", label=f"{bw['kernel']} {bw['gb_s']:.1f} GB/s")
        ax.set_xscale("log")
        ax.set_xlabel("GB/s (byte model, log scale)")
        ax.set_title(f"{shape_set['name']}: {shape_set['params']:,} params", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    return [_save(fig, out / "speed.png")]


def theory(result: dict[str, Any], out: Path) -> list[Path]:
    """One log-log figure per problem: error against h, a panel per optimizer, every path and experiment."""
    paths = []
    for problem in dict.fromkeys(r["problem"] for r in result["results"]):
        mine = [r for r in result["results"] if r["problem"] == problem]
        optimizers = list(dict.fromkeys(r["optimizer"] for r in mine))
        cols = min(4, len(optimizers))
        nrows = math.ceil(len(optimizers) / cols)
        fig = _figure(3.6 * cols, 3.0 * nrows + 0.4)
        for i, name in enumerate(optimizers, 1):
            ax = fig.add_subplot(nrows, cols, i)
            for r in (r for r in mine if r["optimizer"] == name):
                for path, errors in r["errors"].items():
                    style, short = EXPERIMENT_STYLE.get(r["experiment"], (":", r["experiment"]))
                    color, marker = PATH_STYLE.get(path, ("black", "."))
                    if all(e is not None and e > 0 for e in errors):
                        ax.loglog(r["hs"], errors, marker=marker, markersize=4, color=color, linestyle=style,
                                  label=f"{path} ({short})", zorder=3 if path == "probe" else 2)
            hs = mine[0]["hs"]
            for order, style in ((1, ":"), (2, "-.")):
                ax.loglog(hs, [1e-3 * (h / hs[-1]) ** order for h in hs], style, color="gray", linewidth=0.8)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("h", fontsize=8)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
            if i == 1:
                ax.set_ylabel("max distance to target", fontsize=8)
                ax.legend(fontsize=6)
        fig.suptitle(f"order of accuracy on {problem} (gray: slopes 1 and 2)", fontsize=10)
        paths.append(_save(fig, out / f"theory_{problem}.png"))
    return paths


def implicit(result: dict[str, Any], out: Path) -> list[Path]:
    runs, summary = result["runs"], result["summary"]
    names = [s["name"] for s in summary]
    colors = {name: f"C{i}" for i, name in enumerate(names)}

    fig = _figure(7, 4.2)
    ax = fig.add_subplot()
    for name in names:
        series = [r["penalty"] for r in runs if r["name"] == name and r["penalty"]["steps"]]
        if not series:
            continue
        length = min(len(s["steps"]) for s in series)
        means = [statistics.fmean(v) if (v := [s["values"][k] for s in series if s["values"][k] is not None])
                 else math.nan for k in range(length)]
        ax.plot(series[0]["steps"][:length], means, color=colors[name], label=name)
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel("step")
    ax.set_ylabel("penalty R (mean over seeds)")
    ax.set_title("memory's implicit penalty R over training (R < 0: anti-regularization)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    files = [_save(fig, out / "implicit_penalty.png")]

    fig = _figure(6, 4)
    ax = fig.add_subplot()
    adam = [s for s in summary if s["family"] == "AdamW" and s["test_accuracy"] is not None]
    if adam:
        ax.errorbar([1 - s["beta2"] for s in adam], [s["test_accuracy"] for s in adam],
                    yerr=[s["test_accuracy_sd"] for s in adam], marker="o", capsize=3, label="AdamW", color="C0")
        ax.set_xscale("log")
        ax.invert_xaxis()
    for i, s in enumerate(s for s in summary if s["family"] != "AdamW" and s["test_accuracy"] is not None):
        ax.axhline(s["test_accuracy"], color=f"C{i + 1}", linestyle="--", label=s["name"])
    ax.set_xlabel("1 - beta2 (beta2 grows to the right)")
    ax.set_ylabel("test accuracy at the loss threshold")
    ax.set_title(f"digits, beta1 = {result['config']['beta1']}, threshold {result['config']['loss_threshold']}",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    files.append(_save(fig, out / "implicit_accuracy.png"))

    fig = _figure(6.5, 3.8)
    ax = fig.add_subplot()
    shown = [s for s in summary if s["sharpness"] is not None]
    ax.bar(range(len(shown)), [s["sharpness"] for s in shown], yerr=[s["sharpness_sd"] for s in shown],
           color=[colors[s["name"]] for s in shown], capsize=3)
    ax.set_xticks(range(len(shown)), [s["name"] for s in shown], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("top Hessian eigenvalue")
    ax.set_title("sharpness at the loss threshold (mean over seeds)", fontsize=9)
    files.append(_save(fig, out / "implicit_sharpness.png"))
    return files


DRAW = {"speed": speed, "theory": theory, "implicit": implicit}
