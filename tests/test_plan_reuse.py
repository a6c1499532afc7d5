"""A group's plan kept from one step to the next (memkernels/optim/_reuse.py) changes no step's outcome.

Each scenario changes one thing between steps once a plan has been kept and reused, then steps on. The
reference is the same run on an optimizer whose kept plan is dropped before every step, so that each step
plans and checks afresh: every step must give the same parameters, states, diagnostics and warnings, bit for
bit, or raise the same error, and a step that raises changes nothing (docs/DESIGN.md, a step is all or nothing).
"""
from __future__ import annotations

import dataclasses
import gc
import warnings
import weakref
from typing import Callable

import pytest
import torch

import memkernels as mk
from memkernels.optim import _base
from test_prev_grads import _shares_storage

# torch's, from backward into the gradient a scenario transposed (with set_to_none=False)
pytestmark = pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout contract")

CHANGED = 3  # the change comes before this step: step 0 plans, steps 1 and 2 keep and reuse a plan
STEPS = 5
REUSED = 2  # a steady step: it must have reused the kept plan, or the test would compare nothing

Model = torch.nn.Sequential
Change = Callable[[Model, _base.MemoryOptimizer], object]


def _model() -> Model:
    torch.manual_seed(0)
    return Model(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def _backward(model: Model, n: int, set_to_none: bool) -> None:
    """Step n's gradients; by hand where a changed parameter breaks the forward or backward pass."""
    model.zero_grad(set_to_none=set_to_none)
    g = torch.Generator().manual_seed(n)
    try:
        model(torch.randn(5, 4, generator=g)).square().sum().backward()
    except RuntimeError:
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


# ------------------------------------------------------------------ what a scenario changes

def W(m: Model) -> torch.nn.Parameter:
    """The changed parameter: the last layer's weight, (2, 3)."""
    return m[2].weight


def S(m: Model, o: _base.MemoryOptimizer) -> dict:
    return o.state[W(m)]


def K(o: _base.MemoryOptimizer) -> str:
    """The op's first state tensor: exp_avg (AdamW, Lion) or momentum_buffer (SGD)."""
    return o.state_keys[0]


def _regrad(m: Model) -> None:
    """Gradients for changed parameters, as the loop's next backward would make them."""
    _backward(m, CHANGED, set_to_none=True)


def _set(obj: object, name: str, value: object) -> None:
    setattr(obj, name, value)


def _amp(o: _base.MemoryOptimizer, scale: float, found_inf: float) -> None:
    """What GradScaler.step hands the optimizer."""
    o.grad_scale, o.found_inf = torch.tensor(scale), torch.tensor(found_inf)


def _group(o: _base.MemoryOptimizer, **values: object) -> None:
    o.param_groups[0].update(values)


# id: (change, whether the step after it raises); steps that raise are checked to change nothing
SCENARIOS: dict[str, tuple[Change, bool | None]] = {
    # the changed param's gradient
    "grad-scaled-in-place": (lambda m, o: W(m).grad.mul_(2.0), False),
    "grad-new-tensor": (lambda m, o: _set(W(m), "grad", W(m).grad.clone()), False),
    "grad-none": (lambda m, o: _set(W(m), "grad", None), False),
    "grads-all-none": (lambda m, o: m.zero_grad(set_to_none=True), False),
    "grad-transposed": (lambda m, o: _set(W(m), "grad", W(m).grad.t().contiguous().t()), False),
    "grad-strided-view": (lambda m, o: _set(W(m), "grad", torch.randn(2, 6)[:, ::2]), False),
    "grad-expanded": (lambda m, o: _set(W(m), "grad", torch.randn(1, 3).expand(2, 3)), False),
    "grad-in-other-params-memory": (lambda m, o: (_set(m[0].weight, "grad", None),  # not written by this step
                                                  _set(W(m), "grad", m[0].weight.detach().view(-1)[:6].view(2, 3))),
                                    False),
    "grad-is-param": (lambda m, o: _set(W(m), "grad", W(m).detach()), True),
    "grad-data-is-param": (lambda m, o: _set(W(m).grad, "data", W(m).data), True),
    "grad-data-shape": (lambda m, o: _set(W(m).grad, "data", torch.randn(3, 2)), True),
    "grad-resized-in-place": (lambda m, o: W(m).grad.resize_(2, 2), True),
    "grad-data-double": (lambda m, o: _set(W(m).grad, "data", W(m).grad.double()), True),
    "grad-sparse": (lambda m, o: _set(W(m), "grad", W(m).grad.to_sparse()), True),
    # its state
    "state-tensor-replaced": (lambda m, o: S(m, o).__setitem__(K(o), torch.ones(2, 3)), False),
    "state-tensor-scaled-in-place": (lambda m, o: S(m, o)[K(o)].mul_(0.5), False),
    "state-tensor-shape": (lambda m, o: S(m, o).__setitem__(K(o), torch.zeros(5)), True),
    "state-tensor-resized-in-place": (lambda m, o: S(m, o)[K(o)].resize_(6), True),
    "state-tensor-data-shape": (lambda m, o: _set(S(m, o)[K(o)], "data", torch.zeros(3, 2)), True),
    "state-tensor-data-double": (lambda m, o: _set(S(m, o)[K(o)], "data", S(m, o)[K(o)].double()), True),
    "state-tensor-data-transposed": (lambda m, o: _set(S(m, o)[K(o)], "data", S(m, o)[K(o)].t().contiguous().t()),
                                     True),
    "state-tensor-deleted": (lambda m, o: S(m, o).pop(K(o)), True),
    "state-key-added": (lambda m, o: S(m, o).__setitem__("extra", torch.zeros(1)), False),
    "state-reset": (lambda m, o: o.state.__setitem__(W(m), {}), False),
    "states-cleared": (lambda m, o: o.state.clear(), False),
    # step counts
    "step-set-in-place": (lambda m, o: S(m, o)["step"].fill_(100.0), False),
    "step-replaced": (lambda m, o: S(m, o).__setitem__("step", torch.tensor(7.0)), False),
    "steps-all-set": (lambda m, o: [s["step"].fill_(50.0) for s in o.state.values()], False),
    "step-deleted": (lambda m, o: S(m, o).pop("step"), False),
    # params
    "param-data-new-storage": (lambda m, o: _set(W(m), "data", W(m).data.clone()), False),
    "params-double": (lambda m, o: (m.double(), _regrad(m)), False),
    "param-transposed": (lambda m, o: (_set(W(m), "data", W(m).data.t().contiguous().t()), _regrad(m)), True),
    "param-bigger": (lambda m, o: _set(W(m), "data", torch.randn(2, 4)), True),
    "group-param-removed": (lambda m, o: o.param_groups[0]["params"].pop(), False),
    "group-param-replaced": (lambda m, o: o.param_groups[0]["params"].__setitem__(-1, torch.nn.Parameter(
        torch.randn(2))), False),
    "group-added": (lambda m, o: o.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]}), False),
    "state-dict-loaded": (lambda m, o: o.load_state_dict(o.state_dict()), False),
    # the group's flags and hyperparameters, and the step's AMP tensors
    "lr-zero": (lambda m, o: _group(o, lr=0.0), False),
    "lr-tensor": (lambda m, o: _group(o, lr=torch.tensor(0.5)), False),
    "maximize": (lambda m, o: _group(o, maximize=True), False),
    "memoryless": (lambda m, o: _group(o, memoryless=True), False),
    "weight-decay": (lambda m, o: _group(o, weight_decay=0.1), False),
    "correction-on": (lambda m, o: _group(o, memory_correction=-1.0), False),
    "track-memory-on": (lambda m, o: _set(o, "track_memory", True), False),
    "capturable": (lambda m, o: _group(o, capturable=True), False),
    "lr-negative": (lambda m, o: _group(o, lr=-1.0), True),
    "amp-scale": (lambda m, o: _amp(o, 4.0, 0.0), False),
    "amp-inf-skips": (lambda m, o: _amp(o, 4.0, 1.0), False),
    "amp-scale-zero": (lambda m, o: _amp(o, 0.0, 0.0), True),
}

# the trajectory estimate's previous gradients (state "prev_grad": a buffer, or the last gradient kept); None:
# a kept gradient written in place is lost and replaced (new gradient tensors), a buffer raises (the same ones)
TRAJECTORY_SCENARIOS: dict[str, tuple[Change, bool | None]] = {
    "prev-grad-deleted": (lambda m, o: S(m, o).pop("prev_grad"), False),
    "prev-grad-replaced": (lambda m, o: S(m, o).__setitem__("prev_grad", torch.zeros(2, 3)), False),
    "prev-grad-written": (lambda m, o: S(m, o)["prev_grad"].add_(1.0), False),
    "prev-grad-shape": (lambda m, o: S(m, o).__setitem__("prev_grad", torch.zeros(6)), True),
    "prev-grad-resized-in-place": (lambda m, o: S(m, o)["prev_grad"].resize_(6), None),
    "prev-grad-data-double": (lambda m, o: _set(S(m, o)["prev_grad"], "data", S(m, o)["prev_grad"].double()), None),
    "prev-grad-sparse": (lambda m, o: S(m, o).__setitem__("prev_grad", torch.zeros(2, 3).to_sparse()), True),
    "grad-shares-a-storage": (lambda m, o: _set(W(m), "grad", _shares_storage(W(m).grad)), False),  # no view, not alone
    "grad-is-prev-grad": (lambda m, o: _set(W(m), "grad", S(m, o)["prev_grad"]), False),
    "hvp-probe-without-closure": (lambda m, o: _group(o, hvp="probe"), True),
}

# SGD's momentum switched on or off: with momentum 0 its states have no buffer
SGD_SCENARIOS: dict[str, tuple[Change, bool | None]] = {
    "momentum-on": (lambda m, o: _group(o, momentum=0.9), True),
    "momentum-off": (lambda m, o: _group(o, momentum=0.0), False),
}

ALL = {**SCENARIOS, **TRAJECTORY_SCENARIOS, **SGD_SCENARIOS}
SOME = ["grad-none", "grad-data-shape", "state-tensor-replaced", "state-tensor-shape", "state-tensor-resized-in-place",
        "state-tensor-data-double", "state-reset", "step-set-in-place", "params-double", "lr-zero", "maximize",
        "amp-scale-zero"]
SOME_TRAJECTORY = [*SOME, "prev-grad-written", "prev-grad-resized-in-place"]

# id: (the optimizer of the model's params, the scenarios it runs)
CONFIGS: dict[str, tuple[Callable, list[str]]] = {
    "adamw": (lambda ps: mk.AdamW(ps, lr=1e-2, backend="numba"), [*SCENARIOS]),
    "adamw-tracked": (lambda ps: mk.AdamW(ps, lr=1e-2, track_memory=True, hvp="trajectory", backend="numba"),
                      [*SCENARIOS, *TRAJECTORY_SCENARIOS]),
    "adamw-corrected": (lambda ps: mk.AdamW(ps, lr=1e-2, memory_correction=-1.0, hvp="trajectory",
                                            backend="numba"), SOME_TRAJECTORY),
    "sgd": (lambda ps: mk.SGD(ps, lr=1e-2, momentum=0.0, backend="numba"), ["momentum-on"]),
    "sgd-momentum": (lambda ps: mk.SGD(ps, lr=1e-2, momentum=0.9, memory_correction=0.5, hvp="trajectory",
                                       backend="numba"), [*SOME_TRAJECTORY, "momentum-off"]),
    "lion": (lambda ps: mk.Lion(ps, lr=1e-3, smoothing=1e-3, memory_correction=-1.0, hvp="trajectory",
                                backend="numba"), SOME_TRAJECTORY),
}
CASES = [pytest.param(config, scenario, id=f"{config}-{scenario}")
         for config, (_, scenarios) in CONFIGS.items() for scenario in scenarios]


# ------------------------------------------------------------------ the runs and what they record

@dataclasses.dataclass
class Step:
    planned: bool  # the step made a plan (not reusing a kept one)
    error: tuple[type, str] | None
    warnings: list[str]
    before: list
    after: list


def _snapshot(model: Model, opt: _base.MemoryOptimizer) -> list:
    """Every param and its state (copied), and the last step's diagnostics."""
    params = list(dict.fromkeys([*model.parameters(), *(p for g in opt.param_groups for p in g["params"])]))
    states = [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state.get(p, {}).items()} for p in params]
    stats = opt.memory_stats() if any(opt.measures(g) for g in opt.param_groups) else None
    return [[p.detach().clone() for p in params], states, stats]


def _bits(x: object) -> object:
    """A value with its tensors as (dtype, shape, bytes): equal only where bit for bit equal."""
    if isinstance(x, torch.Tensor) and x.is_sparse:
        return "sparse", _bits(x.to_dense())
    if isinstance(x, torch.Tensor):
        return x.dtype, tuple(x.shape), x.detach().contiguous().view(-1).view(torch.uint8).tolist()
    if isinstance(x, dict):
        return {k: _bits(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_bits(v) for v in x]
    return x.hex() if isinstance(x, float) else x  # a NaN diagnostic equals itself


@pytest.fixture
def plans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the plans made (plan_group calls), so a test can tell a reused plan from a new one."""
    made: list[int] = []
    plan_group = _base.plan_group

    def counted(*args, **kwargs):
        made.append(1)
        return plan_group(*args, **kwargs)

    monkeypatch.setattr(_base, "plan_group", counted)
    return made


def _run(make: Callable, change: Change, set_to_none: bool, keep_plans: bool, plans: list[int]) -> list[Step]:
    """STEPS steps of the model, with the change before step CHANGED; without keep_plans every step plans."""
    model = _model()
    opt = make(model.parameters())
    steps = []
    for n in range(STEPS):
        _backward(model, n, set_to_none)
        if n == CHANGED:
            change(model, opt)
        if not keep_plans:
            opt._kept.clear()
        before, made = _snapshot(model, opt), len(plans)
        error = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                opt.step()
            except Exception as e:  # compared with the fresh plan's
                error = (type(e), str(e))
        steps.append(Step(len(plans) > made, error, [str(w.message) for w in caught], before,
                          _snapshot(model, opt)))
    return steps


def _check(make: Callable, change: Change, raises: bool | None, set_to_none: bool, plans: list[int]) -> None:
    kept = _run(make, change, set_to_none, True, plans)
    fresh = _run(make, change, set_to_none, False, plans)
    assert not kept[REUSED].planned, "the steady step did not reuse the kept plan"
    if raises is not None:
        assert (fresh[CHANGED].error is not None) == raises, fresh[CHANGED].error
    for n, (k, f) in enumerate(zip(kept, fresh)):
        assert k.error == f.error, f"step {n}"
        assert k.warnings == f.warnings, f"step {n}"
        assert _bits(k.after) == _bits(f.after), f"step {n}: params, states or diagnostics differ"
        if k.error is not None:
            assert _bits(k.after) == _bits(k.before), f"step {n} raised and changed something"


@pytest.mark.parametrize("set_to_none", [True, False], ids=["new-grads", "same-grads"])
@pytest.mark.parametrize("config, scenario", CASES)
def test_change_between_steps(config: str, scenario: str, set_to_none: bool, plans: list[int]) -> None:
    change, raises = ALL[scenario]
    _check(CONFIGS[config][0], change, raises, set_to_none, plans)


@pytest.mark.parametrize("set_to_none", [True, False], ids=["new-grads", "same-grads"])
@pytest.mark.parametrize("config", CONFIGS)
def test_steady_steps_reuse_the_kept_plan(config: str, set_to_none: bool, plans: list[int]) -> None:
    """Step 0 plans; under the trajectory estimate step 1 too (its previous gradients are new); then none. The
    reference runs, whose kept plans are dropped, plan every step."""
    steps = _run(CONFIGS[config][0], lambda m, o: None, set_to_none, True, plans)
    assert steps[0].planned and not any(step.planned for step in steps[REUSED:])
    assert all(step.planned for step in _run(CONFIGS[config][0], lambda m, o: None, set_to_none, False, plans))


@pytest.mark.parametrize("track_memory,state_dtype", [(False, torch.float32), (3, torch.float32),
                                                     (True, torch.float32), (True, torch.bfloat16)])
def test_a_kept_plan_does_not_keep_gradients_alive(track_memory, state_dtype) -> None:
    """After zero_grad() the gradients no state needs are freed, as with torch.optim: the kept plan refers to them
    weakly. A plain step holds none (track_memory=k copies one only into the step it samples); the trajectory
    (track_memory=True) keeps the last gradient as its state's prev_grad, and only that one, or none where it
    copies it into a bfloat16 buffer."""
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    opt = mk.AdamW(params, backend="reference", track_memory=track_memory, hvp="trajectory", state_dtype=state_dtype)
    history = []
    for _ in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        history.append([weakref.ref(p.grad) for p in params])
        opt.step()
        assert opt._kept  # the plan is kept, so the step after reuses it
    opt.zero_grad()
    gc.collect()
    alive = [[g() is not None for g in step] for step in history]
    kept = track_memory is True and state_dtype == torch.float32
    assert alive == [[False] * len(params)] * 3 + [[kept] * len(params)]
    if kept:
        assert all(opt.state[p]["prev_grad"] is g() for p, g in zip(params, history[-1]))
