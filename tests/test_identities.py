"""Identities the math must satisfy exactly (docs/THEORY.md sections 2-6).

- Section 4's cross-check: Adam with eps inside the sqrt and beta1 = beta2 = beta
  and smoothed Lion (Signum) with the same beta and smoothing = eps have the
  same correction M = tau eps / (g^2 + eps)^(3/2) (H u), tau = beta / (1 - beta).
- Sign-Lion has no correction at all, and its diagnostics count sign flips.
- memory_stats() of AdamW and SGD equal the section 6 quantities evaluated by
  brute force in float64 from the whole gradient history and an exact Hessian.
The optimizer-level checks run the reference backend (this file checks the
math); sign-Lion's bit-identity is a kernel property, checked on "auto" too.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import memkernels as mk
from memkernels import ops, reference
from memkernels.coefficients import EMAAge, LionWeights, replay
from memkernels.theory import logistic, trajectory

F64 = torch.float64


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------- Adam (eps inside) == Signum (section 4)

LARGE_N = 20000  # beta^n has underflowed below float64 rounding for every beta below


@pytest.mark.parametrize("eps", [1e-3, 0.1])
@pytest.mark.parametrize("beta", [0.5, 0.9, 0.99])
def test_adam_eps_inside_and_signum_share_the_correction(beta, eps):
    p, g, g_ref, exp_avg = (rand(257, seed=s) for s in range(4))
    exp_avg_sq = rand(257, seed=4).square()
    age = replay(EMAAge(beta), LARGE_N)
    lion = replay(LionWeights(beta, beta), LARGE_N)
    hvp_scale = 3.0
    hvp = reference.estimate_hvp(g_ref, g, hvp_scale)
    adam = ops.adamw.adamw(p, g, exp_avg, exp_avg_sq, hvp, lr=0.01, beta1=beta, beta2=beta, eps=eps,
                           weight_decay=0.0, bias_correction1=age.bias_correction,
                           bias_correction2=age.bias_correction, mean_age1=age.mean_age, mean_age2=age.mean_age,
                           correction=1.0, correction_limit=math.inf, decoupled=True, eps_inside_sqrt=True,
                           memoryless=True)
    signum = ops.lion.lion(p, g, exp_avg, hvp, lr=0.01, beta1=beta, beta2=beta, weight_decay=0.0,
                            smoothing=eps, ema_weight=lion.w, age_weight=lion.c, correction=1.0,
                            correction_limit=math.inf, memoryless=True)
    tau = beta / (1.0 - beta)
    expected = tau * eps / (g * g + eps) ** 1.5 * (g_ref - g) * hvp_scale
    # Adam's coefficient A/a - B g^2/a^3 cancels down to A eps/a^3: relative rounding ~ 1e-16 g^2/eps
    torch.testing.assert_close(adam.M, expected, rtol=1e-11, atol=0.0)
    torch.testing.assert_close(signum.M, expected, rtol=1e-11, atol=0.0)
    # Both memoryless steps then move p the same way: u = g / sqrt(g^2 + eps) for both
    torch.testing.assert_close(adam.p, signum.p, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("beta", [0.5, 0.9])
def test_adam_eps_inside_and_signum_ops_agree(beta):
    """The same identity through the torch ops: the memoryless corrected steps coincide."""
    eps, lr = 0.05, 0.1
    shapes = [(3, 5), (7,), ()]
    params = [rand(*s, seed=10 + i) for i, s in enumerate(shapes)]
    grads = [rand(*s, seed=20 + i) for i, s in enumerate(shapes)]
    refs = [rand(*s, seed=30 + i) for i, s in enumerate(shapes)]
    age = replay(EMAAge(beta), LARGE_N)
    lion = replay(LionWeights(beta, beta), LARGE_N)
    common = dict(lr=lr, beta1=beta, beta2=beta, weight_decay=0.0, correction=1.0, correction_limit=math.inf,
                  hvp_scale=2.0, memoryless=True, backend="reference")
    p_adam = [p.clone() for p in params]
    torch.ops.memkernels.adamw_(p_adam, grads, [torch.zeros_like(p) for p in params],
                                [torch.zeros_like(p) for p in params], refs, None, eps=eps,
                                bias_correction1=age.bias_correction, bias_correction2=age.bias_correction,
                                mean_age1=age.mean_age, mean_age2=age.mean_age, eps_inside_sqrt=True, **common)
    p_lion = [p.clone() for p in params]
    torch.ops.memkernels.lion_(p_lion, grads, [torch.zeros_like(p) for p in params], refs, None,
                               smoothing=eps, ema_weight=lion.w, age_weight=lion.c, **common)
    tau = beta / (1.0 - beta)
    for p, g, r, a, s in zip(params, grads, refs, p_adam, p_lion):
        a_ = torch.sqrt(g * g + eps)
        expected = p - lr * g / a_ - lr * lr * tau * eps / a_ ** 3 * (r - g) * 2.0
        torch.testing.assert_close(a, expected, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(s, expected, rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------- AdamW's coefficient in float32

@pytest.mark.parametrize("eps_inside_sqrt, low, high", [(False, 1e19, 1e20), (True, 1e13, 1e18)])
def test_adamw_coefficient_in_float32_where_powers_of_a_overflow(eps_inside_sqrt, low, high):
    """A/a - B |g|/a^2 (eps outside) and A/a - B g^2/a^3 (inside) where a^2 (a^3) is past float32's
    range but the coefficient is not: float32 M agrees with float64 M (a formula through a^2 would
    lose the B term and flip M's sign)."""
    g = torch.exp(torch.empty(100, dtype=F64).uniform_(math.log(low), math.log(high),
                                                        generator=torch.Generator().manual_seed(0)))
    g = torch.where(torch.arange(100) % 2 == 0, g, -g)
    inputs = (torch.ones_like(g), g, torch.zeros_like(g), torch.zeros_like(g), -g)  # hvp = 0 - g
    kwargs = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, bias_correction1=1.0,
                  bias_correction2=1.0, mean_age1=9.0, mean_age2=999.0, correction=1.0, correction_limit=0.5,
                  decoupled=True, eps_inside_sqrt=eps_inside_sqrt, memoryless=False)
    M64 = ops.adamw.adamw(*inputs, **kwargs).M
    M32 = ops.adamw.adamw(*(t.float() for t in inputs), **kwargs).M
    assert (M64 * g > 0).all()  # hvp = -g and the coefficient has the sign of A - B: M = 990 g / a
    torch.testing.assert_close(M32.double(), M64, rtol=1e-5, atol=0.0)


# ---------------------------------------------------------------- sign-Lion: no correction

def test_sign_lion_reference_correction_is_zero():
    p, g, exp_avg = (rand(1000, seed=s) for s in range(3))
    g[::7] = 0.0  # c = beta1 m is still nonzero there
    hvp = 1e30 * rand(1000, seed=3)  # however large the HVP
    step = ops.lion.lion(p, g, exp_avg, hvp, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.1,
                          smoothing=0.0, ema_weight=0.95, age_weight=7.0, correction=1.0, correction_limit=0.5,
                          memoryless=False)
    c = 0.9 * exp_avg + 0.1 * g
    assert bool((c != 0).all())
    assert torch.count_nonzero(step.M) == 0


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("hvp", ["trajectory", "probe", "exact"])
@pytest.mark.parametrize("alpha", [1.0, -1.0])
def test_sign_lion_correction_changes_nothing(alpha, hvp, backend):
    """mk.Lion with smoothing 0: any memory_correction gives bit-identical parameters, on every backend."""
    problem = logistic()

    def lion(**kw):
        return lambda ps, h: mk.Lion(ps, lr=h, betas=(0.9, 0.99), weight_decay=0.1, backend=backend, **kw)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plain = trajectory(lion(), problem, 0.01, 0.3)
        corrected = trajectory(lion(memory_correction=alpha, hvp=hvp, track_memory=True), problem, 0.01, 0.3,
                               create_graph=hvp == "exact")
    assert torch.equal(plain, corrected)


def test_sign_lion_reports_sign_flip_fraction():
    """sign_flip_fraction = #{sign(c) != sign(g)} / numel, c from a float64 replay of the EMA."""
    beta1, beta2 = 0.9, 0.95
    shapes = [(6, 5), (11,)]
    params = [rand(*s, seed=40 + i).requires_grad_(True) for i, s in enumerate(shapes)]
    opt = mk.Lion(params, lr=0.01, betas=(beta1, beta2), track_memory=True, backend="reference")
    history: list[list[torch.Tensor]] = []
    for step in range(6):
        grads = [rand(*s, seed=100 * step + i) for i, s in enumerate(shapes)]
        grads[0][0] = 0.0  # sign(g) = 0 != sign(c) once the EMA is nonzero
        history.append(grads)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        flips, numel = 0, 0
        for i in range(len(shapes)):
            past = [history[step - k][i] for k in range(1, step + 1)]  # g_{n-1}, g_{n-2}, ...
            m = sum(((1 - beta2) * beta2 ** k * gk for k, gk in enumerate(past)), torch.zeros(shapes[i], dtype=F64))
            c = beta1 * m + (1 - beta1) * grads[i]
            flips += int((torch.sign(c) != torch.sign(grads[i])).sum())
            numel += grads[i].numel()
        stats = opt.memory_stats()[0]
        assert stats["step"] == step + 1
        assert stats["sign_flip_fraction"] == flips / numel
        assert stats["correction_norm"] == 0.0 and stats["penalty"] == 0.0
    assert flips > 1  # the check saw flips, not just zeros


# ---------------------------------------------------------------- memory_stats() vs brute force (section 6)

STEPS = 6
LR = 0.05
SHAPES = [(3, 2), (2,)]  # two tensors: the statistics reduce over both


def flat_and_split():
    sizes = [math.prod(s) for s in SHAPES]

    def flat(params: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in params])

    def split(theta: torch.Tensor) -> list[torch.Tensor]:
        return [t.reshape(s) for t, s in zip(theta.split(sizes), SHAPES)]

    return flat, split


def run_tracked(make, hvp: str = "exact"):
    """Steps an optimizer on logistic() over two tensors; yields (n, theta_n, stats after step n)."""
    problem = logistic()
    flat, split = flat_and_split()
    params = [t.clone().requires_grad_(True) for t in split(problem.theta0)]
    opt = make(params)

    def closure():
        opt.zero_grad()
        loss = problem.loss(flat(params))
        loss.backward(create_graph=hvp == "exact")
        return loss

    for n in range(STEPS):
        theta = flat([p.detach() for p in params]).clone()
        opt.step(closure)
        yield n, theta, opt.memory_stats()[0]


def check_stats(stats: dict, n: int, F: torch.Tensor, u: torch.Tensor, hM: torch.Tensor, penalty: float) -> None:
    rel = 1e-10
    assert stats["step"] == n + 1
    assert math.isclose(stats["update_norm"], float(F.norm()), rel_tol=rel)
    assert math.isclose(stats["correction_norm"], float(hM.norm()), rel_tol=rel, abs_tol=1e-15)
    memory = float((F - u).norm())
    assert math.isclose(stats["memory_effect"], memory, rel_tol=rel, abs_tol=1e-14)
    if n > 0:  # at n = 0 F = u and the explained fraction is 0/0
        explained = 1.0 - float((F - u - hM).norm()) ** 2 / memory ** 2
        assert math.isclose(stats["explained"], explained, rel_tol=0.0, abs_tol=1e-8)
    assert math.isclose(stats["penalty"], penalty, rel_tol=rel, abs_tol=1e-15)


def ema(beta: float, history: list[torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    """sum_k (1 - beta) beta^k x_{n-k}, its total weight Z_n and its mean age A_n, summed from the definition."""
    n = len(history) - 1
    weights = [(1 - beta) * beta ** k for k in range(n + 1)]
    z = math.fsum(weights)
    value = sum(w * x for w, x in zip(weights, reversed(history)))
    return value, z, math.fsum(k * w for k, w in enumerate(weights)) / z


ADAMW_CASES = {
    "eps_outside": dict(),
    "eps_inside": dict(eps_inside_sqrt=True),
    "coupled_l2": dict(decoupled_weight_decay=False),
}


@pytest.mark.parametrize("alpha", [0.0, -1.0])
@pytest.mark.parametrize("case", ADAMW_CASES)
def test_adamw_memory_stats_equal_brute_force(case, alpha):
    beta1, beta2, eps, wd = 0.8, 0.9, 0.05, 0.1
    kw = ADAMW_CASES[case]
    inside, coupled = kw.get("eps_inside_sqrt", False), not kw.get("decoupled_weight_decay", True)
    problem = logistic()
    history: list[torch.Tensor] = []
    make = lambda ps: mk.AdamW(ps, lr=LR, betas=(beta1, beta2), eps=eps, weight_decay=wd, hvp="exact",
                               memory_correction=alpha, track_memory=True, backend="reference", **kw)
    for n, theta, stats in run_tracked(make):
        g = torch.func.grad(problem.loss)(theta)
        hessian = torch.func.hessian(problem.loss)(theta)
        if coupled:  # Adam + L2: g~ = g + lambda theta, H~ = H + lambda I, no decoupled term
            g, hessian = g + wd * theta, hessian + wd * torch.eye(len(theta), dtype=F64)
        decay = torch.zeros_like(theta) if coupled else wd * theta
        history.append(g)
        m, z1, age1 = ema(beta1, history)
        v, z2, age2 = ema(beta2, [x * x for x in history])
        if inside:
            F = (m / z1) / torch.sqrt(v / z2 + eps) + decay
            a = torch.sqrt(g * g + eps)
            coef = age1 / a - age2 * g * g / a ** 3
            psi = a  # the perturbed one-norm sum sqrt(g^2 + eps)
        else:
            F = (m / z1) / (torch.sqrt(v / z2) + eps) + decay
            a = g.abs() + eps
            coef = age1 / a - age2 * g.abs() / a ** 2
            psi = g.abs() - eps * torch.log1p(g.abs() / eps)  # psi_eps, Hu = grad Psi_eps
        u = g / a + decay
        M = coef * (hessian @ u)
        penalty = LR * (age1 - age2) * float(psi.sum())  # R = h (A_n - B_n) Psi_eps(g)
        check_stats(stats, n, F, u, LR * M, penalty)


def heavy_ball_c(mu: float, n: int, nesterov: bool) -> tuple[float, float]:
    """(F(theta..theta)/g~, c_n) by the double sum of docs/THEORY.md section 1 (small n)."""
    def weights(s):  # dF^(s)/dg~_{s-k}
        return [1.0 + mu] + [mu ** (k + 1) for k in range(1, s + 1)] if nesterov else [mu ** k for k in range(s + 1)]

    f = [math.fsum(weights(s)) for s in range(n + 1)]
    w = weights(n)
    return f[n], math.fsum(w[k] * math.fsum(f[n - k:n]) for k in range(1, n + 1))


@pytest.mark.parametrize("alpha", [0.0, -1.0])
@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy_ball", "nesterov"])
def test_sgd_memory_stats_equal_brute_force(nesterov, alpha):
    mu, wd = 0.8, 0.1
    problem = logistic()
    history: list[torch.Tensor] = []
    make = lambda ps: mk.SGD(ps, lr=LR, momentum=mu, weight_decay=wd, nesterov=nesterov, hvp="exact",
                             memory_correction=alpha, track_memory=True, backend="reference")
    for n, theta, stats in run_tracked(make):
        g = torch.func.grad(problem.loss)(theta) + wd * theta  # g~
        hessian = torch.func.hessian(problem.loss)(theta) + wd * torch.eye(len(theta), dtype=F64)  # H~
        history.append(g)
        b = sum(mu ** k * x for k, x in enumerate(reversed(history)))  # b_n = sum_k mu^k g~_{n-k}
        F = g + mu * b if nesterov else b
        scale, c = heavy_ball_c(mu, n, nesterov)
        u = scale * g
        M = c * (hessian @ g)  # M = c_n H~ g~
        penalty = LR * c / scale * 0.5 * float(g.square().sum())  # R = h c_n / (2 S) |grad L~|^2
        check_stats(stats, n, F, u, LR * M, penalty)
