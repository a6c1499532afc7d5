"""AdEMAMix's reference math (memkernels.ops.ademamix, docs/THEORY.md section 10) against independent references.

- M against the theory engine's (one JVP through the rule, exact Hessians), and the exact two-direction M
  where the one-HVP form leaves the decay's share out; the order of accuracy along trajectories.
- Steps with correction 0 against pytorch-optimizer's AdEMAMix, with and without its warm-up schedulers.
- The coefficient track: recursion, replay by matrix powers and closed form against each other and against
  sums over the EMAs' weights written from their definitions (math.fsum).
- The correction limit and memoryless mode as reference.adamw's, and the penalty R.
"""
from __future__ import annotations

import math

import pytest
import pytorch_optimizer
import torch

from memkernels.ops import ademamix as ademamix_math
from memkernels.coefficients import replay
from memkernels.ops.ademamix import AdEMAMixAges, ademamix_ages_at, ademamix_alpha, ademamix_beta3
from memkernels.theory import correction, logistic, rules, trajectory, with_memory
from memkernels.theory.order import order_of_accuracy

pytestmark = [pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")]

F64 = torch.float64
TOL = 1e-14  # the engine's history truncation: far below the 1e-12 asked
CONFIGS = {  # betas, alpha, eps: slow > second > first; second < first; a small eps and a large alpha
    "slow": ((0.8, 0.9, 0.95), 2.0, 0.1),
    "fast_second": ((0.9, 0.8, 0.95), 0.5, 0.3),
    "small_eps": ((0.5, 0.8, 0.9), 5.0, 0.01),
}
WARMUPS = {"none": (None, None), "both": (7, 7), "alpha": (20, None), "beta3": (None, 7.5)}
NS = (0, 1, 2, 5, 30, 400)  # n <= 30: bias correction and S_n < 1; 400: c_s constant to 1e-9
STEADY = 800  # 0.95^800 = 1.6e-18: c_s constant over the engine's history


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls (conftest.py)


def point() -> tuple:
    """theta, g, the exact Hessian (torch.autograd.functional, independent of the engine) and the loss."""
    problem = logistic()
    theta = problem.theta0 + 0.1
    return theta, torch.func.grad(problem.loss)(theta), torch.autograd.functional.hessian(problem.loss, theta), \
        problem.loss


def assert_matches(M: torch.Tensor, expected: torch.Tensor, tol: float = 1e-12) -> None:
    scale = max(1.0, float(expected.abs().max()))
    err = float((M - expected).abs().max())
    assert err <= tol * scale, f"max |M - expected| = {err:.3g} (scale {scale:.3g})"


def scalars(track: AdEMAMixAges) -> dict[str, float]:
    """The op's step scalars at the track's step."""
    return dict(beta1=track.beta1, beta2=track.beta2, beta3=track.beta3_n, alpha=track.alpha_n,
                bias_correction1=track.bias_correction1, bias_correction2=track.bias_correction2,
                slow_sum=track.slow_sum, mean_age1=track.mean_age1, mean_age2=track.mean_age2,
                slow_age=track.slow_age)


def memoryless_M(theta, g, H, track, eps, wd):
    d = ademamix_math.ademamix_direction(theta, g, eps=eps, weight_decay=wd, alpha=track.alpha_n,
                                         slow_sum=track.slow_sum)
    zeros = torch.zeros_like(g)
    return ademamix_math.ademamix(theta, g, zeros, zeros, zeros, H @ d, lr=0.01, eps=eps, weight_decay=wd,
                                  correction=1.0, correction_limit=math.inf, memoryless=True, **scalars(track)).M


# ---------------------------------------------------------------- brute force from the definitions

def brute_force(betas, alpha, n, warmups) -> dict[str, float]:
    """Each EMA's weights on g_{n-k}, the displacements D_k = sum_{s=n-k}^{n-1} c_s of THEORY section 10
    and the weighted sums: P (by D_k) and Q (by k); for m1 and v normalised by the bias correction."""
    beta1, beta2, beta3 = betas
    b3 = [ademamix_beta3(s, beta1, beta3, warmups[1]) for s in range(n + 1)]

    def slow_weights(s):  # (1 - beta3_{s-k}) prod_{j=s-k+1..s} beta3_j, k = 0..s
        out, kept = [], 1.0
        for k in range(s + 1):
            out.append((1.0 - b3[s - k]) * kept)
            kept *= b3[s - k]
        return out

    sums = [math.fsum(slow_weights(s)) for s in range(n + 1)]
    c = [1.0 + ademamix_alpha(s, alpha, warmups[0]) * sums[s] for s in range(n + 1)]
    D = [math.fsum(c[n - k:n]) for k in range(n + 1)]
    out = dict(S=sums[n], c=c[n])
    for name, w in (("1", [(1 - beta1) * beta1 ** k for k in range(n + 1)]), ("3", slow_weights(n)),
                    ("2", [(1 - beta2) * beta2 ** k for k in range(n + 1)])):
        z = 1.0 if name == "3" else math.fsum(w)
        out["Z" + name] = z
        out["P" + name] = math.fsum(wk * dk for wk, dk in zip(w, D)) / z
        out["Q" + name] = math.fsum(k * wk for k, wk in enumerate(w)) / z
    return out


# ---------------------------------------------------------------- M against the theory engine


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("config", CONFIGS)
def test_M_is_the_engines_without_decay(config, n):
    """lambda = 0: every memoryless step is c_s g / a, so the one HVP of u is exact at every step."""
    betas, alpha, eps = CONFIGS[config]
    theta, g, H, loss = point()
    M = correction(rules.ademamix(betas, alpha, eps, 0.0), n, theta, loss, tol=TOL)
    ours = memoryless_M(theta, g, H, replay(AdEMAMixAges(*betas, alpha), n), eps, 0.0)
    assert_matches(ours, M)
    assert n == 0 or float(M.abs().max()) > 0.1  # the comparison is not between zeros


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("warmup", [w for w in WARMUPS if w != "none"])
def test_M_is_the_engines_during_the_warmups(warmup, n):
    betas, alpha, eps = CONFIGS["slow"]
    aw, bw = WARMUPS[warmup]
    theta, g, H, loss = point()
    M = correction(rules.ademamix(betas, alpha, eps, 0.0, alpha_warmup=aw, beta3_warmup=bw), n, theta, loss, tol=TOL)
    ours = memoryless_M(theta, g, H, replay(AdEMAMixAges(*betas, alpha, aw, bw), n), eps, 0.0)
    assert_matches(ours, M)


@pytest.mark.parametrize("warmup", ["none", "both"])
@pytest.mark.parametrize("config", CONFIGS)
def test_M_is_the_engines_with_decay_once_c_is_constant(config, warmup):
    betas, alpha, eps = CONFIGS[config]
    aw, bw = WARMUPS[warmup]
    theta, g, H, loss = point()
    rule = rules.ademamix(betas, alpha, eps, 0.1, alpha_warmup=aw, beta3_warmup=bw)
    M = correction(rule, STEADY, theta, loss, tol=TOL)
    assert_matches(memoryless_M(theta, g, H, replay(AdEMAMixAges(*betas, alpha, aw, bw), STEADY), eps, 0.1), M)


@pytest.mark.parametrize("warmup", ["none", "both"])
@pytest.mark.parametrize("n", [1, 5, 30])
def test_transient_with_decay_leaves_out_exactly_the_decays_share(n, warmup):
    """While c_s varies and lambda > 0, delta_k = D_k g / a + k lambda theta is not along u: the exact M
    (two HVPs) is sum_e K_e (P_e H (g/a) + lambda Q_e H theta); the one-HVP M misses
    lambda sum_e K_e (Q_e - P_e / c_n) H theta, and only that."""
    (beta1, beta2, beta3), alpha, eps = CONFIGS["slow"]
    aw, bw = WARMUPS[warmup]
    wd = 0.1
    theta, g, H, loss = point()
    M = correction(rules.ademamix((beta1, beta2, beta3), alpha, eps, wd, alpha_warmup=aw, beta3_warmup=bw), n,
                   theta, loss, tol=TOL)
    b = brute_force((beta1, beta2, beta3), alpha, n, (aw, bw))
    a = g.abs() + eps
    alpha_n = ademamix_alpha(n, alpha, aw)
    K = {"1": 1 / a, "3": alpha_n / a, "2": -b["c"] * g.abs() / a ** 2}  # dF/dg_{n-k} = sum_e K_e w_e,k
    H_g, H_theta = H @ (g / a), H @ theta
    exact = sum(K[e] * (b["P" + e] * H_g + wd * b["Q" + e] * H_theta) for e in K)
    assert_matches(exact, M)
    ours = memoryless_M(theta, g, H, replay(AdEMAMixAges(beta1, beta2, beta3, alpha, aw, bw), n), eps, wd)
    left_out = wd * sum(K[e] * (b["Q" + e] - b["P" + e] / b["c"]) for e in K) * H_theta
    assert_matches(ours + left_out, M)
    assert float(left_out.abs().max()) > 1e-3


# ---------------------------------------------------------------- order of accuracy


def memoryless_steps(betas, alpha, eps, wd, warmups, corr):
    """theta <- theta - h [u + corr h M] from ademamix_math, with the exact HVP of u (a Factory for order.py)."""
    class Memoryless:
        def __init__(self, params, lr):
            self.p, self.lr, self.track = params[0], lr, AdEMAMixAges(*betas, alpha, *warmups)

        def zero_grad(self):
            self.p.grad = None

        def step(self, closure):
            with torch.enable_grad():
                closure()
            g, theta = self.p.grad, self.p.detach()
            d = ademamix_math.ademamix_direction(theta, g.detach(), eps=eps, weight_decay=wd,
                                                 alpha=self.track.alpha_n, slow_sum=self.track.slow_sum)
            hd = torch.autograd.grad(g, self.p, d)[0]
            zeros = torch.zeros_like(theta)
            out = ademamix_math.ademamix(theta, g.detach(), zeros, zeros, zeros, hd, lr=self.lr, eps=eps,
                                         weight_decay=wd, correction=corr, correction_limit=math.inf,
                                         memoryless=True, **scalars(self.track))
            with torch.no_grad():
                self.p.copy_(out.p)
            self.track.advance()
    return Memoryless


@pytest.mark.parametrize("warmup", ["none", "both"])
def test_order_of_accuracy(warmup):
    """The memory method against theta - h [u + h M] (ademamix_math, exact HVP, lambda = 0.1): the error is
    O(h^2) with M and O(h) without, over a fixed horizon (docs/THEORY.md section 7's experiment)."""
    betas, alpha, eps, wd = (0.7, 0.8, 0.9), 1.0, 0.1, 0.1
    aw, bw = WARMUPS[warmup]
    rule = rules.ademamix(betas, alpha, eps, wd, alpha_warmup=aw, beta3_warmup=bw)
    result = order_of_accuracy(with_memory(rule, tol=1e-12),
                               {"without": memoryless_steps(betas, alpha, eps, wd, (aw, bw), 0.0),
                                "with": memoryless_steps(betas, alpha, eps, wd, (aw, bw), 1.0)},
                               logistic(), create_graph=True)
    with_m, without_m = result.slopes("with"), result.slopes("without")
    assert with_m[-1] >= 1.8, (result.errors, with_m)
    assert 0.8 <= without_m[-1] <= 1.2, (result.errors, without_m)
    assert result.errors["with"][-1] < 0.2 * result.errors["without"][-1]


def step_residuals(h, betas, alpha, eps, warmups, horizon=0.3):
    """Along the memory trajectory: the largest |F - u| and |F - u - h M| of any element at any step, from the
    step's own diagnostics (exact HVP of u)."""
    problem = logistic()
    theta, track = problem.theta0.clone(), AdEMAMixAges(*betas, alpha, *warmups)
    states = (torch.zeros_like(theta),) * 3
    memory = residual = 0.0
    for _ in range(round(horizon / h)):
        x = theta.clone().requires_grad_(True)
        g = torch.autograd.grad(problem.loss(x), x, create_graph=True)[0]
        d = ademamix_math.ademamix_direction(theta, g.detach(), eps=eps, weight_decay=0.0, alpha=track.alpha_n,
                                             slow_sum=track.slow_sum)
        hd = torch.autograd.grad(g, x, d)[0]
        out = ademamix_math.ademamix(theta, g.detach(), *states, hd, lr=h, eps=eps, weight_decay=0.0,
                                     correction=0.0, correction_limit=math.inf, memoryless=False, **scalars(track))
        theta, states = out.p, out.states
        track.advance()
        memory = max(memory, float(out.diag[2].max().sqrt()))
        residual = max(residual, float(out.diag[3].max().sqrt()))
    return memory, residual


@pytest.mark.parametrize("warmup", ["none", "both"])
def test_step_residual_is_second_order(warmup):
    """F = u + h M + O(h^2) at every step (lambda = 0, where M is exact at every n): halving h halves F - u
    and quarters F - u - h M."""
    runs = [step_residuals(h, (0.8, 0.9, 0.95), 2.0, 0.1, WARMUPS[warmup]) for h in (0.002, 0.001, 0.0005)]
    memory = [runs[i][0] / runs[i + 1][0] for i in range(2)]
    residual = [runs[i][1] / runs[i + 1][1] for i in range(2)]
    assert 1.7 < memory[-1] < 2.5, (runs, memory)
    assert residual[-1] > 3.5, (runs, residual)


# ---------------------------------------------------------------- pytorch-optimizer's AdEMAMix


def test_schedules_are_pytorch_optimizers():
    """The warm-ups at t = n + 1, bit for bit, through the cap and beyond."""
    for warmup in (7, 7.5, 100):
        for n in range(3 * math.ceil(warmup)):
            assert ademamix_alpha(n, 5.0, warmup) == pytorch_optimizer.AdEMAMix.schedule_alpha(warmup, n + 1, 5.0)
            assert ademamix_beta3(n, 0.9, 0.9999, warmup) == pytorch_optimizer.AdEMAMix.schedule_beta3(
                warmup, n + 1, 0.9, 0.9999)
    assert ademamix_alpha(3, 5.0, None) == 5.0 and ademamix_beta3(3, 0.9, 0.9999, None) == 0.9999
    assert ademamix_beta3(0, 0.9, 0.9999, 1e13) == pytest.approx(0.9, rel=1e-8)  # beta_start = beta1


def small_model(dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).to(dtype)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("warmup", [None, 20])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_steps_equal_pytorch_optimizer(dtype, warmup, foreach):
    """50 steps of a 5-4-3 tanh MLP (four tensors), weight decay 0.1 decoupled: the parameters after every step."""
    betas, alpha, eps, wd, lr = (0.9, 0.99, 0.999), 5.0, 1e-8, 0.1, 1e-2
    theirs, ours = small_model(dtype), small_model(dtype)
    opt = pytorch_optimizer.AdEMAMix(theirs.parameters(), lr=lr, betas=betas, alpha=alpha, eps=eps,
                                     weight_decay=wd, weight_decouple=True, t_alpha_beta3=warmup, foreach=foreach)
    params = list(ours.parameters())
    states = [(torch.zeros_like(p),) * 3 for p in params]
    track = AdEMAMixAges(*betas, alpha, warmup, warmup)
    gen = torch.Generator().manual_seed(1)
    rtol, atol = (1e-12, 1e-14) if dtype == torch.float64 else (1e-5, 1e-7)
    for _ in range(50):
        x, y = torch.randn(16, 5, generator=gen, dtype=dtype), torch.randn(16, 3, generator=gen, dtype=dtype)
        opt.zero_grad()
        torch.nn.functional.mse_loss(theirs(x), y).backward()
        opt.step()
        grads = torch.autograd.grad(torch.nn.functional.mse_loss(ours(x), y), params)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                out = ademamix_math.ademamix(p, g, *states[i], None, lr=lr, eps=eps, weight_decay=wd, correction=0.0,
                                             correction_limit=0.5, memoryless=False, **scalars(track))
                p.copy_(out.p)
                states[i] = out.states
        track.advance()
        for p, q in zip(params, theirs.parameters()):
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
    for s, p in zip(states, theirs.parameters()):  # the states too, in the brief's order (m1, m2, v)
        st = opt.state[p]
        for mine, key in zip(s, ("exp_avg", "exp_avg_slow", "exp_avg_sq")):
            torch.testing.assert_close(mine, st[key], rtol=rtol, atol=atol)


@pytest.mark.parametrize("warmup", [None, 7])
def test_rule_with_memory_is_pytorch_optimizer(warmup):
    """The engine's rule (m2's weights from the schedule's betas) steps as pytorch-optimizer does."""
    betas, alpha, eps, wd = (0.8, 0.9, 0.95), 2.0, 0.1, 0.1
    rule = rules.ademamix(betas, alpha, eps, wd, alpha_warmup=warmup, beta3_warmup=warmup)
    problem = logistic()
    ours = trajectory(with_memory(rule, tol=TOL), problem, 0.05, 2.0)  # 40 steps
    theirs = trajectory(lambda ps, lr: pytorch_optimizer.AdEMAMix(ps, lr, betas=betas, alpha=alpha, eps=eps,
                                                                  weight_decay=wd, weight_decouple=True,
                                                                  t_alpha_beta3=warmup), problem, 0.05, 2.0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- the coefficient track

FIELDS = ("bias_correction1", "bias_correction2", "slow_sum", "mean_age1", "mean_age2", "slow_age")
TRACK_CONFIGS = [((0.9, 0.999, 0.9999), 5.0), ((0.8, 0.9, 0.95), 2.0), ((0.9, 0.9999, 0.999), 8.0),
                 ((0.0, 0.5, 0.9), 1.0), ((0.9, 0.99, 0.0), 3.0), ((0.9, 0.999, 0.9999), 0.0)]


def stepped(track: AdEMAMixAges, steps) -> dict[int, dict[str, float]]:
    out = {}
    for n in sorted(steps):
        while track.n < n:
            track.advance()
        out[n] = {f: getattr(track, f) for f in FIELDS}
    return out


def close(actual: float, expected: float, rel: float) -> bool:
    return math.isclose(actual, expected, rel_tol=rel, abs_tol=1e-300)


@pytest.mark.parametrize("config", range(len(TRACK_CONFIGS)))
def test_track_is_the_brute_force_sum(config):
    betas, alpha = TRACK_CONFIGS[config]
    for warmups in ((None, None), (30, 30), (None, 12.5)):
        if warmups[1] is not None and 0.0 in betas[::2]:
            continue  # the beta3 warm-up needs beta1, beta3 > 0 (test_track_bad_input)
        for n, got in stepped(AdEMAMixAges(*betas, alpha, *warmups), (0, 1, 2, 10, 100, 1000)).items():
            b = brute_force(betas, alpha, n, warmups)
            expected = dict(bias_correction1=b["Z1"], bias_correction2=b["Z2"], slow_sum=b["S"],
                            mean_age1=b["P1"] / b["c"], mean_age2=b["P2"] / b["c"], slow_age=b["P3"] / b["c"])
            for f in FIELDS:
                assert close(got[f], expected[f], 1e-12), (warmups, n, f, got[f], expected[f])


def test_track_limits():
    """c constant: the ages are AdamW's mean ages and the slow EMA's, beta / (1 - beta); S -> 1."""
    track = replay(AdEMAMixAges(0.8, 0.9, 0.95, 2.0, 30, 30), 2000)
    assert close(track.slow_sum, 1.0, 1e-14) and track.update_scale == pytest.approx(3.0, rel=1e-14)
    for age, beta in ((track.mean_age1, 0.8), (track.mean_age2, 0.9), (track.slow_age, 0.95)):
        assert close(age, beta / (1 - beta), 1e-12)


# Relative agreement of the three evaluations. Where the slow EMA's beta is 0.9999 two bounds are wider, as for
# AdamW's EMAAge (tests/test_coefficients.py): 10^6 steps of the recursion drift by eps / (1 - beta3) from its
# fixed point (measured 1.6e-12 from the replay, which lands within 2e-13 of beta3 / (1 - beta3)); the closed
# form's sums lose eps / (n (1 - beta3)) at n <= 10 (measured 9.6e-12 at n = 3).
REL = 1e-12


@pytest.mark.parametrize("config", range(len(TRACK_CONFIGS)))
def test_recursion_replay_and_closed_form_agree(config):
    betas, alpha = TRACK_CONFIGS[config]
    slow = max(betas) >= 0.9999
    steps = (0, 1, 10, 1000, 10**6)
    for n, rec in stepped(AdEMAMixAges(*betas, alpha), steps).items():
        jumped = replay(replay(AdEMAMixAges(*betas, alpha), min(n, 7)), n)  # from step 0 or part of the way
        closed = dict(zip(FIELDS, ademamix_ages_at(*betas, alpha, torch.tensor(float(n), dtype=F64))))
        for f in FIELDS:
            assert close(getattr(jumped, f), rec[f], 3e-12 if slow and n == 10**6 else REL), (n, f)
            assert close(closed[f].item(), getattr(jumped, f), 3e-11 if slow and n <= 10 else REL), (n, f)
        assert closed["bias_correction1"].item() == rec["bias_correction1"]  # both 1 - beta1^(n+1)


def test_replay_steps_through_the_warmups():
    """No constant matrix while a warm-up runs: replay advances through it step by step, then jumps."""
    warmups = (300, 250.5)
    reference = stepped(AdEMAMixAges(0.9, 0.999, 0.9999, 5.0, *warmups), (5000,))[5000]
    track = replay(AdEMAMixAges(0.9, 0.999, 0.9999, 5.0, *warmups), 5000)
    assert track.steady_from == 301
    for f in FIELDS:
        assert close(getattr(track, f), reference[f], REL), f
    assert not close(track.slow_age, replay(AdEMAMixAges(0.9, 0.999, 0.9999, 5.0), 5000).slow_age, 1e-3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta3=1.0), "beta3 must be in"), (dict(beta1=-0.1), "beta1 must be in"), (dict(alpha=-1.0), "alpha"),
    (dict(alpha=math.nan), "alpha"), (dict(alpha_warmup=0.0), "alpha_warmup"),
    (dict(beta3_warmup=math.inf), "beta3_warmup"), (dict(beta1=0.0, beta3_warmup=10), "both must be > 0")])
def test_track_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdEMAMixAges(**{**dict(beta1=0.9, beta2=0.999, beta3=0.9999, alpha=5.0), **kwargs})


# ---------------------------------------------------------------- limit, memoryless mode and the penalty


def random_step(**overrides):
    """One step on random tensors with hand-set scalars and an HVP that makes some terms limited."""
    gen = torch.Generator().manual_seed(3)
    p, g, m1, m2, hvp = (torch.randn(200, generator=gen, dtype=F64) for _ in range(5))
    v = torch.rand(200, generator=gen, dtype=F64)
    kwargs = dict(lr=0.1, beta1=0.9, beta2=0.999, beta3=0.9999, alpha=5.0, eps=1e-3, weight_decay=0.1,
                  bias_correction1=0.5, bias_correction2=0.01, slow_sum=0.2, mean_age1=3.0, mean_age2=40.0,
                  slow_age=90.0, correction=-1.0, correction_limit=0.5, memoryless=False)
    kwargs.update(overrides)
    return (p, g, m1, m2, v, 0.01 * hvp), kwargs


@pytest.mark.parametrize("memoryless", [False, True])
def test_limit_bounds_the_correction_by_the_update(memoryless):
    """As reference.adamw: the term correction lr^2 M is clipped to kappa lr |F| (|u| memoryless), the step
    without it is untouched, and the diagnostics count the clipped elements."""
    inputs, kwargs = random_step(memoryless=memoryless)
    limited = ademamix_math.ademamix(*inputs, **kwargs)
    unlimited = ademamix_math.ademamix(*inputs, **{**kwargs, "correction_limit": math.inf})
    plain = ademamix_math.ademamix(*inputs, **{**kwargs, "correction": 0.0})
    lr, kappa = kwargs["lr"], kwargs["correction_limit"]
    if memoryless:
        update = ademamix_math.ademamix_direction(inputs[0], inputs[1], eps=kwargs["eps"],
                                                  weight_decay=kwargs["weight_decay"], alpha=kwargs["alpha"],
                                                  slow_sum=kwargs["slow_sum"])
    else:
        update = torch.sqrt(plain.diag[0])  # |F|
    bound = kappa * lr * update.abs()
    term = kwargs["correction"] * lr * lr * unlimited.M
    torch.testing.assert_close(limited.p, plain.p - torch.clamp(term, -bound, bound), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(unlimited.p, plain.p - term, rtol=1e-14, atol=1e-15)
    count = int((term.abs() > bound).sum())
    assert 0 < count < 200 and float(limited.diag[6].sum()) == count


def test_memoryless_mode_steps_with_the_memoryless_update():
    """F with the states every past gradient = g would have is u (memory_sq = 0), and memoryless mode
    steps theta - lr (u + correction lr M) with u = ademamix_direction."""
    gen = torch.Generator().manual_seed(4)
    p, g, hvp = (torch.randn(50, generator=gen, dtype=F64) for _ in range(3))
    track = replay(AdEMAMixAges(0.8, 0.9, 0.95, 2.0, 7, 7), 5)
    previous = replay(AdEMAMixAges(0.8, 0.9, 0.95, 2.0, 7, 7), 4)
    kwargs = dict(lr=0.05, eps=0.1, weight_decay=0.1, correction=-1.0, correction_limit=math.inf, **scalars(track))
    states = (previous.bias_correction1 * g, previous.slow_sum * g, previous.bias_correction2 * g * g)
    out = ademamix_math.ademamix(p, g, *states, hvp, memoryless=False, **kwargs)
    assert float(out.diag[2].max()) < 1e-28  # (F - u)^2
    u = ademamix_math.ademamix_direction(p, g, eps=0.1, weight_decay=0.1, alpha=track.alpha_n,
                                         slow_sum=track.slow_sum)
    same = ademamix_math.ademamix(p, g, torch.zeros_like(g), torch.zeros_like(g), torch.zeros_like(g), hvp,
                                  memoryless=True, **kwargs)
    torch.testing.assert_close(same.p, p - 0.05 * (u - 0.05 * same.M), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(same.M, out.M, rtol=0, atol=0)  # M depends on theta and g only


@pytest.mark.parametrize("n", [3, 10**6])
def test_penalty_is_the_modified_loss_to_leading_order(n):
    """u + h M = (c / a) grad(L + R) + h c B eps / a^2 H u, R = penalty_prefactor * Psi_eps(g) (lambda = 0): the
    residual shrinks like eps; with AdamW's prefactor h (A1 - B) (the slow EMA left out) it does not."""
    track = replay(AdEMAMixAges(0.9, 0.999, 0.9999, 5.0), n)
    theta = torch.tensor([0.3, -0.7, 1.1], dtype=F64, requires_grad=True)

    def loss(t):
        return torch.log(torch.cosh(2 * t[0] - t[1])) + 0.5 * t[1] ** 2 + 0.1 * t[0] ** 4 + t[2] ** 2 * t[0]

    g = torch.autograd.grad(loss(theta), theta, create_graph=True)[0]
    h, c = 1e-3, track.update_scale
    prefactor = ademamix_math.penalty_prefactor(h, track.alpha_n, track.slow_sum, track.mean_age1, track.mean_age2,
                                                track.slow_age)
    adamw_prefactor = h * (track.mean_age1 - track.mean_age2)

    def residual(eps, pre):
        a = g.detach().abs() + eps
        u = ademamix_math.ademamix_direction(theta.detach(), g.detach(), eps=eps, weight_decay=0.0,
                                             alpha=track.alpha_n, slow_sum=track.slow_sum)
        hu = torch.autograd.grad(g, theta, u, retain_graph=True)[0]
        zeros = torch.zeros_like(u)
        M = ademamix_math.ademamix(theta.detach(), g.detach(), zeros, zeros, zeros, hu, lr=h, eps=eps,
                                   weight_decay=0.0, correction=1.0, correction_limit=math.inf, memoryless=True,
                                   **scalars(track)).M
        psi = (g.abs() - eps * torch.log1p(g.abs() / eps)).sum()
        grad_psi = torch.autograd.grad(psi, theta, retain_graph=True)[0]
        rest = u + h * M - c / a * (g.detach() + pre * grad_psi)
        if pre == prefactor:  # the identity itself, to the rounding of terms of size c / a |g| ~ 10
            torch.testing.assert_close(rest, h * c * track.mean_age2 * eps / a ** 2 * hu, rtol=0.0, atol=1e-12)
        return float(rest.norm())

    ours = [residual(eps, prefactor) for eps in (1e-4, 1e-5)]
    assert ours[0] / ours[1] > 9.0
    if n == 10**6:  # the paper's betas, steady state: K = 9 + 5 * 9999 - 6 * 999 > 0: memory regularizes
        assert prefactor == pytest.approx(h * 44010, rel=1e-9) and adamw_prefactor < 0
        assert residual(1e-5, adamw_prefactor) > 100 * ours[1]
