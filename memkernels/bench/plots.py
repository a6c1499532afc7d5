"""The PNG figures of the suites (matplotlib's Agg canvas: no display, no global pyplot state)."""
from __future__ import annotations

import math
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


FAMILY_COLOR = {"AdamW": "tab:blue", "AdamW eps in sqrt": "tab:cyan", "AdamW corrected": "tab:red",
                "memoryless": "tab:gray", "Lion": "tab:green", "heavy ball": "tab:brown"}


def _beta2_x(beta2: float) -> float:
    return math.log(1.0 / (1.0 - beta2))


def implicit_trend(result: dict[str, Any], out: Path) -> Path:
    """Test loss and accuracy at the threshold against log(1/(1 - beta2)) for the AdamW sweep: a line per lr
    (mean over seeds), every seed's run as a dot, the fitted per-seed trend dashed; other arms as
    horizontal lines (base lr)."""
    cfg, analysis = result["config"], result["analysis"]
    settings = list(analysis)
    metrics = (("test_loss", "test loss"), ("test_accuracy", "test accuracy"))
    fig = _figure(5.2 * len(settings), 7.2)
    lrs = list(cfg["lrs"])
    for col, setting in enumerate(settings):
        summary = analysis[setting]["summary"]
        sweep = [s for s in summary if s["family"] == "AdamW" and s["beta2"] in cfg["beta2s"]]
        runs = [r for r in result["runs"] if r["setting"] == setting and r["status"] == "reached"]
        for row, (metric, label) in enumerate(metrics):
            ax = fig.add_subplot(2, len(settings), row * len(settings) + col + 1)
            for k, lr in enumerate(lrs):
                mine = sorted((s for s in sweep if s["lr"] == lr and s[metric] is not None), key=lambda s: s["beta2"])
                if not mine:
                    continue
                color = f"C{k}"
                xs = [_beta2_x(s["beta2"]) for s in mine]
                ax.errorbar(xs, [s[metric] for s in mine], yerr=[s[f"{metric}_sd"] for s in mine], marker="o",
                            color=color, capsize=3, label=f"AdamW lr {lr:g}")
                names = {s["name"]: s["beta2"] for s in mine}
                dots = [(_beta2_x(names[r["name"]]), r[metric]) for r in runs if r["name"] in names]
                if dots:
                    ax.scatter(*zip(*dots), s=8, color=color, alpha=0.35)
                fit = next((f for f in analysis[setting]["trends"]["beta2"] if f["lr"] == lr and f["metric"] == metric),
                           None)
                if fit and fit["mean"] is not None and fit["intercept"] is not None:
                    t = "n/a" if fit["t"] is None else f"{fit['t']:.1f}"
                    ax.plot(xs, [fit["intercept"] + fit["mean"] * x for x in xs], "--", color=color, linewidth=1,
                            label=f"slope {fit['mean']:.3g}, t {t}")
            ax.axvline(_beta2_x(cfg["beta1"]), color="black", linestyle=":", linewidth=0.8)
            others = [s for s in summary
                      if s["family"] in ("memoryless", "Lion", "heavy ball") and s[metric] is not None]
            for s in others:
                ax.axhline(s[metric], color=FAMILY_COLOR.get(s["family"], "black"), linestyle="-.", linewidth=0.8,
                           alpha=0.7, label=s["name"])
            ticks = sorted(cfg["beta2s"])
            ax.set_xticks([_beta2_x(b) for b in ticks], [f"{b:g}" for b in ticks], fontsize=7)
            ax.set_xlabel("beta2 (axis: log(1/(1 - beta2)); dotted: beta2 = beta1)", fontsize=8)
            ax.set_ylabel(f"{label} at the threshold", fontsize=8)
            ax.set_title(f"{setting}", fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle(f"MNIST MLP, test metrics at training loss {cfg['loss_threshold']} (mean ± sd; dots: seeds)",
                 fontsize=10)
    return _save(fig, out / "implicit_trend.png")


def implicit_paired(result: dict[str, Any], out: Path) -> Path:
    """Paired differences arm - baseline (mean and 95% t interval over seeds) of test loss and accuracy."""
    analysis = result["analysis"]
    settings = list(analysis)
    metrics = (("test_loss", "Δ test loss"), ("test_accuracy", "Δ test accuracy"))
    listed = {setting: [(f"{s['name']} − {s['baseline']}", s["family"], s["paired"])
                        for s in analysis[setting]["summary"] if s["paired"] is not None]
              + [(f"{c['arm']} − {c['against']}", "Lion" if c["arm"].startswith("Lion") else "memoryless", c["paired"])
                 for c in analysis[setting]["contrasts"]] for setting in settings}
    heights = [len(items) + 2 for items in listed.values()]
    fig = _figure(7.0 * len(metrics), 1.0 + 0.26 * sum(heights))
    grid = fig.add_gridspec(len(settings), len(metrics), height_ratios=heights)
    for r, setting in enumerate(settings):
        items = listed[setting][::-1]
        for c, (metric, label) in enumerate(metrics):
            ax = fig.add_subplot(grid[r, c])
            for y, (name, family, paired) in enumerate(items):
                stats = paired[metric]
                if stats["mean"] is None:
                    continue
                half = stats["t_crit"] * stats["se"] if stats["se"] is not None and stats["t_crit"] else 0.0
                significant = (stats["t"] is not None and stats["t_crit"] is not None
                               and abs(stats["t"]) >= stats["t_crit"])
                color = FAMILY_COLOR.get(family, "black")
                ax.errorbar([stats["mean"]], [y], xerr=[half], fmt="o", color=color, capsize=2, markersize=4,
                            markerfacecolor=color if significant else "white")
            ax.axvline(0.0, color="black", linewidth=0.8)
            ax.set_ylim(-0.7, len(items) - 0.3)
            ax.set_yticks(range(len(items)), [i[0] for i in items], fontsize=6)
            ax.set_xlabel(f"{label} (mean, 95% t interval over seeds; filled: |t| past critical)", fontsize=7)
            ax.set_title(setting, fontsize=9)
            ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("paired differences against each arm's baseline, seed by seed", fontsize=10)
    return _save(fig, out / "implicit_paired.png")


def implicit_regime(result: dict[str, Any], out: Path) -> Path:
    """Per arm, the median ||hM|| / ||F|| over training (log scale) against the regime bound, with the fraction
    of elements limited: where the leading-order expansion (and R) can be read quantitatively."""
    cfg, analysis = result["config"], result["analysis"]
    settings = list(analysis)
    rows = max((len(a["summary"]) for a in analysis.values()), default=1)
    fig = _figure(5.5 * len(settings), 1.4 + 0.28 * rows)
    for c, setting in enumerate(settings):
        ax = fig.add_subplot(1, len(settings), c + 1)
        summary = [s for s in analysis[setting]["summary"]][::-1]
        for y, s in enumerate(summary):
            ratio = s["regime"]["ratio"]
            if ratio is None or ratio <= 0:
                ax.text(0.02, y, "M = 0 (sign)" if ratio == 0 else "not measured", fontsize=6, va="center",
                        transform=ax.get_yaxis_transform())
                continue
            ax.barh(y, ratio, color=FAMILY_COLOR.get(s["family"], "black"), alpha=0.8)
            limited = s["regime"]["limited"]
            if limited:
                ax.text(ratio, y, f" {limited:.0%} limited", fontsize=6, va="center")
        ax.axvline(cfg["regime_ratio"], color="black", linestyle="--", linewidth=0.8,
                   label=f"regime bound {cfg['regime_ratio']}")
        ax.set_xscale("log")
        ax.set_yticks(range(len(summary)), [s["name"] for s in summary], fontsize=6)
        ax.set_xlabel("median ||hM|| / ||F|| over training (log)", fontsize=8)
        ax.set_title(setting, fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("where the leading-order correction can hold (||hM|| << ||F||, nothing limited)", fontsize=10)
    return _save(fig, out / "implicit_regime.png")


def implicit(result: dict[str, Any], out: Path) -> list[Path]:
    return [implicit_trend(result, out), implicit_paired(result, out), implicit_regime(result, out)]


def _panels(result: dict[str, Any], width: float, height: float) -> tuple[Figure, list[tuple[str, str, Any]]]:
    """A figure with a panel per task (rows) and correction setting (columns): (task, setting, axes) each."""
    summary = result["summary"]
    settings = list(result["settings"])
    fig = _figure(width * len(settings), height * max(1, len(summary)))
    return fig, [(task, setting, fig.add_subplot(len(summary), len(settings), i * len(settings) + j + 1))
                 for i, task in enumerate(summary) for j, setting in enumerate(settings)]


def convergence_relative(result: dict[str, Any], out: Path) -> Path:
    """Each row's held-out loss relative to the fp32-states row (mean over seeds, %), the threshold marked; a row
    that did not run is named with a note instead of a bar."""
    names = [r["name"] for r in result["rows"] if r["name"] != result["baseline"]][::-1]
    threshold = result["threshold_pct"]
    fig, panels = _panels(result, 6.0, 0.6 + 0.32 * len(names))
    for task, setting, ax in panels:
        summary = result["summary"][task][setting]
        for y, name in enumerate(names):
            pct = summary["rows"].get(name, {}).get("held_out_vs_baseline_pct")
            if pct is None:
                why = summary["unavailable"].get(name, "not run")
                note = "no correction (a peer)" if why.startswith("a peer") else why.split(":")[0]
                ax.text(0.5, y, note, fontsize=6, ha="center", va="center", transform=ax.get_yaxis_transform(),
                        color="gray")
                continue
            ax.barh(y, pct, color="tab:blue" if abs(pct) <= threshold else "tab:red")
            ax.text(pct, y, f" {pct:+.2f}% ", fontsize=6, va="center", ha="left" if pct >= 0 else "right")
        for x in (-threshold, threshold):
            ax.axvline(x, color="black", linestyle="--", linewidth=0.8)
        ax.axvline(0.0, color="black", linewidth=0.6)
        ax.set_ylim(-0.7, len(names) - 0.3)
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.set_xlabel(f"held-out loss vs fp32 states, % (dashed: ±{threshold:g}%)", fontsize=7)
        ax.set_title(f"{task}, {setting}", fontsize=8)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("final held-out loss relative to fp32 states (mean over seeds)", fontsize=10)
    return _save(fig, out / "convergence_relative.png")


def convergence_curves(result: dict[str, Any], out: Path) -> Path:
    """Held-out loss along training, the mean over seeds, a line per row that ran; the axis spans the second
    half of training, where rows part (the first loss is several times the last)."""
    fig, panels = _panels(result, 5.5, 3.6)
    styles = {r["name"]: (f"C{i}", "--" if r["peer"] else "-") for i, r in enumerate(result["rows"])}
    for task, setting, ax in panels:
        late, last = [], 0
        for name, s in result["summary"][task][setting]["rows"].items():
            points = [(x, y) for x, y in zip(s["curve"]["steps"], s["curve"]["held_out_loss"]) if y is not None]
            if points:
                color, line = styles[name]
                ax.plot(*zip(*points), line, color=color, linewidth=1, marker=".", markersize=3, label=name)
                late += [y for x, y in points if x >= points[-1][0] / 2]
                last = max(last, points[-1][0])
        if late:
            ax.set_xlim(0.45 * last, 1.02 * last)
            low, high = min(late), max(late)
            ax.set_ylim(low - 0.05 * (high - low) - 1e-3 * low, high + 0.05 * (high - low) + 1e-3 * high)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("held-out loss (second half of training)", fontsize=7)
        ax.set_title(f"{task}, {setting}", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=5)
    fig.suptitle("held-out loss during training (mean over seeds)", fontsize=10)
    return _save(fig, out / "convergence_curves.png")


def convergence(result: dict[str, Any], out: Path) -> list[Path]:
    return [convergence_relative(result, out), convergence_curves(result, out)]




def memory(result: dict[str, Any], out: Path) -> list[Path]:
    """Per optimizer, its state, what it holds and its peak during a step, in bytes per parameter."""
    rows = result["rows"][::-1]
    fig = _figure(7.5, 1.2 + 0.3 * max(len(rows), 1))
    ax = fig.add_subplot(1, 1, 1)
    kinds = (("state_bytes_per_param", "state", "tab:blue"), ("held_bytes_per_param", "held", "tab:orange"),
             ("peak_bytes_per_param", "peak during a step", "tab:red"))
    for j, (key, label, color) in enumerate(kinds):
        ax.barh([i + (j - 1) * 0.27 for i in range(len(rows))], [r[key] for r in rows], height=0.27, color=color,
                label=label)
    ax.set_yticks(range(len(rows)), [f"{r['name']} ({r['implementation']})" for r in rows], fontsize=6)
    ax.set_xlabel("bytes per parameter (measured)", fontsize=8)
    ax.set_title(f"optimizer memory, {result['device']}", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(True, axis="x", alpha=0.3)
    return [_save(fig, out / "memory.png")]


DRAW = {"speed": speed, "memory": memory, "theory": theory, "implicit": implicit, "convergence": convergence}
