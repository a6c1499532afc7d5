"""The Triton backend against the reference backend, on CPU tensors under TRITON_INTERPRET=1, where
tests/test_parity.py (every op, mode and flag from the specs) does not reach.

The interpreter runs the same kernels in numpy, one program at a time, so the
sizes are small; tests/test_triton_gpu.py repeats the checks on CUDA at large
sizes. The interpreter is lenient where the compiler is not (a scalar where a
tensor is needed, say), so test_kernels_compile_for_sm90 also compiles every
kernel variant the host code launches, for a Hopper target, without a GPU.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from typing import NamedTuple

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run in numpy on CPU tensors

pytest.importorskip("triton")

from memkernels import _ops, backends  # noqa: E402
from memkernels.reference import DIAGNOSTICS, NDIAG  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STATUS = backends.load("triton")
if not STATUS.startswith("available"):
    pytest.fail(f"triton imports but the backend is {STATUS}", pytrace=False)

from memkernels.backends.triton import _table, host, kernels  # noqa: E402

BLOCK = host.BLOCK
# One tensor of several full tiles plus a tail, an empty one, one element, odd sizes, a 2-D one.
SHAPES = [(2 * BLOCK + 37,), (0,), (1,), (5, 7), (129,)]

ADAMW = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, bias_correction1=1 - 0.9 ** 3,
             bias_correction2=1 - 0.999 ** 3, mean_age1=0.6, mean_age2=0.9, decoupled=True, eps_inside_sqrt=False)
LION = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, smoothing=0.0, ema_weight=0.19, age_weight=0.37)
SGD = dict(lr=1e-2, momentum=0.9, weight_decay=0.01, nesterov=False, update_scale=2.71, memory_coef=4.1)
HYPER = {"adamw": ADAMW, "lion": LION, "sgd": SGD}


def make_case(op: str, shapes=SHAPES, dtype=torch.float32, state_dtype=None, refs=True, momentum=True,
              scale: float = 1.0, seed: int = 0) -> list[list[torch.Tensor]]:
    """params, grads, state lists, grad_refs: fresh random values, never zeros."""
    gen = torch.Generator(DEVICE).manual_seed(seed)
    state_dtype = state_dtype or dtype

    def rand(shape, std, dt, positive=False):
        x = torch.randn(shape, generator=gen, dtype=torch.float32, device=DEVICE) * std
        return (x.abs() if positive else x).to(dt)

    params = [rand(s, 1.0, dtype) for s in shapes]
    grads = [rand(s, 0.1 * scale, dtype) for s in shapes]
    if op == "adamw":
        states = [[rand(s, 0.05, state_dtype) for s in shapes], [rand(s, 1e-3, state_dtype, True) for s in shapes]]
    else:
        states = [[rand(s, 0.1, state_dtype) for s in shapes] if (op != "sgd" or momentum) else []]
    grad_refs = [rand(s, 0.1 * scale, state_dtype) for s in shapes] if refs else []
    return [params, grads, *states, grad_refs]


def run(op: str, backend: str, case, diagnostics: torch.Tensor | None = None, **kw):
    """Apply the op to copies of the case; return the updated lists and diagnostics."""
    lists = [[t.clone() for t in lst] for lst in case]
    diag = None if diagnostics is None else diagnostics.clone()
    getattr(_ops, f"{op}_")(*lists, diag, backend=backend, **{**HYPER[op], **kw})
    return lists, diag


def ordered(x: torch.Tensor) -> torch.Tensor:
    """Half-precision values as integers that step by 1 between adjacent floats (+0 and -0 both 0)."""
    bits = x.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def assert_same(got, want, rtol: float = 1e-6) -> None:
    """fp32: max |got - want| <= rtol * max |want| per tensor; half: equal but for rare one-ulp ties."""
    for k, (gl, wl) in enumerate(zip(got, want)):
        for i, (g, w) in enumerate(zip(gl, wl)):
            assert g.dtype == w.dtype and g.shape == w.shape
            if w.numel() == 0:
                continue
            where = f"list {k}, tensor {i} ({w.dtype}, {tuple(w.shape)})"
            assert torch.equal(g.isnan(), w.isnan()), where
            if w.dtype in (torch.float16, torch.bfloat16):
                ulps = (ordered(g) - ordered(w)).abs()
                assert ulps.max().item() <= 1, f"{where}: {ulps.max().item()} ulp apart"
                # Rounded alike (to nearest even): only a last-bit difference of the fp32 value before
                # rounding, rare, may tip an element to the neighbouring half; truncation tips about half.
                assert (ulps > 0).sum().item() <= max(1, 0.01 * w.numel()), f"{where}: rounded differently"
            else:
                scale = w.double().abs().nan_to_num(0.0).max().item()
                err = (g.double() - w.double()).nan_to_num(0.0).abs().max().item()
                assert err <= rtol * scale, f"{where}: max error {err:.3g} vs scale {scale:.3g}"


def assert_diag(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-6) -> None:
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-12)


def check(op: str, case, diagnostics: bool = True, rtol: float = 1e-6, **kw) -> None:
    start = torch.rand(NDIAG, dtype=torch.float64, device=DEVICE) if diagnostics else None  # the kernel adds
    got, got_diag = run(op, "triton", case, start, **kw)
    want, want_diag = run(op, "reference", case, start, **kw)
    assert_same(got, want, rtol)
    if diagnostics:
        assert_diag(got_diag, want_diag)
    moved = [not torch.equal(a, b) for a, b in zip(got[0], case[0]) if a.numel()]
    # A half-precision step smaller than half an ulp leaves an element as it was.
    assert all(moved) if case[0][0].dtype == torch.float32 else any(moved), "parameters were not updated"


# ------------------------------------------------------------------ modes and flags test_parity leaves out, fp32

TRAJECTORY = dict(update_grad_refs=True, hvp_scale=40.0)
PROBE = dict(update_grad_refs=False, hvp_scale=300.0)
# (grad_refs, diagnostics, kwargs), also run at large sizes by tests/test_triton_gpu.py
MODES = {
    "plain": (False, False, {}),
    "traj-write-only": (True, False, dict(TRAJECTORY)),
    "traj-correct": (True, True, dict(TRAJECTORY, correction=-1.0)),
    "probe-correct": (True, True, dict(PROBE, correction=0.5)),
    "memoryless": (True, True, dict(TRAJECTORY, correction=-1.0, memoryless=True)),
    "maximize": (True, True, dict(PROBE, correction=-1.0, maximize=True)),
}


# plain, traj-correct and memoryless: test_parity; its grad_refs always come with diagnostics, its maximize and
# probe gradients with a grad_scale
@pytest.mark.parametrize("mode", ["traj-write-only", "probe-correct", "maximize"])
@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_matches_reference(op, mode):
    refs, diagnostics, kw = MODES[mode]
    check(op, make_case(op, refs=refs, seed=len(mode)), diagnostics=diagnostics, **kw)


@pytest.mark.parametrize("op, kw", [  # each flag alone: test_parity
    ("adamw", dict(decoupled=False, eps_inside_sqrt=True, memoryless=True)),
    ("adamw", dict(weight_decay=0.0)),
    ("lion", dict(smoothing=1e-3, memoryless=True)),
])
def test_variants_match_reference(op, kw):
    check(op, make_case(op, seed=7), **TRAJECTORY, correction=-1.0, **kw)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_without_momentum_buffers(nesterov):
    """momentum == 0: no state list; F = g~."""
    case = make_case("sgd", momentum=False, seed=3)
    check("sgd", case, **PROBE, correction=-1.0, momentum=0.0, nesterov=nesterov)


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_close_to_float64_reference(op):
    """The fp32 kernel is within fp32 rounding of reference.py evaluated in float64."""
    case = make_case(op, seed=4)
    kw = dict(TRAJECTORY, correction=-1.0, smoothing=1e-3) if op == "lion" else dict(TRAJECTORY, correction=-1.0)
    start = torch.zeros(NDIAG, dtype=torch.float64, device=DEVICE)
    got, got_diag = run(op, "triton", case, start, **kw)
    exact, exact_diag = run(op, "reference", [[t.double() for t in lst] for lst in case], start, **kw)
    assert_same(got, [[t.float() for t in lst] for lst in exact], rtol=2e-6)
    assert_diag(got_diag, exact_diag, rtol=1e-5)  # fp32 terms (M, F - u cancel a little), fp64 sums


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_grad_scale(op):
    """AMP: grads and probe gradients arrive scaled by 1024; the kernel unscales them on the device."""
    scale = torch.tensor(1024.0, device=DEVICE)
    check(op, make_case(op, scale=1024.0, seed=5), **PROBE, correction=-1.0, grad_scale=scale)


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_found_inf_changes_nothing(op):
    case = make_case(op, seed=6)
    start = torch.rand(NDIAG, dtype=torch.float64, device=DEVICE)
    got, diag = run(op, "triton", case, start, **TRAJECTORY, correction=-1.0,
                    found_inf=torch.tensor(1.0, device=DEVICE), grad_scale=torch.tensor(2.0, device=DEVICE))
    assert all(torch.equal(a, b) for gl, cl in zip(got, case) for a, b in zip(gl, cl))
    assert torch.equal(diag, start)
    check(op, case, **TRAJECTORY, correction=-1.0, found_inf=torch.tensor(0.0, device=DEVICE))


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_zero_correction_never_touches_p_with_M(op):
    """correction == 0: p is bit-identical to the step without refs, even where M is NaN."""
    case = make_case(op, seed=8)
    case[-1][0][3] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy sees the NaN
        with_refs, _ = run(op, "triton", case, torch.zeros(NDIAG, dtype=torch.float64, device=DEVICE),
                           **TRAJECTORY)
    without, _ = run(op, "triton", case[:-1] + [[]])
    assert all(torch.equal(a, b) for a, b in zip(with_refs[0], without[0]))
    assert all(torch.equal(a, b) for a, b in zip(with_refs[1], without[1]))


# ------------------------------------------------------------------ the limit, origins, kept estimates, the probe pass

LIMITED = DIAGNOSTICS.index("limited")
TAU = 1 / 300  # the probe's displacement, as PROBE's hvp_scale


def tau_tensor(tau: float = TAU) -> torch.Tensor:
    return torch.tensor([tau], dtype=torch.float64, device=DEVICE)


def like(tensors, seed: int, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Fresh random tensors shaped as these (origins, kept estimates), of their dtype or the given one."""
    gen = torch.Generator(DEVICE).manual_seed(seed)
    return [torch.randn(t.shape, generator=gen, device=DEVICE).to(dtype or t.dtype) for t in tensors]


def with_slope(op: str) -> dict:
    """Lion's sign has slope zero (M = 0 whatever the HVP): a smooth sign where M matters."""
    return dict(smoothing=1e-3) if op == "lion" else {}


class Out(NamedTuple):
    """A call's outputs: the case's lists, the diagnostics, and its origins, hvps and probe_norms."""

    lists: list
    diag: torch.Tensor | None
    origins: list
    hvps: list
    norms: torch.Tensor | None


def run_more(op: str, backend: str, case, diagnostics: torch.Tensor | None = None, *, origins=(), hvps=(),
             probe_norms: torch.Tensor | None = None, **kw) -> Out:
    """run() on copies of origins, hvps and probe_norms too."""
    origins, hvps = [t.clone() for t in origins], [t.clone() for t in hvps]
    norms = None if probe_norms is None else probe_norms.clone()
    lists, diag = run(op, backend, case, diagnostics, origins=origins, hvps=hvps, probe_norms=norms, **kw)
    return Out(lists, diag, origins, hvps, norms)


def check_more(op: str, case, diagnostics: bool = True, **kw) -> Out:
    """Every output of the triton call against the reference backend's, the "limited" count exactly; returns
    the triton call's."""
    start = torch.zeros(NDIAG, dtype=torch.float64, device=DEVICE) if diagnostics else None  # counts add exactly
    got = run_more(op, "triton", case, start, **kw)
    want = run_more(op, "reference", case, start, **kw)
    assert_same(got.lists + [got.origins, got.hvps], want.lists + [want.origins, want.hvps])
    if diagnostics:
        assert_diag(got.diag, want.diag)
        assert got.diag[LIMITED].item() == want.diag[LIMITED].item()
    if want.norms is not None:
        assert_diag(got.norms, want.norms)
    return got


@pytest.mark.parametrize("op, kw", [
    ("adamw", dict(PROBE)),
    ("adamw", dict(PROBE, decoupled=False, memoryless=True)),
    ("adamw", dict(PROBE, eps_inside_sqrt=True, correction_limit=2.0)),
    ("lion", dict(PROBE, smoothing=1e-3, correction_limit=0.2)),
    ("lion", dict(PROBE, smoothing=1e-3, memoryless=True, correction_limit=0.1)),
    ("sgd", dict(TRAJECTORY)),
    ("sgd", dict(TRAJECTORY, nesterov=True, correction_limit=2.0)),
])
def test_limit_matches_reference(op, kw):
    """A correction large enough that the limit acts on a good fraction of the elements: the step and the count
    of limited elements as the reference's."""
    case = make_case(op, seed=50)
    got = check_more(op, case, correction=0.5, **kw)
    n = sum(t.numel() for t in case[0])
    assert 0.1 * n < got.diag[LIMITED].item() < 0.95 * n


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_infinite_limit_limits_nothing(op):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy: inf * |u| on masked-off lanes
        got = check_more(op, make_case(op, seed=51), **PROBE, correction=0.5, correction_limit=math.inf,
                         **with_slope(op))
    assert got.diag[LIMITED].item() == 0.0


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_step_reads_theta_from_origins(op):
    """With origins, theta is read there and the new theta written into params: the bits of the step whose
    params hold the origins."""
    case = make_case(op, seed=52)
    origins = like(case[0], 53)
    kw = dict(PROBE, correction=0.5, **with_slope(op))
    got = check_more(op, case, origins=origins, **kw)
    start = torch.zeros(NDIAG, dtype=torch.float64, device=DEVICE)
    want, want_diag = run(op, "triton", [origins] + case[1:], start, **kw)
    assert_identical(got.lists + [got.origins], want + [origins], got.diag, want_diag, diag_rtol=1e-12)


@pytest.mark.parametrize("hvp_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_hvps_kept_then_reused(op, hvp_dtype):
    """A step stores its estimate (before the decay terms) into hvps; a step that reuses them, without grad_refs
    and with hvp_scale unread, gives the same bits."""
    case = make_case(op, seed=54)
    kw = dict(TRAJECTORY, correction=-1.0, decoupled=False, **with_slope(op)) if op == "adamw" else \
        dict(TRAJECTORY, correction=-1.0, **with_slope(op))
    kept = check_more(op, case, hvps=like(case[0], 55, hvp_dtype), **kw)
    reused = check_more(op, case[:-1] + [[]], hvps=kept.hvps, reuse_hvp=True, **dict(kw, hvp_scale=7.0))
    assert_identical(reused.lists[:-1] + [reused.hvps], kept.lists[:-1] + [kept.hvps], reused.diag, kept.diag,
                     diag_rtol=1e-12)


PROBE_PASSES = [("adamw", {}), ("adamw", dict(decoupled=False, eps_inside_sqrt=True)), ("lion", {}),
                ("lion", dict(smoothing=1e-3)), ("sgd", {}), ("sgd", dict(maximize=True)),
                ("adamw", dict(maximize=True, grad_scale=torch.tensor(4.0, device=DEVICE)))]


@pytest.mark.parametrize("norms", [True, False])
@pytest.mark.parametrize("op, kw", PROBE_PASSES)
def test_probe_pass_matches_reference(op, kw, norms):
    """theta + tau d into params, theta exactly into origins, sum theta^2 and d^2 added to probe_norms; grads,
    states and grad_refs untouched."""
    case = make_case(op, seed=56)
    start = torch.rand(2, dtype=torch.float64, device=DEVICE) if norms else None
    got = check_more(op, case, diagnostics=False, origins=like(case[0], 57), probe=True, probe_tau=tau_tensor(),
                     probe_norms=start, **kw)
    assert_identical([got.origins] + got.lists[1:], case)
    assert all(not torch.equal(a, b) for a, b in zip(got.lists[0], case[0]) if a.numel())


def test_probe_pass_skipped_on_inf():
    case = make_case("lion", seed=58)
    origins, norms = like(case[0], 59), torch.rand(2, dtype=torch.float64, device=DEVICE)
    got = run_more("lion", "triton", case, origins=origins, probe=True, probe_tau=tau_tensor(), probe_norms=norms,
                   found_inf=torch.tensor(1.0, device=DEVICE))
    assert_identical(got.lists + [got.origins], case + [origins], got.norms, norms)


@pytest.mark.parametrize("tau", [TAU, 0.0])
@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_probe_tau_replaces_hvp_scale(op, tau):
    """A step given probe_tau uses 1 / tau (0 for tau = 0) in place of hvp_scale: the bits of that float."""
    case = make_case(op, seed=60)
    kw = dict(PROBE, correction=0.5, **with_slope(op))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy divides by tau = 0
        got = check_more(op, case, probe_tau=tau_tensor(tau), **dict(kw, hvp_scale=7.0))
    start = torch.zeros(NDIAG, dtype=torch.float64, device=DEVICE)
    want, want_diag = run(op, "triton", case, start, **dict(kw, hvp_scale=1 / tau if tau > 0 else 0.0))
    assert_identical(got.lists, want, got.diag, want_diag, diag_rtol=1e-12)


# ------------------------------------------------------------------ per-step scalars read on the device

# (grad_refs, diagnostics, kwargs): every path the per-step scalars feed (correction and its limit, M,
# diagnostics, shrink, the probe pass). In kwargs, probe_tau is a float and origins, hvps and probe_norms are
# True: check_step_scalars makes the tensors.
STEP_MODES = {
    "plain": (False, False, {}),
    "traj-correct-diag": (True, True, dict(TRAJECTORY, correction=-1.0)),
    "memoryless": (True, True, dict(TRAJECTORY, correction=-1.0, memoryless=True)),
    "maximize-scaled": (True, True, dict(PROBE, correction=0.5, maximize=True)),
    "probe-pass": (False, False, dict(probe=True, probe_tau=TAU, origins=True, probe_norms=True)),
    "after-probe": (True, True, dict(PROBE, correction=0.5, correction_limit=0.25, probe_tau=TAU, origins=True,
                                     hvps=True)),
    "reuse-hvp": (False, True, dict(correction=-1.0, reuse_hvp=True, hvps=True)),
}
STEP_SHAPES = [(BLOCK + 37,), (0,), (5, 7)]  # a full tile, a tail, an empty tensor


def step_values(op: str, kw: dict, **override: float) -> dict[str, float]:
    """The op's STEP_SCALARS, as floats, from HYPER and kw."""
    full = {**HYPER[op], "hvp_scale": 0.0, **kw, **override}
    return {name: full[name] for name in _ops.STEP_SCALARS[op]}


def wrong_floats(op: str) -> dict[str, float]:
    """Float arguments that must not be read when step_scalars is given (0 bias corrections: placeholders that
    the host could not even divide by)."""
    return {name: 0.0 if name.startswith("bias_correction") else 7.0 for name in _ops.STEP_SCALARS[op]}


def step_scalars(values: dict[str, float]) -> torch.Tensor:
    return torch.tensor(list(values.values()), dtype=torch.float64, device=DEVICE)


def assert_identical(got, want, got_diag=None, want_diag=None, diag_rtol: float = 0.0) -> None:
    """Every tensor bit for bit; diagnostics exactly, or to diag_rtol (a GPU adds its tiles in any order)."""
    for k, (gl, wl) in enumerate(zip(got, want)):
        for i, (g, w) in enumerate(zip(gl, wl)):
            assert torch.equal(g.view(torch.uint8) if g.numel() else g, w.view(torch.uint8) if w.numel() else w), \
                f"list {k}, tensor {i} differs"
    if want_diag is not None:
        if diag_rtol == 0.0:
            assert torch.equal(got_diag, want_diag), (got_diag, want_diag)
        else:
            assert_diag(got_diag, want_diag, rtol=diag_rtol)


def check_step_scalars(op: str, case, mode: str, overrides: dict, diag_rtol: float = 0.0) -> None:
    """step_scalars holding v (and wrong floats) gives exactly what the floats v give."""
    refs, diagnostics, kw = STEP_MODES[mode]
    kw = dict(kw)
    if mode == "maximize-scaled":
        kw["grad_scale"] = torch.tensor(1024.0, device=DEVICE)
    if "probe_tau" in kw:
        kw["probe_tau"] = tau_tensor(kw["probe_tau"])
    more = {name: like(case[0], seed) for seed, name in enumerate(("origins", "hvps")) if kw.pop(name, False)}
    if kw.pop("probe_norms", False):
        more["probe_norms"] = torch.rand(2, dtype=torch.float64, device=DEVICE)
    values = step_values(op, kw, **overrides)
    start = torch.rand(NDIAG, dtype=torch.float64, device=DEVICE) if diagnostics else None
    want = run_more(op, "triton", case, start, **more, **{**kw, **values})
    got = run_more(op, "triton", case, start, **more, **{**kw, **wrong_floats(op)}, step_scalars=step_scalars(values))
    assert_identical(got.lists + [got.origins, got.hvps], want.lists + [want.origins, want.hvps], got.diag, want.diag,
                     diag_rtol)
    assert_identical([], [], got.norms, want.norms, diag_rtol)


STEP_VALUES = {"given": {}, "lr_0_hvp_0": dict(lr=0.0, hvp_scale=0.0)}


@pytest.mark.parametrize("values", STEP_VALUES)
@pytest.mark.parametrize("mode", STEP_MODES)
@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_step_scalars_on_device_match_floats(op, mode, values):
    scale = 1024.0 if mode == "maximize-scaled" else 1.0
    case = make_case(op, shapes=STEP_SHAPES, refs=STEP_MODES[mode][0], scale=scale, seed=31)
    check_step_scalars(op, case, mode, STEP_VALUES[values])


@pytest.mark.parametrize("mode", ["traj-correct-diag", "probe-pass", "after-probe"])
@pytest.mark.parametrize("op, kw", [("adamw", dict(decoupled=False, eps_inside_sqrt=True)),
                                    ("lion", dict(smoothing=1e-3)), ("sgd", dict(nesterov=True))])
def test_step_scalars_variants(op, kw, mode, monkeypatch):
    """Op flags that change how the per-step scalars are used (coupled decay: no shrink; a smooth sign)."""
    monkeypatch.setitem(HYPER, op, {**HYPER[op], **kw})
    check_step_scalars(op, make_case(op, shapes=STEP_SHAPES, seed=32), mode, {})


def test_step_scalars_are_read():
    """The kernel follows the tensor: another lr there moves the parameters differently; a strided view works."""
    case = make_case("adamw", shapes=STEP_SHAPES, seed=33)
    kw = dict(TRAJECTORY, correction=-1.0)
    values = step_values("adamw", kw)
    base, _ = run("adamw", "triton", case, **kw, step_scalars=step_scalars(values))
    other, _ = run("adamw", "triton", case, **kw, step_scalars=step_scalars({**values, "lr": 2 * values["lr"]}))
    assert not torch.equal(base[0][0], other[0][0])
    strided = torch.zeros(2 * len(values), dtype=torch.float64, device=DEVICE)[::2]
    strided.copy_(step_scalars(values))
    again, _ = run("adamw", "triton", case, **kw, step_scalars=strided)
    assert_identical(again, base)


# ------------------------------------------------------------------ dtypes and layouts

@pytest.mark.parametrize("dtype, state_dtype", [(torch.bfloat16, None), (torch.float16, None),
                                                (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_half_precision_within_one_ulp(op, dtype, state_dtype):
    """Math in fp32, each result rounded once to nearest even: within one ulp of the reference."""
    case = make_case(op, dtype=dtype, state_dtype=state_dtype, seed=9)
    check(op, case, **TRAJECTORY, correction=-1.0)


@pytest.mark.parametrize("dtype, hvp_dtype", [(torch.bfloat16, None), (torch.float16, None),
                                              (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_half_precision_probe_and_kept_estimates(op, dtype, hvp_dtype):
    """The probe pass and the step after it on half params, origins and (half or fp32) kept estimates."""
    case = make_case(op, dtype=dtype, seed=64)
    origins = like(case[0], 65)
    check_more(op, case, diagnostics=False, origins=origins, probe=True, probe_tau=tau_tensor(),
               probe_norms=torch.zeros(2, dtype=torch.float64, device=DEVICE), **with_slope(op))
    check_more(op, case, origins=origins, hvps=like(case[0], 66, hvp_dtype), probe_tau=tau_tensor(), **PROBE,
               correction=0.5, **with_slope(op))


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_float64_states_with_float32_params(op):
    """States and grad_refs may be float64: read into fp32 math, written back exactly widened."""
    check(op, make_case(op, state_dtype=torch.float64, seed=15), **TRAJECTORY, correction=-1.0)


def test_fp64_params_are_rejected():
    case = make_case("adamw", shapes=[(4,)], dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        run("adamw", "triton", case)


class Counting:
    """Stands in for a kernel: records the grid of each launch, then launches."""

    def __init__(self, kernel, grids: list) -> None:
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.fixture
def grids(monkeypatch) -> list:
    """The grids of the triton launches the test makes."""
    recorded = []
    monkeypatch.setattr(kernels, "multi_tensor_kernel", Counting(kernels.multi_tensor_kernel, recorded))
    return recorded


MANY = [(3 * i + 1,) for i in range(19)] + [(BLOCK + 1,)]  # 20 tensors: 19 one-tile tensors + 2 tiles


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_many_tensors_one_launch(op, grids):
    """20 tensors are one launch of one program per tile."""
    check(op, make_case(op, shapes=MANY, seed=10), **TRAJECTORY, correction=-1.0)
    assert grids == [(21,)]


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_many_tensors_probe_then_step(op, grids):
    """The probe pass, then the step from its origins that keeps its estimate: one launch each for 20 tensors."""
    case = make_case(op, shapes=MANY, seed=16)
    probed = check_more(op, case, diagnostics=False, origins=like(case[0], 17), probe=True, probe_tau=tau_tensor(),
                        probe_norms=torch.zeros(2, dtype=torch.float64, device=DEVICE), **with_slope(op))
    moved = [probed.lists[0]] + case[1:]  # params at theta + tau d; grad_refs stand for the gradients there
    check_more(op, moved, origins=probed.origins, hvps=like(case[0], 18), probe_tau=tau_tensor(), **PROBE,
               correction=0.5, **with_slope(op))
    assert grids == [(21,)] * 2


def test_all_empty_launches_nothing():
    case = make_case("adamw", shapes=[(0,), (0, 3)])
    got, diag = run("adamw", "triton", case, torch.ones(NDIAG, dtype=torch.float64, device=DEVICE))
    assert torch.equal(diag, torch.ones(NDIAG, dtype=torch.float64, device=DEVICE))


def test_misaligned_views():
    """Tensors starting one element into their storage (not 16-byte aligned) take the unaligned path."""
    case = make_case("adamw", shapes=[(BLOCK + 3,), (9,)], seed=11)
    views = [[torch.cat([t.new_zeros(1), t.reshape(-1)])[1:].view(t.shape) for t in lst] for lst in case]
    assert all(v.data_ptr() % 16 for v in views[0])
    check("adamw", views, **TRAJECTORY, correction=-1.0)


def test_transposed_dense_tensors():
    """Dense non-contiguous tensors with the params' strides are flat ranges of memory."""
    case = make_case("lion", shapes=[(33, 40)], seed=12)
    case = [[t.t() for t in lst] for lst in case]
    check("lion", case, **TRAJECTORY, correction=-1.0, smoothing=1e-3)


# ------------------------------------------------------------------ the ops' parts

@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_device_derivation_takes_the_spec_order(op):
    """The device derivation reads the step_scalars tensor by position: one whose parameters are not the
    spec's step scalars in order is refused, naming both orders."""
    from memkernels.backends.triton import elements
    from memkernels.ops import SPECS

    host._check_order(SPECS[op], elements.OPS[op])
    other = {"adamw": "lion", "lion": "sgd", "sgd": "adamw"}[op]
    wrong = elements.OPS[op]._replace(derived=elements.OPS[other].derived)
    with pytest.raises(RuntimeError, match=f"{other}_derived takes .* step scalars are"):
        host._check_order(SPECS[op], wrong)


# ------------------------------------------------------------------ pointer tables

def test_pointer_table_cache_hit_and_invalidation():
    """Same tensors: the cached table is reused. A replaced tensor: a new table, and the new tensor moves."""
    _table.TABLES.clear()
    case = make_case("sgd", shapes=[(50,), (70,)], refs=False, seed=13)
    lists = [[t.clone() for t in lst] for lst in case]
    _ops.sgd_(*lists, None, backend="triton", **SGD)
    assert len(_table.TABLES) == 2  # the pointer table and the block map
    _ops.sgd_(*lists, None, backend="triton", **SGD)
    assert len(_table.TABLES) == 2  # hits

    old = lists[0][1]
    old_value = old.clone()
    lists[0][1] = old.clone()  # the optimizer's param replaced by a new tensor (new address)
    expected = [[t.clone() for t in lst] for lst in lists]
    _ops.sgd_(*expected, None, backend="reference", **SGD)
    _ops.sgd_(*lists, None, backend="triton", **SGD)
    assert len(_table.TABLES) == 3  # a new pointer table, the same block map
    assert torch.equal(old, old_value), "the stale tensor was written"
    assert_same(lists, expected)


def test_block_map_layout():
    numels = [0, 3, 2 * BLOCK, BLOCK + 1]
    blocks = _table.block_map(numels, BLOCK, torch.device("cpu")).view(-1, 2).tolist()
    assert blocks == [[1, 0], [2, 0], [2, BLOCK], [3, 0], [3, BLOCK]]


# ------------------------------------------------------------------ optimizers

@pytest.mark.parametrize("make", [
    lambda ps, b: __import__("memkernels").AdamW(ps, lr=1e-2, memory_correction=-1.0, track_memory=True, backend=b),
    lambda ps, b: __import__("memkernels").Lion(ps, lr=1e-3, smoothing=1e-4, memory_correction=-1.0,
                                                track_memory=True, backend=b),
    lambda ps, b: __import__("memkernels").SGD(ps, lr=1e-2, momentum=0.9, memory_correction=-1.0,
                                               track_memory=True, backend=b),
], ids=["AdamW", "Lion", "SGD"])
def test_optimizer_steps_match_reference(make):
    """Three trajectory-corrected steps through the optimizer classes, diagnostics included."""
    gen = torch.Generator().manual_seed(14)
    init = [torch.randn(s, generator=gen).to(DEVICE) for s in [(17, 3), (40,), (1,)]]
    grads = [[torch.randn(p.shape, generator=gen).to(DEVICE) * 0.1 for p in init] for _ in range(3)]
    results = {}
    for backend in ("triton", "reference"):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the trajectory-HVP note
            opt = make(params, backend)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        results[backend] = ([p.detach() for p in params], opt.memory_stats()[0])
    assert_same([results["triton"][0]], [results["reference"][0]])
    for key, value in results["reference"][1].items():
        assert results["triton"][1][key] == pytest.approx(value, rel=1e-5, nan_ok=True), key


# ------------------------------------------------------------------ compiled code, no GPU needed

_COMPILE = textwrap.dedent('''
    import json, re, sys
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import mangle_type
    from memkernels.backends.triton import host, kernels as K
    from memkernels.reference import NDIAG
    from memkernels.ops import SPECS
    from memkernels._ops import KEY_COLUMNS

    TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.int64: "i64", torch.bfloat16: "bf16",
             torch.float16: "fp16"}
    launches = []

    class Recorder:  # stands in for a kernel: records what the host code launches
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((self.fn, args, kw))

    K.multi_tensor_kernel = Recorder(K.multi_tensor_kernel)
    def tensors(dt):
        return [torch.ones(1 + 2 * host.BLOCK, dtype=getattr(torch, dt))] if dt else []

    for op, dtypes, kw in json.loads(sys.argv[1]):
        lists = [tensors(dt) for dt in dtypes]
        kw["origins"], kw["hvps"] = tensors(kw["origins"]), tensors(kw["hvps"])
        for name in ("grad_scale", "found_inf"):
            kw[name] = None if kw[name] is None else torch.tensor(kw[name])
        for name in ("step_scalars", "probe_tau"):
            if kw.get(name) is not None:
                kw[name] = torch.tensor(kw[name], dtype=torch.float64)
        kw["probe_norms"] = torch.zeros(2, dtype=torch.float64) if kw["probe_norms"] else None
        if kw.pop("rounding_keys", False):
            kw["rounding_keys"] = torch.zeros(len(lists[0]), KEY_COLUMNS[op], dtype=torch.int64)
        diag = torch.zeros(NDIAG, dtype=torch.float64) if kw.pop("diag") else None
        host.launch(SPECS[op], *lists, diag, **kw)

    results = []
    for fn, args, kw in launches:
        options = dict(num_warps=kw.pop("num_warps"), enable_fp_fusion=kw.pop("enable_fp_fusion"))
        values = dict(zip(fn.arg_names, args), **kw)
        signature, constexprs, attrs = {}, {}, {}
        for i, name in enumerate(fn.arg_names):
            value = values[name]
            if fn.params[i].is_constexpr:
                signature[name] = "constexpr"
                constexprs[(i,)] = value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + TYPES[value.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:  # floats (fp64 where annotated) and namedtuples of them, as a launch types them
                signature[name] = fn.params[i].annotation_type or mangle_type(value)
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
        results.append({"op": kw["STEP"].__name__, "v4_loads": len(re.findall(r"ld\\.global(?:\\.\\w+)*\\.v4", ptx)),
                        "device_scalars": kw["DEVICE_SCALARS"], "fmas": len(re.findall(r"\\bfma\\.", ptx)),
                        "stochastic": kw["STOCHASTIC"], "hashes": ptx.count(str(0x7FEB352D)),
                        "ieee_f64": sorted(set(re.findall(r"(?:sqrt|div)\\.rn\\.f64", ptx)))})
    print(json.dumps(results))
''')


def _compile_cases() -> list:
    """(op, list dtypes or None for an absent list, kwargs): the flag combinations worth compiling."""
    f32, plain = "float32", dict(update_grad_refs=False, hvp_scale=0.0, correction=0.0, correction_limit=0.5,
                                 maximize=False, memoryless=False, grad_scale=None, found_inf=None, diag=False,
                                 origins=None, hvps=None, reuse_hvp=False, probe=False, probe_tau=None,
                                 probe_norms=False)
    traj = dict(plain, update_grad_refs=True, hvp_scale=1.0, correction=-1.0, diag=True)
    amp = dict(traj, update_grad_refs=False, memoryless=True, maximize=True, grad_scale=2.0, found_inf=0.0)
    probe = dict(plain, origins=f32, probe=True, probe_tau=1e-3, probe_norms=True, grad_scale=2.0, found_inf=0.0)
    after_probe = dict(traj, update_grad_refs=False, origins=f32, hvps=f32, probe_tau=1e-3)
    reuse = dict(traj, update_grad_refs=False, hvps="bfloat16", reuse_hvp=True, correction_limit=float("inf"))
    return [("adamw", [f32] * 4 + [None], dict(ADAMW, **plain)),
            ("lion", [f32] * 3 + [None], dict(LION, **plain)),
            ("sgd", [f32] * 3 + [None], dict(SGD, **plain)),
            ("adamw", [f32] * 5, dict(ADAMW, **traj)),
            ("adamw", ["bfloat16", "bfloat16", f32, f32, f32],
             dict(ADAMW, **traj, eps_inside_sqrt=True, decoupled=False)),
            ("lion", ["float16"] * 4, dict(LION, **dict(traj, smoothing=1e-3))),
            ("sgd", [f32] * 4, dict(SGD, **dict(traj, nesterov=True))),
            ("sgd", [f32, f32, None, f32], dict(SGD, **dict(traj, momentum=0.0))),
            ("adamw", [f32, f32, "float64", "float64", "float64"], dict(ADAMW, **amp)),
            ("lion", [f32] * 4, dict(LION, **amp)),
            ("adamw", [f32] * 5, dict(ADAMW, **traj, step_scalars=[1e-3, 0.1, 0.01, 1.0, 2.0, 3.0])),
            ("lion", ["bfloat16"] * 4, dict(LION, **amp, step_scalars=[1e-3, 0.5, 2.0, 3.0])),
            ("sgd", [f32] * 4, dict(SGD, **traj, step_scalars=[1e-3, 2.0, 3.0, 4.0])),
            ("adamw", [f32] * 4 + [None], dict(ADAMW, **dict(probe, eps_inside_sqrt=True))),
            ("lion", ["bfloat16"] * 3 + [None],
             dict(LION, **probe, smoothing=1e-3, step_scalars=[1e-3, 0.5, 2.0, 3.0])),
            ("sgd", [f32, f32, None, None], dict(SGD, **dict(probe, probe_norms=False, momentum=0.0))),
            ("adamw", [f32] * 5, dict(ADAMW, **after_probe, step_scalars=[1e-3, 0.1, 0.01, 1.0, 2.0, 3.0])),
            ("lion", ["bfloat16"] * 3 + [None], dict(LION, **reuse)),
            ("sgd", [f32] * 4, dict(SGD, **after_probe)),
            ("adamw", [f32, f32] + ["bfloat16"] * 3, dict(ADAMW, **traj, rounding_keys=True)),
            ("sgd", ["bfloat16"] * 3 + [f32], dict(SGD, **dict(after_probe, hvps="bfloat16"), rounding_keys=True,
                                                    step_scalars=[1e-3, 2.0, 3.0, 4.0]))]


def test_kernels_compile_for_sm90():
    """Every kind of launch the host code makes compiles for Hopper; aligned full tiles load 16 bytes at a time;
    only a stochastic step hashes (its first multiplier is in the code), the others are the code of before."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cases = _compile_cases()
    proc = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(cases)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(cases)
    for result in results:
        assert result["v4_loads"] > 0, result
        assert (result["hashes"] > 0) == result["stochastic"], result
    assert sum(r["stochastic"] for r in results) == 2, results
    # What a step does not use is dropped: AdamW's penalty (a log, libdevice's FMAs: the kernels contract none)
    # is computed for the diagnostics only.
    assert [(r["op"], r["fmas"] > 0) for r in (results[0], results[3])] == [("adamw", False), ("adamw", True)], \
        results
    # The device derives bias_correction2 ** 0.5 and lr / bias_correction1 with IEEE double sqrt and division,
    # as Python does on the host (not the approximations Triton may pick for `/` and tl.sqrt).
    adamw_step = [r for r in results if r["op"] == "adamw" and r["device_scalars"]]
    assert adamw_step and all(r["ieee_f64"] == ["div.rn.f64", "sqrt.rn.f64"] for r in adamw_step), adamw_step


# ------------------------------------------------------------------ the GPU benchmark script, without a GPU

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture(scope="module")
def gpu_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(BENCH_DIR, "gpu_bench.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["gpu_bench"]


def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", os.path.join(BENCH_DIR, "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_bench_arguments(gpu_bench, tmp_path):
    args = gpu_bench.parse_args(["--out", str(tmp_path)])
    assert (args.flat_params, args.workloads, args.device) == (1 << 28, ["flat", "gpt2"], "cuda")
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--out", str(tmp_path), "--repeats", "0"])
    with pytest.raises(SystemExit):
        gpu_bench.parse_args([])  # --out is required


def test_bench_byte_model_and_table(gpu_bench):
    """GB/s from docs/DESIGN.md's bytes per parameter; percent of copy and time over fused AdamW per workload."""
    Row = gpu_bench.Row
    assert gpu_bench.gbps("adamw", 10 ** 9, 28.0) == pytest.approx(1000.0)
    assert gpu_bench.BYTES_PER_PARAM == {"copy": 8, "adamw": 28, "adamw_traj": 36, "adamw_kept": 32,
                                         "adamw_probe": 48, "adamw_reuse": 32, "lion": 20, "heavy_ball": 20}
    rows = [Row("flat", "device copy (copy_)", "copy", 10 ** 9, times_ms=[4.0, 2.0, 3.0]),  # 8 GB in 3 ms
            Row("flat", gpu_bench.BASELINE, "adamw", 10 ** 9, times_ms=[14.0]),
            Row("flat", "memkernels triton AdamW+traj+diag", "adamw_traj", 10 ** 9, times_ms=[18.0, 12.0]),
            Row("flat", "memkernels cuda", "adamw", 10 ** 9, skip="skipped: no | library")]
    summary = gpu_bench.summarize(rows)
    copy, fused, triton, cuda = summary
    assert copy["ms"] == 3.0 and copy["gbps"] == pytest.approx(8000 / 3)
    assert fused["gbps"] == pytest.approx(2000.0) and fused["vs_fused"] == 1.0
    assert triton["gbps"] == pytest.approx(36000 / 15) and triton["vs_fused"] == pytest.approx(15 / 14)
    assert triton["pct_copy"] == pytest.approx(100 * (36000 / 15) / (8000 / 3))
    assert cuda["ms"] is None and cuda["skip"].startswith("skipped")
    table = gpu_bench.markdown(summary).splitlines()
    assert len(table) == 2 + len(rows) and all(line.count("|") == 8 for line in table)
    assert "| flat | memkernels triton AdamW+traj+diag | 36 | 15.000 | 2400 | 90.0 | 1.07 |" in table


def test_bench_smoke_on_cpu(gpu_bench, tmp_path, monkeypatch):
    """The whole script on CPU tensors (host timer, Triton interpreted), small sizes, no numba compile."""
    monkeypatch.setattr(backends, "BACKENDS", ("reference", "triton"))
    code = gpu_bench.main(["--out", str(tmp_path), "--device", "cpu", "--flat-params", "2500", "--workloads",
                           "flat", "--repeats", "1", "--target-ms", "0.1", "--no-sweep"])
    assert code == 0
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    timed = {r["row"] for r in report["rows"] if r["ms"] is not None}
    assert {"device copy (copy_)", "torch AdamW fused", "torch AdamW foreach", "memkernels triton AdamW",
            "memkernels triton AdamW+traj+diag", "memkernels triton AdamW+traj+diag kept", "memkernels triton Lion",
            "memkernels triton heavy ball"} <= timed
    graph = [r for r in report["rows"] if "CUDA graph" in r["row"]]
    assert graph and all(r["skip"] for r in graph)
    assert (tmp_path / "gpu_bench.md").read_text().startswith("| workload |")

    args = gpu_bench.parse_args(["--out", str(tmp_path), "--device", "cpu", "--repeats", "1", "--target-ms", "0.1"])
    rows = gpu_bench.run_workload("gpt2", [(33, 3), (7,)], args)  # the GPT-2 path: lion-pytorch row included
    assert any(r.name.startswith("lion-pytorch") for r in rows)
    assert all(r.ms is not None or r.skip for r in rows)


COMPACT_ROWS = {"AdamW bf16 states (stochastic)": "adamw_bf16", "AdamW bf16 states (nearest)": "adamw_bf16",
                "AdamW+traj bf16 states": "adamw_traj_bf16", "AdamW bf16 params + Kahan": "adamw_kahan"}


def _bench_compact(gpu_bench, backend: str):
    t = gpu_bench.Tensors([(BLOCK + 3,), (5, 7)], seed=3, device=torch.device(DEVICE))
    c = gpu_bench.CompactTensors(t, seed=3)
    return t, c, gpu_bench.compact_rows("flat", t, c, backend)


def test_bench_compact_rows_step_as_the_reference(gpu_bench):
    """Each compact-state row's call is valid: it runs through the Triton interpreter and the reference backend
    and moves its params (a bfloat16 param with Kahan: p + c, the value it stands for), and both backends end
    where the other does after the four rows in turn."""
    def value(row, t, c):
        if row.model == "adamw_kahan":
            return [p.float() + k.float() for p, k in zip(c.params, c.compensations)]
        return [p.clone() for p in t.params]

    ends = {}
    for backend in ("triton", "reference"):
        t, c, rows = _bench_compact(gpu_bench, backend)
        assert {r.name: r.model for r in rows} == {f"memkernels {backend} {n}": m for n, m in COMPACT_ROWS.items()}
        for row in rows:
            assert row.skip is None, row.skip
            before = value(row, t, c)
            row.fn()
            after = value(row, t, c)
            assert all(not torch.equal(a, b) and bool(b.isfinite().all()) for a, b in zip(before, after)), row.name
        assert all(x.dtype == torch.bfloat16 for x in (*c.exp_avgs, *c.exp_avg_sqs, *c.grad_refs, *c.compensations))
        ends[backend] = [*t.params, *c.params, *c.compensations, *c.exp_avgs, *c.exp_avg_sqs, *c.grad_refs]
    for mine, ref in zip(ends["triton"], ends["reference"], strict=True):
        if mine.dtype == torch.bfloat16:  # a float32 step a last bit apart may round to the next bfloat16
            torch.testing.assert_close(mine.float(), ref.float(), rtol=2 ** -7, atol=1e-9)
        else:
            torch.testing.assert_close(mine, ref)


def test_bench_compact_rows_show_cudas_refusal(gpu_bench, monkeypatch):
    """CUDA cannot run here: a kernel registered as CUDA's, without stochastic rounding or bf16 params, stands in.
    Its refused rows say what is missing and touch nothing; the nearest row reaches the kernel."""
    calls = []
    stand_in = backends.register("cuda", "adamw", ())(lambda *args, **kwargs: calls.append(kwargs))
    monkeypatch.setitem(backends._kernels, ("adamw", "cuda", DEVICE), stand_in)
    t, c, rows = _bench_compact(gpu_bench, "cuda")
    skips = {r.name.removeprefix("memkernels cuda "): r.skip for r in rows}
    assert set(skips) == set(COMPACT_ROWS) and skips["AdamW bf16 states (nearest)"] is None
    for name in ("AdamW bf16 states (stochastic)", "AdamW+traj bf16 states"):
        assert skips[name].startswith("skipped: backend cuda: stochastic rounding of bf16 states is not implemented")
    assert skips["AdamW bf16 params + Kahan"].startswith(
        "skipped: backend cuda: kahan / stochastic parameter rounding is not implemented")
    assert calls == [] and all(r.fn is None for r in rows if r.skip)
    fresh_t, fresh_c, _ = _bench_compact(gpu_bench, "reference")  # the same seed: the tensors before any call
    for mine, fresh in zip([*t.params, *c.params, *c.compensations, *c.exp_avgs, *c.exp_avg_sqs, *c.grad_refs],
                           [*fresh_t.params, *fresh_c.params, *fresh_c.compensations, *fresh_c.exp_avgs,
                            *fresh_c.exp_avg_sqs, *fresh_c.grad_refs], strict=True):
        assert torch.equal(mine, fresh)
    next(r for r in rows if not r.skip).fn()
    assert len(calls) == 1 and "rounding_keys" not in calls[0]
