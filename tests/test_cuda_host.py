"""The CUDA kernels' per-element math (csrc/include/memkernels/math.h), compiled for the host
with g++ into a pybind11 module, against memkernels/reference.py.

math.h runs in float for fp16/bf16/fp32 parameters and in double for fp64, so its float
instantiation is compared with reference.py evaluated in float32 and its double
instantiation with reference.py in float64, element by element, for every output of a
step (p, states, the processed g, M, the hvp estimate and the seven diagnostic terms) and of
the probe pass (theta + tau d, theta^2, d^2). They must agree bit for bit (same IEEE
operations in the same order), except the one term that goes through two libraries' log1p,
held to 1e-6 relative. Inputs are fresh random values over eleven orders of magnitude plus
every pair of edge values (0, -0, tiny, huge, NaN, Inf) of g and g_ref. The per-element part
of backends/reference.py's _run (theta from an origin, hvp estimated or a kept one) is the
host module's, as it is the kernels' driver's.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from memkernels import reference
from memkernels.ops import SPECS
from memkernels._ops import CORRECTION_LIMIT

ROOT = Path(__file__).resolve().parents[1]
# math.h repeats reference.py's operations in the same order, so every output is the same
# rounding of the same IEEE operations: equal bit for bit, except where libm's log1p enters.
LOG1P_RTOL = 1e-6
# Edge values of g and g_ref: zero, signed zero, tiny (subnormal in float32), huge, NaN and Inf.
EDGES = [0.0, -0.0, 1e-30, -1e-42, 1e-300, 1e30, -3e38, 1e300, float("nan"), float("inf"), -float("inf")]


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """Build csrc/host_module.cpp with g++ once per session; fail if g++ is there and it fails."""
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) on PATH: cannot build the host module of math.h")
    pybind11 = pytest.importorskip("pybind11")
    out = tmp_path_factory.mktemp("mk_host") / ("_mk_host" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [cxx, "-O2", "-shared", "-fPIC", "-std=c++17", "-fno-math-errno", "-ffp-contract=off",
           "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc' / 'include'}", f"-I{pybind11.get_include()}",
           f"-I{sysconfig.get_paths()['include']}", str(ROOT / "csrc" / "host_module.cpp"), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"host module build failed:\n{' '.join(cmd)}\n{proc.stderr}"
    spec = importlib.util.spec_from_file_location("_mk_host", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ inputs and the reference

def _inputs(rng: np.random.Generator, dtype, n_random: int = 400, edges: bool = True,
            inf_params: bool = False) -> dict[str, np.ndarray]:
    """Random values over many magnitudes, with the edge values placed in g and in g_ref (and in the kept
    estimates hvp, which take g_ref's values); inf_params makes theta's first two values +inf and -inf."""
    n = n_random + (len(EDGES) ** 2 if edges else 0)
    magnitude = 10.0 ** rng.uniform(-8, 3, n)
    grad = rng.standard_normal(n) * magnitude
    grad_ref = grad + rng.standard_normal(n) * magnitude * 0.1
    if edges:  # every pair of edge values (g, g_ref) occurs once
        pairs = np.array([(a, b) for a in EDGES for b in EDGES])
        grad[n_random:], grad_ref[n_random:] = pairs[:, 0], pairs[:, 1]
    p, origin = rng.standard_normal(n), rng.standard_normal(n) * 3
    if inf_params:
        p[:2] = origin[:2] = np.inf, -np.inf
    with np.errstate(over="ignore"):
        return {
            "p": p.astype(dtype),
            "grad": grad.astype(dtype),
            "exp_avg": (rng.standard_normal(n) * magnitude * 0.5).astype(dtype),
            "exp_avg_sq": ((rng.standard_normal(n) * magnitude) ** 2).astype(dtype),
            "grad_ref": grad_ref.astype(dtype),
            "hvp": grad_ref.astype(dtype),
            "origin": origin.astype(dtype),
        }


def _numpy_ufunc(ufunc):
    """torch's CPU sqrt and log1p are vectorized approximations (measured here: sqrt is off by an
    ulp for ~20% of float32 and ~1% of float64 inputs); math.h calls the IEEE sqrt, as CUDA does,
    and libm's log1p. The reference evaluates them through numpy so that the comparison checks
    the formulas and their order of operations rather than two libms."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        with np.errstate(all="ignore"):
            return torch.from_numpy(np.asarray(ufunc(x.numpy()), dtype=x.numpy().dtype))
    return fn


def _reference(fn: Callable, *args):
    """fn(*args) with torch's sqrt (and the in-place sqrt_ of the directions) and log1p through numpy."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "sqrt", _numpy_ufunc(np.sqrt))
        mp.setattr(torch.Tensor, "sqrt_", lambda t: t.copy_(_numpy_ufunc(np.sqrt)(t)))
        mp.setattr(torch, "log1p", _numpy_ufunc(np.log1p))
        return fn(*args)


def _reference_step(op: str, x: dict[str, np.ndarray], states: list, has_ref: bool, kw: dict, reuse: bool = False,
                    origin: bool = False) -> tuple[reference.Step, torch.Tensor | None]:
    """reference.py on torch tensors of x's dtype, as backends/reference.py's _run runs it: g and g_ref
    loaded, theta from the origin, hvp estimated (or a kept one reused). Returns the Step and the hvp."""
    kw = dict(kw)
    inv_scale, maximize, update = kw.pop("inv_scale", 1.0), kw.pop("maximize", False), kw.pop("update_grad_refs", False)
    hvp_scale = kw.pop("hvp_scale")
    t = {k: torch.from_numpy(v.copy()) for k, v in x.items()}
    g = reference.load_grad(t["grad"], inv_scale, maximize)
    theta = t["origin"] if origin else t["p"]
    hvp = None
    if reuse:
        hvp = t["hvp"]
    elif has_ref:
        g_ref = t["grad_ref"] if update else reference.load_grad(t["grad_ref"], inv_scale, maximize)
        hvp = reference.estimate_hvp(g_ref, g, hvp_scale)
    state_values = [t[name] if name else None for name in states]
    return SPECS[op].step(theta, g, *state_values, hvp, **kw), hvp


def _host(host, op: str, x: dict[str, np.ndarray], states: list[str], has_ref: bool, kw: dict, reuse: bool = False,
          origin: bool = False) -> dict:
    args = [x[name] if name else None for name in states]
    return getattr(host, op)(x["p"], x["grad"], *args, x["grad_ref"] if has_ref else None,
                             hvp=x["hvp"] if reuse else None, origin=x["origin"] if origin else None, **kw)


def _assert_matches(name: str, actual: np.ndarray, expected: torch.Tensor, *, rtol: float, atol,
                    seed: int) -> None:
    """Same NaN positions, same infinities, and |actual - expected| <= rtol * |expected| + atol."""
    e = expected.numpy()
    assert actual.dtype == e.dtype, f"{name}: dtype {actual.dtype} vs {e.dtype}"
    where = f"{name} (seed {seed})"
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(e), err_msg=f"{where}: NaN positions differ")
    finite = np.isfinite(e)
    np.testing.assert_array_equal(actual[~finite & ~np.isnan(e)], e[~finite & ~np.isnan(e)],
                                  err_msg=f"{where}: infinities differ")
    a, e, tol = actual[finite].astype(np.float64), e[finite].astype(np.float64), np.broadcast_to(atol, finite.shape)[finite]
    bad = ~(np.abs(a - e) <= rtol * np.abs(e) + tol)
    assert not bad.any(), (f"{where}: {bad.sum()} of {bad.size} elements differ, e.g. "
                           f"{a[bad][:4]} vs {e[bad][:4]}")


def _check(host, op: str, states: list[str], has_ref: bool, kw: dict, dtype, edges: bool = True, *,
           reuse: bool = False, origin: bool = False, inf_params: bool = False) -> np.ndarray:
    """Every output of the host step against the reference; returns the reference's limited flags. With
    inf_params (and no weight decay) theta's +inf and -inf must come out as they went in, as in torch.optim."""
    seed = int.from_bytes(os.urandom(4), "little")
    x = _inputs(np.random.default_rng(seed), dtype, edges=edges, inf_params=inf_params)
    with np.errstate(all="ignore"):
        got = _host(host, op, x, states, has_ref, kw, reuse, origin)
    want, hvp = _reference(_reference_step, op, x, states, has_ref, kw, reuse, origin)
    exact = dict(rtol=0.0, atol=0.0, seed=seed)
    if hvp is not None:  # what a step with hvps stores (a reused one comes back as it went in)
        _assert_matches("hvp", got["hvp"], hvp, **exact)
    _assert_matches("p", got["p"], want.p, **exact)
    if inf_params:
        np.testing.assert_array_equal(got["p"][:2], [np.inf, -np.inf], err_msg=f"infinite params (seed {seed})")
    for i, (value, expected) in enumerate(zip(got["states"], want.states)):
        _assert_matches(f"states[{i}]", value, expected, **exact)
    _assert_matches("g", got["g"], want.g, **exact)
    _assert_matches("M", got["M"], want.M, **exact)
    for k, (name, expected) in enumerate(zip(reference.DIAGNOSTICS, want.diag)):
        if op == "adamw" and name == "penalty_sum" and not kw["eps_inside_sqrt"]:
            # |g| - eps log1p(|g| / eps): two libms' log1p may differ by an ulp, and the
            # difference cancels for |g| << eps, so the bound there is relative to |g|.
            atol = 4 * np.finfo(dtype).eps * np.abs(x["grad"].astype(np.float64)) * kw["inv_scale"]
            _assert_matches(name, got["diag"][k], expected, rtol=LOG1P_RTOL, atol=atol, seed=seed)
        else:
            _assert_matches(name, got["diag"][k], expected, **exact)
    return want.diag[-1].numpy()


# --------------------------------------------------------------------------- the modes

DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]
COMMON = dict(correction=0.0, correction_limit=CORRECTION_LIMIT, hvp_scale=0.0, maximize=False, memoryless=False,
              update_grad_refs=False, inv_scale=1.0)

ADAMW = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, bias_correction1=1 - 0.9 ** 3,
             bias_correction2=1 - 0.999 ** 3, mean_age1=1.7, mean_age2=2.9, decoupled=True, eps_inside_sqrt=False)
ADAMW_MODES = {
    "plain": dict(),
    "diag_with_ref": dict(has_ref=True),
    "correction_-1_probe": dict(has_ref=True, correction=-1.0, hvp_scale=37.0),
    "correction_0.5_trajectory": dict(has_ref=True, correction=0.5, hvp_scale=1e3, update_grad_refs=True),
    "memoryless": dict(has_ref=True, correction=-1.0, hvp_scale=10.0, memoryless=True),
    "eps_inside_sqrt": dict(has_ref=True, correction=-1.0, hvp_scale=10.0, eps_inside_sqrt=True),
    "coupled": dict(has_ref=True, correction=-1.0, hvp_scale=10.0, decoupled=False),
    "coupled_eps_inside": dict(has_ref=True, correction=0.5, hvp_scale=3.0, decoupled=False, eps_inside_sqrt=True),
    "maximize": dict(has_ref=True, correction=-1.0, hvp_scale=10.0, maximize=True),
    "grad_scale": dict(has_ref=True, correction=-1.0, hvp_scale=10.0, inv_scale=1 / 65536.0, maximize=True),
    "grad_scale_trajectory": dict(has_ref=True, correction=-1.0, hvp_scale=10.0, inv_scale=1 / 3.0,
                                  update_grad_refs=True),
    "no_decay": dict(weight_decay=0.0, has_ref=True, correction=-1.0, hvp_scale=1.0),
    "no_decay_inf_params": dict(weight_decay=0.0, has_ref=True, correction=-1.0, hvp_scale=1.0, inf_params=True),
    "coupled_no_decay_inf_params": dict(weight_decay=0.0, has_ref=True, correction=-1.0, hvp_scale=10.0,
                                        decoupled=False, inf_params=True),
    "no_limit": dict(has_ref=True, correction=-1.0, hvp_scale=5e3, correction_limit=float("inf")),
    "reuse_hvp": dict(reuse=True, correction=-1.0, hvp_scale=7.0),
    "reuse_hvp_coupled": dict(reuse=True, correction=0.5, decoupled=False),
    "origin_probe": dict(origin=True, has_ref=True, correction=-1.0, hvp_scale=37.0),
    "origin_coupled_eps_inside": dict(origin=True, has_ref=True, correction=-1.0, hvp_scale=37.0, decoupled=False,
                                      eps_inside_sqrt=True),
}

LION = dict(lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.1, smoothing=0.0, ema_weight=0.65, age_weight=3.3)
LION_MODES = {
    "plain": dict(),
    "diag_with_ref": dict(has_ref=True),
    "sign_correction_-1": dict(has_ref=True, correction=-1.0, hvp_scale=5.0),
    "smooth": dict(smoothing=1e-6),
    "smooth_correction_-1_probe": dict(smoothing=1e-4, has_ref=True, correction=-1.0, hvp_scale=5.0),
    "smooth_correction_0.5_trajectory": dict(smoothing=1e-2, has_ref=True, correction=0.5, hvp_scale=50.0,
                                             update_grad_refs=True),
    "smooth_memoryless": dict(smoothing=1e-4, has_ref=True, correction=-1.0, hvp_scale=5.0, memoryless=True),
    "maximize_grad_scale": dict(smoothing=1e-4, has_ref=True, correction=-1.0, hvp_scale=5.0, maximize=True,
                                inv_scale=1 / 1024.0),
    "no_decay": dict(weight_decay=0.0, smoothing=1e-4, has_ref=True, correction=-1.0, hvp_scale=5.0),
    "no_decay_inf_params": dict(weight_decay=0.0, smoothing=1e-4, has_ref=True, correction=-1.0, hvp_scale=5.0,
                                inf_params=True),
    "sign_no_decay_inf_params": dict(weight_decay=0.0, has_ref=True, correction=-1.0, hvp_scale=5.0, inf_params=True),
    "no_limit": dict(smoothing=1e-4, has_ref=True, correction=-3.0, hvp_scale=1e5, correction_limit=float("inf")),
    "reuse_hvp": dict(smoothing=1e-4, reuse=True, correction=-1.0),
    "origin_probe": dict(smoothing=1e-4, origin=True, has_ref=True, correction=-1.0, hvp_scale=5.0),
    "origin_sign_reuse": dict(origin=True, reuse=True, correction=-1.0),
}

SGD = dict(lr=1e-2, momentum=0.9, weight_decay=1e-3, nesterov=False, update_scale=2.71, memory_coef=4.1)
SGD_MODES = {
    "plain": dict(),
    "diag_with_ref": dict(has_ref=True),
    "correction_-1_probe": dict(has_ref=True, correction=-1.0, hvp_scale=20.0),
    "correction_0.5_trajectory": dict(has_ref=True, correction=0.5, hvp_scale=100.0, update_grad_refs=True),
    "nesterov": dict(nesterov=True, has_ref=True, correction=-1.0, hvp_scale=20.0),
    "momentum_0": dict(momentum=0.0, has_ref=True, correction=-1.0, hvp_scale=20.0, no_buffer=True),
    "memoryless": dict(has_ref=True, correction=-1.0, hvp_scale=20.0, memoryless=True),
    "maximize_grad_scale": dict(has_ref=True, correction=-1.0, hvp_scale=20.0, maximize=True, inv_scale=0.125),
    "no_decay": dict(weight_decay=0.0, has_ref=True, correction=-1.0, hvp_scale=20.0),
    "no_decay_inf_params": dict(weight_decay=0.0, has_ref=True, correction=-1.0, hvp_scale=20.0, inf_params=True),
    "nesterov_no_decay_inf_params": dict(nesterov=True, weight_decay=0.0, inf_params=True),
    "momentum_0_no_decay_inf_params": dict(momentum=0.0, weight_decay=0.0, no_buffer=True, inf_params=True),
    "no_limit": dict(has_ref=True, correction=-1.0, hvp_scale=1e3, correction_limit=float("inf")),
    "reuse_hvp": dict(reuse=True, correction=-1.0),
    "reuse_hvp_momentum_0": dict(momentum=0.0, reuse=True, correction=0.5, no_buffer=True),
    "origin_probe": dict(origin=True, has_ref=True, correction=-1.0, hvp_scale=20.0),
}

# op -> (its scalars, its state arrays)
BASES = {"adamw": (ADAMW, ["exp_avg", "exp_avg_sq"]), "lion": (LION, ["exp_avg"]), "sgd": (SGD, ["exp_avg"])}


def _split(base: dict, mode: dict) -> tuple[dict, bool, dict]:
    kw = {**COMMON, **base, **mode}
    has_ref = kw.pop("has_ref", False)
    flags = {name: kw.pop(name, False) for name in ("no_buffer", "reuse", "origin", "inf_params")}
    return kw, has_ref, flags


def _check_mode(host, op: str, mode: dict, dtype) -> np.ndarray:
    base, states = BASES[op]
    kw, has_ref, flags = _split(base, mode)
    states = [None] if flags["no_buffer"] else states
    return _check(host, op, states, has_ref, kw, dtype, reuse=flags["reuse"], origin=flags["origin"],
                  inf_params=flags["inf_params"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ADAMW_MODES)
def test_adamw_math_matches_reference(host, mode, dtype):
    _check_mode(host, "adamw", ADAMW_MODES[mode], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", LION_MODES)
def test_lion_math_matches_reference(host, mode, dtype):
    _check_mode(host, "lion", LION_MODES[mode], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", SGD_MODES)
def test_sgd_math_matches_reference(host, mode, dtype):
    _check_mode(host, "sgd", SGD_MODES[mode], dtype)


# Corrections large enough that the limit acts on 20-80% of the random elements (adamw measured 0.22-0.82 over
# seeds: plain and update_grad_refs near 0.75, memoryless near 0.25).
LIMITER = {
    "adamw": dict(has_ref=True, correction=-1.0, hvp_scale=2e3),
    "lion": dict(smoothing=1e-4, has_ref=True, correction=-3.0, hvp_scale=1e5, correction_limit=0.1),
    "sgd": dict(has_ref=True, correction=-1.0, hvp_scale=1e3),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", LIMITER)
def test_limiter_acts_where_the_reference_does(host, op, dtype):
    """The limit acts on a good fraction of the random elements, and the "limited" diagnostic term (checked in
    _check) equals the reference's element by element, so its sum is the reference's count exactly."""
    for mode in (LIMITER[op], {**LIMITER[op], "memoryless": True}, {**LIMITER[op], "update_grad_refs": True}):
        limited = _check_mode(host, op, mode, dtype)[:400]
        assert 0.1 < limited.mean() < 0.9, f"{op}: the limit acted on {limited.mean():.0%} of the elements"


def _reference_probe(op: str, x: dict[str, np.ndarray], kw: dict, tau: float) -> reference.Probe:
    """reference.probe of the op's direction, as backends/reference.py's _run runs the probe pass."""
    kw = dict(kw)
    inv_scale, maximize = kw.pop("inv_scale", 1.0), kw.pop("maximize", False)
    t = {k: torch.from_numpy(v.copy()) for k, v in x.items()}
    g = reference.load_grad(t["grad"], inv_scale, maximize)
    return reference.probe(t["p"], SPECS[op].direction(t["p"], g, **kw), tau)


PROBE_CASES = {
    "adamw": [dict(), dict(decoupled=False), dict(eps_inside_sqrt=True), dict(decoupled=False, eps_inside_sqrt=True),
              dict(weight_decay=0.0, maximize=True, inv_scale=1 / 1024.0)],
    "lion": [dict(), dict(smoothing=1e-4), dict(smoothing=1e-2, maximize=True, inv_scale=0.5)],
    "sgd": [dict(), dict(weight_decay=0.0, maximize=True, inv_scale=0.125)],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", PROBE_CASES)
def test_probe_matches_reference(host, op, dtype):
    """The probe pass: theta + tau d and the terms theta^2, d^2, for the op's direction d."""
    base, states = BASES[op]
    for case in PROBE_CASES[op]:
        seed = int.from_bytes(os.urandom(4), "little")
        rng = np.random.default_rng(seed)
        kw = {**COMMON, **base, **case}
        inf_params = kw["weight_decay"] == 0.0  # theta +-inf: the direction adds no 0 * inf
        x = _inputs(rng, dtype, inf_params=inf_params)
        tau = float(10 ** rng.uniform(-6, 0))
        with np.errstate(all="ignore"):
            got = getattr(host, op)(x["p"], x["grad"], *(x[name] for name in states), None, probe=True, tau=tau, **kw)
        want = _reference(_reference_probe, op, x, kw, tau)
        for name in ("p", "theta_sq", "d_sq"):
            _assert_matches(f"{op} {case} {name}", got[name], getattr(want, name), rtol=0.0, atol=0.0, seed=seed)
        if inf_params:
            np.testing.assert_array_equal(got["p"][:2], [np.inf, -np.inf], err_msg=f"{op} {case} (seed {seed})")


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_random_hyperparameters(host, op):
    """Fresh random scalars (bias corrections of a random step, betas near 1) for every mode flag."""
    rng = np.random.default_rng()
    for _ in range(20):
        correction = float(rng.choice([0.0, -1.0, 0.5, rng.normal()]))
        common = dict(lr=10 ** rng.uniform(-5, -1), correction=correction, hvp_scale=10 ** rng.uniform(-2, 3),
                      correction_limit=float(rng.choice([CORRECTION_LIMIT, float("inf"), 10 ** rng.uniform(-2, 1)])),
                      maximize=bool(rng.integers(2)), memoryless=bool(rng.integers(2)),
                      update_grad_refs=bool(rng.integers(2)), inv_scale=float(rng.choice([1.0, 2.0 ** -rng.integers(1, 20)])))
        reuse, origin = bool(rng.integers(2)), bool(rng.integers(2))
        has_ref = not reuse and (correction != 0.0 or bool(rng.integers(2)))
        if op == "adamw":
            b1, b2, n = 1 - 10 ** rng.uniform(-3, -0.5), 1 - 10 ** rng.uniform(-5, -1), int(rng.integers(1, 10000))
            kw = dict(beta1=b1, beta2=b2, eps=10 ** rng.uniform(-12, -4), weight_decay=float(rng.choice([0.0, 0.1])),
                      bias_correction1=1 - b1 ** n, bias_correction2=1 - b2 ** n, mean_age1=rng.uniform(0, 20),
                      mean_age2=rng.uniform(0, 2000), decoupled=bool(rng.integers(2)),
                      eps_inside_sqrt=bool(rng.integers(2)))
            states = ["exp_avg", "exp_avg_sq"]
        elif op == "lion":
            kw = dict(beta1=rng.uniform(0.5, 0.99), beta2=rng.uniform(0.9, 0.999), weight_decay=rng.uniform(0, 1),
                      smoothing=float(rng.choice([0.0, 10 ** rng.uniform(-8, 0)])), ema_weight=rng.uniform(0, 1),
                      age_weight=rng.uniform(0, 50))
            states = ["exp_avg"]
        else:
            momentum = float(rng.choice([0.0, rng.uniform(0, 0.99)]))
            kw = dict(momentum=momentum, weight_decay=float(rng.choice([0.0, 1e-3])), nesterov=bool(rng.integers(2)),
                      update_scale=rng.uniform(1, 10), memory_coef=rng.uniform(0, 100))
            states = [None] if momentum == 0.0 and rng.integers(2) else ["exp_avg"]
        for dtype in (np.float32, np.float64):
            _check(host, op, states, has_ref, {**COMMON, **common, **kw}, dtype, edges=False, reuse=reuse,
                   origin=origin)


def test_float32_math_is_not_float64_math(host):
    """The check can fail: float32 inputs run the float instantiation (rounding differs from double)."""
    x = _inputs(np.random.default_rng(0), np.float64, edges=False)
    kw = {**COMMON, **ADAMW, "correction": -1.0, "hvp_scale": 10.0}
    in64 = host.adamw(x["p"], x["grad"], x["exp_avg"], x["exp_avg_sq"], x["grad_ref"], **kw)
    in32 = host.adamw(*(x[k].astype(np.float32) for k in ("p", "grad", "exp_avg", "exp_avg_sq", "grad_ref")), **kw)
    assert in32["p"].dtype == np.float32 and in64["p"].dtype == np.float64
    assert not np.array_equal(in32["p"].astype(np.float64), in64["p"])
    np.testing.assert_allclose(in32["p"], in64["p"], rtol=1e-5, atol=1e-6)


def test_bad_arrays_are_rejected(host):
    x = _inputs(np.random.default_rng(0), np.float32, n_random=8, edges=False)
    with pytest.raises(ValueError, match="exp_avg_sq must be 1-d"):
        host.adamw(x["p"], x["grad"], x["exp_avg"], x["exp_avg_sq"][:3], None, **ADAMW, correction_limit=0.5)
    with pytest.raises(ValueError, match="float32 or float64"):
        host.lion(x["p"].astype(np.float16), x["grad"], x["exp_avg"], None, **LION, correction_limit=0.5)
    with pytest.raises(ValueError, match="pass one"):
        host.sgd(x["p"], x["grad"], None, x["grad_ref"], hvp=x["hvp"], **SGD, correction_limit=0.5)
