"""The memory correction in training: the limit, the fused probe, kept estimates, hvp="auto" and the regime warning.

Independent references: on a quadratic loss the probe's finite difference is exact, so a probe run must equal
an exact-HVP run (double backward) to float64 rounding; the limit's count equals a brute-force count from
memory_stats' definitions; Lion-K's penalty is checked against its modified loss by finite differences.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import memkernels as mk
from memkernels.coefficients import LionWeights, replay

F64 = torch.float64
OPTIMIZERS = {
    "adamw": lambda ps, **kw: mk.AdamW(ps, lr=0.02, betas=(0.8, 0.9), eps=0.1, weight_decay=0.1, **kw),
    "adam_l2": lambda ps, **kw: mk.AdamW(ps, lr=0.02, betas=(0.8, 0.9), eps=0.1, weight_decay=0.1,
                                         decoupled_weight_decay=False, **kw),
    "lion_smooth": lambda ps, **kw: mk.Lion(ps, lr=0.01, betas=(0.8, 0.9), weight_decay=0.1, smoothing=0.01, **kw),
    "nesterov": lambda ps, **kw: mk.SGD(ps, lr=0.02, momentum=0.8, nesterov=True, weight_decay=0.05, **kw),
}


class Quadratic:
    """L = 1/2 theta' A theta - b' theta in float64: its gradient is affine, so g(theta + tau d) - g = tau A d."""

    def __init__(self, dim: int = 12, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(dim, dim, generator=gen, dtype=F64)
        self.A = q @ q.T / dim + 0.1 * torch.eye(dim, dtype=F64)
        self.b = torch.randn(dim, generator=gen, dtype=F64)
        self.theta0 = torch.randn(dim, generator=gen, dtype=F64)

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        return 0.5 * theta @ self.A @ theta - self.b @ theta


def run(name: str, steps: int, *, graph: bool = False, record=None, **kw) -> torch.Tensor:
    """Iterates of `steps` closure steps on the quadratic; record(opt) is called after each step."""
    problem = Quadratic()
    theta = problem.theta0.clone().requires_grad_(True)
    opt = OPTIMIZERS[name]([theta], backend="reference", **kw)

    def closure():
        opt.zero_grad()
        loss = problem.loss(theta)
        loss.backward(create_graph=graph)
        return loss

    path = []
    for _ in range(steps):
        opt.step(closure)
        path.append(theta.detach().clone())
        if record is not None:
            record(opt)
    return torch.stack(path)


# ---------------------------------------------------------------- the fused probe

@pytest.mark.parametrize("kappa", [0.5, math.inf])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_probe_equals_exact_hvp_on_a_quadratic(name, kappa):
    """The fused probe (theta + tau d kept in origins, tau from the last pass's norms) is the exact H d."""
    common = dict(memory_correction=-1.0, correction_limit=kappa)
    probe = run(name, 25, hvp="probe", **common)
    exact = run(name, 25, hvp="exact", graph=True, **common)
    torch.testing.assert_close(probe, exact, rtol=1e-7, atol=1e-9)


def test_probe_moves_nothing_when_the_closure_raises():
    theta = torch.randn(6, dtype=F64, requires_grad=True)
    opt = mk.AdamW([theta], memory_correction=-1.0, hvp="probe", backend="reference")
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:  # the gradient at the probe point
            raise KeyboardInterrupt
        opt.zero_grad()
        (theta * theta).sum().backward()

    before = theta.detach().clone()
    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert torch.equal(theta.detach(), before)
    assert theta.grad is not None and torch.equal(theta.grad, 2 * before)  # the first gradient is back


@pytest.mark.parametrize("name", ["adamw", "lion_smooth"])
def test_probe_in_device_mode_matches_host_mode(name):
    """capturable=True takes the probe now: no host read in its path; it steps like host mode."""
    host = run(name, 12, hvp="probe", memory_correction=-1.0)
    device = run(name, 12, hvp="probe", memory_correction=-1.0, capturable=True)
    torch.testing.assert_close(device, host, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- hvp_every

def test_hvp_every_reuses_the_kept_estimate():
    """Estimate steps call the closure twice and keep (g(theta + tau d) - g) / tau = A d in state["hvp"]."""
    problem = Quadratic()
    theta = problem.theta0.clone().requires_grad_(True)
    opt = mk.AdamW([theta], lr=0.02, memory_correction=-1.0, hvp="probe", hvp_every=3, backend="reference")
    calls, kept = [], []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = problem.loss(theta)
        loss.backward()
        return loss

    for n in range(7):
        before = len(calls)
        d = theta.grad.detach() if theta.grad is not None else None
        opt.step(closure)
        assert len(calls) - before == (2 if n % 3 == 0 else 1), n
        kept.append(opt.state[theta]["hvp"].clone())
        if n % 3 == 0:  # A d with d = g / (|g| + eps) + lambda theta at this step's theta and gradient
            theta_n = opt._probes.origins[id(theta)]
            g = problem.A @ theta_n - problem.b
            d = g / (g.abs() + 1e-8) + 1e-2 * theta_n
            torch.testing.assert_close(kept[-1], problem.A @ d, rtol=1e-6, atol=1e-8)
        else:
            assert torch.equal(kept[-1], kept[-2])


def test_hvp_every_resumes_from_a_state_dict():
    problem = Quadratic()

    def make(theta):
        return mk.Lion([theta], lr=0.01, smoothing=0.01, memory_correction=-1.0, hvp="probe", hvp_every=4,
                       backend="reference")

    def steps(opt, theta, n):
        def closure():
            opt.zero_grad()
            problem.loss(theta).backward()
        for _ in range(n):
            opt.step(closure)

    theta = problem.theta0.clone().requires_grad_(True)
    opt = make(theta)
    steps(opt, theta, 10)
    twin = theta.detach().clone().requires_grad_(True)
    resumed = make(twin)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from disk: torch keeps "step" tensors shared
    assert "hvp" in opt.state_dict()["state"][0]
    steps(opt, theta, 3)  # steps 10, 11 reuse the estimate of step 8; 12 estimates again
    steps(resumed, twin, 3)
    # step 12 estimates again: the resumed tau comes from torch-op norms, the original's from the last pass:
    # the finite difference rounds differently (1e-16 / tau ~ 1e-8 relative of H d)
    torch.testing.assert_close(twin, theta, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- the limit

def test_limited_fraction_equals_a_brute_force_count():
    """memory_stats' limited_fraction counts |alpha h^2 M_i| > kappa h |F_i|, with F and M from THEORY's formulas
    (float64, exact HVP, AdamW's EMAs replayed by hand)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(20, 5).double()
    x, y = torch.randn(64, 20, dtype=F64), torch.randn(64, 5, dtype=F64)
    lr, wd, kappa, betas = 0.05, 1e-2, 0.3, (0.9, 0.999)
    opt = mk.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=wd, memory_correction=-1.0,
                   correction_limit=kappa, hvp="exact", backend="reference")
    m = [torch.zeros_like(p) for p in model.parameters()]
    v = [torch.zeros_like(p) for p in model.parameters()]
    from memkernels.coefficients import EMAAge
    for n in range(6):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward(create_graph=True)
        theta = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.detach().clone() for p in model.parameters()]
        hd = torch.autograd.grad([p.grad for p in model.parameters()], list(model.parameters()),
                                 grad_outputs=[g / (g.abs() + 1e-8) + wd * t for g, t in zip(grads, theta)],
                                 retain_graph=True)
        opt.step()
        first, second = replay(EMAAge(betas[0]), n), replay(EMAAge(betas[1]), n)
        limited = 0
        for i, (t, g, h) in enumerate(zip(theta, grads, hd)):
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            a = g.abs() + 1e-8
            F = m[i] / first.bias_correction / (torch.sqrt(v[i] / second.bias_correction) + 1e-8) + wd * t
            M = (first.mean_age - second.mean_age * (g / a).abs()) / a * h
            limited += int(((lr * lr * M).abs() > kappa * lr * F.abs()).sum())
        assert opt.memory_stats()[0]["limited_fraction"] == limited / sum(p.numel() for p in model.parameters())
    assert limited > 0


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_infinite_limit_is_the_plain_correction(name):
    """correction_limit=inf never limits: the run equals one whose limit is too large to act."""
    a = run(name, 15, hvp="exact", graph=True, memory_correction=-1.0, correction_limit=math.inf)
    b = run(name, 15, hvp="exact", graph=True, memory_correction=-1.0, correction_limit=1e300)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- hvp="auto" and the warnings

def _net():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)


def _closure(model, opt, counter):
    def closure():
        counter.append(1)
        opt.zero_grad()
        loss = model(torch.ones(3, 4)).square().sum()
        loss.backward()
        return loss
    return closure


def test_auto_is_the_probe_with_a_closure_and_warns_without_one():
    model = _net()
    opt = mk.AdamW(model.parameters(), memory_correction=-1.0)
    counter = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning with a closure
        opt.step(_closure(model, opt, counter))
    assert len(counter) == 2  # the loss, then the gradient at the probe point
    model(torch.ones(3, 4)).square().sum().backward()
    with pytest.warns(UserWarning, match="without step\\(closure\\)") as record:
        opt.step()
        opt.step()
    assert len([w for w in record if "without step" in str(w.message)]) == 1


def test_explicit_trajectory_and_plain_steps_do_not_warn():
    for kw in (dict(memory_correction=-1.0, hvp="trajectory"), dict()):
        model = _net()
        opt = mk.AdamW(model.parameters(), **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):
                model(torch.ones(3, 4)).square().sum().backward()
                opt.step()
                opt.zero_grad()


def test_regime_warning_fires_once_with_the_measured_ratio():
    """alpha = -1 at torch's defaults on a net with tiny gradients: |h M_i| >> |u_i| on most elements."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 30), torch.nn.Tanh(), torch.nn.Linear(30, 3))
    x, y = torch.randn(256, 30), torch.randint(0, 3, (256,))
    opt = mk.AdamW(model.parameters(), memory_correction=-1.0, hvp="probe")
    counter = []

    def closure():
        counter.append(1)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match=r"outside the regime.*\|\|alpha h M\|\| / \|\|F\|\| = [0-9.e+]+, "
                                            r"[0-9.]+% of elements limited") as record:
        for _ in range(30):
            opt.step(closure)
    assert len([w for w in record if "outside the regime" in str(w.message)]) == 1
    assert opt.memory_stats()[0]["limited_fraction"] > 0.01
    assert all(math.isfinite(float(p.detach().abs().max())) for p in model.parameters())


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("key, value, match", [
    ("correction_limit", 0.0, "correction_limit"), ("correction_limit", -1.0, "correction_limit"),
    ("correction_limit", float("nan"), "correction_limit"), ("correction_limit", "0.5", "correction_limit"),
    ("correction_limit", True, "correction_limit"), ("hvp_every", 0, "hvp_every"), ("hvp_every", 1.5, "hvp_every"),
    ("hvp_every", True, "hvp_every"),
])
def test_bad_correction_settings_raise_and_change_nothing(key, value, match):
    model = _net()
    with pytest.raises(ValueError, match=match):
        mk.AdamW(model.parameters(), memory_correction=-1.0, **{key: value})
    opt = mk.AdamW(model.parameters(), memory_correction=-1.0)
    counter = []
    opt.step(_closure(model, opt, counter))
    before = ([p.detach().clone() for p in model.parameters()],
              {k: v.clone() for k, v in opt.state[model.weight].items()})
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=match):
        opt.step(_closure(model, opt, counter))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before[0]))
    assert all(torch.equal(opt.state[model.weight][k], v) for k, v in before[1].items())


def test_hvp_every_with_the_trajectory_or_capturable_raises():
    with pytest.raises(ValueError, match="hvp_every > 1"):
        mk.AdamW(_net().parameters(), memory_correction=-1.0, hvp="trajectory", hvp_every=2)
    with pytest.raises(ValueError, match="capturable"):
        mk.AdamW(_net().parameters(), memory_correction=-1.0, hvp="probe", hvp_every=2, capturable=True)
    with pytest.raises(ValueError, match="capturable"):
        mk.AdamW(_net().parameters(), memory_correction=-1.0, hvp="exact", capturable=True)


# ---------------------------------------------------------------- Lion-K's penalty (docs/THEORY.md section 4)

@pytest.mark.parametrize("n", [1, 3, 50])
def test_lion_penalty_is_the_modified_loss_of_its_memoryless_flow(n):
    """phi(W g) + h M = phi(W grad(L + R)) + O(h^2) with R = h C_n / W_n^2 sum sqrt((W_n g)^2 + eps).

    Checked on a smooth 2-d loss: the residual shrinks like h^2 with the docs' prefactor and only like h
    with h C_n / W_n (which the optimizer used before); W_n differs from 1 at small n only.
    """
    beta1, beta2, eps = 0.8, 0.9, 0.05
    weights = replay(LionWeights(beta1, beta2), n)
    W, C = weights.w, weights.c
    theta = torch.tensor([0.3, -0.7], dtype=F64, requires_grad=True)

    def loss(t):
        return torch.log(torch.cosh(2 * t[0] - t[1])) + 0.5 * t[1] ** 2 + 0.1 * t[0] ** 4

    def phi(x):
        return x / torch.sqrt(x * x + eps)

    g = torch.autograd.grad(loss(theta), theta, create_graph=True)[0]
    u = phi(W * g)
    Hu = torch.autograd.grad(g, theta, grad_outputs=u.detach(), retain_graph=True)[0]
    M = eps / (W * W * g * g + eps) ** 1.5 * C * Hu  # phi'(W g) C_n H u
    psi = torch.sqrt((W * g) ** 2 + eps).sum()
    grad_psi = torch.autograd.grad(psi, theta)[0]

    def residual(h, prefactor):
        modified = phi(W * (g + h * prefactor * grad_psi))
        return float((u + h * M - modified).detach().norm())

    right = [residual(h, C / W ** 2) for h in (1e-2, 5e-3)]
    wrong = [residual(h, C / W) for h in (1e-2, 5e-3)]
    assert math.log2(right[0] / right[1]) > 1.9
    if abs(W - 1.0) > 0.1:  # the early steps (at n = 50, W = 0.996 and the two agree to O(h^2) here too)
        assert math.log2(wrong[0] / wrong[1]) < 1.1
    lion = mk.Lion([torch.zeros(1)], lr=0.1, betas=(beta1, beta2), smoothing=eps)
    assert lion.penalty_prefactor({}, dict(lr=0.1, smoothing=eps, age_weight=C, ema_weight=W)) == pytest.approx(
        0.1 * C / W ** 2, rel=1e-15)


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("mode", ["host", "capturable", "tensor_lr"])
@pytest.mark.parametrize("lr", [1e-3, 1e-30, 1e-39])
def test_a_vanishing_lr_skips_the_trajectory_estimate_and_counts_it(backend, mode, lr):
    """1/h past sqrt(fp32 max) (h < ~5e-20) would overflow M to inf and the term to NaN: those steps go
    without the estimate, and memory_stats counts them; at a usual lr none is skipped."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64))
    twin = torch.nn.Parameter(p.detach().clone())
    opt = mk.AdamW([p], lr=torch.tensor(lr) if mode == "tensor_lr" else lr, memory_correction=-1.0,
                   hvp="trajectory", capturable=mode == "capturable", backend=backend)
    ref = torch.optim.AdamW([twin], lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the regime warning, at lr = 1e-3
        for _ in range(4):
            p.grad = torch.randn(64) * 10
            twin.grad = p.grad.clone()
            opt.step()
            ref.step()
    assert torch.isfinite(p).all()
    skipped = opt.memory_stats()[0]["skipped_estimates"]
    assert skipped == (0 if lr == 1e-3 else 3)  # steps 2-4 estimate; step 1 has no previous gradient
    if lr != 1e-3:
        torch.testing.assert_close(p.detach(), twin.detach(), rtol=0, atol=0)
