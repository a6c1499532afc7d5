"""mk.theory's engine: M by one JVP against the closed forms of reference.py, the definition of
docs/THEORY.md section 1 by finite differences, the memory rules against the optimizers they model, the
order of accuracy of rules with no closed form, and clear errors."""
from __future__ import annotations

import math

import lion_pytorch
import pytest
import torch

from memkernels import ops
from memkernels.coefficients import EMAAge, HeavyBall, LionWeights, replay
from memkernels.theory import (Rule, correction, engine_cost, logistic, memoryless, plot_order, rule_order,
                               rules, tanh_regression, trajectory, with_memory)
from memkernels.theory.engine import WITH_M, WITHOUT_M, MemorylessStep, loss_hvp, memoryless_terms
from memkernels.theory.order import OrderResult

pytestmark = [pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")]  # torch.func's jvp

TOL = 1e-14  # history truncation for the exact comparisons: far below the 1e-8 asked
NS = (0, 1, 2, 5, 30, 400)  # n = 0..5: bias-correction regime; 400: steady state


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls (conftest.py)


def point(problem=None) -> tuple:
    """theta, g, the exact Hessian (float64, by autograd.functional, independent of the engine) and the loss."""
    problem = problem or logistic()
    theta = problem.theta0 + 0.1
    hessian = torch.autograd.functional.hessian(problem.loss, theta)
    grad = torch.func.grad(problem.loss)(theta)
    return theta, grad, hessian, problem.loss


def assert_matches(M: torch.Tensor, expected: torch.Tensor, tol: float = 1e-8) -> None:
    scale = max(1.0, float(expected.abs().max()))
    err = float((M - expected).abs().max())
    assert err <= tol * scale, f"max |M - closed form| = {err:.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------- closed forms of reference.py


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("n", NS)
def test_heavy_ball_matches_closed_form(n, nesterov):
    theta, g, H, loss = point()
    mu, wd = 0.8, 0.1
    M = correction(rules.heavy_ball(mu, wd, nesterov=nesterov), n, theta, loss, tol=TOL)
    hb = replay(HeavyBall(mu, nesterov), n)
    d = ops.sgd.sgd_direction(theta, g, weight_decay=wd)
    ref = ops.sgd.sgd(theta, g, torch.zeros_like(g), H @ d, lr=0.01, momentum=mu, weight_decay=wd,
                        nesterov=nesterov, update_scale=hb.update_scale, memory_coef=hb.c, correction=1.0,
                        correction_limit=math.inf, memoryless=True)
    assert_matches(M, ref.M)
    assert n == 0 or ref.M.abs().max() > 0.1  # the comparison is not between zeros


def adamw_reference(theta, g, H, n, *, betas, eps, wd, inside, decoupled):
    a1, a2 = replay(EMAAge(betas[0]), n), replay(EMAAge(betas[1]), n)
    d = ops.adamw.adamw_direction(theta, g, eps=eps, weight_decay=wd, decoupled=decoupled, eps_inside_sqrt=inside)
    zeros = torch.zeros_like(g)
    return ops.adamw.adamw(theta, g, zeros, zeros, H @ d, lr=0.01, beta1=betas[0], beta2=betas[1], eps=eps,
                           weight_decay=wd, bias_correction1=a1.bias_correction,
                           bias_correction2=a2.bias_correction, mean_age1=a1.mean_age, mean_age2=a2.mean_age,
                           correction=1.0, correction_limit=math.inf, decoupled=decoupled, eps_inside_sqrt=inside,
                           memoryless=True)


@pytest.mark.parametrize("inside,decoupled", [(False, True), (True, True), (False, False)])
@pytest.mark.parametrize("n", NS)
def test_adamw_matches_closed_form(n, inside, decoupled):
    theta, g, H, loss = point()
    kw = dict(betas=(0.8, 0.9), eps=0.1 if not inside else 0.01)
    rule = rules.adamw(kw["betas"], kw["eps"], 0.1, eps_inside_sqrt=inside, decoupled=decoupled)
    M = correction(rule, n, theta, loss, tol=TOL)
    ref = adamw_reference(theta, g, H, n, wd=0.1, inside=inside, decoupled=decoupled, **kw)
    assert_matches(M, ref.M)


def test_adamw_zero_gradient_coordinate():
    """g_i = 0 exactly: sqrt(v) is not differentiable there, but M is finite and equals the closed form."""
    def loss(t):
        return 0.5 * (t * t).sum() + t[0] * t[1] * t[2] + 0.1 * (t[3:] ** 4).sum()

    theta = torch.tensor([-0.125, 0.5, 0.25, 0.3, -0.7], dtype=torch.float64)  # g_0 = -0.125 + 0.5 * 0.25 = 0
    g = torch.func.grad(loss)(theta)
    assert g[0] == 0.0
    H = torch.autograd.functional.hessian(loss, theta)
    for n in (1, 7):
        M = correction(rules.adamw((0.8, 0.9), 0.1, 0.0), n, theta, loss, tol=TOL)
        ref = adamw_reference(theta, g, H, n, betas=(0.8, 0.9), eps=0.1, wd=0.0, inside=False, decoupled=True)
        assert_matches(M, ref.M)
        assert ref.M[0] != 0.0


@pytest.mark.parametrize("n", NS)
def test_smoothed_lion_matches_closed_form(n):
    """M = phi'(W_n g) H D with D = sum_k w_k delta_k (section 4), D built by brute force from F^(s)."""
    theta, g, H, loss = point()
    betas, wd, smoothing = (0.8, 0.9), 0.1, 0.0025
    M = correction(rules.smoothed_lion(betas, wd, smoothing), n, theta, loss, tol=TOL)
    lw = replay(LionWeights(*betas), n)
    directions = [ops.lion.lion_direction(theta, g, weight_decay=wd, smoothing=smoothing,
                                           ema_weight=replay(LionWeights(*betas), s).w) for s in range(n)]
    weights = [1 - betas[0]] + [betas[0] * (1 - betas[1]) * betas[1] ** (k - 1) for k in range(1, n + 1)]
    D = sum((weights[k] * sum(directions[n - k:n]) for k in range(1, n + 1)), torch.zeros_like(g))
    kw = dict(lr=0.01, beta1=betas[0], beta2=betas[1], weight_decay=wd, smoothing=smoothing,
              ema_weight=lw.w, correction=1.0, correction_limit=math.inf, memoryless=True)
    exact = ops.lion.lion(theta, g, torch.zeros_like(g), H @ D, age_weight=1.0, **kw)
    assert_matches(M, exact.M)
    if n == NS[-1]:  # steady state: THEORY's D = C_n u is exact too
        u = ops.lion.lion_direction(theta, g, weight_decay=wd, smoothing=smoothing, ema_weight=lw.w)
        assert_matches(M, ops.lion.lion(theta, g, torch.zeros_like(g), H @ u, age_weight=lw.c, **kw).M)


# ---------------------------------------------------------------- the definition, for every shipped rule

ALL_RULES = {
    "heavy_ball": rules.heavy_ball(0.8, 0.1),
    "nesterov": rules.nesterov(0.8, 0.1),
    "adamw": rules.adamw((0.8, 0.9), 0.1, 0.1),
    "adamw_inside": rules.adamw((0.8, 0.9), 0.01, 0.1, eps_inside_sqrt=True),
    "smoothed_lion": rules.smoothed_lion((0.8, 0.9), 0.1, 0.0025),
    "rmsprop": rules.rmsprop(alpha=0.8, eps=0.3, momentum=0.5, weight_decay=0.1),
    "adabelief": rules.adabelief((0.8, 0.9), eps=0.1, weight_decay=0.1),
}


@pytest.mark.parametrize("name", ALL_RULES)
def test_correction_is_the_directional_derivative_of_section_1(name):
    """M = d/dt F(n, theta, [g~(theta + t delta_k)]_k) by finite differences of true gradients, no HVP."""
    rule = ALL_RULES[name]
    problem = tanh_regression()
    theta = problem.theta0
    grad_fn = torch.func.grad(problem.loss)
    depth = rule.depth(TOL)

    def g_tilde(x):
        return grad_fn(x) + rule.l2 * x

    g = g_tilde(theta)
    for n in (1, 4, 13):
        updates = [rule.update(s, theta, g.expand(min(s + 1, depth), *g.shape).clone()) for s in range(n)]
        deltas = [sum(updates[n - k:n], torch.zeros_like(g)) for k in range(n + 1)]

        def F(t):
            return rule.update(n, theta, torch.stack([g_tilde(theta + t * d) for d in deltas]))

        t = 1e-4 / max(1.0, max(float(d.abs().max()) for d in deltas))  # fourth-order central difference
        expected = (8 * (F(t) - F(-t)) - (F(2 * t) - F(-2 * t))) / (12 * t)
        M = correction(rule, n, theta, problem.loss, tol=TOL)
        assert float((M - expected).abs().max()) <= 1e-7 * max(1.0, float(expected.abs().max()))
        assert float(expected.abs().max()) > 1e-3


def test_one_hvp_per_distinct_direction():
    theta, g, _, loss = point()
    grad, hvp = loss_hvp(loss, theta)
    assert memoryless_terms(rules.adamw((0.8, 0.9), 0.1, 0.1), 30, theta, grad, hvp, tol=TOL).hvps == 1
    assert memoryless_terms(rules.heavy_ball(0.8, 0.1), 30, theta, grad, hvp, tol=TOL).hvps == 1
    lion = rules.smoothed_lion((0.8, 0.9), 0.1, 0.0025)
    assert memoryless_terms(lion, 5, theta, grad, hvp, tol=TOL).hvps == 5  # W_s differs for each s < n
    assert memoryless_terms(lion, 2 * lion.depth(1e-6), theta, grad, hvp, tol=1e-6).hvps == 1  # steady


def test_float32_close_to_float64():
    theta, _, _, loss = point()
    rule = rules.adamw((0.8, 0.9), 0.1, 0.1)
    M64 = correction(rule, 20, theta, loss, tol=1e-8)
    M32 = correction(rule, 20, theta.float(), lambda t: loss(t.double()).float(), tol=1e-8)
    assert M32.dtype == torch.float32
    torch.testing.assert_close(M32.double(), M64, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the rules with memory = the optimizers


def recursion(step_fn):
    """A factory stepping theta with a plain state recursion written here, independently of the rules."""
    class Recursion:
        def __init__(self, params, lr):
            self.p, self.lr, self.state, self.n = params[0], lr, {}, 0

        def zero_grad(self):
            self.p.grad = None

        @torch.no_grad()
        def step(self, closure):
            with torch.enable_grad():
                closure()
            self.p -= self.lr * step_fn(self.n, self.p.detach(), self.p.grad, self.state)
            self.n += 1
    return Recursion


def adabelief_step(betas, eps, wd):
    def step(n, p, g, st):
        m = st["m"] = betas[0] * st.get("m", 0 * g) + (1 - betas[0]) * g
        s = st["s"] = betas[1] * st.get("s", 0 * g) + (1 - betas[1]) * (g - m) ** 2 + eps
        bc1, bc2 = 1 - betas[0] ** (n + 1), 1 - betas[1] ** (n + 1)
        return m / bc1 / (torch.sqrt(s / bc2) + eps) + wd * p
    return step


def inside_adamw_step(betas, eps, wd):
    def step(n, p, g, st):
        a1, a2 = replay(EMAAge(betas[0]), n), replay(EMAAge(betas[1]), n)
        out = ops.adamw.adamw(p, g, st.get("m", 0 * g), st.get("v", 0 * g), None, lr=1.0, beta1=betas[0],
                              beta2=betas[1], eps=eps, weight_decay=wd, bias_correction1=a1.bias_correction,
                              bias_correction2=a2.bias_correction, mean_age1=0.0, mean_age2=0.0, correction=0.0,
                              correction_limit=math.inf, decoupled=True, eps_inside_sqrt=True, memoryless=False)
        st["m"], st["v"] = out.states
        return p - out.p
    return step


def smooth_lion_step(betas, wd, smoothing):
    def step(n, p, g, st):
        out = ops.lion.lion(p, g, st.get("m", 0 * g), None, lr=1.0, beta1=betas[0], beta2=betas[1],
                             weight_decay=wd, smoothing=smoothing, ema_weight=1.0, age_weight=0.0,
                             correction=0.0, correction_limit=math.inf, memoryless=False)
        st["m"], = out.states
        return p - out.p
    return step


OPTIMIZERS = {
    "heavy_ball": (ALL_RULES["heavy_ball"], lambda ps, lr: torch.optim.SGD(ps, lr, momentum=0.8, weight_decay=0.1)),
    "nesterov": (ALL_RULES["nesterov"],
                 lambda ps, lr: torch.optim.SGD(ps, lr, momentum=0.8, weight_decay=0.1, nesterov=True)),
    "adamw": (ALL_RULES["adamw"], lambda ps, lr: torch.optim.AdamW(ps, lr, betas=(0.8, 0.9), eps=0.1,
                                                                    weight_decay=0.1)),
    "adam_l2": (rules.adamw((0.8, 0.9), 0.1, 0.1, decoupled=False),
                lambda ps, lr: torch.optim.Adam(ps, lr, betas=(0.8, 0.9), eps=0.1, weight_decay=0.1)),
    "adamw_inside": (ALL_RULES["adamw_inside"], recursion(inside_adamw_step((0.8, 0.9), 0.01, 0.1))),
    "lion": (rules.lion((0.8, 0.9), 0.1), lambda ps, lr: lion_pytorch.Lion(ps, lr, betas=(0.8, 0.9),
                                                                            weight_decay=0.1)),
    "smoothed_lion": (ALL_RULES["smoothed_lion"], recursion(smooth_lion_step((0.8, 0.9), 0.1, 0.0025))),
    "rmsprop": (ALL_RULES["rmsprop"], lambda ps, lr: torch.optim.RMSprop(ps, lr, alpha=0.8, eps=0.3, momentum=0.5,
                                                                         weight_decay=0.1)),
    "adabelief": (ALL_RULES["adabelief"], recursion(adabelief_step((0.8, 0.9), 0.1, 0.1))),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_rule_with_memory_is_the_optimizer(name):
    rule, optimizer = OPTIMIZERS[name]
    problem = logistic()
    ours = trajectory(with_memory(rule, tol=TOL), problem, 0.05, 2.0)  # 40 steps
    theirs = trajectory(optimizer, problem, 0.05, 2.0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- order of accuracy (docs/THEORY.md section 7)

NO_CLOSED_FORM = {
    "rmsprop": (ALL_RULES["rmsprop"], 1e-8),
    "adabelief": (ALL_RULES["adabelief"], 1e-6),
}


@pytest.mark.parametrize("problem", [logistic, tanh_regression])
@pytest.mark.parametrize("name", NO_CLOSED_FORM)
def test_order_of_accuracy_without_closed_form(name, problem):
    rule, tol = NO_CLOSED_FORM[name]
    result = rule_order(rule, problem(), tol=tol)
    with_m, without_m = result.slopes(WITH_M), result.slopes(WITHOUT_M)
    assert with_m[-1] >= 1.8, (result.table(), with_m)
    assert 0.8 <= without_m[-1] <= 1.2, (result.table(), without_m)
    assert result.errors[WITH_M][-1] < 0.1 * result.errors[WITHOUT_M][-1]


# ---------------------------------------------------------------- non-smooth rules and bad rules


def sign_point():
    """A loss whose gradient has an exactly zero coordinate at theta (see test_adamw_zero_gradient_coordinate)."""
    def loss(t):
        return 0.5 * (t * t).sum() + t[0] * t[1] * t[2]

    return torch.tensor([-0.125, 0.5, 0.25, 0.3], dtype=torch.float64), loss


def test_sign_rule_gives_zero_correction():
    theta, loss = sign_point()
    sign_rule = Rule("sign_of_momentum", lambda n, t, gs: torch.sign(rules.ema(gs, 0.5)), decay=0.5)
    grad, hvp = loss_hvp(loss, theta)
    for rule, decay in ((rules.lion((0.8, 0.9), 0.1), 0.1 * theta[0]), (sign_rule, 0.0)):
        terms = memoryless_terms(rule, 6, theta, grad, hvp, tol=1e-8)
        assert terms.update[0] == decay  # sign(0) = 0 in the coordinate where g = 0
        assert terms.hvps >= 1 and torch.equal(terms.M, torch.zeros_like(theta))


def test_sign_lion_memoryless_steps():
    path = trajectory(memoryless(rules.lion((0.8, 0.9), 0.1)), logistic(), 0.05, 0.5, create_graph=True)
    assert torch.isfinite(path).all()


def test_wrong_shape_raises():
    theta, _, _, loss = point()
    rule = Rule("truncating_rule", lambda n, t, gs: gs[0][:-1], decay=0.5)
    with pytest.raises(ValueError, match=r"truncating_rule.*shape \(7,\).*\(8,\)"):
        correction(rule, 3, theta, loss)
    with pytest.raises(ValueError, match="float_rule.*not a tensor"):
        correction(Rule("float_rule", lambda n, t, gs: 1.0, decay=0.5), 3, theta, loss)


def test_non_finite_update_raises():
    theta, _, _, loss = point()
    rule = Rule("log_rule", lambda n, t, gs: torch.log(rules.ema(gs, 0.5)), decay=0.5)  # log of negatives: NaN
    with pytest.raises(ValueError, match="log_rule.*memoryless update is not finite"):
        correction(rule, 3, theta, loss)
    with pytest.raises(ValueError, match="log_rule.*update is not finite"):
        trajectory(with_memory(rule), logistic(), 0.1, 0.3)


def test_non_finite_correction_raises():
    """sqrt(|m|) at m = 0: the derivative is infinite, the chain rule gives NaN; say so rather than step."""
    theta, loss = sign_point()
    rule = Rule("sqrt_rule", lambda n, t, gs: torch.sqrt(torch.abs(rules.ema(gs, 0.5))), decay=0.5)
    with pytest.raises(ValueError, match="sqrt_rule' at step 4: the correction M .* not finite"):
        correction(rule, 4, theta, loss)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="decay"):
        Rule("r", lambda n, t, gs: gs[0], decay=1.0)
    with pytest.raises(ValueError, match="keeps"):
        rules.adamw((0.9, 0.999999)).depth(1e-12)
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    step = MemorylessStep([theta], 0.1, rules.heavy_ball(0.5))
    theta.grad = torch.ones(3, dtype=torch.float64)  # no graph: no Hessian
    with pytest.raises(ValueError, match="create_graph=True"):
        step.step()


# ---------------------------------------------------------------- plot and cost


def test_plot_order_writes_png(tmp_path):
    result = OrderResult([0.02, 0.01, 0.005], {WITHOUT_M: [1e-2, 5e-3, 2.5e-3], WITH_M: [1e-3, 2.5e-4, 6.25e-5]})
    path = plot_order(result, tmp_path / "order.png", title="synthetic")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_engine_cost_reports():
    report = engine_cost(20_000, batch=32, repeats=1, device="cpu")
    assert 15_000 < report["params"] < 25_000 and report["hvps"] == 1
    assert report["ratio"] > 0 and report["gradient_s"] > 0
