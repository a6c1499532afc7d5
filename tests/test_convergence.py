"""The convergence suite at its tiny size, end to end: every row a result or a reason, finite losses that fall,
seeds that differ, the fp32-states row against torch.optim.AdamW, and the JSON, report and figures written."""
from __future__ import annotations

import dataclasses
import json
import math
import statistics

import pytest

from memkernels.bench import convergence, run
from memkernels.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    folder = tmp_path_factory.mktemp("convergence")
    run.run(["convergence"], "tiny", folder, progress=False, math_backend="reference")
    return folder


@pytest.fixture(scope="module")
def result(out):
    text = (out / "convergence.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    return json.loads(text)


def runs_of(result, task, setting, row):
    return sorted((r for r in result["runs"] if (r["task"], r["setting"], r["row"]) == (task, setting, row)),
                  key=lambda r: r["seed"])


def test_every_row_is_a_result_or_a_reason(result):
    seeds = result["config"]["seeds"]
    assert len(result["summary"]) == 2 and all(set(s) == set(convergence.SETTINGS) for s in result["summary"].values())
    for task, settings in result["summary"].items():
        for setting, summary in settings.items():
            for row in convergence.ROWS:
                ran, why = row.name in summary["rows"], summary["unavailable"].get(row.name)
                assert ran != (why is not None), (task, setting, row.name)
                if ran:
                    assert [r["seed"] for r in runs_of(result, task, setting, row.name)] == list(seeds)
                else:
                    assert why.strip()
                if row.peer and setting == "correction on":
                    assert why == "a peer: it has no memory correction"
            assert convergence.BASELINE in summary["rows"] and "bf16 states, nearest" in summary["rows"]


def test_the_bf16_param_rows_run(result):
    """kahan=True and param_rounding="stochastic" rows train in every task and setting."""
    for name in ("bf16 params + Kahan", "bf16 params + stochastic rounding"):
        for settings in result["summary"].values():
            for summary in settings.values():
                assert name not in summary["unavailable"] and summary["rows"][name]["held_out_loss"] > 0


def test_losses_are_finite_and_the_baseline_trains(result):
    for r in result["runs"]:
        assert r["finite"] and all(math.isfinite(x) for x in r["curve"]["train_loss"] + r["curve"]["held_out_loss"])
        assert r["curve"]["steps"][0] == 0 and r["curve"]["steps"][-1] == r["steps"] > 0
        assert r["train_loss"] == r["curve"]["train_loss"][-1] and r["held_out_loss"] == r["curve"]["held_out_loss"][-1]
    for task in result["summary"]:
        for setting in convergence.SETTINGS:
            for r in runs_of(result, task, setting, convergence.BASELINE):
                assert r["train_loss"] < r["curve"]["train_loss"][0], (task, setting, r["seed"])


def test_seeds_differ(result):
    for task in result["summary"]:
        first, second = runs_of(result, task, "correction off", convergence.BASELINE)[:2]
        assert first["curve"]["train_loss"][0] != second["curve"]["train_loss"][0]  # the initial weights
        assert first["held_out_loss"] != second["held_out_loss"]


def test_fp32_states_are_torch_adamw(result):
    """memkernels' fp32-state AdamW and torch.optim.AdamW, same hyperparameters and minibatches: the same run."""
    for task in result["summary"]:
        ours = runs_of(result, task, "correction off", convergence.BASELINE)
        torch_runs = runs_of(result, task, "correction off", "torch.optim.AdamW (fp32)")
        for a, b in zip(ours, torch_runs, strict=True):
            assert a["held_out_loss"] == pytest.approx(b["held_out_loss"], rel=1e-5)
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_the_summary_is_its_runs(result):
    for task, settings in result["summary"].items():
        for setting, summary in settings.items():
            base = statistics.fmean(r["held_out_loss"] for r in runs_of(result, task, setting, convergence.BASELINE))
            for name, s in summary["rows"].items():
                mine = runs_of(result, task, setting, name)
                held = [r["held_out_loss"] for r in mine]
                assert s["held_out_loss"] == pytest.approx(statistics.fmean(held))
                assert s["held_out_loss_sd"] == pytest.approx(statistics.stdev(held))
                assert s["train_loss"] == pytest.approx(statistics.fmean(r["train_loss"] for r in mine))
                assert s["held_out_vs_baseline_pct"] == pytest.approx(100 * (statistics.fmean(held) / base - 1))
                last = [statistics.fmean(r["curve"]["held_out_loss"][-1] for r in mine)]
                assert s["curve"]["held_out_loss"][-1:] == pytest.approx(last)


def test_outputs_are_written(out, result):
    assert result["suite"] == "convergence" and result["mode"] == "tiny" and result["seconds"] > 0
    for png in ("convergence_relative.png", "convergence_curves.png"):
        assert (out / png).read_bytes()[:8] == PNG
    report = (out / "report.md").read_text()
    assert "## Convergence of compact states" in report and "](convergence_relative.png)" in report
    for task, settings in result["summary"].items():
        assert f"**{task}**" in report
        for summary in settings.values():
            for why in summary["unavailable"].values():
                assert why in report
    baseline = result["summary"][next(iter(result["summary"]))]["correction off"]["rows"][convergence.BASELINE]
    assert f"{baseline['held_out_loss']:.4f} ± {baseline['held_out_loss_sd']:.4f}" in report


def test_held_out_examples_are_never_trained_on():
    cfg = convergence.ConvergenceConfig.preset("tiny")
    task = convergence.mnist_task(cfg)
    seen = {x.numpy().tobytes() for xb, _ in task.batches(0) for x in xb}
    assert seen == {x.numpy().tobytes() for x in task.train_eval[0]}  # every epoch covers the training set
    assert not seen & {x.numpy().tobytes() for x in task.held_out[0]}
    assert len(task.batches(0)) == cfg.mnist_epochs * math.ceil(cfg.mnist_train / cfg.mnist_batch)


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="mode"):
        convergence.ConvergenceConfig.preset("huge")
    with pytest.raises(ValueError, match="seeds"):
        convergence.run(dataclasses.replace(convergence.ConvergenceConfig.preset("tiny"), seeds=()))


def test_the_default_run_leaves_convergence_out(monkeypatch, tmp_path):
    asked = []
    monkeypatch.setattr(run, "run", lambda suites, mode, out, **kw: asked.append(list(suites)) or tmp_path / "r.md")
    for argv, suites in (([], list(run.DEFAULT_SUITES)), (["--suite", "all"], list(run.SUITES)),
                         (["--suite", "convergence"], ["convergence"])):
        assert main(["bench", "--tiny", "--out", str(tmp_path), "--no-progress", *argv]) == 0
        assert asked.pop() == suites
    assert "convergence" in run.SUITES and "convergence" not in run.DEFAULT_SUITES
