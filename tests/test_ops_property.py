"""Property tests: each op equals an independent float64 evaluation of docs/THEORY.md's formulas.

The expected values are written here from docs/THEORY.md sections 2-6 (not taken
from memkernels.reference) and evaluated in float64 together with a bound on
the error that computing them in the kernel's precision may make (fp32 for
fp32/bf16/fp16 params, fp64 for fp64): every operation adds its rounding
(unit roundoff times the result) and propagates the errors of its operands.
An actual value must lie within SAFETY times that bound, plus the rounding of
the dtype it is stored in. The bound makes the tolerance honest where a fixed
rtol is not: cancellation (m - g, F - u, g_ref - g) is where kernels may differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import memkernels  # noqa: F401  (registers torch.ops.memkernels)

F64 = torch.float64
SAFETY = 4.0  # the kernel's order of operations may round a few times more often than the one below
NDIAG = 7
PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------- float64 values with error bounds

class Num:
    """A float64 tensor and a bound on the absolute error of computing it with unit roundoff u."""

    def __init__(self, v: Tensor, e: Tensor | float, u: float) -> None:
        self.v, self.e, self.u = v, torch.as_tensor(e, dtype=F64).expand_as(v), u

    def lift(self, x: Num | float) -> Num:
        if isinstance(x, Num):
            return x
        value = torch.tensor(float(x), dtype=F64)
        return Num(value, self.u * abs(float(x)), self.u)  # a scalar argument is rounded to the compute dtype

    def rounded(self, v: Tensor, e: Tensor) -> Num:
        return Num(v, e + self.u * v.abs(), self.u)

    def __add__(self, other: Num | float) -> Num:
        o = self.lift(other)
        return self.rounded(self.v + o.v, self.e + o.e)

    __radd__ = __add__

    def __neg__(self) -> Num:
        return Num(-self.v, self.e, self.u)

    def __sub__(self, other: Num | float) -> Num:
        return self + (-self.lift(other))

    def __rsub__(self, other: float) -> Num:
        return self.lift(other) - self

    def __mul__(self, other: Num | float) -> Num:
        o = self.lift(other)
        return self.rounded(self.v * o.v, self.v.abs() * o.e + o.v.abs() * self.e + self.e * o.e)

    __rmul__ = __mul__

    def __truediv__(self, other: Num | float) -> Num:
        o = self.lift(other)
        v = self.v / o.v
        return self.rounded(v, (self.e + v.abs() * o.e) / (o.v.abs() - o.e).clamp_min(1e-300))

    def __rtruediv__(self, other: float) -> Num:
        return self.lift(other) / self

    def abs(self) -> Num:
        return Num(self.v.abs(), self.e, self.u)

    def sqrt(self) -> Num:
        v = self.v.sqrt()
        lower = (self.v - self.e).clamp_min(0.0).sqrt()
        e = torch.minimum(self.e.sqrt(), self.e / (v + lower).clamp_min(1e-300))
        return self.rounded(v, e)

    def log1p(self) -> Num:
        return self.rounded(self.v.log1p(), self.e / (1.0 + self.v - self.e).clamp_min(1e-300))

    def sign(self) -> Num:
        """Exact unless the value is within its error of 0: then either sign may come out (error 2)."""
        ambiguous = (self.v.abs() <= SAFETY * self.e) & (self.e > 0)
        return Num(self.v.sign(), ambiguous.to(F64) * 2.0, self.u)

    def differs_in_sign(self, other: Num) -> Num:
        """The indicator sign(self) != sign(other) (0 or 1), uncertain where either sign is."""
        a, b = self.sign(), other.sign()
        return Num((a.v != b.v).to(F64), ((a.e + b.e) > 0).to(F64), self.u)


def ema(beta: float, old: Num, new: Num, lerp: bool = False) -> Num:
    """beta old + (1 - beta) new. A first moment may be computed as torch's lerp, old + (1 - beta)(new - old),
    whose intermediate new - old rounds at the scale of |old| + |new| even when the result is small."""
    x = beta * old + (1.0 - beta) * new
    return Num(x.v, x.e + 2 * x.u * (old.v.abs() + new.v.abs()), x.u) if lerp else x


def zeros_like(x: Num) -> Num:
    return Num(torch.zeros_like(x.v), 0.0, x.u)


# ---------------------------------------------------------------- docs/THEORY.md's formulas, one element-wise step

@dataclass
class Expected:
    p: Num
    states: list[Num]
    g_raw: Num  # what the trajectory mode stores as the next reference gradient
    diag: list[Num]  # update_sq, correction_sq, memory_sq, residual_sq, penalty, sign_flips, limited


def memory_terms(F: Num, u: Num, M: Num, lr: float, penalty: Num, flips: Num, limited: Num) -> list[Num]:
    """Section 6: |F|^2, |h M|^2, |F - u|^2 (memory effect), |F - u - h M|^2 (unexplained), R's summand, flips,
    and whether the correction was limited (section 9)."""
    hM = lr * M
    memory = F - u
    residual = memory - hM
    return [F * F, hM * hM, memory * memory, residual * residual, penalty, flips, limited]


def moved(p: Num, lr: float, update: Num, M: Num, correction: float, kappa: float) -> tuple[Num, Num]:
    """p - h update - alpha h^2 M, the last term at most kappa h |update| per element (section 9: update is F,
    or u in memoryless mode); and the indicator of where it was limited. alpha = 0 leaves M out entirely. Where |term| is within its error
    of the bound either outcome may come out: the two differ by at most that error."""
    p = p - lr * update
    if correction == 0.0:
        return p, zeros_like(p)
    term = (correction * lr * lr) * M
    if math.isinf(kappa):  # a bound of inf (or NaN where update = 0) limits nothing
        return p - term, zeros_like(p)
    bound = (kappa * lr) * update.abs()
    limited = term.v.abs() > bound.v  # NaN: not limited
    # either outcome where the two are within their errors, or where both are below the compute dtype's smallest
    # normal number (the error model is relative: a scalar that underflows to 0 in the kernel is not modelled)
    tiny = torch.finfo(F64 if p.u < 1e-10 else torch.float32).tiny
    ambiguous = (((term.v.abs() - bound.v).abs() <= SAFETY * (term.e + bound.e))
                 | (torch.maximum(term.v.abs(), bound.v) < tiny)).to(F64)
    clipped = Num(torch.where(limited, torch.where(term.v < 0, -bound.v, bound.v), term.v),
                  torch.where(limited, bound.e, term.e) + ambiguous * (term.e + bound.e), p.u)
    return p - clipped, Num(limited.to(F64), ambiguous, p.u)


def adamw_step(p: Num, g: Num, states: list[Num], hvp: Num | None, kw: dict) -> Expected:
    """Section 3: AdamW (or Adam + L2), eps outside or inside the sqrt, bias-corrected EMAs."""
    exp_avg, exp_avg_sq = states
    lam, eps = kw["weight_decay"], kw["eps"]
    g_raw = g
    if not kw["decoupled"]:
        g = g + lam * p  # g~
    m = ema(kw["beta1"], exp_avg, g, lerp=True)
    v = ema(kw["beta2"], exp_avg_sq, g * g)
    decay = lam * p if kw["decoupled"] else zeros_like(p)
    if kw["eps_inside_sqrt"]:
        denom = (v / kw["bias_correction2"] + eps).sqrt()
        a = (g * g + eps).sqrt()
        coef = kw["mean_age1"] / a - kw["mean_age2"] * (g * g) / (a * a * a)
        penalty = a
    else:
        denom = (v / kw["bias_correction2"]).sqrt() + eps
        a = g.abs() + eps
        coef = kw["mean_age1"] / a - kw["mean_age2"] * g.abs() / (a * a)
        penalty = g.abs() - eps * (g.abs() / eps).log1p()
    F = (m / kw["bias_correction1"]) / denom + decay
    u = g / a + decay
    if hvp is None:
        M = zeros_like(p)
    else:
        M = coef * (hvp if kw["decoupled"] else hvp + lam * u)  # H~ u = H u + lambda u
    update = u if kw["memoryless"] else F
    p_new, limited = moved(p, kw["lr"], update, M, kw["correction"], kw["correction_limit"])
    return Expected(p_new, [m, v], g_raw, memory_terms(F, u, M, kw["lr"], penalty, zeros_like(p), limited))


def lion_step(p: Num, g: Num, states: list[Num], hvp: Num | None, kw: dict) -> Expected:
    """Section 4: Lion with phi = sign or the smooth sign x / sqrt(x^2 + smoothing)."""
    (exp_avg,) = states
    s, lam = kw["smoothing"], kw["weight_decay"]

    def phi(x: Num) -> Num:
        return x.sign() if s == 0.0 else x / (x * x + s).sqrt()

    c = ema(kw["beta1"], exp_avg, g)  # c_n
    wg = kw["ema_weight"] * g  # W_n g
    F = phi(c) + lam * p
    u = phi(wg) + lam * p
    if hvp is None:
        M = zeros_like(p)
    elif s == 0.0:
        M = zeros_like(p)  # phi' = 0 away from 0
    else:
        x2s = wg * wg + s
        M = (s / (x2s * x2s.sqrt())) * kw["age_weight"] * hvp  # phi'(W g) C_n (H u)
    m = ema(kw["beta2"], exp_avg, g, lerp=True)
    penalty = (wg * wg + s).sqrt()
    update = u if kw["memoryless"] else F
    p_new, limited = moved(p, kw["lr"], update, M, kw["correction"], kw["correction_limit"])
    return Expected(p_new, [m], g, memory_terms(F, u, M, kw["lr"], penalty, c.differs_in_sign(g), limited))


def sgd_step(p: Num, g: Num, states: list[Num], hvp: Num | None, kw: dict) -> Expected:
    """Section 2: heavy ball b = mu b + g~ (dampening 0), Nesterov g~ + mu b, M = c_n H~ g~."""
    g_raw = g
    g = g + kw["weight_decay"] * p
    new_states = []
    if states:
        b = kw["momentum"] * states[0] + g
        F = g + kw["momentum"] * b if kw["nesterov"] else b
        new_states = [b]
    else:
        F = g
    u = kw["update_scale"] * g
    M = zeros_like(p) if hvp is None else kw["memory_coef"] * (hvp + kw["weight_decay"] * g)
    update = u if kw["memoryless"] else F
    p_new, limited = moved(p, kw["lr"], update, M, kw["correction"], kw["correction_limit"])
    return Expected(p_new, new_states, g_raw, memory_terms(F, u, M, kw["lr"], 0.5 * (g * g), zeros_like(p),
                                                            limited))


# ---------------------------------------------------------------- the cases

@dataclass
class Case:
    op: str
    dtype: torch.dtype
    params: list[Tensor]
    grads: list[Tensor]
    states: list[list[Tensor]]
    grad_refs: list[Tensor]
    diagnostics: Tensor | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    origins: list[Tensor] = field(default_factory=list)  # theta, when params hold the probe point
    hvps: list[Tensor] = field(default_factory=list)  # kept estimates of H d: stored, or reused


SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 3, 4), (33,)]
STEP_FNS: dict[str, Callable[..., Expected]] = {"adamw": adamw_step, "lion": lion_step, "sgd": sgd_step}
SMALL = [0.0, 0.5, 0.9, 0.99, 0.999]


def hyperparameters(op: str) -> st.SearchStrategy[dict]:
    lr = st.floats(1e-4, 1.0)
    common = dict(lr=lr, weight_decay=st.sampled_from([0.0, 0.01, 0.3]),
                  correction=st.sampled_from([0.0, 1.0, -1.0, 0.5]),
                  correction_limit=st.sampled_from([0.5, math.inf, 1e-3, 10.0]),
                  hvp_scale=st.sampled_from([0.0, 1.0, 100.0]), maximize=st.booleans(),
                  memoryless=st.booleans(), update_grad_refs=st.booleans())
    if op == "adamw":
        return st.fixed_dictionaries(dict(
            common, beta1=st.sampled_from(SMALL), beta2=st.sampled_from(SMALL),
            eps=st.sampled_from([1e-8, 1e-6, 1e-3, 0.1, 1.0]),
            bias_correction1=st.floats(0.01, 1.0), bias_correction2=st.floats(0.001, 1.0),
            mean_age1=st.floats(0.0, 100.0), mean_age2=st.floats(0.0, 1000.0),
            decoupled=st.booleans(), eps_inside_sqrt=st.booleans()))
    if op == "lion":
        return st.fixed_dictionaries(dict(
            common, beta1=st.sampled_from(SMALL), beta2=st.sampled_from(SMALL),
            smoothing=st.sampled_from([0.0, 1e-4, 0.0025, 0.1]), ema_weight=st.floats(0.01, 1.0),
            age_weight=st.floats(0.0, 100.0)))
    return st.fixed_dictionaries(dict(
        common, momentum=st.sampled_from(SMALL), nesterov=st.booleans(),
        update_scale=st.floats(1.0, 1000.0), memory_coef=st.floats(0.0, 1e4)))


@st.composite
def cases(draw, op: str) -> Case:
    dtype = draw(st.sampled_from(PARAM_DTYPES))
    kw = draw(hyperparameters(op))
    n_states = {"adamw": 2, "lion": 1, "sgd": 1}[op]
    state_dtypes = [draw(st.sampled_from([dtype, torch.float32, F64])) for _ in range(n_states)]
    ref_dtype = draw(st.sampled_from([dtype, torch.float32, F64]))
    shapes = draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3))  # empty lists: see the end
    transpose = draw(st.booleans())  # 2-D tensors as transposed (dense, non-contiguous) views
    has_refs = kw["correction"] != 0.0 or draw(st.booleans())
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 4.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))

    def tensor(shape, dt, kind="normal"):
        base = shape[::-1] if transpose and len(shape) == 2 else shape
        x = scale * torch.randn(base, generator=gen, dtype=F64)
        if kind == "grad":
            x[torch.rand(base, generator=gen) < 0.15] = 0.0  # g = 0 edge values
        if kind == "square":
            x = x * x
        x = x.to(dt)
        return x.t() if transpose and len(shape) == 2 else x

    params = [tensor(s, dtype) for s in shapes]
    grads = [tensor(s, dtype, "grad") for s in shapes]
    kinds = {"adamw": ["normal", "square"], "lion": ["normal"], "sgd": ["normal"]}[op]
    states = [[tensor(s, dt, kind) for s in shapes] for kind, dt in zip(kinds, state_dtypes)]
    if op == "sgd" and kw["momentum"] == 0.0 and draw(st.booleans()):
        states = [[]]  # no momentum buffers: F = g~
    grad_refs = [tensor(s, ref_dtype) for s in shapes] if has_refs else []
    origins = [tensor(s, dtype) for s in shapes] if draw(st.booleans()) else []
    hvps: list[Tensor] = []
    if has_refs and draw(st.booleans()):  # reuse kept estimates instead of reading grad_refs, or store them
        kw["reuse_hvp"] = draw(st.booleans())
        hvps = [tensor(s, state_dtypes[0]) for s in shapes]
        grad_refs = [] if kw["reuse_hvp"] else grad_refs
    diagnostics = torch.randn(NDIAG, generator=gen, dtype=F64) if draw(st.booleans()) else None
    kw["grad_scale"] = draw(st.sampled_from([None, 1024.0, 3.0]))
    kw["found_inf"] = draw(st.sampled_from([None, 0.0, 1.0]))
    for name in ("grad_scale", "found_inf"):
        if kw[name] is not None:
            kw[name] = torch.tensor(kw[name], dtype=torch.float32)
    return Case(op, dtype, params, grads, states, grad_refs, diagnostics, kw, origins, hvps)


# ---------------------------------------------------------------- the comparison

def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def load(t: Tensor, u: float) -> Num:
    """A stored tensor read into the compute dtype: exact unless it is stored more precisely (fp64 in fp32)."""
    v = t.to(F64)
    exact = torch.finfo(t.dtype).eps >= 2 * u
    return Num(v, 0.0 if exact else u * v.abs(), u)


def assert_within(actual: Tensor, expected: Num, what: str) -> None:
    """|actual - expected| <= SAFETY * bound + the rounding of actual's dtype (one ulp, subnormals included)."""
    info = torch.finfo(actual.dtype)
    a = actual.to(F64)
    err = SAFETY * expected.e
    tol = err + info.eps * torch.maximum(expected.v.abs() + err, torch.tensor(info.tiny, dtype=F64))
    ok = (a - expected.v).abs() <= tol
    # beyond the dtype's range (fp16 tops out at 65504) the write-back rounds to inf of the same sign
    overflow = (expected.v.abs() + tol > info.max) & a.isinf() & (a.sign() * expected.v.sign() > 0)
    bad = ~(ok | overflow)
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} elements off; first at {i}: "
                             f"actual {a.reshape(-1)[i].item()!r}, expected {expected.v.reshape(-1)[i].item()!r} "
                             f"+- {tol.reshape(-1)[i].item():.3g}")


def expected_of(case: Case) -> tuple[list[Expected], list[Num]]:
    kw = case.kwargs
    u = unit_roundoff(F64 if case.dtype == F64 else torch.float32)
    inv_scale = 1.0 if kw["grad_scale"] is None else 1.0 / kw["grad_scale"].item()

    def processed(raw: Tensor) -> Num:
        """Unscaled (AMP) and oriented so that the optimizer descends."""
        g = load(raw, u)
        if inv_scale != 1.0:
            g = g * inv_scale
        return -g if kw["maximize"] else g

    out, estimates = [], []
    for i, p in enumerate(case.params):
        g = processed(case.grads[i])
        states = [load(lst[i], u) for lst in case.states if lst]
        hvp = None
        if kw.get("reuse_hvp"):
            hvp = load(case.hvps[i], u)
        elif case.grad_refs:
            g_ref = load(case.grad_refs[i], u) if kw["update_grad_refs"] else processed(case.grad_refs[i])
            hvp = (g_ref - g) * kw["hvp_scale"]
            estimates.append(hvp)
        scalars = {k: v for k, v in kw.items() if k not in ("grad_scale", "found_inf", "maximize", "reuse_hvp")}
        theta = case.origins[i] if case.origins else p
        out.append(STEP_FNS[case.op](load(theta, u), g, states, hvp, scalars))
    diag = []
    for k in range(NDIAG):
        total = sum((x.diag[k].v.sum() for x in out), torch.tensor(0.0, dtype=F64))
        bound = sum((x.diag[k].e.sum() for x in out), torch.tensor(0.0, dtype=F64))
        magnitude = sum((x.diag[k].v.abs().sum() for x in out), torch.tensor(0.0, dtype=F64))
        diag.append(Num(total, bound + 1e-12 * magnitude, u))
    return out, diag, estimates


def clone_all(case: Case) -> dict[str, Any]:
    return {"params": [t.clone() for t in case.params], "grads": [t.clone() for t in case.grads],
            "states": [[t.clone() for t in lst] for lst in case.states],
            "grad_refs": [t.clone() for t in case.grad_refs], "origins": [t.clone() for t in case.origins],
            "hvps": [t.clone() for t in case.hvps],
            "diagnostics": None if case.diagnostics is None else case.diagnostics.clone()}


def check_case(case: Case) -> None:
    before = clone_all(case)
    expected, diag, estimates = expected_of(case)
    op = getattr(torch.ops.memkernels, case.op + "_")
    op(case.params, case.grads, *case.states, case.grad_refs, case.diagnostics, backend="reference",
       origins=case.origins, hvps=case.hvps, **case.kwargs)
    kw = case.kwargs
    for i, (a, b) in enumerate(zip(case.grads, before["grads"])):
        assert torch.equal(a, b), f"grads[{i}] was written"
    assert all(torch.equal(a, b) for a, b in zip(case.origins, before["origins"])), "origins were written"
    if kw["found_inf"] is not None and kw["found_inf"].item() != 0.0:
        after = clone_all(case)  # AMP found an inf: nothing at all may change
        for name in ("params", "grad_refs", "hvps"):
            assert all(torch.equal(a, b) for a, b in zip(after[name], before[name])), name
        for lst, old in zip(after["states"], before["states"]):
            assert all(torch.equal(a, b) for a, b in zip(lst, old)), "states"
        assert case.diagnostics is None or torch.equal(case.diagnostics, before["diagnostics"])
        return
    for i, x in enumerate(expected):
        assert_within(case.params[i], x.p, f"params[{i}]")
        for j, lst in enumerate(lst for lst in case.states if lst):
            assert_within(lst[i], x.states[j], f"state {j}[{i}]")
        if case.grad_refs:
            if kw["update_grad_refs"]:
                assert_within(case.grad_refs[i], x.g_raw, f"grad_refs[{i}] (trajectory write)")
            else:
                assert torch.equal(case.grad_refs[i], before["grad_refs"][i]), f"grad_refs[{i}] was written"
    for i, h in enumerate(case.hvps):
        if kw["reuse_hvp"]:
            assert torch.equal(h, before["hvps"][i]), f"hvps[{i}] was written"
        else:
            assert_within(h, estimates[i], f"hvps[{i}] (stored estimate)")
    if case.diagnostics is not None:
        prior = before["diagnostics"]
        for k, d in enumerate(diag):
            total = Num(prior[k] + d.v, d.e + 1e-15 * prior[k].abs(), d.u)
            assert_within(case.diagnostics[k], total, f"diagnostics[{k}]")


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(case=cases("adamw"))
def test_adamw_matches_theory(case: Case) -> None:
    check_case(case)


@SETTINGS
@given(case=cases("lion"))
def test_lion_matches_theory(case: Case) -> None:
    check_case(case)


@SETTINGS
@given(case=cases("sgd"))
def test_sgd_matches_theory(case: Case) -> None:
    check_case(case)


# ---------------------------------------------------------------- the probe pass

def direction(op: str, p: Num, g: Num, kw: dict) -> Num:
    """d = F(theta, ..., theta) whose H d the correction needs (sections 2-4): AdamW's and Lion's u, SGD's g~."""
    lam = kw["weight_decay"]
    if op == "adamw":
        g = g if kw["decoupled"] else g + lam * p
        a = (g * g + kw["eps"]).sqrt() if kw["eps_inside_sqrt"] else g.abs() + kw["eps"]
        return g / a + lam * p if kw["decoupled"] else g / a
    if op == "lion":
        wg = kw["ema_weight"] * g
        return (wg.sign() if kw["smoothing"] == 0.0 else wg / (wg * wg + kw["smoothing"]).sqrt()) + lam * p
    return g + lam * p


def check_probe(case: Case, tau: float, with_norms: bool) -> None:
    """The probe pass: params <- theta + tau d, origins <- theta (exactly), norms += (sum theta^2, sum d^2)."""
    kw = {k: v for k, v in case.kwargs.items() if k != "reuse_hvp"}
    u = unit_roundoff(F64 if case.dtype == F64 else torch.float32)
    inv_scale = 1.0 if kw["grad_scale"] is None else 1.0 / kw["grad_scale"].item()
    before = clone_all(case)
    origins = [torch.full_like(p, float("nan")) for p in case.params]
    norms = torch.tensor([1.0, 2.0], dtype=F64) if with_norms else None
    getattr(torch.ops.memkernels, case.op + "_")(
        case.params, case.grads, *case.states, [], None, backend="reference", origins=origins, probe=True,
        probe_tau=torch.tensor([tau], dtype=F64), probe_norms=norms, **kw)
    for name in ("grads", "grad_refs"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(case, name), before[name])), f"{name} were written"
    for lst, old in zip(case.states, before["states"]):
        assert all(torch.equal(a, b) for a, b in zip(lst, old)), "states were written"
    if kw["found_inf"] is not None and kw["found_inf"].item() != 0.0:
        assert all(torch.equal(a, b) for a, b in zip(case.params, before["params"])), "skipped probe moved params"
        assert norms is None or torch.equal(norms, torch.tensor([1.0, 2.0], dtype=F64))
        return
    sums = [Num(torch.tensor(1.0, dtype=F64), 0.0, u), Num(torch.tensor(2.0, dtype=F64), 0.0, u)]
    for i, (theta, grad) in enumerate(zip(before["params"], case.grads)):
        assert torch.equal(origins[i], theta), f"origins[{i}] is not theta"
        g = load(grad, u) * inv_scale if inv_scale != 1.0 else load(grad, u)
        g = -g if kw["maximize"] else g
        t = load(theta, u)
        d = direction(case.op, t, g, kw)
        assert_within(case.params[i], t + tau * d, f"params[{i}] (theta + tau d)")
        for k, x in enumerate((t * t, d * d)):
            sums[k] = Num(sums[k].v + x.v.sum(), sums[k].e + x.e.sum() + 1e-12 * x.v.abs().sum(), u)
    if norms is not None:
        for k in range(2):
            assert_within(norms[k], sums[k], f"probe_norms[{k}]")


@SETTINGS
@given(case=st.sampled_from(["adamw", "lion", "sgd"]).flatmap(cases), tau=st.sampled_from([0.0, 1e-3, 0.5]),
       with_norms=st.booleans())
def test_probe_pass_matches_theory(case: Case, tau: float, with_norms: bool) -> None:
    check_probe(case, tau, with_norms)


# Representative scalars of each op for the fixed-input tests below.
OP_KWARGS = {
    "adamw": dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, bias_correction1=0.1,
                  bias_correction2=0.01, mean_age1=0.5, mean_age2=0.7),
    "lion": dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.1, smoothing=0.01, ema_weight=0.5, age_weight=2.0),
    "sgd": dict(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=False, update_scale=1.9, memory_coef=0.9),
}
N_STATES = {"adamw": 2, "lion": 1, "sgd": 1}


@pytest.mark.parametrize("op", OP_KWARGS)
def test_zero_correction_ignores_the_reference_gradient(op):
    """correction = 0 never touches p with M: NaN reference gradients change nothing (bit for bit)."""
    shapes = [(5, 3), (8,)]
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    start = [torch.randn(s, generator=gen) for s in shapes]
    results = []
    for refs in ([], [torch.full(s, float("nan")) for s in shapes]):
        params = [p.clone() for p in start]
        states = [[torch.zeros(s) for s in shapes] for _ in range(N_STATES[op])]
        getattr(torch.ops.memkernels, op + "_")(params, grads, *states, refs, None, hvp_scale=1.0,
                                                backend="reference", **OP_KWARGS[op])
        results.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("op", OP_KWARGS)
def test_empty_lists_are_a_no_op(op):
    diagnostics = torch.arange(NDIAG, dtype=F64)
    kw = {**OP_KWARGS[op], "momentum": 0.0} if op == "sgd" else OP_KWARGS[op]  # momentum: see below
    getattr(torch.ops.memkernels, op + "_")([], [], *[[]] * N_STATES[op], [], diagnostics, backend="reference", **kw)
    assert torch.equal(diagnostics, torch.arange(NDIAG, dtype=F64))


@pytest.mark.parametrize("op", OP_KWARGS)
def test_call_without_any_tensor_is_a_no_op(op):
    getattr(torch.ops.memkernels, op + "_")([], [], *[[]] * N_STATES[op], [], None, **OP_KWARGS[op])


@pytest.mark.parametrize("op", OP_KWARGS)
def test_empty_lists_with_correction_are_a_no_op(op):
    getattr(torch.ops.memkernels, op + "_")([], [], *[[]] * N_STATES[op], [], torch.zeros(NDIAG, dtype=F64),
                                            correction=1.0, **OP_KWARGS[op])
