"""Every backend that runs here against the reference backend, for every op of memkernels.ops, generated from
the specs: an op added with its spec gets these checks without a test written for it.

Cases: each op's example scalars (its spec) in every mode (plain, AMP with maximize, diagnostics alone, the
trajectory correction, a probe gradient's correction, memoryless, the limiter acting, measuring only), every
flag's other value and every variant value in the trajectory mode, the probe pass, a step from origins that
keeps its estimate, and a step reusing it; the trajectory mode also in every dtype pair the backend takes.

Tolerances (TOLERANCE): every written tensor within tol x its largest finite magnitude of the reference's
(tol by the compute dtype: sqrt and log round differently in torch and in the kernels), half formats within one
ulp of it besides; the diagnostics, also summed in another order, within tol relative plus twice their
sensitivity to a few roundings of the inputs; the count of limited elements within the number of parameters
that differ (an element on the limit's boundary may fall either way when its F rounds differently). The
backends' own checks (bit-identical states, thread counts, caches, tables) are in their test modules.
"""
from __future__ import annotations

import pytest
import torch

from memkernels import _ops, backends
from memkernels.ops import SPECS
from memkernels.reference import NDIAG

TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}
SHAPES = [(5000,), (5, 7), (1,), (0,)]  # several chunks, a 2-D tensor, one element, none
TAU = 1e-2
AMP = dict(maximize=True, grad_scale=1024.0)
TRAJECTORY = dict(correction=-1.0, hvp_scale=10.0, update_grad_refs=True)
LIMITED = dict(TRAJECTORY, correction_limit=0.01)
PROBE_GRADIENT = dict(correction=0.5, hvp_scale=10.0, update_grad_refs=False)
# (name, keyword arguments, with grad_refs, with diagnostics)
MODES = [("plain", {}, False, False), ("amp", AMP, False, False), ("diagnostics", {}, False, True),
         ("trajectory", TRAJECTORY, True, True), ("probe_gradient", dict(PROBE_GRADIENT, **AMP), True, True),
         ("memoryless", dict(TRAJECTORY, memoryless=True), True, True),
         ("limited", LIMITED, True, True),
         ("measure_only", dict(TRAJECTORY, correction=0.0), True, True)]
DTYPES = {"numba": [(torch.bfloat16, torch.float32), (torch.float16, torch.float16), (torch.float64, torch.float64),
                    (torch.float32, torch.float64)],
          "triton": [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)]}


def _runs_here(backend: str) -> bool:
    return backends.load(backend).startswith("available") and all(
        backends.has_kernel(op, backend, "cpu") for op in SPECS)


BACKENDS = [b for b in ("numba", "triton") if _runs_here(b)]


def cases() -> list[tuple]:
    """(op, case name, scalars and modes, with grad_refs, with diagnostics, dtype, state dtype) per backend.
    Every mode and variant also with the flags' other values where a flag picks the code path (an eps large
    next to |g| makes the penalty's eps log1p(|g| / eps) term count in the sum)."""
    out = []
    for op, spec in SPECS.items():
        for name, kwargs, refs, diag in MODES:
            out.append((op, name, kwargs, refs, diag, torch.float32, torch.float32))
        if "eps" in spec.examples:
            for s in (x for x in spec.scalars if x.bounds is None):
                out.append((op, f"large_eps-{s.name}={not s.example}",
                            dict(TRAJECTORY, eps=0.5, **{s.name: not s.example}), True, True, torch.float32,
                            torch.float32))
            out.append((op, "large_eps", dict(TRAJECTORY, eps=0.5), True, True, torch.float32, torch.float32))
        for s in spec.scalars:
            values = ((not s.example,) if s.bounds is None else ()) + s.variants
            for value in values:
                out.append((op, f"{s.name}={value}", dict(TRAJECTORY, **{s.name: value}), True, True, torch.float32,
                            torch.float32))
            for value in s.variants:  # a variant may be what makes M nonzero (Lion's smoothing): limited there too
                out.append((op, f"{s.name}={value}-limited", dict(LIMITED, **{s.name: value}), True, True,
                            torch.float32, torch.float32))
    return out


def params_for(backend: str) -> list:
    out = []
    for op, name, kwargs, refs, diag, dtype, state_dtype in cases():
        out.append(pytest.param(backend, op, kwargs, refs, diag, dtype, state_dtype, id=f"{backend}-{op}-{name}"))
    for op in SPECS:
        for dtype, state_dtype in DTYPES[backend]:
            out.append(pytest.param(backend, op, TRAJECTORY, True, True, dtype, state_dtype,
                                    id=f"{backend}-{op}-trajectory-{dtype}-{state_dtype}"[:200]))
    return out


def make_inputs(op: str, kwargs: dict, dtype: torch.dtype, state_dtype: torch.dtype, *, refs: bool, seed: int,
                origins: bool = False, hvps: bool = False) -> dict:
    """Random params, grads, states (squares positive; a state absent where its scalar is 0), reference
    gradients near the grads, origins near the params, kept estimates."""
    gen = torch.Generator().manual_seed(seed)
    spec = SPECS[op]
    scalars = {**spec.examples, **kwargs}

    def randn(shape, scale=1.0, dt=dtype):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dt)

    params, grads = [randn(s) for s in SHAPES], [randn(s) for s in SHAPES]
    states = [[] if state.absent_when_zero and scalars[state.absent_when_zero] == 0.0
              else [randn(s, 0.1, state_dtype).abs() ** 2 if state.squares else randn(s, 0.1, state_dtype)
                    for s in SHAPES]
              for state in spec.states]
    return {"params": params, "grads": grads, "states": states,
            "grad_refs": [(g.double() + randn(g.shape, 0.1, torch.float64)).to(state_dtype) for g in grads]
            if refs else [],
            "origins": [(p.double() + randn(p.shape, 1e-3, torch.float64)).to(dtype) for p in params]
            if origins else [],
            "hvps": [randn(s, 1.0, state_dtype) for s in SHAPES] if hvps else []}


def run(op: str, backend: str, inputs: dict, kwargs: dict, diagnostics: bool) -> dict:
    """The op on clones of the inputs; every tensor it may write."""
    clone = lambda lst: [t.clone() for t in lst]  # noqa: E731
    params, states = clone(inputs["params"]), [clone(s) for s in inputs["states"]]
    grad_refs, origins, hvps = clone(inputs["grad_refs"]), clone(inputs["origins"]), clone(inputs["hvps"])
    diag = torch.zeros(NDIAG, dtype=torch.float64) if diagnostics else None
    norms = torch.zeros(2, dtype=torch.float64) if kwargs.get("probe") else None
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in kwargs.items()
               if k in ("grad_scale", "probe_tau") and not isinstance(v, torch.Tensor)}
    getattr(_ops, op + "_")(params, clone(inputs["grads"]), *states, grad_refs, diag, backend=backend,
                            origins=origins, hvps=hvps, probe_norms=norms,
                            **{**SPECS[op].examples, **kwargs, **tensors})
    return {"params": params, "states": [t for s in states for t in s], "grad_refs": grad_refs, "origins": origins,
            "hvps": hvps, "diagnostics": [diag] if diag is not None else [],
            "probe_norms": [norms] if norms is not None else []}


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Half-precision bits as integers in the order of the values (+0 and -0 both 0)."""
    bits = t.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    finite = expected[expected.isfinite()].abs()
    atol = tol * finite.max().item() if finite.numel() else 0.0
    if actual.dtype in (torch.bfloat16, torch.float16):
        nan = expected.isnan()
        assert torch.equal(actual.isnan(), nan), f"{what}: NaN positions differ"
        ulps = (_ordered(actual) - _ordered(expected)).abs()[~nan]
        near = (actual.float() - expected.float()).abs()[~nan] <= atol
        assert ulps.numel() == 0 or ((ulps <= 1) | near).all(), f"{what}: {ulps.max().item()} ulps apart"
        return
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def sensitivity(op: str, inputs: dict, kwargs: dict, tol: float) -> torch.Tensor:
    """How far the reference's diagnostics, in float64, move when every input moves by 4 roundings of the
    compute dtype (random signs, the largest of four draws): F, u, the memory and the residual can cancel."""
    gen = torch.Generator().manual_seed(61)
    unit = 4 * (2.0 ** -53 if tol == TOLERANCE[torch.float64] else 2.0 ** -24)

    def moved(by: float) -> dict:
        def move(t):
            return t.double() * (1 + by * (torch.randint(0, 2, t.shape, generator=gen).double() * 2 - 1))
        return {k: [[move(t) for t in s] for s in v] if k == "states" else [move(t) for t in v]
                for k, v in inputs.items()}

    base = run(op, "reference", moved(0.0), kwargs, True)["diagnostics"][0]
    return torch.stack([(run(op, "reference", moved(unit), kwargs, True)["diagnostics"][0] - base).abs()
                        for _ in range(4)]).amax(dim=0)


def compare(op: str, backend: str, inputs: dict, kwargs: dict, diagnostics: bool) -> dict:
    expected = run(op, "reference", inputs, kwargs, diagnostics)
    actual = run(op, backend, inputs, kwargs, diagnostics)
    tol = TOLERANCE[torch.float64 if inputs["params"][0].dtype == torch.float64 else torch.float32]
    for key in ("params", "states", "grad_refs", "origins", "hvps"):
        for i, (a, e) in enumerate(zip(actual[key], expected[key], strict=True)):
            assert_close(a, e, f"{key}[{i}]", tol)
    for a, e in zip(actual["probe_norms"], expected["probe_norms"]):
        torch.testing.assert_close(a, e, rtol=tol, atol=0.0, msg=lambda m: f"probe norms: {m}")
    for a, e in zip(actual["diagnostics"], expected["diagnostics"]):
        if kwargs.get("correction_limit") == LIMITED["correction_limit"] and e[1] > 0:  # M != 0 somewhere
            assert e[6] > 0, "a limited case in which the limit acts nowhere tests nothing of it"
        slack = 2 * sensitivity(op, inputs, kwargs, tol)
        shared = tol * e[[0, 2, 3]].abs().max()  # F^2, memory^2, residual^2 share F and u's roundings
        slack[[0, 2, 3]] += shared if shared.isfinite() else 0.0
        close = ((a - e).abs() <= tol * e.abs() + slack) | (a == e)
        assert close[:6].all(), f"diagnostics: {backend} {a.tolist()}, reference {e.tolist()}"
        differing = sum(int((x != y).sum()) for x, y in zip(actual["params"], expected["params"]))
        assert abs(a[6] - e[6]) <= differing, f"limited: {backend} {a[6].item()}, reference {e[6].item()}"
    return actual


@pytest.mark.parametrize("backend,op,kwargs,refs,diagnostics,dtype,state_dtype",
                         [p for b in BACKENDS for p in params_for(b)])
def test_step_matches_reference(backend, op, kwargs, refs, diagnostics, dtype, state_dtype):
    inputs = make_inputs(op, kwargs, dtype, state_dtype, refs=refs, seed=len(str(kwargs)))
    out = compare(op, backend, inputs, kwargs, diagnostics)
    moved = [not torch.equal(a, b) for a, b in zip(out["params"], inputs["params"]) if a.numel()]
    # a half-precision step below half an ulp leaves an element as it was
    assert all(moved) if dtype in (torch.float32, torch.float64) else any(moved), "parameters were not updated"


@pytest.mark.parametrize("backend,op", [(b, op) for b in BACKENDS for op in SPECS])
def test_probe_pass_then_step_from_origins(backend, op):
    """The probe pass (theta + tau d into params, theta into origins, the norms), then the step from the
    origins with the probe gradient that keeps its estimate in hvps, then a step that reuses it."""
    inputs = make_inputs(op, PROBE_GRADIENT, torch.float32, torch.float32, refs=True, seed=5, origins=True,
                         hvps=True)
    probe = dict(PROBE_GRADIENT, probe=True, probe_tau=TAU)
    probed = compare(op, backend, dict(inputs, grad_refs=[], hvps=[]), probe, False)
    assert all(torch.equal(a, b) for a, b in zip(probed["origins"], inputs["params"]))
    step = dict(PROBE_GRADIENT, probe_tau=TAU)
    stepped = compare(op, backend, dict(inputs, params=probed["params"], origins=probed["origins"]), step, True)
    reused = compare(op, backend, dict(inputs, params=probed["params"], origins=probed["origins"], grad_refs=[],
                                       hvps=stepped["hvps"]), dict(step, reuse_hvp=True), True)
    for key in ("params", "states"):
        assert all(torch.equal(a, b) for a, b in zip(reused[key], stepped[key])), key


def test_every_op_runs_on_every_backend_here():
    """The checks above are generated for the backends that run every op here: numba always runs on CPU."""
    assert "numba" in BACKENDS, backends.load("numba")


@pytest.mark.parametrize("backend,op", [(b, op) for b in BACKENDS for op in SPECS
                                        if backends.resolve(op, b, "cpu")[1].device_step_scalars])
def test_step_scalars_on_the_device_equal_the_floats(backend, op):
    """A device-mode call reads the per-step scalars from the step_scalars tensor (the floats are placeholders):
    the same bits as the floats give."""
    kwargs = dict(TRAJECTORY, correction=0.5)
    inputs = make_inputs(op, kwargs, torch.float32, torch.float32, refs=True, seed=9)
    values = {**SPECS[op].examples, **kwargs}
    tensor = torch.tensor([values[name] for name in SPECS[op].step_scalars], dtype=torch.float64)
    placeholders = dict.fromkeys(SPECS[op].step_scalars, 0.5)
    floats = run(op, backend, inputs, kwargs, True)
    device = run(op, backend, inputs, dict(kwargs, **placeholders, step_scalars=tensor), True)
    for key in floats:
        assert all(torch.equal(a, b) for a, b in zip(device[key], floats[key])), key
