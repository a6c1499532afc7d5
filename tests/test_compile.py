"""Device mode: capturable=True and torch.compile step like host mode, with no graph break and no recompile.

The reference is the same optimizer in host mode (itself tested against torch.optim): device mode
changes only where the step count and lr are read and how the coefficients are evaluated (closed
forms instead of recursions, equal to 1e-10), so parameters agree to fp32 rounding.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable

import pytest
import torch
import torch._dynamo

import memkernels as mk

CASES = {
    "adamw": (mk.AdamW, dict(lr=1e-2)),
    "adamw_correction": (mk.AdamW, dict(lr=1e-2, memory_correction=-0.5)),
    "adam_l2": (mk.AdamW, dict(lr=1e-2, decoupled_weight_decay=False, memory_correction=0.5)),
    "heavy_ball": (mk.SGD, dict(lr=1e-2, momentum=0.9, memory_correction=0.5)),
    "nesterov": (mk.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, memory_correction=0.5)),
    "sgd_plain": (mk.SGD, dict(lr=1e-2, momentum=0.0)),
    "lion_smooth": (mk.Lion, dict(lr=1e-3, smoothing=1e-3, memory_correction=-1.0)),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(32, 8, generator=g), torch.randn(32, 3, generator=g)


def _train(case: str, *, capturable: bool, steps: int, step_fn=None, schedule=True):
    """steps of full training with a tensor lr decayed in place (as a scheduler does); params and stats."""
    cls, kw = CASES[case]
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trajectory-HVP note
        opt = cls(model.parameters(), **{**kw, "lr": torch.tensor(kw["lr"])}, capturable=capturable,
                  track_memory=True)
    step = (step_fn or (lambda o: o.step))(opt)
    for n in range(steps):
        x, y = _batch(n)
        torch.nn.functional.mse_loss(model(x), y).backward()
        step()
        opt.zero_grad()
        if schedule:
            opt.param_groups[0]["lr"].mul_(0.8)
    return [p.detach().clone() for p in model.parameters()], opt.memory_stats()[0], opt


def _assert_same_run(got, want) -> None:
    (p_got, stats_got, _), (p_want, stats_want, _) = got, want
    for a, b in zip(p_got, p_want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert stats_got["step"] == stats_want["step"]
    for key, value in stats_want.items():
        assert stats_got[key] == pytest.approx(value, rel=1e-6, abs=1e-12, nan_ok=True), key


@pytest.mark.parametrize("case", CASES)
def test_capturable_matches_host_mode(case):
    host = _train(case, capturable=False, steps=6)
    device = _train(case, capturable=True, steps=6)
    _assert_same_run(device, host)
    opt = device[2]
    assert all(s["step"].item() == 6 for s in opt.state.values())
    assert isinstance(opt.param_groups[0]["prev_lr"], torch.Tensor)  # copied on the device, never read


def compiled_step(opt: torch.optim.Optimizer, backend: str = "eager") -> Callable[[], object]:
    """opt.step compiled whole (fullgraph=True: a graph break raises), and no recompile after its first two
    calls (state creation, then the steady state)."""
    torch._dynamo.reset()
    fn = torch.compile(opt.step, fullgraph=True, backend=backend)
    calls = []

    def step() -> object:
        calls.append(None)
        with torch._dynamo.config.patch(error_on_recompile=len(calls) > 2):
            return fn()
    return step


@pytest.mark.parametrize("case", CASES)
def test_compiled_step_has_no_graph_break(case):
    """fullgraph=True raises on any graph break; after the first two calls lr changes in place and the step
    count moves without a recompile."""
    got = _train(case, capturable=False, steps=6, step_fn=compiled_step)
    _assert_same_run(got, _train(case, capturable=False, steps=6))


def test_inductor_step_with_a_scheduler_does_not_recompile():
    """A whole training step under the default backend, lr driven by StepLR on a tensor lr.

    torch's own pieces break the graph here (loss.backward, zero_grad, and the wrapper StepLR puts
    around opt.step, as for torch.optim's optimizers); memkernels' step adds none, and nothing recompiles.
    """
    torch._dynamo.reset()
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = mk.AdamW(model.parameters(), lr=torch.tensor(1e-2), memory_correction=-0.5, track_memory=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.8)
    eager_model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager_opt = mk.AdamW(eager_model.parameters(), lr=1e-2, memory_correction=-0.5)
    eager_sched = torch.optim.lr_scheduler.StepLR(eager_opt, 1, gamma=0.8)

    @torch.compile
    def train_step(x, y):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    try:
        for n in range(6):
            if n == 2:
                torch._dynamo.config.error_on_recompile = True
            x, y = _batch(n)
            train_step(x, y)
            sched.step()
            torch.nn.functional.mse_loss(eager_model(x), y).backward()
            eager_opt.step()
            eager_opt.zero_grad()
            eager_sched.step()
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert opt.param_groups[0]["lr"].item() == pytest.approx(1e-2 * 0.8 ** 6)
    # Inductor's fused forward and backward round the gradients differently, and the trajectory estimate
    # divides gradient differences by lr: 2e-5 apart after six steps (measured).
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert opt.memory_stats()[0]["step"] == 6


def test_capturable_rejects_what_it_cannot_capture():
    model = _model()
    with pytest.raises(ValueError, match="capturable=True measures memory with hvp='trajectory' or 'probe'"):
        mk.AdamW(model.parameters(), memory_correction=-1.0, hvp="exact", capturable=True)
    with pytest.raises(ValueError, match="lr must be a float or a one-element floating tensor"):
        mk.SGD(model.parameters(), lr=torch.tensor([0.1, 0.2]), capturable=True)


def test_capturable_state_dict_round_trip():
    """A host-mode checkpoint (step on the CPU) resumes in device mode and continues like host mode."""
    host = _train("adamw_correction", capturable=False, steps=3, schedule=False)[2]
    cls, kw = CASES["adamw_correction"]
    resumed = {}
    for capturable in (False, True):
        model = _model()
        for p, q in zip(model.parameters(), host.param_groups[0]["params"]):
            p.data.copy_(q)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = cls(model.parameters(), **kw, capturable=capturable)
        state = copy.deepcopy(host.state_dict())  # loading keeps the tensors it is given
        state["param_groups"][0]["capturable"] = capturable
        opt.load_state_dict(state)
        x, y = _batch(10)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        resumed[capturable] = [p.detach().clone() for p in model.parameters()]
        assert all(s["step"].item() == 4 for s in opt.state.values())
    torch.testing.assert_close(resumed[True], resumed[False], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("opt_cls, kw", [(mk.AdamW, dict(eps=0.1)), (mk.Lion, dict(smoothing=0.01)),
                                         (mk.SGD, dict(nesterov=True))])
def test_compiled_probe_step_has_no_graph_break(opt_cls, kw):
    """The fused probe reads nothing on the host: with a closure that sets gradients without autograd (a
    quadratic, g = A theta - b), fullgraph=True covers its whole path (tau from the norms, the probe pass, both
    closure calls, the step from the kept origins), and the compiled steps equal eager ones."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 8, generator=gen)
    a, b = a @ a.T / 8 + torch.eye(8), torch.randn(8, generator=gen)

    def run(compiled: bool):
        torch._dynamo.reset()
        theta = torch.nn.Parameter(torch.randn(8, generator=torch.Generator().manual_seed(1)))
        opt = opt_cls([theta], lr=1e-2, memory_correction=-1.0, hvp="probe", **kw)

        def closure():
            theta.grad = a @ theta.detach() - b
            return theta.detach() @ a @ theta.detach()

        step = (lambda: opt.step(closure))
        fn = torch.compile(step, fullgraph=True, backend="eager") if compiled else step
        for _ in range(5):
            fn()
        return theta.detach().clone(), opt.memory_stats()[0]

    (got, stats), (want, _) = run(True), run(False)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert stats["correction_norm"] > 0
