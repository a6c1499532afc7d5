"""The numba backend against the reference backend: every op, mode, dtype and edge value, bit for bit where
tests/test_parity.py (every backend within a tolerance, from the specs) allows a rounding.

Both backends run the same op on clones of the same inputs. Wherever no sqrt
or log enters (all states, grad_refs, origins and kept HVP estimates, SGD and
sign-Lion parameters, and the probe pass's parameters but for AdamW with eps
inside the sqrt and smooth Lion) the results must be bit-identical: that checks
the order of operations, and so must the count of elements where the
correction's limit acted. The
reference's torch.sqrt and torch.log1p (MKL) are not always correctly rounded
where the kernels use IEEE sqrt and their own log1p, so AdamW and smooth-Lion
parameters agree to 1e-6 (fp32 math) or 1e-12 (fp64) of the tensor's scale and
half-precision results to one ulp of their format; diagnostics, also summed in
another order, to 1e-6 / 1e-12 relative or to twice their sensitivity to a few
roundings of the inputs (see rounding_sensitivity). One kernel call updates every tensor
of an op call, so many-tensor calls (sizes around the chunk and sub-block
boundaries, empty and one-element tensors, views of one buffer) are checked
the same way, and their results must not depend on the thread count. Each mode
is a separately compiled kernel: the first run of this file compiles about 70
(several minutes of CPU), later runs load them from numba's disk cache.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")
import numba  # noqa: E402
from numba import njit  # noqa: E402

from memkernels import _ops, backends  # noqa: E402
from memkernels.reference import NDIAG  # noqa: E402
from memkernels.backends import numba as nb  # noqa: E402
from memkernels.backends.numba import host as nb_host  # noqa: E402
from memkernels.backends.numba._dtypes import SCRATCH  # noqa: E402
from memkernels.backends.numba.kernels import CHUNK, SUB_BLOCK  # noqa: E402
from memkernels.backends.numba._log1p import log1p  # noqa: E402
from memkernels.backends.numba._penalty import _split  # noqa: E402

if nb.numba is None:
    pytest.skip(backends.load("numba"), allow_module_level=True)

BASE = {
    "adamw": dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, bias_correction1=0.271,
                  bias_correction2=0.003, mean_age1=0.63, mean_age2=1.2),
    "lion": dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, smoothing=0.0, ema_weight=0.95, age_weight=2.0),
    "sgd": dict(lr=1e-2, momentum=0.9, weight_decay=0.05, nesterov=False, update_scale=2.7, memory_coef=3.1),
}
AMP = dict(maximize=True, grad_scale=torch.tensor(1024.0))
TRAJECTORY = dict(correction=-1.0, hvp_scale=10.0, update_grad_refs=True)
PROBE = dict(correction=0.5, hvp_scale=10.0, update_grad_refs=False)
# hvp_scale large enough that the correction term passes its limit (kappa = 0.5) in 30-70% of the elements
LIMITED = {"adamw": dict(TRAJECTORY, hvp_scale=1000.0), "lion": dict(TRAJECTORY, smoothing=1.0, hvp_scale=3000.0),
           "sgd": dict(TRAJECTORY, hvp_scale=300.0)}

# (op, name, keyword arguments, with grad_refs, with diagnostics)
MODES = [
    ("adamw", "plain", {}, False, False),
    ("adamw", "maximize_amp", AMP, False, False),
    ("adamw", "diagnostics", {}, False, True),
    ("adamw", "trajectory", TRAJECTORY, True, True),
    ("adamw", "probe_coupled_eps_inside", dict(PROBE, eps_inside_sqrt=True, decoupled=False, **AMP), True, True),
    ("adamw", "measure_only", dict(TRAJECTORY, correction=0.0), True, True),
    ("adamw", "memoryless", dict(TRAJECTORY, memoryless=True), True, False),
    ("adamw", "limited", LIMITED["adamw"], True, True),
    ("adamw", "limited_coupled_memoryless", dict(LIMITED["adamw"], decoupled=False, memoryless=True), True, True),
    ("lion", "plain", {}, False, False),
    ("lion", "trajectory_smooth", dict(TRAJECTORY, smoothing=0.01), True, True),
    ("lion", "probe_sign", dict(PROBE, **AMP), True, True),
    ("lion", "memoryless_smooth", dict(TRAJECTORY, smoothing=0.01, memoryless=True), True, False),
    ("lion", "limited_smooth", LIMITED["lion"], True, True),
    ("sgd", "plain", {}, False, False),
    ("sgd", "nesterov_trajectory", dict(TRAJECTORY, nesterov=True, **AMP), True, True),
    ("sgd", "no_momentum_memoryless_probe", dict(PROBE, momentum=0.0, memoryless=True), True, True),
    ("sgd", "limited", LIMITED["sgd"], True, True),
    ("sgd", "unlimited", dict(LIMITED["sgd"], correction_limit=math.inf), True, True),
]
FULL = {"adamw": "trajectory", "lion": "trajectory_smooth", "sgd": "nesterov_trajectory"}


def mode(op: str, name: str) -> tuple:
    return next(m for m in MODES if m[:2] == (op, name))


def make_inputs(op: str, shapes, dtype=torch.float32, state_dtype=None, *, refs: bool, seed: int = 0,
                momentum: bool = True, origins: bool = False, hvps: bool = False) -> dict:
    """Random parameters, gradients, states, reference gradients, origins (theta, near the parameters) and
    kept HVP estimates; exp_avg_sq is positive."""
    gen = torch.Generator().manual_seed(seed)
    state_dtype = state_dtype or dtype

    def randn(shape, scale=1.0, dt=dtype):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dt)

    grads = [randn(s) for s in shapes]
    states = [[randn(s, 0.1, state_dtype) for s in shapes]]
    if op == "adamw":
        states.append([randn(s, 0.1, state_dtype).abs() ** 2 for s in shapes])
    if op == "sgd" and not momentum:
        states = [[]]
    grad_refs = [(g.double() + randn(s, 0.1, torch.float64)).to(state_dtype) for g, s in zip(grads, shapes)]
    params = [randn(s) for s in shapes]
    return {"params": params, "grads": grads, "states": states, "grad_refs": grad_refs if refs else [],
            "origins": [(p.double() + randn(s, 1e-3, torch.float64)).to(dtype) for p, s in zip(params, shapes)]
            if origins else [],
            "hvps": [randn(s, 1.0, state_dtype) for s in shapes] if hvps else []}


OUTPUTS = ("params", "states", "grad_refs", "origins", "hvps", "diagnostics", "probe_norms")


def run(op: str, backend: str, inputs: dict, kwargs: dict, diagnostics: bool) -> dict:
    """Run the op on clones; return every tensor it may write (a probe pass gets probe_norms)."""
    clone = lambda lst: [t.clone() for t in lst]  # noqa: E731
    params, states, grad_refs = clone(inputs["params"]), [clone(s) for s in inputs["states"]], clone(inputs["grad_refs"])
    origins, hvps = clone(inputs.get("origins", [])), clone(inputs.get("hvps", []))
    diag = torch.zeros(NDIAG, dtype=torch.float64) if diagnostics else None
    norms = torch.zeros(2, dtype=torch.float64) if kwargs.get("probe") else None
    getattr(_ops, op + "_")(params, clone(inputs["grads"]), *states, grad_refs, diag, backend=backend,
                            origins=origins, hvps=hvps, probe_norms=norms, **{**BASE[op], **kwargs})
    return {"params": params, "states": [t for s in states for t in s], "grad_refs": grad_refs, "origins": origins,
            "hvps": hvps, "diagnostics": [t for t in (diag,) if t is not None],
            "probe_norms": [t for t in (norms,) if t is not None]}


def flat(outputs: dict) -> list[torch.Tensor]:
    return [t for key in OUTPUTS for t in outputs[key]]


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Half-precision bits mapped to integers in the order of the values (+0 and -0 both 0)."""
    bits = t.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str, fp64_math: bool) -> None:
    """Within 1e-6 (fp32 math) or 1e-12 (fp64 math) of the tensor's scale; half formats also within one ulp.

    The scale is the largest finite magnitude: a sqrt that differs by an ulp in a large step leaves
    that much absolute difference in a parameter the step nearly cancels (a step of fp32 math rounded
    to a half format is that close before rounding, so its rounding may land one ulp away besides).
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    finite = expected[expected.isfinite()].abs()
    rtol = 1e-12 if fp64_math else 1e-6
    atol = rtol * finite.max().item() if finite.numel() else 0.0
    if actual.dtype in (torch.bfloat16, torch.float16):
        nan = expected.isnan()
        assert torch.equal(actual.isnan(), nan), f"{what}: NaN positions differ"
        ulps = (ordered_bits(actual) - ordered_bits(expected)).abs()[~nan]
        near = (actual.float() - expected.float()).abs()[~nan] <= atol
        assert ulps.numel() == 0 or ((ulps <= 1) | near).all(), f"{what}: {ulps.max().item()} ulps apart"
        return
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def assert_identical(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def compare(op: str, inputs: dict, kwargs: dict, diagnostics: bool) -> dict:
    """Reference and numba on the same inputs; returns numba's outputs.

    States, grad_refs, origins and hvps involve no sqrt or log, so they must be bit-identical, and
    so must the parameters of SGD and sign-Lion and those of a probe pass without sqrt; the rest
    (AdamW and smooth-Lion parameters, the diagnostics, which are also summed in another order)
    within assert_matches' tolerance; the count of limited elements is exact where the parameters are, and
    otherwise differs by no more than the number of parameters that do.
    The probe norms sum the same terms in another order: 1e-12 relative where the direction is exact.
    """
    expected = run(op, "reference", inputs, kwargs, diagnostics)
    actual = run(op, "numba", inputs, kwargs, diagnostics)
    fp64_math = bool(inputs["params"]) and inputs["params"][0].dtype == torch.float64
    smooth = op == "lion" and kwargs.get("smoothing", 0.0) != 0.0
    if kwargs.get("probe"):
        exact_params = not smooth and not (op == "adamw" and kwargs.get("eps_inside_sqrt"))
    else:
        exact_params = op == "sgd" or (op == "lion" and not smooth)
    for key in ("params", "states", "grad_refs", "origins", "hvps"):
        for i, (a, e) in enumerate(zip(actual[key], expected[key])):
            check = assert_identical if key != "params" or exact_params else assert_matches
            check(a, e, f"{key}[{i}]", *(() if check is assert_identical else (fp64_math,)))
    for a, e in zip(actual["probe_norms"], expected["probe_norms"]):
        torch.testing.assert_close(a, e, rtol=1e-12 if exact_params else 1e-6, atol=0.0, msg=lambda m: f"norms: {m}")
    for a, e in zip(actual["diagnostics"], expected["diagnostics"]):
        slack = diagnostics_slack(e, rounding_sensitivity(op, inputs, kwargs, fp64_math), fp64_math)
        close = ((a - e).abs() <= (1e-12 if fp64_math else 1e-6) * e.abs() + slack) | (a == e) | (a.isnan() & e.isnan())
        assert close.all(), f"diagnostics: numba {a.tolist()}, reference {e.tolist()}, slack {slack.tolist()}"
        # The limit compares |alpha h^2 M| with kappa h |F|: where F is exact, so is the count; where F takes a
        # sqrt that rounds differently (torch's vs IEEE), an element on the boundary may fall either way, and
        # its parameter then differs too, so the counts differ by at most the elements whose parameters do.
        differing = 0 if exact_params else sum(int((x != y).sum())
                                               for x, y in zip(actual["params"], expected["params"]))
        assert abs(a[6] - e[6]) <= differing, f"limited: numba {a[6].item()}, reference {e[6].item()}, " \
                                              f"{differing} parameters differ"
    return actual


def diagnostics_slack(expected: torch.Tensor, sensitivity: torch.Tensor, fp64_math: bool) -> torch.Tensor:
    """Absolute slack per slot on top of the relative tolerance: twice the rounding sensitivity; for the
    sums of F^2, memory^2 and residual^2, whose terms come from the same F and u (so a rounding of one of
    those moves all three), the relative tolerance of the largest of them; for the sum of (lr M)^2, 20
    units in the last place (M is the product of about ten rounded operations, with a sqrt that MKL may
    round the other way)."""
    unit = 2.0 ** (-53 if fp64_math else -24)
    shared = (1e-12 if fp64_math else 1e-6) * expected[[0, 2, 3]].abs().max()
    slack = 2 * sensitivity
    slack[[0, 2, 3]] += shared if shared.isfinite() else 0.0
    slack[1] += 20 * unit * expected[1].abs() if expected[1].isfinite() else 0.0
    return slack


def rounding_sensitivity(op: str, inputs: dict, kwargs: dict, fp64_math: bool) -> torch.Tensor:
    """How far the reference's diagnostics, computed in float64, move when the inputs move by a few roundings.

    F = step + decay, the memory F - u, the residual and M can cancel, so a sum of few terms may be
    ill-conditioned, and no kernel rounding in the compute dtype can be held closer than about this.
    The largest move over four random-sign draws of 4 units in the last place.
    """
    gen = torch.Generator().manual_seed(61)
    unit = 4 * 2.0 ** (-53 if fp64_math else -24)

    def moved(by: float) -> dict:
        def move(t):
            sign = torch.randint(0, 2, t.shape, generator=gen).double() * 2 - 1
            return t.double() * (1 + by * sign)
        return {"params": [move(t) for t in inputs["params"]], "grads": [move(t) for t in inputs["grads"]],
                "states": [[move(t) for t in lst] for lst in inputs["states"]],
                "grad_refs": [move(t) for t in inputs["grad_refs"]],
                "origins": [move(t) for t in inputs.get("origins", [])],
                "hvps": [move(t) for t in inputs.get("hvps", [])]}

    base = run(op, "reference", moved(0.0), kwargs, True)["diagnostics"][0]
    shifts = [(run(op, "reference", moved(unit), kwargs, True)["diagnostics"][0] - base).abs() for _ in range(4)]
    return torch.stack(shifts).amax(dim=0)


# ---------------------------------------------------------------- resolution

def test_forcing_numba_resolves_to_the_numba_kernel(monkeypatch):
    for op in ("adamw", "lion", "sgd"):
        assert backends.resolve(op, "numba", "cpu") == ("numba", getattr(nb, op))
    monkeypatch.setenv("MEMKERNELS_BACKEND", "numba")
    assert backends.resolve("adamw", "auto", "cpu") == ("numba", nb.adamw)
    monkeypatch.delenv("MEMKERNELS_BACKEND")
    assert backends.resolve("sgd", "auto", "cpu")[0] == "numba"  # numba is auto's first choice on CPU
    assert backends.load("numba").startswith("available")


# ---------------------------------------------------------------- modes and dtypes

# The plain and full modes are checked the same way on 150 tensors (test_plain_many_tensors_match_reference,
# test_many_tensors_in_one_call_match_reference); the rest here on a few.
FEW_TENSOR_MODES = [m for m in MODES if m[1] not in ("plain", FULL[m[0]])]


@pytest.mark.parametrize("op,name,kwargs,refs,diagnostics", FEW_TENSOR_MODES,
                         ids=[f"{m[0]}-{m[1]}" for m in FEW_TENSOR_MODES])
def test_mode_matches_reference(op, name, kwargs, refs, diagnostics):
    shapes = [(3 * CHUNK + 17,), (5, 7), (1,)]  # several chunks, a 2-D tensor, one element
    inputs = make_inputs(op, shapes, refs=refs, seed=MODES.index(mode(op, name)),
                         momentum=kwargs.get("momentum", 1.0) != 0)
    compare(op, inputs, kwargs, diagnostics)


# bf16/fp32 and fp16/fp16 in the full modes: test_many_tensors_in_one_call_match_reference
@pytest.mark.parametrize("op,dtype,state_dtype", [
    ("adamw", torch.float64, torch.float64), ("lion", torch.float64, torch.float64), ("sgd", torch.float64, torch.float64),
    ("adamw", torch.bfloat16, torch.bfloat16), ("sgd", torch.float16, torch.float32),
    ("adamw", torch.float32, torch.float64),
])
def test_dtypes_match_reference(op, dtype, state_dtype):
    _, _, kwargs, refs, diagnostics = mode(op, FULL[op])
    inputs = make_inputs(op, [(CHUNK + 999,), (4, 3)], dtype, state_dtype, refs=refs, seed=7)
    compare(op, inputs, kwargs, diagnostics)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_write_back_rounds_to_nearest_even(dtype):
    """Values near ties, subnormals, Inf and NaN pass through the kernel's half rounding as through torch's.

    Nesterov SGD with g = 0, momentum 1/2, lr 2 and momentum_buffer 2x writes p = 0 - 2 (x / 2) = -x,
    every step exact (the fp32 subnormals below have even significands), so p is -x rounded once.
    """
    subnormals = torch.tensor([0x5A5A4, 0x3FFE, 0x18000], dtype=torch.int32).view(torch.float32)
    x = torch.cat([torch.tensor([1.00390625, 1.01171875, 1 + 2 ** -8 + 2 ** -20, 1 + 2 ** -11, 1 + 2 ** -11 + 2 ** -20,
                                 65519.0, 65520.0, 6e-8, 1e-6, 2e-38, float("inf"), float("nan")]), subnormals])
    zeros = lambda dt: torch.zeros(x.shape, dtype=dt)  # noqa: E731
    inputs = {"params": [zeros(dtype)], "grads": [zeros(dtype)], "states": [[2 * x]], "grad_refs": [zeros(torch.float32)]}
    _, _, kwargs, _, _ = mode("sgd", "nesterov_trajectory")
    kwargs = dict(kwargs, lr=2.0, momentum=0.5, weight_decay=0.0, hvp_scale=0.0, maximize=False, grad_scale=None)
    out = run("sgd", "numba", inputs, kwargs, True)["params"][0]
    want = (-x).to(dtype)
    nan = want.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(ordered_bits(out)[~nan], ordered_bits(want)[~nan])


@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_half_load_keeps_specials(dtype, state_dtype):
    """AdamW with zero gradient, state and decay leaves p as it was: a round trip through load and store."""
    p = torch.tensor([1.0, -2.5, 3e-39, 1e-40, 6e-8, -0.0, 60000.0, float("inf"), -float("inf"), float("nan")]).to(dtype)
    zeros = lambda dt: torch.zeros(p.shape, dtype=dt)  # noqa: E731
    inputs = {"params": [p], "grads": [zeros(dtype)], "states": [[zeros(state_dtype)], [zeros(state_dtype)]],
              "grad_refs": [zeros(state_dtype)]}
    _, _, kwargs, _, _ = mode("adamw", "trajectory")
    out = run("adamw", "numba", inputs, dict(kwargs, weight_decay=0.0, hvp_scale=0.0), True)["params"][0]
    nan = p.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(ordered_bits(out)[~nan], ordered_bits(p)[~nan])


# ---------------------------------------------------------------- the limit, origins, kept estimates, the probe pass

TAU = torch.tensor(1e-2, dtype=torch.float64)
SHAPES = [(3 * CHUNK + 17,), (5, 7), (1,)]


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_limit_acts_on_a_good_fraction_of_elements(op):
    """The limit acts where the reference's does (compare checks the count exactly), on a fifth to nine tenths."""
    n = 3 * CHUNK + 17
    diag = compare(op, make_inputs(op, [(n,)], refs=True, seed=63), LIMITED[op], True)["diagnostics"][0]
    assert 0.2 * n < diag[6] < 0.9 * n


@pytest.mark.parametrize("op,name", [("adamw", "limited"), ("adamw", "probe_coupled_eps_inside"),
                                     ("lion", "limited_smooth"), ("sgd", "nesterov_trajectory")])
def test_step_reads_theta_from_origins(op, name):
    """With origins, theta comes from them (params hold theta + tau d) and the new theta goes to params."""
    _, _, kwargs, refs, diagnostics = mode(op, name)
    inputs = make_inputs(op, SHAPES, refs=refs, seed=65, origins=True)
    out = compare(op, inputs, kwargs, diagnostics)
    assert all(torch.equal(a, b) for a, b in zip(out["origins"], inputs["origins"]))
    from_params = run(op, "numba", dict(inputs, params=inputs["origins"], origins=[]), kwargs, diagnostics)
    for key in ("params", "states", "grad_refs", "diagnostics"):
        assert all(torch.equal(a, b) for a, b in zip(out[key], from_params[key])), key


@pytest.mark.parametrize("op,name", [("adamw", "trajectory"), ("adamw", "probe_coupled_eps_inside"),
                                     ("lion", "limited_smooth"), ("sgd", "nesterov_trajectory")])
def test_hvps_are_stored_then_reused(op, name):
    """A step that estimates H d keeps the estimate in hvps; a step with reuse_hvp reads it there instead
    of estimating it from grad_refs, and moves the same parameters and states the same way."""
    _, _, kwargs, _, diagnostics = mode(op, name)
    inputs = make_inputs(op, SHAPES, refs=True, seed=67, hvps=True)
    stored = compare(op, inputs, kwargs, diagnostics)
    reused = compare(op, dict(inputs, grad_refs=[], hvps=stored["hvps"]), dict(kwargs, reuse_hvp=True), diagnostics)
    for key in ("params", "states", "diagnostics"):
        assert all(torch.equal(a, b) for a, b in zip(reused[key], stored[key])), key


@pytest.mark.parametrize("op,kwargs", [
    ("adamw", {}), ("adamw", dict(decoupled=False, eps_inside_sqrt=True, **AMP)), ("lion", {}),
    ("lion", dict(smoothing=0.01, **AMP)), ("sgd", {}), ("sgd", dict(weight_decay=0.0, **AMP)),
], ids=["adamw", "adamw-coupled-eps-inside-amp", "lion-sign", "lion-smooth-amp", "sgd", "sgd-no-decay-amp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probe_pass_matches_reference(op, kwargs, dtype):
    """theta + tau d into params, theta into origins, the sums of theta^2 and d^2 into probe_norms;
    states and grad_refs untouched."""
    inputs = make_inputs(op, SHAPES, dtype, refs=True, seed=69, origins=True)
    out = compare(op, inputs, dict(kwargs, probe=True, probe_tau=TAU), False)
    assert all(torch.equal(a, b) for a, b in zip(out["origins"], inputs["params"]))
    for key in ("states", "grad_refs"):
        assert all(torch.equal(a, b) for a, b in zip(out[key], (t for s in inputs[key] for t in s)
                                                     if key == "states" else inputs[key])), key


@pytest.mark.parametrize("dtype,nan_bits", [(torch.float32, 0x7FA00001), (torch.bfloat16, 0x7F81),
                                            (torch.float16, 0x7C01)], ids=["float32", "bfloat16", "float16"])
def test_probe_pass_copies_theta_bit_for_bit_and_needs_no_norms(dtype, nan_bits):
    """origins get theta's bits (a signalling NaN's too); without probe_norms the pass writes the same values."""
    int_type = torch.int32 if dtype == torch.float32 else torch.int16
    inputs = make_inputs("adamw", [(CHUNK + 9,)], dtype, refs=False, seed=71, origins=True)
    params = inputs["params"][0]
    params[:7] = torch.tensor([float("inf"), -float("inf"), -0.0, 0.0, 1e-40, float("nan"), 0.0]).to(dtype)
    params.view(int_type)[6] = nan_bits
    kwargs = dict(probe=True, probe_tau=TAU)
    measured = run("adamw", "numba", inputs, kwargs, False)
    p, origins = params.clone(), [torch.zeros_like(params)]
    _ops.adamw_([p], inputs["grads"], *inputs["states"], [], None, origins=origins, backend="numba",
                **BASE["adamw"], **kwargs)
    assert torch.equal(origins[0].view(int_type), params.view(int_type))
    assert torch.equal(measured["origins"][0].view(int_type), params.view(int_type))
    assert torch.equal(p.view(int_type), measured["params"][0].view(int_type))
    assert torch.equal(p.isnan(), run("adamw", "reference", inputs, kwargs, False)["params"][0].isnan())


@pytest.mark.parametrize("op,name", [("adamw", "probe_coupled_eps_inside"), ("sgd", "no_momentum_memoryless_probe")])
@pytest.mark.parametrize("tau", [1e-3, 0.0])
def test_probe_tau_replaces_hvp_scale(op, name, tau):
    """A step given probe_tau estimates H d with 1 / tau (0 for tau = 0) in place of hvp_scale."""
    _, _, kwargs, refs, diagnostics = mode(op, name)
    inputs = make_inputs(op, SHAPES, refs=refs, seed=73, momentum=kwargs.get("momentum", 1.0) != 0)
    given = compare(op, inputs, dict(kwargs, hvp_scale=123.0, probe_tau=torch.tensor(tau, dtype=torch.float64)),
                    diagnostics)
    scaled = run(op, "numba", inputs, dict(kwargs, hvp_scale=1 / tau if tau else 0.0), diagnostics)
    assert all(torch.equal(a, b) for a, b in zip(flat(given), flat(scaled)))


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16)])
def test_probe_pass_then_step_on_many_tensors(op, dtype, state_dtype):
    """The probe estimate's two calls over 150 tensors: the probe pass, then the step from the origins with the
    probe gradient, 1 / tau, diagnostics and the estimate kept in hvps, each against the reference."""
    _, _, kwargs, _, _ = mode(op, FULL[op])
    inputs = make_inputs(op, mixed_shapes(150, seed=75), dtype, state_dtype, refs=True, seed=77, origins=True,
                         hvps=True)
    probed = compare(op, dict(inputs, grad_refs=[], hvps=[]), dict(kwargs, probe=True, probe_tau=TAU), False)
    step = dict(kwargs, update_grad_refs=False, probe_tau=TAU)
    out = compare(op, dict(inputs, params=probed["params"], origins=probed["origins"]), step, True)
    assert out["diagnostics"][0][6] > 0


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_found_inf_skips_the_probe_pass(op):
    inputs = make_inputs(op, [(100,)], refs=False, seed=79, origins=True)
    out = run(op, "numba", inputs, dict(probe=True, probe_tau=TAU, found_inf=torch.tensor(1.0)), False)
    assert torch.equal(out["params"][0], inputs["params"][0]) and torch.equal(out["origins"][0], inputs["origins"][0])
    assert torch.equal(out["probe_norms"][0], torch.zeros(2, dtype=torch.float64))



def off_line(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of t that starts offset bytes past a 64-byte boundary (frombuffer takes any byte offset)."""
    if not t.numel():
        return t.clone()
    raw = torch.empty(t.numel() * t.element_size() + 128, dtype=torch.uint8)
    return torch.frombuffer(raw.numpy(), dtype=t.dtype, count=t.numel(),
                            offset=-raw.data_ptr() % 64 + offset).view(t.shape).copy_(t)


@pytest.mark.parametrize("op,dtype,state_dtype", [("adamw", torch.float32, torch.float32),
                                                  ("adamw", torch.bfloat16, torch.float32),
                                                  ("lion", torch.float64, torch.float64),
                                                  ("sgd", torch.float16, torch.float16)])
def test_streaming_stores_write_the_same_bits(op, dtype, state_dtype, monkeypatch):
    """Streaming stores (forced on in these small calls) write origins in the probe pass and params in the step
    from the origins: both calls match the reference and write the bits that plain stores write, also into
    tensors that start off a cache line, or off their element size (stream()'s plain stores)."""
    _, _, kwargs, _, _ = mode(op, FULL[op])
    inputs = make_inputs(op, mixed_shapes(40, seed=81) + [(SCRATCH + 1,), (3 * CHUNK + 17,)], dtype, state_dtype,
                         refs=True, seed=83, origins=True)
    probe, step = dict(kwargs, probe=True, probe_tau=TAU), dict(kwargs, update_grad_refs=False, probe_tau=TAU)
    size = inputs["params"][0].element_size()
    written, norms = [], []
    for stream in (False, True):
        if stream:
            monkeypatch.setattr(nb_host, "STREAM_MIN_BYTES", 0)
        probed = compare(op, dict(inputs, grad_refs=[]), probe, False)
        stepped = compare(op, dict(inputs, params=probed["params"], origins=probed["origins"]), step, True)
        norms.append(probed["probe_norms"][0])
        written.append(flat(dict(probed, probe_norms=[])) + flat(stepped))
        for offset in (size, size + 1):
            params = [off_line(t, offset) for t in inputs["params"]]
            origins = [off_line(t, 2 * offset) for t in inputs["origins"]]
            states = [[t.clone() for t in s] for s in inputs["states"]]
            call = getattr(_ops, op + "_")
            call(params, inputs["grads"], *states, [], None, backend="numba", origins=origins,
                 probe_norms=torch.zeros(2, dtype=torch.float64), **{**BASE[op], **probe})
            written[-1] += [t.clone() for t in params + origins]
            call(params, inputs["grads"], *states, inputs["grad_refs"], torch.zeros(NDIAG, dtype=torch.float64),
                 backend="numba", origins=origins, **{**BASE[op], **step})
            written[-1] += params + [t for s in states for t in s]
    for a, b in zip(*written, strict=True):
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    torch.testing.assert_close(*norms, rtol=1e-12, atol=0.0)  # summed in blocks when streaming


# ---------------------------------------------------------------- semantics

@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_nan_and_inf_match_reference(op):
    _, _, kwargs, refs, diagnostics = mode(op, FULL[op])
    n = CHUNK + 3
    inputs = make_inputs(op, [(n,)], refs=refs, seed=3)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30, 3e38])
    for key in ("grads", "params", "grad_refs"):
        t = inputs[key][0]
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(len(key)))[:70]
        t[idx] = specials.repeat(10)
    diag = compare(op, inputs, kwargs, diagnostics)["diagnostics"][0]
    assert not diag.isfinite().all()  # the specials reached the diagnostics, as they reach the reference's


@pytest.mark.parametrize("eps_inside_sqrt, scale", [(False, 1e19), (True, 1e13)])
def test_huge_gradients_match_reference(eps_inside_sqrt, scale):
    """Gradients whose a^2 (a^3) is past float32's range: M, hence p and the (lr M)^2 sum, as the reference's."""
    inputs = make_inputs("adamw", [(CHUNK + 3,)], refs=True, seed=7)
    inputs["grads"] = [g * scale for g in inputs["grads"]]
    inputs["grad_refs"] = [r * scale for r in inputs["grad_refs"]]
    compare("adamw", inputs, dict(TRAJECTORY, eps_inside_sqrt=eps_inside_sqrt), True)


def test_zero_correction_never_touches_p_with_M():
    """correction == 0 with an infinite reference gradient: M is NaN, p still equals the plain step."""
    inputs = make_inputs("adamw", [(1000,)], refs=True, seed=5)
    inputs["grad_refs"][0][::3] = float("inf")
    measured = run("adamw", "numba", inputs, dict(TRAJECTORY, correction=0.0), True)
    plain = run("adamw", "numba", {**inputs, "grad_refs": []}, {}, False)
    for a, b in zip(measured["params"] + measured["states"], plain["params"] + plain["states"]):
        assert torch.equal(a, b)
    assert not measured["diagnostics"][0][1].isfinite()  # correction_sq saw the infinite M


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_found_inf_changes_nothing(op):
    _, _, kwargs, refs, diagnostics = mode(op, FULL[op])
    inputs = make_inputs(op, [(100,)], refs=refs, seed=11)
    out = run(op, "numba", inputs, dict(kwargs, found_inf=torch.tensor(1.0)), diagnostics)
    before = [*inputs["params"], *(t for s in inputs["states"] for t in s), *inputs["grad_refs"],
              torch.zeros(NDIAG, dtype=torch.float64)]
    after = flat(out)
    assert len(after) == len(before) - (not diagnostics)
    for a, b in zip(after, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_runs_are_bit_identical(op):
    _, _, kwargs, refs, diagnostics = mode(op, FULL[op])
    inputs = make_inputs(op, [(7 * CHUNK + 123,), (301,)], refs=refs, seed=13)
    first = run(op, "numba", inputs, kwargs, diagnostics)
    second = run(op, "numba", inputs, kwargs, diagnostics)
    for a, b in zip(flat(first), flat(second)):
        assert torch.equal(a, b)


def test_dense_non_contiguous_tensors():
    """A transposed parameter is dense: the kernel walks its storage, element-aligned with its gradient's."""
    inputs = make_inputs("adamw", [(300, 70)], refs=True, seed=17)
    for key in ("params", "grads", "grad_refs"):
        inputs[key] = [t.t() for t in inputs[key]]
    inputs["states"] = [[t.t() for t in s] for s in inputs["states"]]
    _, _, kwargs, _, _ = mode("adamw", "trajectory")
    out = compare("adamw", inputs, kwargs, True)
    assert out["params"][0].stride() == (1, 70)


# ---------------------------------------------------------------- one call for many tensors

def mixed_shapes(count: int, seed: int) -> list[tuple[int, ...]]:
    """Sizes around the chunk and sub-block boundaries, empty and one-element tensors among them."""
    rng = np.random.default_rng(seed)
    special = [0, 1, 2, SUB_BLOCK - 1, SUB_BLOCK, SUB_BLOCK + 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + SUB_BLOCK + 3]
    sizes = [special[i] if i < len(special) else int(rng.integers(0, 3000)) for i in range(count)]
    rng.shuffle(sizes)
    return [(n,) if n % 3 else (1, n) for n in sizes]


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16)])
def test_many_tensors_in_one_call_match_reference(op, dtype, state_dtype):
    _, _, kwargs, refs, diagnostics = mode(op, FULL[op])
    inputs = make_inputs(op, mixed_shapes(150, seed=21), dtype, state_dtype, refs=refs, seed=23)
    compare(op, inputs, kwargs, diagnostics)


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_plain_many_tensors_match_reference(op):
    _, _, kwargs, refs, diagnostics = mode(op, "plain")
    compare(op, make_inputs(op, mixed_shapes(150, seed=25), refs=refs, seed=27), kwargs, diagnostics)


def test_only_empty_tensors_change_nothing():
    inputs = make_inputs("adamw", [(0,), (0, 3)], refs=True, seed=29)
    out = run("adamw", "numba", inputs, mode("adamw", "trajectory")[2], True)
    assert torch.equal(out["diagnostics"][0], torch.zeros(NDIAG, dtype=torch.float64))


@pytest.mark.parametrize("probe", [False, True])
@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_many_tensors_are_bit_identical_across_runs_and_thread_counts(op, probe):
    """Diagnostics and probe norms are summed per chunk and added in work order: no dependence on the threads."""
    _, _, kwargs, refs, diagnostics = mode(op, FULL[op])
    if probe:
        kwargs, refs, diagnostics = dict(kwargs, probe=True, probe_tau=TAU), False, False
    inputs = make_inputs(op, mixed_shapes(60, seed=31) + [(5 * CHUNK + 7,)], refs=refs, seed=33, origins=probe)
    first = run(op, "numba", inputs, kwargs, diagnostics)
    second = run(op, "numba", inputs, kwargs, diagnostics)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        single = run(op, "numba", inputs, kwargs, diagnostics)
    finally:
        numba.set_num_threads(threads)
    for a, b, c in zip(flat(first), flat(second), flat(single)):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_views_of_one_buffer():
    """Parameters, gradients and states that are slices and reshaped views of one flat buffer each."""
    shapes = [(7, 5), (0,), (CHUNK + 3,), (1,), (40, 30)]
    sizes = [int(np.prod(s)) for s in shapes]
    offsets = np.cumsum([0] + [n + 3 for n in sizes])  # gaps between the views
    dense = make_inputs("adamw", [(int(offsets[-1]),)], refs=True, seed=35)
    views = lambda buf: [buf[o:o + n].view(s) for o, n, s in zip(offsets, sizes, shapes)]  # noqa: E731
    inputs = {"params": views(dense["params"][0]), "grads": views(dense["grads"][0]),
              "states": [views(s[0]) for s in dense["states"]], "grad_refs": views(dense["grad_refs"][0])}
    _, _, kwargs, _, _ = mode("adamw", "trajectory")
    compare("adamw", inputs, kwargs, True)
    # in place on the views: the gaps between them stay as they were
    params = dense["params"][0].clone()
    _ops.adamw_(views(params), inputs["grads"], *[[t.clone() for t in s] for s in inputs["states"]],
                [t.clone() for t in inputs["grad_refs"]], None, backend="numba", **{**BASE["adamw"], **kwargs})
    gaps = torch.ones(params.numel(), dtype=torch.bool)
    for o, n in zip(offsets, sizes):
        gaps[o:o + n] = False
    assert torch.equal(params[gaps], dense["params"][0][gaps])
    assert not torch.equal(params[~gaps], dense["params"][0][~gaps])


def test_new_tensors_of_the_same_sizes_get_their_own_table():
    """The address table is cached by address: a second set of tensors is updated, the first is left alone."""
    _, _, kwargs, refs, diagnostics = mode("sgd", "plain")
    first, second = (make_inputs("sgd", mixed_shapes(20, seed=37), refs=refs, seed=s) for s in (39, 41))
    run("sgd", "numba", first, kwargs, diagnostics)
    before = [t.clone() for t in first["params"]]
    compare("sgd", second, kwargs, diagnostics)
    assert all(torch.equal(a, b) for a, b in zip(first["params"], before))


def test_diagnostic_sums_past_the_float32_range_stay_finite():
    """Terms near 1e36 sum past float32's 3.4e38 in every sub-block; the float64 totals stay finite like the reference's."""
    _, _, kwargs, refs, _ = mode("sgd", "plain")
    inputs = make_inputs("sgd", [(3 * SUB_BLOCK + 5,)], refs=refs, seed=43)
    inputs["grads"] = [torch.full_like(inputs["grads"][0], 1.5e18)]  # 0.5 g^2 = 1.1e36, g~^2 = 2.3e36 per element
    diag = compare("sgd", inputs, dict(kwargs, weight_decay=0.0), True)["diagnostics"][0]
    assert diag[0].isfinite() and diag[0] > 3.4e38 and diag[4] > 3.4e38


# ---------------------------------------------------------------- AdamW's penalty sum (numba/_penalty.py)

def adamw_penalty_inputs(grads: torch.Tensor, seed: int) -> dict:
    inputs = make_inputs("adamw", [tuple(grads.shape)], refs=True, seed=seed)
    inputs["grads"] = [grads.to(torch.float32)]
    return inputs


@pytest.mark.parametrize("low,high", [(1e-12, 1e3), (0.5, 20.0), (1e-3, 1e-1), (1e4, 1e7)])
def test_penalty_sum_over_gradient_scales(low, high):
    """|g| / eps log-uniform in [low, high]: from far below eps (the log part cancels |g|) to far above it."""
    gen = torch.Generator().manual_seed(51)
    n = 3 * CHUNK + SUB_BLOCK + 9
    ratio = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(np.log(low), np.log(high), generator=gen))
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    inputs = adamw_penalty_inputs(ratio * sign * BASE["adamw"]["eps"], seed=53)
    diag = compare("adamw", inputs, mode("adamw", "trajectory")[2], True)["diagnostics"][0]
    assert diag[4] > 0


@pytest.mark.parametrize("mantissa", [2 ** -0.5, 2 ** 0.5, 1.0, 1.25])
def test_penalty_sum_of_equal_gradients(mantissa):
    """u = 1 + |g| / eps the same in every element, one ulp either side of mantissa * 2**9: a sub-block's 256
    equal factors take its product of mantissas to its extremes (about 2**+-128 next to sqrt(2))."""
    center = np.float32(mantissa * 2.0 ** 9)
    for ulps in (-1, 0, 1):
        u = float(center + ulps * np.spacing(center))
        grads = torch.full((2 * SUB_BLOCK + 3,), (u - 1.0) * BASE["adamw"]["eps"])
        compare("adamw", adamw_penalty_inputs(grads, seed=55), mode("adamw", "trajectory")[2], True)


@pytest.mark.parametrize("eps,special", [(1e-8, 1e35), (1e-8, float("inf")), (1e-8, float("nan")), (1e-40, 1.0)])
def test_penalty_sub_blocks_with_specials_are_summed_per_element(eps, special):
    """|g| / eps past float32's range, Inf or NaN in one sub-block: that sub-block takes the per-element
    formula (the reference's -Inf, NaN), the others keep the product; subnormal eps overflows 1 / eps."""
    inputs = make_inputs("adamw", [(4 * SUB_BLOCK,)], refs=True, seed=57)
    inputs["grads"][0][SUB_BLOCK + 7] = special
    kwargs = dict(mode("adamw", "trajectory")[2], eps=eps)
    expected = run("adamw", "reference", inputs, kwargs, True)["diagnostics"][0]
    actual = compare("adamw", inputs, kwargs, True)["diagnostics"][0]
    assert torch.equal(actual[4].isfinite(), expected[4].isfinite())


def test_penalty_sub_block_whose_float32_sum_of_abs_g_overflows():
    """|g| = 3e36 in every element (eps = 1 keeps |g| / eps finite): a sub-block's float32 sum of |g|
    (summed unscaled) overflows, so each sub-block is summed again per element in float64, finite like
    the reference's float64 sum."""
    grads = torch.full((2 * SUB_BLOCK + 3,), 3e36)
    kwargs = dict(mode("adamw", "trajectory")[2], eps=1.0)
    diag = compare("adamw", adamw_penalty_inputs(grads, seed=59), kwargs, True)["diagnostics"][0]
    assert diag[4].isfinite() and diag[4] > 3.4e38


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_split_gives_mantissa_and_biased_exponent(dtype):
    """u = 2**(e - bias) m exactly, m in [sqrt(1/2), sqrt(2)), over u from 1 to the dtype's largest value."""
    @njit
    def split_all(u):
        m = np.empty_like(u)
        e = np.empty(u.size, np.int64)
        for i in range(u.size):
            m[i], e[i] = _split(u[i])
        return m, e

    info = np.finfo(dtype)
    rng = np.random.default_rng(59)
    u = np.concatenate([np.exp(rng.uniform(0.0, np.log(float(info.max)), 100_000)),
                        [1.0, 2 ** 0.5, np.nextafter(2 ** 0.5, 0), 2.0, float(info.max)]]).astype(dtype)
    m, e = split_all(u)
    bias = 127 if dtype == np.float32 else 1023
    assert np.all(m >= dtype(2 ** -0.5)) and np.all(m < dtype(2 ** 0.5))
    assert np.array_equal(np.ldexp(m, (e - bias).astype(np.int32)), u)


# ---------------------------------------------------------------- shapes and seeds

_shape = st.one_of(st.just((0,)), st.just((1,)), st.integers(2, 3 * CHUNK).map(lambda n: (n,)),
                   st.tuples(st.integers(1, 40), st.integers(1, 40)), st.just((1_000_003,)))


@settings(max_examples=12, deadline=None)
@given(shapes=st.lists(_shape, min_size=1, max_size=3), seed=st.integers(0, 2 ** 16),
       name=st.sampled_from(["plain", "trajectory"]))
def test_shapes_and_seeds(shapes, seed, name):
    op, _, kwargs, refs, diagnostics = mode("adamw", name)
    compare(op, make_inputs(op, shapes, refs=refs, seed=seed), kwargs, diagnostics)


def test_status_reports_first_calls_and_a_second_process_loads_from_the_cache():
    status = nb.numba_status()  # runs (so compiles or loads, then caches) the fp32 AdamW fast path
    assert status.startswith("numba ") and "threads" in status and "loaded" in status
    assert nb.first_calls and all(c.seconds >= 0 for c in nb.first_calls)
    code = "from memkernels.backends import numba as nb; print(nb.numba_status())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "kernel loaded from the disk cache" in out.stdout, out.stdout + out.stderr


def test_only_the_sgd_kernel_is_built_for_256_bit_vectors(tmp_path):
    """The vector-width hint reaches LLVM's IR of SGD's kernel and no other (compiled afresh in a
    process with an empty cache: a kernel loaded from the cache has no IR to inspect)."""
    code = """
import torch
from memkernels.backends import numba as nb
from memkernels.backends.numba import kernels as K
x = [torch.ones(100)]
common = dict(maximize=False, memoryless=False, update_grad_refs=False, grad_scale=None, found_inf=None,
              correction=0.0, correction_limit=0.5, hvp_scale=0.0, origins=[], hvps=[], reuse_hvp=False, probe=False,
              probe_tau=0.0, probe_norms=None)
nb.sgd(x, x, [torch.ones(100)], [], None, lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=False,
       update_scale=1.0, memory_coef=0.0, **common)
nb.lion(x, x, [torch.ones(100)], [], None, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, smoothing=0.0,
        ema_weight=0.1, age_weight=1.0, **common)
for name, kernel in (("sgd", K.step_kernel("sgd", (True, False, False), *[False] * 10)),
                     ("lion", K.step_kernel("lion", (False, False), *[False] * 10))):
    print(name, '"prefer-vector-width"="256"' in kernel.inspect_llvm(kernel.signatures[0]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True,
                         env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert out.stdout.split() == ["sgd", "True", "lion", "False"], out.stdout + out.stderr


def test_an_llvmlite_without_the_hint_builds_the_kernel_and_warns(monkeypatch):
    """If llvmlite refuses the attribute, the function compiles at LLVM's default width, with a warning."""
    from memkernels.backends.numba import kernels as K

    class Refusing(K._FunctionAttributes):
        def add(self, name):
            raise ValueError(f"unknown attr {name!r}")

    monkeypatch.setattr(K, "_FunctionAttributes", Refusing)

    @njit
    def doubled(x):
        K.prefer_256_bit_vectors()
        return 2 * x

    with pytest.warns(RuntimeWarning, match="no vector-width hint"):
        assert doubled(21) == 42


def test_float32_log1p_is_within_two_ulps():
    """The kernels' division-free float32 log1p against float64 numpy over the whole float32 range."""
    @njit
    def evaluate(x):
        out = np.empty_like(x)
        for i in range(x.size):
            out[i] = log1p(x[i])
        return out

    rng = np.random.default_rng(0)
    x = np.concatenate([np.exp(rng.uniform(np.log(1e-45), np.log(3e38), 200_000)), rng.uniform(0.0, 4.0, 100_000),
                        np.array([0.0, 1e-45, 2 ** -24, 0.41421356, 1.0, 2.0 ** 127, 3.4e38])]).astype(np.float32)
    exact = np.log1p(x.astype(np.float64))
    ulps = np.abs(evaluate(x) - exact) / np.spacing(exact.astype(np.float32))
    assert ulps.max() <= 2.0, f"{ulps.max()} ulps at x = {x[ulps.argmax()]}"
    specials = evaluate(np.array([np.inf, np.nan], np.float32))
    assert specials[0] == np.inf and np.isnan(specials[1])


def test_add_one_counts_as_torch_adds():
    """The optimizers' one-call step count: CPU float32 scalars gain 1 exactly as torch's float32 add
    (past 2**24 too); any other count is left to the caller, untouched."""
    values = [0.0, 1.0, 2.0 ** 24 - 1, 2.0 ** 24, 2.0 ** 24 + 2, 3e38]
    counts = [torch.tensor(v) for v in values] + [torch.tensor([5.0])]
    expected = [c + 1.0 for c in counts]
    assert nb.add_one(counts)
    for got, want in zip(counts, expected):
        assert torch.equal(got, want)
    for others in ([torch.tensor(1.0, dtype=torch.float64)], [torch.tensor(1)], [torch.zeros(2)]):
        before = [t.clone() for t in others]
        assert not nb.add_one(counts[:1] + others)
        assert all(torch.equal(a, b) for a, b in zip(others, before)) and torch.equal(counts[0], expected[0])


def test_optimizer_step_counts_advance_through_numba_and_torch():
    """Counts a torch.optim checkpoint left as float64 still advance (torch's add), CPU float32 ones by add_one."""
    import memkernels as mk
    ps = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    opt = mk.AdamW(ps, lr=1e-3, backend="numba")
    for p in ps:
        p.grad = torch.randn(3)
    opt.step()
    opt.state[ps[0]]["step"] = opt.state[ps[0]]["step"].double()
    opt.step()
    opt.step()
    assert [opt.state[p]["step"].item() for p in ps] == [3.0, 3.0, 3.0]
    assert opt.state[ps[0]]["step"].dtype == torch.float64 and opt.state[ps[1]]["step"].dtype == torch.float32
