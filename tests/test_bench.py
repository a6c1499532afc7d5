"""`memkernels bench`: each suite in its tiny configuration, end to end through the CLI's run().

The figures of a tiny run mean nothing; these tests check the outputs'
structure and what must hold whatever the machine: finite numbers, positive
times and ratios, a byte model that matches the GB/s, order-of-accuracy slopes
near 1 without and near 2 with the correction, and the signs of the memory
penalty that THEORY.md derives (R = 0 when beta1 = beta2, R < 0 for AdamW with
beta2 > beta1, R > 0 for heavy ball, R = 0 for sign-Lion).
"""
from __future__ import annotations

import importlib.util
import json
import math
import statistics
import time
import warnings

import pytest

import torch

from memkernels.bench import run, speed, timing
from memkernels.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


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
    for png in ("speed.png", "theory_logistic.png", "implicit_penalty.png", "implicit_accuracy.png",
                "implicit_sharpness.png"):
        assert (out / png).read_bytes()[:8] == PNG, png
    report = (out / "report.md").read_text()
    for heading in ("## Speed", "## Theory: order of accuracy", "## Implicit regularization"):
        assert heading in report
    for png in ("speed.png", "theory_logistic.png", "implicit_accuracy.png"):
        assert f"]({png})" in report
    assert "Machine: " in report and "| optimizer | implementation | median ms |" in report


def test_speed_rows(out):
    result = load(out, "speed")
    sets = {s["name"]: s for s in result["shape_sets"]}
    assert set(sets) == {"large tensor", "GPT-2 small"}
    assert sets["large tensor"]["params"] == 4096 and sets["GPT-2 small"]["tensors"] == 148
    rows = result["rows"]
    for shape_set in sets.values():
        assert shape_set["bandwidth"]["kernel"] == "triad" and shape_set["bandwidth"]["gb_s"] > 0
        mine = [r for r in rows if r["shape_set"] == shape_set["name"]]
        timed = {(r["name"], r["backend"]) for r in mine}
        assert {(v, "reference") for v in speed.VARIANTS} <= timed  # every variant of the forced backend
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
            assert paired["anchor"] == anchors[r["name"].split(" + ")[0]]["backend"]
            assert len(paired["ratios"]) == r["repeats"] and all(x > 0 for x in paired["ratios"])
            assert paired["median"] == statistics.median(paired["ratios"])
    bytes_per_param = {r["name"]: r["bytes_per_param"] for r in rows if r["kind"] == "memkernels"}
    assert bytes_per_param == {"AdamW": 28, "AdamW + trajectory correction": 32,
                               "AdamW + trajectory + diagnostics": 32,
                               "AdamW + trajectory + diagnostics, grads in place": 36,
                               "AdamW + probe correction": 32, "Lion": 20, "heavy ball": 20}
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
        steps = {variant: speed._stepper(variant, params, stored, "reference", closure, grads)
                 for variant, (_, _, closure, grads) in speed.VARIANTS.items() if "trajectory" in variant}
    for n in range(3):
        for variant, opt in zip(steps, made):  # round-robin, as the timing runs them
            steps[variant]()
            kept = [opt.state[p]["prev_grad"] is p.grad for p in params]
            assert kept == [speed.VARIANTS[variant][1] == 32 and n > 0] * 2, variant  # none before step 1


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
    result = load(out, "implicit")
    cfg = result["config"]
    names = {s["name"] for s in result["summary"]}
    assert len(result["runs"]) == len(names) * cfg["seeds"]
    assert result["data"]["train"] + result["data"]["test"] == 1797  # scikit-learn's digits
    for r in result["runs"]:
        assert r["status"] in ("reached", "step cap", "diverged")
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["steps"] <= cfg["max_steps"]
        if r["status"] == "reached":
            assert r["train_loss"] <= cfg["loss_threshold"] and r["sharpness"] > 0
    final = {r["name"]: r["final_penalty"] for r in result["runs"] if r["seed"] == 0}
    assert final[f"AdamW b2={cfg['beta1']}"] == 0.0  # beta1 = beta2: the two EMAs' ages cancel
    assert final["AdamW b2=0.999"] < 0  # anti-regularization
    assert final["heavy ball"] > 0
    assert final["Lion"] == 0.0  # sign: no memory penalty
    for s in result["summary"]:
        if s["reached"]:
            assert 0.0 <= s["test_accuracy"] <= 1.0 and s["steps"] > 0


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
