"""The CUDA kernels' per-element math (csrc/include/memkernels/math.h), compiled for the host
with g++ into a pybind11 module, against each op's reference (memkernels/ops/), for every op
of memkernels.ops.SPECS: an op added with its spec gets these checks without a test written for it.

The module binds every op through its trait generated from the spec (op_traits.cuh), taking the
Args fields by name. math.h runs in float for fp16/bf16/fp32 parameters and in double for fp64,
so its float instantiation is compared with the reference evaluated in float32 and its double
instantiation with the reference in float64, element by element, for every output of a step
(p, states, the processed g, M, the hvp estimate and the seven diagnostic terms) and of the
probe pass (theta + tau d, theta^2, d^2). They must agree bit for bit (same IEEE operations in
the same order), except the penalty term where the reference goes through log1p (two
libraries' log1p), held to 1e-6 relative. Inputs are fresh random values over eleven orders of
magnitude plus every pair of edge values (0, -0, tiny, huge, NaN, Inf) of g and g_ref; states
from the spec (squares positive, an optional one absent where its scalar is 0); scalars from
the spec's examples in every combination of its flags' values and variants (SETTINGS), in every
mode (MODES), and at random within the spec's bounds. The per-element part of
backends/reference.py's _run (theta from an origin, hvp estimated or a kept one) is the host
module's, as it is the kernels' driver's; so are the stochastic step's bfloat16 writes (rounding.h's
rounded_write under each list's key), checked against the reference's rounding bit for bit.
"""
from __future__ import annotations

import functools
import importlib.util
import itertools
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
from memkernels._ops import CORRECTION_LIMIT, KEY_COLUMNS
from memkernels.backends.cuda import _build
from memkernels.ops import SPECS, rounding
from memkernels.ops.spec import OpSpec, Scalar

ROOT = Path(__file__).resolve().parents[1]
# math.h repeats the reference's operations in the same order, so every output is the same
# rounding of the same IEEE operations: equal bit for bit, except where libm's log1p enters.
LOG1P_RTOL = 1e-6
# Edge values of g and g_ref: zero, signed zero, tiny (subnormal in float32), huge, NaN and Inf.
EDGES = [0.0, -0.0, 1e-30, -1e-42, 1e-300, 1e30, -3e38, 1e300, float("nan"), float("inf"), -float("inf")]


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """Build csrc/host_module.cpp with g++ once per session, with the headers generated from the specs; fail if
    g++ is there and it fails."""
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) on PATH: cannot build the host module of math.h")
    pybind11 = pytest.importorskip("pybind11")
    tmp = tmp_path_factory.mktemp("mk_host")
    _build.write_headers(tmp / "include", _build.generated_headers())
    out = tmp / ("_mk_host" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [cxx, "-O2", "-shared", "-fPIC", "-std=c++17", "-fno-math-errno", "-ffp-contract=off",
           "-Wall", "-Wextra", "-Werror", f"-I{tmp / 'include'}", f"-I{ROOT / 'csrc' / 'include'}",
           f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
           str(ROOT / "csrc" / "host_module.cpp"), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"host module build failed:\n{' '.join(cmd)}\n{proc.stderr}"
    spec = importlib.util.spec_from_file_location("_mk_host", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ inputs and the reference

def _inputs(rng: np.random.Generator, spec: OpSpec, dtype, n_random: int = 400, edges: bool = True,
            inf_params: bool = False) -> dict:
    """Random values over many magnitudes, with the edge values placed in g and in g_ref (and in the kept
    estimates hvp, which take g_ref's values); a value per state of the spec (squares positive);
    inf_params makes theta's first two values +inf and -inf."""
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
    states = [(rng.standard_normal(n) * magnitude) ** 2 if state.squares else rng.standard_normal(n) * magnitude * 0.5
              for state in spec.states]
    with np.errstate(over="ignore"):
        return {"p": p.astype(dtype), "grad": grad.astype(dtype), "states": [s.astype(dtype) for s in states],
                "grad_ref": grad_ref.astype(dtype), "hvp": grad_ref.astype(dtype), "origin": origin.astype(dtype)}


def _present(spec: OpSpec, kw: dict) -> list[bool]:
    """A state is absent where its scalar is 0 (SGD's buffer without momentum), as the optimizers leave it out."""
    return [not (state.absent_when_zero and kw[state.absent_when_zero] == 0.0) for state in spec.states]


def _numpy_ufunc(ufunc):
    """torch's CPU sqrt and log1p are vectorized approximations (measured here: sqrt is off by an
    ulp for ~20% of float32 and ~1% of float64 inputs); math.h calls the IEEE sqrt, as CUDA does,
    and libm's log1p. The reference evaluates them through numpy so that the comparison checks
    the formulas and their order of operations rather than two libms."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        with np.errstate(all="ignore"):
            return torch.from_numpy(np.asarray(ufunc(x.numpy()), dtype=x.numpy().dtype))
    return fn


def _reference(fn: Callable, *args) -> tuple:
    """fn(*args) with torch's sqrt (and the in-place sqrt_ of the directions) and log1p through numpy; and
    whether it called log1p."""
    log1p = _numpy_ufunc(np.log1p)
    calls = []

    def counted_log1p(x: torch.Tensor) -> torch.Tensor:
        calls.append(x)
        return log1p(x)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "sqrt", _numpy_ufunc(np.sqrt))
        mp.setattr(torch.Tensor, "sqrt_", lambda t: t.copy_(_numpy_ufunc(np.sqrt)(t)))
        mp.setattr(torch, "log1p", counted_log1p)
        return fn(*args), bool(calls)


def _reference_step(op: str, x: dict, present: list[bool], has_ref: bool, kw: dict, reuse: bool = False,
                    origin: bool = False) -> tuple[reference.Step, torch.Tensor | None]:
    """The op's reference step on torch tensors of x's dtype, as backends/reference.py's _run runs it: g and
    g_ref loaded, theta from the origin, hvp estimated (or a kept one reused). Returns the Step and the hvp."""
    kw = dict(kw)
    inv_scale, maximize, update = kw.pop("inv_scale"), kw.pop("maximize"), kw.pop("update_grad_refs")
    hvp_scale = kw.pop("hvp_scale")
    t = {k: torch.from_numpy(v.copy()) for k, v in x.items() if k != "states"}
    g = reference.load_grad(t["grad"], inv_scale, maximize)
    theta = t["origin"] if origin else t["p"]
    hvp = None
    if reuse:
        hvp = t["hvp"]
    elif has_ref:
        g_ref = t["grad_ref"] if update else reference.load_grad(t["grad_ref"], inv_scale, maximize)
        hvp = reference.estimate_hvp(g_ref, g, hvp_scale)
    states = [torch.from_numpy(s.copy()) if here else None for s, here in zip(x["states"], present)]
    return SPECS[op].step(theta, g, *states, hvp, **kw), hvp


def _host(host, op: str, x: dict, present: list[bool], has_ref: bool, kw: dict, reuse: bool = False,
          origin: bool = False) -> dict:
    states = [s if here else None for s, here in zip(x["states"], present)]
    return getattr(host, op)(x["p"], x["grad"], states, x["grad_ref"] if has_ref else None,
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


def _check(host, op: str, present: list[bool], has_ref: bool, kw: dict, dtype, edges: bool = True, *,
           reuse: bool = False, origin: bool = False, inf_params: bool = False) -> np.ndarray:
    """Every output of the host step against the reference; returns the reference's limited flags. With
    inf_params (and no weight decay) theta's +inf and -inf must come out as they went in, as in torch.optim."""
    seed = int.from_bytes(os.urandom(4), "little")
    x = _inputs(np.random.default_rng(seed), SPECS[op], dtype, edges=edges, inf_params=inf_params)
    with np.errstate(all="ignore"):
        got = _host(host, op, x, present, has_ref, kw, reuse, origin)
    (want, hvp), log1p = _reference(_reference_step, op, x, present, has_ref, kw, reuse, origin)
    exact = dict(rtol=0.0, atol=0.0, seed=seed)
    if hvp is not None:  # what a step with hvps stores (a reused one comes back as it went in)
        _assert_matches("hvp", got["hvp"], hvp, **exact)
    _assert_matches("p", got["p"], want.p, **exact)
    if inf_params:
        np.testing.assert_array_equal(got["p"][:2], [np.inf, -np.inf], err_msg=f"infinite params (seed {seed})")
    assert len(want.states) == sum(present)
    for i, (value, expected) in enumerate(zip(got["states"], want.states)):
        _assert_matches(f"states[{i}]", value, expected, **exact)
    _assert_matches("g", got["g"], want.g, **exact)
    _assert_matches("M", got["M"], want.M, **exact)
    for k, (name, expected) in enumerate(zip(reference.DIAGNOSTICS, want.diag)):
        if log1p and name == "penalty_sum":
            # |g| - eps log1p(|g| / eps): two libms' log1p may differ by an ulp, and the
            # difference cancels for |g| << eps, so the bound there is relative to |g|.
            atol = 4 * np.finfo(dtype).eps * np.abs(x["grad"].astype(np.float64)) * kw["inv_scale"]
            _assert_matches(name, got["diag"][k], expected, rtol=LOG1P_RTOL, atol=atol, seed=seed)
        else:
            _assert_matches(name, got["diag"][k], expected, **exact)
    return want.diag[-1].numpy()


def test_the_module_binds_every_op_with_its_states(host):
    """The generated op list and traits: every op of the specs, its states in spec order."""
    assert host.STATES == {op: spec.state_keys for op, spec in SPECS.items()}


# --------------------------------------------------------------------------- settings and modes

DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]
COMMON = dict(correction=0.0, correction_limit=CORRECTION_LIMIT, hvp_scale=0.0, maximize=False, memoryless=False,
              update_grad_refs=False, inv_scale=1.0)
HVP_SCALE = 10.0  # the estimates' scale in the correction modes (the limit's own test finds its scale)

# The modes of the correction and of the driver, for every op. has_ref: an estimate from g_ref; reuse: a kept
# one; origin: theta from the origin; inf_params: theta +-inf; no_decay: weight_decay 0 (where the op has one).
MODES = {
    "plain": dict(),
    "diag_with_ref": dict(has_ref=True),
    "correction_-1_probe": dict(has_ref=True, correction=-1.0, hvp_scale=HVP_SCALE),
    "correction_0.5_trajectory": dict(has_ref=True, correction=0.5, hvp_scale=100 * HVP_SCALE, update_grad_refs=True),
    "memoryless": dict(has_ref=True, correction=-1.0, hvp_scale=HVP_SCALE, memoryless=True),
    "maximize": dict(has_ref=True, correction=-1.0, hvp_scale=HVP_SCALE, maximize=True),
    "grad_scale": dict(has_ref=True, correction=-1.0, hvp_scale=HVP_SCALE, inv_scale=1 / 65536.0, maximize=True),
    "grad_scale_trajectory": dict(has_ref=True, correction=-1.0, hvp_scale=HVP_SCALE, inv_scale=1 / 3.0,
                                  update_grad_refs=True),
    "no_decay": dict(no_decay=True, has_ref=True, correction=-1.0, hvp_scale=HVP_SCALE),
    "no_decay_inf_params": dict(no_decay=True, has_ref=True, correction=-1.0, hvp_scale=HVP_SCALE, inf_params=True),
    "plain_no_decay_inf_params": dict(no_decay=True, inf_params=True),
    "no_limit": dict(has_ref=True, correction=-3.0, hvp_scale=1e3, correction_limit=float("inf")),
    "reuse_hvp": dict(reuse=True, correction=-1.0),
    "reuse_hvp_0.5": dict(reuse=True, correction=0.5),
    "origin_probe": dict(origin=True, has_ref=True, correction=-1.0, hvp_scale=HVP_SCALE),
    "origin_reuse": dict(origin=True, reuse=True, correction=-1.0),
}


def _settings(spec: OpSpec) -> list[dict]:
    """Every combination of the op's flags (both values) and its scalars' variants (with the example)."""
    choices = [[(s.name, v) for v in ((s.example, not s.example) if s.bounds is None else (s.example, *s.variants))]
               for s in spec.scalars if s.bounds is None or s.variants]
    return [dict(combination) for combination in itertools.product(*choices)]


def _setting_id(spec: OpSpec, setting: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in setting.items() if v != spec.examples[k]) or "examples"


SETTINGS = [(op, setting) for op, spec in SPECS.items() for setting in _settings(spec)]


def _split(spec: OpSpec, setting: dict, mode: dict) -> tuple[dict, bool, dict]:
    """The host's keyword arguments (the op's scalars, the common ones), whether it has g_ref, and the flags."""
    kw = {**COMMON, **spec.examples, **setting, **mode}
    has_ref = kw.pop("has_ref", False)
    flags = {name: kw.pop(name, False) for name in ("reuse", "origin", "inf_params", "no_decay")}
    if flags.pop("no_decay") and "weight_decay" in kw:
        kw["weight_decay"] = 0.0
    return kw, has_ref, flags


def _check_mode(host, op: str, setting: dict, mode: dict, dtype) -> np.ndarray:
    kw, has_ref, flags = _split(SPECS[op], setting, mode)
    return _check(host, op, _present(SPECS[op], kw), has_ref, kw, dtype, **flags)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op, setting", [pytest.param(op, setting, id=f"{op}-{_setting_id(SPECS[op], setting)}")
                                         for op, setting in SETTINGS])
def test_math_matches_reference(host, op, setting, mode, dtype):
    _check_mode(host, op, setting, MODES[mode], dtype)


# --------------------------------------------------------------------------- the limit

LIMITER = dict(has_ref=True, correction=-1.0)
LIMITER_MODES = {"plain": {}, "memoryless": dict(memoryless=True), "trajectory": dict(update_grad_refs=True)}


def _limited_fraction(op: str, kw: dict, present: list[bool], hvp_scale: float) -> tuple[float, bool]:
    """The fraction of random float64 elements (a fixed seed) that the reference limits, and whether M is 0 on all."""
    x = _inputs(np.random.default_rng(0), SPECS[op], np.float64, edges=False)
    (want, _), _ = _reference(_reference_step, op, x, present, True, {**kw, "hvp_scale": hvp_scale})
    return float(want.diag[-1].numpy().mean()), not want.M.any()


@functools.lru_cache(maxsize=None)
def _limiter_hvp_scale(op: str, setting: tuple, mode: str) -> float | None:
    """The hvp_scale at which the limit acts on 30-70% of the random elements, by bisection on its log (the
    fraction grows with the scale of M); None where M is 0 everywhere (nothing to limit: e.g. sign Lion)."""
    kw, _, _ = _split(SPECS[op], dict(setting), {**LIMITER, **LIMITER_MODES[mode]})
    present = _present(SPECS[op], kw)
    if _limited_fraction(op, kw, present, 1.0)[1]:
        return None
    low, high = -6.0, 14.0
    for _ in range(60):
        middle = (low + high) / 2
        fraction = _limited_fraction(op, kw, present, 10 ** middle)[0]
        if 0.3 <= fraction <= 0.7:
            return 10 ** middle
        low, high = (middle, high) if fraction < 0.3 else (low, middle)
    raise AssertionError(f"{op} {setting} {mode}: no hvp_scale makes the limit act on 30-70% of the elements")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", SPECS)
def test_limiter_acts_where_the_reference_does(host, op, dtype):
    """In every setting where M is not 0, at an hvp_scale found from the reference, the limit acts on a good
    fraction of fresh random elements, and the "limited" diagnostic term (checked in _check) equals the
    reference's element by element, so its sum is the reference's count exactly."""
    checked = 0
    for setting in _settings(SPECS[op]):
        for mode in LIMITER_MODES:
            hvp_scale = _limiter_hvp_scale(op, tuple(setting.items()), mode)
            if hvp_scale is None:
                continue
            limited = _check_mode(host, op, setting, {**LIMITER, **LIMITER_MODES[mode], "hvp_scale": hvp_scale},
                                  dtype)[:400]
            assert 0.1 < limited.mean() < 0.9, f"{op} {setting} {mode}: the limit acted on {limited.mean():.0%}"
            checked += 1
    assert checked, f"{op}: M is 0 in every setting, so the limit never acts"


# --------------------------------------------------------------------------- the probe pass

def _reference_probe(op: str, x: dict, kw: dict, tau: float) -> reference.Probe:
    """The reference probe of the op's direction, as backends/reference.py's _run runs the probe pass."""
    kw = dict(kw)
    inv_scale, maximize = kw.pop("inv_scale"), kw.pop("maximize")
    t = {k: torch.from_numpy(v.copy()) for k, v in x.items() if k != "states"}
    g = reference.load_grad(t["grad"], inv_scale, maximize)
    return reference.probe(t["p"], SPECS[op].direction(t["p"], g, **kw), tau)


PROBE_CASES = [dict(), dict(no_decay=True, maximize=True, inv_scale=1 / 1024.0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op, setting", [pytest.param(op, setting, id=f"{op}-{_setting_id(SPECS[op], setting)}")
                                         for op, setting in SETTINGS])
def test_probe_matches_reference(host, op, setting, dtype):
    """The probe pass: theta + tau d and the terms theta^2, d^2, for the op's direction d."""
    spec = SPECS[op]
    for case in PROBE_CASES:
        seed = int.from_bytes(os.urandom(4), "little")
        rng = np.random.default_rng(seed)
        kw, _, _ = _split(spec, setting, case)
        inf_params = kw.get("weight_decay", 0.0) == 0.0  # theta +-inf: the direction adds no 0 * inf
        x = _inputs(rng, spec, dtype, inf_params=inf_params)
        tau = float(10 ** rng.uniform(-6, 0))
        states = [s if here else None for s, here in zip(x["states"], _present(spec, kw))]
        with np.errstate(all="ignore"):
            got = getattr(host, op)(x["p"], x["grad"], states, None, probe=True, tau=tau, **kw)
        want, _ = _reference(_reference_probe, op, x, kw, tau)
        for name in ("p", "theta_sq", "d_sq"):
            _assert_matches(f"{op} {case} {name}", got[name], getattr(want, name), rtol=0.0, atol=0.0, seed=seed)
        if inf_params:
            np.testing.assert_array_equal(got["p"][:2], [np.inf, -np.inf], err_msg=f"{op} {case} (seed {seed})")


# --------------------------------------------------------------------------- random hyperparameters

def _random_scalar(rng: np.random.Generator, s: Scalar) -> float | bool:
    """A value within the scalar's bounds: a flag either way; one of its variants a quarter of the time; a
    weight in [0, 1) or (0, 1] near either end; else 0 now and then (where allowed) or up to 1000 times its
    example's magnitude either way (a variant's, or 1, where the example is 0), of either sign if allowed."""
    if s.bounds is None:
        return bool(rng.integers(2))
    if s.variants and rng.random() < 0.25:
        return float(rng.choice(s.variants))
    b = s.bounds
    if (b.low, b.high) == (0.0, 1.0):
        x = float(10 ** rng.uniform(-5, 0))
        value = 1.0 - x if b.high_open else x
    elif b.low == 0.0 and not b.low_open and rng.random() < 0.25:
        value = 0.0
    else:
        scale = abs(s.example) or max((abs(v) for v in s.variants), default=0.0) or 1.0
        value = scale * float(10 ** rng.uniform(-3, 3)) * (float(rng.choice([-1, 1])) if b.low < 0.0 else 1.0)
    b.check(s.name, value)
    return value


@pytest.mark.parametrize("op", SPECS)
def test_random_hyperparameters(host, op):
    """Fresh random scalars within the spec's bounds, with every mode flag at random."""
    spec = SPECS[op]
    rng = np.random.default_rng()
    for _ in range(20):
        correction = float(rng.choice([0.0, -1.0, 0.5, rng.normal()]))
        kw = dict(correction=correction, hvp_scale=10 ** rng.uniform(-2, 3),
                  correction_limit=float(rng.choice([CORRECTION_LIMIT, float("inf"), 10 ** rng.uniform(-2, 1)])),
                  maximize=bool(rng.integers(2)), memoryless=bool(rng.integers(2)),
                  update_grad_refs=bool(rng.integers(2)), inv_scale=float(rng.choice([1.0, 2.0 ** -rng.integers(1, 20)])),
                  **{s.name: _random_scalar(rng, s) for s in spec.scalars})
        reuse, origin = bool(rng.integers(2)), bool(rng.integers(2))
        has_ref = not reuse and (correction != 0.0 or bool(rng.integers(2)))
        # an optional state may be left out where its scalar is 0, or kept (then it is read)
        present = [here or not rng.integers(2) for here in _present(spec, kw)]
        for dtype in (np.float32, np.float64):
            _check(host, op, present, has_ref, kw, dtype, edges=False, reuse=reuse, origin=origin)


# --------------------------------------------------------------------------- the module itself

@pytest.mark.parametrize("op", SPECS)
def test_float32_math_is_not_float64_math(host, op):
    """The check can fail: float32 inputs run the float instantiation (rounding differs from double)."""
    spec = SPECS[op]
    x = _inputs(np.random.default_rng(0), spec, np.float64, edges=False)
    kw = {**COMMON, **spec.examples, "correction": -1.0, "hvp_scale": HVP_SCALE}
    in64 = getattr(host, op)(x["p"], x["grad"], x["states"], x["grad_ref"], **kw)
    in32 = getattr(host, op)(x["p"].astype(np.float32), x["grad"].astype(np.float32),
                             [s.astype(np.float32) for s in x["states"]], x["grad_ref"].astype(np.float32), **kw)
    assert in32["p"].dtype == np.float32 and in64["p"].dtype == np.float64
    assert not np.array_equal(in32["p"].astype(np.float64), in64["p"])
    np.testing.assert_allclose(in32["p"], in64["p"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", SPECS)
def test_bad_input_is_rejected(host, op):
    spec = SPECS[op]
    x = _inputs(np.random.default_rng(0), spec, np.float32, n_random=8, edges=False)
    kw = {**COMMON, **spec.examples}
    step = getattr(host, op)
    last = spec.state_keys[-1]
    with pytest.raises(ValueError, match=f"{last} must be 1-d"):
        step(x["p"], x["grad"], [*x["states"][:-1], x["states"][-1][:3]], None, **kw)
    with pytest.raises(ValueError, match="float32 or float64"):
        step(x["p"].astype(np.float16), x["grad"], x["states"], None, **kw)
    with pytest.raises(ValueError, match="pass one"):
        step(x["p"], x["grad"], x["states"], x["grad_ref"], hvp=x["hvp"], **kw)
    with pytest.raises(ValueError, match=f"{op} takes {len(spec.states)} states, got {len(spec.states) + 1}"):
        step(x["p"], x["grad"], [*x["states"], x["p"]], None, **kw)
    with pytest.raises(ValueError, match=f"{op}: missing scalar {spec.scalars[-1].name}"):
        step(x["p"], x["grad"], x["states"], None, **{k: v for k, v in kw.items() if k != spec.scalars[-1].name})
    with pytest.raises(ValueError, match=f"{op}: unknown scalar momentums"):
        step(x["p"], x["grad"], x["states"], None, **kw, momentums=0.9)
    required = [i for i, state in enumerate(spec.states) if not state.absent_when_zero]
    if required:  # None leaves out only an optional state
        with pytest.raises(ValueError, match=f"{spec.state_keys[required[0]]} is required"):
            step(x["p"], x["grad"], [None if i == required[0] else s for i, s in enumerate(x["states"])], None, **kw)


# --------------------------------------------------------------------------- stochastic bfloat16 writes

# Where a call's element indices start: a tensor's first element, a later chunk's, and just below 2**32, so that
# the indices cross into the hash's high word.
INDEX_STARTS = [0, 3 * 16384, 2 ** 32 - 200]
# The modes that write each list: states always, grad_refs in trajectory mode, kept estimates from grad_refs.
SR_MODES = ["plain", "correction_-1_probe", "correction_0.5_trajectory", "grad_scale_trajectory", "reuse_hvp",
            "origin_probe"]


def _bf16_bits(value: torch.Tensor, keys: np.ndarray, write: int, start: int) -> np.ndarray:
    """The reference's stochastic bfloat16 write number `write` (rounding.key_of_write) of float32 values at
    element indices start, start + 1, ..."""
    column, shift = rounding.key_of_write(write)
    index = torch.arange(start, start + value.numel(), dtype=torch.int64)
    bits = rounding.random_bits(int(keys[column]), index) >> shift
    return rounding.round_bf16(value, bits).view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("mode", SR_MODES)
@pytest.mark.parametrize("op", SPECS)
def test_stochastic_bf16_writes_match_the_reference(host, op, mode):
    """Every state, the processed g (a grad_ref's write) and the estimated hvp (a kept estimate's write), each
    by its write's bits (rounding.key_of_write: the states, grad_refs, hvps, two to a key; random keys and the
    other half's bits differ, so a wrong column or half fails), rounded to
    bfloat16 as the reference rounds them: the same bits, in every setting of the op's flags, at element
    indices from 0, from a later chunk and across 2**32."""
    spec = SPECS[op]
    for setting in _settings(spec):
        seed = int.from_bytes(os.urandom(4), "little")
        rng = np.random.default_rng(seed)
        kw, has_ref, flags = _split(spec, setting, MODES[mode])
        present = _present(spec, kw)
        x = _inputs(rng, spec, np.float32)
        keys = rng.integers(0, 2 ** 32, KEY_COLUMNS[op], dtype=np.int64)
        (want, hvp), _ = _reference(_reference_step, op, x, present, has_ref, kw, flags["reuse"],
                                    flags["origin"])
        for start in INDEX_STARTS:
            states = [s if here else None for s, here in zip(x["states"], present)]
            with np.errstate(all="ignore"):
                got = getattr(host, op)(x["p"], x["grad"], states, x["grad_ref"] if has_ref else None,
                                        hvp=x["hvp"] if flags["reuse"] else None,
                                        origin=x["origin"] if flags["origin"] else None, keys=keys, index=start, **kw)
            rounded, where = got["bf16"], f"{op} {setting} {mode} from {start} (seed {seed})"
            expected_states = iter(want.states)
            for k, here in enumerate(present):
                if not here:
                    assert rounded["states"][k] is None, where
                    continue
                expected = _bf16_bits(next(expected_states), keys, k, start)
                np.testing.assert_array_equal(rounded["states"][k], expected, err_msg=f"{where}: states[{k}]")
            np.testing.assert_array_equal(rounded["g"], _bf16_bits(want.g, keys, len(spec.states), start),
                                          err_msg=f"{where}: g")
            if hvp is not None and not flags["reuse"]:
                np.testing.assert_array_equal(rounded["hvp"], _bf16_bits(hvp, keys, len(spec.states) + 1, start),
                                              err_msg=f"{where}: hvp")
            nearest = want.g.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            assert (rounded["g"] != nearest).any(), f"{where}: every g rounded to nearest"


def test_stochastic_writes_refuse_bad_keys(host):
    spec = SPECS["adamw"]
    x = _inputs(np.random.default_rng(0), spec, np.float32, n_random=8, edges=False)
    kw = {**COMMON, **spec.examples}
    keys = np.arange(KEY_COLUMNS["adamw"], dtype=np.int64)
    with pytest.raises(ValueError, match="keys must be 1-d: a key per two writes"):
        host.adamw(x["p"], x["grad"], x["states"], keys=keys[:-1], **kw)
    with pytest.raises(ValueError, match=r"keys must be in \[0, 2\*\*32\)"):
        host.adamw(x["p"], x["grad"], x["states"], keys=keys + (1 << 32), **kw)
    with pytest.raises(ValueError, match="index must be >= 0"):
        host.adamw(x["p"], x["grad"], x["states"], keys=keys, index=-1, **kw)
    with pytest.raises(ValueError, match="bfloat16 writes round float32 values"):
        host.adamw(x["p"].astype(np.float64), x["grad"].astype(np.float64),
                   [s.astype(np.float64) for s in x["states"]], keys=keys, **kw)
    assert "bf16" not in host.adamw(x["p"], x["grad"], x["states"], **kw)
