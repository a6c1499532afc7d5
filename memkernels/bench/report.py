"""Writing results: JSON per suite (no NaN: missing or non-finite values are null) and report.md.

report.md is rendered from every suite JSON present in the output folder, so
running the suites one at a time into the same folder builds one report.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .machine import summary

SUITES = ("speed", "theory", "implicit")
TITLES = {"speed": "Speed", "theory": "Theory: order of accuracy", "implicit": "Implicit regularization"}


def clean(value: Any) -> Any:
    """JSON-safe copy: tuples become lists, NaN and infinities become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def write_json(result: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(clean(result), indent=1, allow_nan=False) + "\n")
    return path


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    if abs(x) >= 10 ** digits or abs(x) < 10 ** -2:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _slope(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                          for r in rows]


def _images(names: list[str]) -> list[str]:
    return ["", *(f"![{Path(n).stem}]({n})" for n in names)]


# ------------------------------------------------------------------ speed

def implementation(row: dict[str, Any]) -> str:
    return f"memkernels {row['backend']}" if row["kind"] == "memkernels" else row["backend"]


def _paired(paired: dict[str, Any] | None) -> str:
    return "" if paired is None else f"{paired['median']:.3f} ({paired['anchor']})"


def speed_section(result: dict[str, Any], images: list[str]) -> list[str]:
    cfg = result["config"]
    lines = [f"Device: {result['device']}. Each row is the median of {cfg['repeats']} round-robin repeats "
             f"after {cfg['warmup']} warm-up rounds of `opt.step()` with gradients already set."]
    for shape_set in result["shape_sets"]:
        bw = shape_set["bandwidth"]
        lines += ["", f"**{shape_set['name']}**: {shape_set['description']}: {shape_set['params']:,} parameters "
                      f"in {shape_set['tensors']} tensor(s). Bandwidth ({bw['kernel']} over as many fp32 elements, "
                      f"same run): {bw['gb_s']:.1f} GB/s.", ""]
        rows = [[r["name"], implementation(r), _num(r["median_ms"]), _num(r["iqr_ms"], 2), _num(r["gb_s"]),
                 f"{r['pct_bandwidth']:.0f}%", _num(r["ratio_to_torch_fused"]), _paired(r.get("paired_ratio"))]
                for r in result["rows"] if r["shape_set"] == shape_set["name"]]
        lines += _table(["optimizer", "implementation", "median ms", "IQR ms", "GB/s", f"% of {bw['kernel']}",
                         "time / torch fused AdamW", "paired ratio (to)"], rows)
    missing = [f"{name}: {why}" for name, why in result["unavailable"].items()]
    if missing:
        lines += ["", "Not timed: " + "; ".join(missing) + "."]
    skipped = [f"{name} ({why})" for name, why in result["backends"].items() if why != "ok"]
    if skipped:
        lines += ["", "memkernels backends not timed: " + "; ".join(skipped) + "."]
    lines += ["", *(f"- {note}" for note in result["notes"])]
    return lines + _images(images)


# ------------------------------------------------------------------ theory

def theory_section(result: dict[str, Any], images: list[str]) -> list[str]:
    cfg = result["config"]
    lines = [f"Max-over-trajectory distance to the target path over horizon T = {cfg['horizon']}, "
             f"h in {cfg['hs']}, float64; slope = log(e_h / e_h') / log(h / h') of the last pair "
             "(order q: slope q). *memoryless approximation*: memoryless path (uncorrected) or memoryless + hM "
             "(corrected, alpha = +1) against the optimizer with memory. *memory cancellation*: the optimizer "
             "with memory (uncorrected) or memory-cancelled (alpha = -1) against the memoryless path. "
             "*engine*: M from memkernels.theory.engine (exact HVPs) for rules without a closed form.", ""]
    paths = ["uncorrected", "exact", "trajectory", "probe", "engine"]
    paths = [p for p in paths if any(p in r["slopes"] for r in result["results"])]
    rows = []
    for r in result["results"]:
        last = {p: r["slopes"][p][-1] if p in r["slopes"] else None for p in paths}
        corrected = [p for p in paths[1:] if p in r["errors"]]
        rows.append([r["problem"], r["optimizer"], r["experiment"], *(_slope(last[p]) for p in paths),
                     _num(r["errors"]["uncorrected"][-1]),
                     _num(min(r["errors"][p][-1] for p in corrected)) if corrected else "n/a"])
    lines += _table(["problem", "optimizer", "experiment", *(f"slope {p}" for p in paths),
                     "error uncorrected (smallest h)", "best corrected error (smallest h)"], rows)
    detail = []
    for r in result["results"]:
        for path, errors in r["errors"].items():
            detail.append([r["problem"], r["optimizer"], r["experiment"], path, *(_num(e) for e in errors),
                           ", ".join(_slope(s) for s in r["slopes"][path])])
    lines += ["", "<details><summary>Error table (every h)</summary>", ""]
    lines += _table(["problem", "optimizer", "experiment", "path", *(f"h={h:g}" for h in cfg["hs"]), "slopes"],
                    detail)
    lines += ["", "</details>"]
    cost = result.get("engine_cost")
    if cost:
        lines += ["", f"engine_cost: {cost['rule']} on a {cost['params']:,}-parameter tanh MLP, batch "
                      f"{cost['batch']}, {cost['device']}, {cost['threads']} threads: the engine's memoryless update "
                      f"and M take {cost['ratio']:.1f}x one gradient (HVP {cost['hvp_ratio']:.1f}x, JVP through the "
                      f"rule over {cost['depth']} past gradients {cost['rule_ratio']:.1f}x)."]
    return lines + _images(images)


# ------------------------------------------------------------------ implicit regularization

def _checks(result: dict[str, Any]) -> list[str]:
    """The paper's qualitative predictions next to what was measured."""
    summary_rows = {s["name"]: s for s in result["summary"]}
    adam = sorted((s for s in result["summary"] if s["family"] == "AdamW"), key=lambda s: s["beta2"])
    beta1 = result["config"]["beta1"]
    out = []

    def trend(key: str) -> str:
        values = [s[key] for s in adam]
        if len(values) < 2 or any(v is None for v in values):
            return "not measured (a beta2 run did not reach the threshold)"
        pairs = list(zip(values, values[1:]))
        if all(b > a for a, b in pairs):
            return "increases with beta2"
        if all(b < a for a, b in pairs):
            return "decreases with beta2"
        return "is not monotone in beta2 (" + ", ".join(_num(v) for v in values) + ")"

    anti = [s for s in adam if s["beta2"] > beta1 and s["final_penalty"] is not None]
    if anti:
        sign = "negative" if all(s["final_penalty"] < 0 for s in anti) else "not always negative"
        out.append(f"AdamW's penalty R for beta2 > beta1: predicted negative (anti-regularization); measured {sign} "
                   f"({', '.join(_num(s['final_penalty']) for s in anti)}).")
    out.append(f"AdamW test accuracy at the threshold: predicted to decrease as beta2 grows; measured: it "
               f"{trend('test_accuracy')}.")
    out.append(f"AdamW sharpness at the threshold: predicted to increase with beta2; measured: it {trend('sharpness')}.")
    for name, predicted, test in (("heavy ball", "positive (regularization)", lambda r: r > 0),
                                  ("Lion", "zero (sign: no memory penalty)", lambda r: r == 0)):
        s = summary_rows.get(name)
        if s and s["final_penalty"] is not None:
            verdict = "agrees" if test(s["final_penalty"]) else "disagrees"
            out.append(f"{name}'s R: predicted {predicted}; measured {_num(s['final_penalty'])} ({verdict}).")
    corrected = [s for s in result["summary"] if s["family"] == "AdamW alpha=-1"]
    for s in corrected:
        base = next((a for a in adam if a["beta2"] == s["beta2"]), None)
        if s["reached"] == 0:
            out.append(f"{s['name']}: no seed reached the threshold ({', '.join(s['statuses'])}), so the "
                       "cancellation's effect on accuracy is not measured at this learning rate.")
        elif base and base["test_accuracy"] is not None:
            out.append(f"{s['name']} vs the same AdamW without correction: test accuracy "
                       f"{_num(s['test_accuracy'])} vs {_num(base['test_accuracy'])}, sharpness "
                       f"{_num(s['sharpness'])} vs {_num(base['sharpness'])} (predicted: higher accuracy, flatter).")
    return out


def implicit_section(result: dict[str, Any], images: list[str]) -> list[str]:
    cfg, data = result["config"], result["data"]
    lines = [f"{data['name']}: {data['train']} train / {data['test']} test images (fixed stratified split), "
             f"64-{cfg['hidden']}-10 tanh MLP, full batch, until training loss <= {cfg['loss_threshold']} "
             f"(cap {cfg['max_steps']} steps), {cfg['seeds']} seeds, weight decay {cfg['weight_decay']}. "
             f"AdamW lr {cfg['lr_adamw']}, beta1 {cfg['beta1']}; alpha = -1 uses the trajectory HVP; Lion lr "
             f"{cfg['lr_lion']} (sign); heavy ball lr {cfg['lr_heavy_ball']}, momentum {cfg['momentum']}. "
             "Means ± sd over the seeds that reached the threshold; R is memory_stats()['penalty'] at the last "
             "recorded step; sharpness is the top Hessian eigenvalue of the training loss "
             f"({cfg['power_iterations']} power iterations).", ""]
    rows = []
    for s in result["summary"]:
        pm = lambda m, sd: "n/a" if m is None else f"{_num(m)} ± {_num(sd, 2)}"  # noqa: E731
        others = [st for st in s["statuses"] if st != "reached"]
        stopped = f"{'/'.join(others)} at step {', '.join(map(str, s['stopped_at']))}" if others else ""
        rows.append([s["name"], f"{s['reached']}/{s['seeds']}", _num(s["steps"]),
                     pm(s["test_accuracy"], s["test_accuracy_sd"]), pm(s["sharpness"], s["sharpness_sd"]),
                     pm(s["final_penalty"], s["final_penalty_sd"]), _num(s["explained"], 2), stopped])
    lines += _table(["optimizer", "reached", "steps", "test accuracy", "sharpness", "R", "hM explains",
                     "runs stopped"], rows)
    lines += ["", "*hM explains*: median over training and seeds of memory_stats()['explained'] = "
                  "1 - |memory effect - hM|^2 / |memory effect|^2 (1: the leading-order correction accounts for "
                  "all of what memory changes in the step; below 0: it is off by more than the effect itself)."]
    lines += ["", "Against the paper's predictions:", "", *(f"- {c}" for c in _checks(result))]
    return lines + _images(images)


SECTIONS = {"speed": speed_section, "theory": theory_section, "implicit": implicit_section}


def render(out: Path) -> str:
    """report.md's text from the suite JSONs in `out` and their PNGs (named after the suite).

    Suites run separately into one folder share the report; one whose JSON another version wrote
    gets a line saying so instead of its section.
    """
    lines = ["# memkernels bench report"]
    for suite in SUITES:
        path = out / f"{suite}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        mode = result.get("mode", "?")
        seconds = result.get("seconds")
        took = f", {seconds:.0f} s" if seconds is not None else ""
        lines += ["", f"## {TITLES[suite]}", ""]
        try:
            body = [f"Machine: {summary(result['machine'])}. Mode: {mode}{took}.", ""]
            body += SECTIONS[suite](result, sorted(p.name for p in out.glob(f"{suite}*.png")))
        except (KeyError, TypeError) as exc:  # a JSON an older memkernels left in this folder
            body = [f"{path.name} lacks what this version reports ({type(exc).__name__}: {exc}); "
                    f"rerun `memkernels bench --suite {suite}` into this folder."]
        lines += body
    return "\n".join(lines) + "\n"
