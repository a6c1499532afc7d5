"""The CUDA C++ backend against the reference backend on a GPU (run by bench/gpu_check.sh).

Every op and mode at large and odd sizes, many tensors in one call, misaligned views,
fp32/bf16/fp16/fp64 parameters with fp32 or half states, AMP scaling, and the
diagnostics sums; the correction limit acting on about half of the elements; the
probe pass (origins, probe_norms), the step from origins with probe_tau in place of
hvp_scale, kept HVP estimates stored and reused. The reference backend runs
reference.py with torch's CUDA ops on copies of the same inputs; where the two differ
it is by torch evaluating `x / scalar` as x * (1 / scalar) on CUDA (an ulp), log1p (an
ulp) and summation order.
"""
from __future__ import annotations

import os

import pytest
import torch

import memkernels  # noqa: F401  (registers the ops)
from memkernels import _ops, backends
from memkernels.reference import DIAGNOSTICS, NDIAG

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
BACKEND = "cuda"
OPS = {"adamw": torch.ops.memkernels.adamw_, "lion": torch.ops.memkernels.lion_, "sgd": torch.ops.memkernels.sgd_}
STATES = {"adamw": 2, "lion": 1, "sgd": 1}
SCALARS = {
    "adamw": dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, bias_correction1=1 - 0.9 ** 5,
                  bias_correction2=1 - 0.999 ** 5, mean_age1=2.1, mean_age2=2.5),
    "lion": dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, smoothing=0.0, ema_weight=0.41, age_weight=2.7),
    "sgd": dict(lr=1e-2, momentum=0.9, weight_decay=1e-3, nesterov=False, update_scale=4.1, memory_coef=17.0),
}
MODES = {
    "plain": dict(),
    "probe_correction": dict(refs=True, diag=True, correction=-1.0, hvp_scale=10.0),
    "trajectory": dict(refs=True, diag=True, correction=0.5, hvp_scale=30.0, update_grad_refs=True),
    "memoryless": dict(refs=True, diag=True, correction=-1.0, hvp_scale=10.0, memoryless=True),
    "amp_maximize": dict(refs=True, diag=True, correction=-1.0, hvp_scale=10.0, maximize=True, scale=1024.0),
    "diag_only": dict(refs=True, diag=True),
    "limiter": dict(refs=True, diag=True, limiter=True),
    # the step after a probe pass: theta from origins, hvp_scale = 1 / tau, the estimate kept in hvps
    "probe_step": dict(refs=True, diag=True, origins=True, hvps=True, correction=-1.0, tau=0.1),
    "reuse_hvp": dict(hvps=True, diag=True, correction=-1.0, reuse_hvp=True),
    "origins_trajectory": dict(refs=True, origins=True, correction=0.5, hvp_scale=30.0, update_grad_refs=True),
    # the probe pass; grad_refs, hvps and the states are given to check that it leaves them alone
    "probe": dict(probe=True, origins=True, norms=True, refs=True, hvps=True, tau=1e-2),
}
# Corrections with which the limit acts on about half of the elements of these inputs (reference backend).
LIMITER = {
    "adamw": dict(correction=-1.0, hvp_scale=100.0),
    "lion": dict(smoothing=1e-2, correction=-1.0, hvp_scale=50.0),
    "sgd": dict(correction=-1.0, hvp_scale=10.0),
}
# The keys of a mode that say what to make rather than how to call
MADE = ("refs", "diag", "scale", "no_buffers", "limiter", "origins", "hvps", "norms", "tau")
VARIANTS = {  # op-specific flags, each run in the probe mode
    "adamw": [dict(decoupled=False), dict(eps_inside_sqrt=True), dict(decoupled=False, eps_inside_sqrt=True)],
    "lion": [dict(smoothing=1e-4), dict(smoothing=1e-2, memoryless=True)],
    "sgd": [dict(nesterov=True), dict(momentum=0.0, no_buffers=True)],
}
# (params dtype, states dtype, grad_refs dtype)
DTYPES = {
    "f32": (torch.float32, torch.float32, torch.float32),
    "bf16_f32states": (torch.bfloat16, torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    "f16_f32states": (torch.float16, torch.float32, torch.float16),
    "f16": (torch.float16, torch.float16, torch.float16),
    "f64": (torch.float64, torch.float64, torch.float64),
}
SHAPES = [(1 << 21) + 7, (1,), (0,), (1023,), (4097,), (129, 67), (16384,), (16385,)]


@pytest.fixture(scope="module", autouse=True)
def backend_loads():
    state = backends.load(BACKEND)
    assert state.startswith("available"), f"the {BACKEND} backend must load on a GPU machine: {state}"


def _generator() -> tuple[torch.Generator, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator(DEVICE).manual_seed(seed), seed


def _shape(s) -> tuple[int, ...]:
    return s if isinstance(s, tuple) else (s,)


def _make(op: str, shapes, dtypes, mode: dict, gen: torch.Generator) -> dict:
    """Fresh inputs: params, grads (scaled when AMP is on), states, grad_refs, diagnostics, origins, hvps (kept
    estimates, of the states' dtype), probe_norms."""
    pdt, sdt, rdt = dtypes
    scale = mode.get("scale", 1.0)

    def rand(shape, dtype, factor=1.0, positive=False):
        x = torch.randn(_shape(shape), device=DEVICE, dtype=torch.float32, generator=gen) * factor
        return (x * x if positive else x).to(dtype)

    n_states = 0 if mode.get("no_buffers") else STATES[op]
    return {
        "params": [rand(s, pdt) for s in shapes],
        "grads": [rand(s, pdt, 0.1 * scale) for s in shapes],
        "states": [[rand(s, sdt, 0.05, positive=(op == "adamw" and k == 1)) for s in shapes]
                   for k in range(n_states)] + ([[]] if mode.get("no_buffers") else []),
        "grad_refs": [rand(s, rdt, 0.1 * scale) for s in shapes] if mode.get("refs") else [],
        "diagnostics": torch.zeros(NDIAG, dtype=torch.float64, device=DEVICE) if mode.get("diag") else None,
        "origins": [rand(s, pdt) for s in shapes] if mode.get("origins") else [],
        "hvps": [rand(s, sdt) for s in shapes] if mode.get("hvps") else [],
        "probe_norms": torch.zeros(2, dtype=torch.float64, device=DEVICE) if mode.get("norms") else None,
    }


def _clone(inputs: dict) -> dict:
    """A copy of every tensor, list and state list of inputs."""
    out = {}
    for key, value in inputs.items():
        if key == "states":
            out[key] = [[t.clone() for t in lst] for lst in value]
        elif isinstance(value, list):
            out[key] = [t.clone() for t in value]
        else:
            out[key] = None if value is None else value.clone()
    return out


def _reset_captured(x: dict, fresh: dict, keys: tuple[str, ...]) -> None:
    """Copy fresh's values into the tensors a CUDA graph captured (the lists named by keys, states, diagnostics)."""
    for key in keys:
        for t, o in zip(x[key], fresh[key]):
            t.copy_(o)
    for lst, olst in zip(x["states"], fresh["states"]):
        for t, o in zip(lst, olst):
            t.copy_(o)
    x["diagnostics"].copy_(fresh["diagnostics"])


def _kwargs(op: str, mode: dict) -> dict:
    kw = {**SCALARS[op], **(LIMITER[op] if mode.get("limiter") else {}),
          **{k: v for k, v in mode.items() if k not in MADE}}
    if op == "sgd" and mode.get("no_buffers"):
        kw["momentum"] = 0.0
    if "scale" in mode:
        kw["grad_scale"] = torch.tensor(mode["scale"], device=DEVICE)
        kw["found_inf"] = torch.zeros((), device=DEVICE)
    if "tau" in mode:
        kw["probe_tau"] = torch.tensor(mode["tau"], dtype=torch.float64, device=DEVICE)
    return kw


def _step(op: str, x: dict, kw: dict, backend: str) -> None:
    OPS[op](x["params"], x["grads"], *x["states"], x["grad_refs"], x["diagnostics"], origins=x.get("origins", []),
            hvps=x.get("hvps", []), probe_norms=x.get("probe_norms"), **kw, backend=backend)


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor, seed: int, before: torch.Tensor | None = None) -> None:
    """fp32/fp64: ulps apart; half: rounded from fp32 values an ulp apart, so rarely one half-ulp.

    `before` (the parameters before the step) widens the fp32/fp64 scale to max(|before|, |want|): a large
    update that cancels `before` to near zero carries the update's ulp, not the result's.
    """
    assert got.dtype == want.dtype and got.shape == want.shape
    where = f"{name} (seed {seed})"
    if got.dtype in (torch.float16, torch.bfloat16):
        rtol = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[got.dtype]
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-5, equal_nan=True, msg=where)
        differ = ((got != want) & ~(got.isnan() & want.isnan())).sum().item()
        assert differ <= 1e-3 * got.numel(), f"{where}: {differ} of {got.numel()} elements differ"
    else:
        rtol = 1e-5 if got.dtype == torch.float32 else 1e-12
        scale = want.abs() if before is None else torch.maximum(want.abs(), before.abs())
        scale = scale.nan_to_num(0.0, posinf=0.0)  # an Inf must match exactly
        same = (got == want) | (got.isnan() & want.isnan())
        ok = same | ((got - want).abs() <= rtol * scale + rtol * 1e-2)
        assert bool(ok.all()), f"{where}: {int((~ok).sum())} elements over tolerance"


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                      b.reshape(-1).view(torch.uint8))


def _assert_limited(got: float, want: float, numel: int, dtype: torch.dtype, where: str) -> None:
    """The count of elements where the limit acted. Exact in fp64; in fp32 an M an ulp from torch's (see the
    module docstring) can move an element lying on the edge |term| = bound across it, which is rare."""
    slack = 0 if dtype == torch.float64 else 2 + 1e-5 * numel
    assert abs(got - want) <= slack, f"{where}: limited on {got} elements vs {want}"


def _assert_same_results(mine: dict, ref: dict, seed: int, before: list[torch.Tensor]) -> None:
    """Every tensor the call may change, mine (the backend's) against ref (the reference backend's)."""
    for i, (a, b) in enumerate(zip(mine["params"], ref["params"])):
        _assert_close(f"params[{i}]", a, b, seed, before[i])
    for key in ("grads", "grad_refs", "origins", "hvps"):
        for i, (a, b) in enumerate(zip(mine.get(key, []), ref.get(key, []))):
            _assert_close(f"{key}[{i}]", a, b, seed)
    for k, (la, lb) in enumerate(zip(mine["states"], ref["states"])):
        for i, (a, b) in enumerate(zip(la, lb)):
            _assert_close(f"states[{k}][{i}]", a, b, seed)
    numel = sum(p.numel() for p in mine["params"])
    if mine["diagnostics"] is not None:
        for name, a, b in zip(DIAGNOSTICS, mine["diagnostics"].tolist(), ref["diagnostics"].tolist()):
            if name == "limited":
                _assert_limited(a, b, numel, mine["params"][0].dtype, f"diagnostics (seed {seed})")
            else:
                assert a == pytest.approx(b, rel=1e-4, abs=1e-9), f"diagnostics {name} (seed {seed}): {a} vs {b}"
    if mine.get("probe_norms") is not None:
        for name, a, b in zip(("theta_sq", "d_sq"), mine["probe_norms"].tolist(), ref["probe_norms"].tolist()):
            assert a == pytest.approx(b, rel=1e-6), f"probe_norms {name} (seed {seed}): {a} vs {b}"


def _compare(op: str, shapes, dtypes, mode: dict) -> dict:
    gen, seed = _generator()
    mine = _make(op, shapes, dtypes, mode, gen)
    ref = _clone(mine)
    before = [p.clone() for p in mine["params"]]
    kw = _kwargs(op, mode)
    _step(op, mine, kw, BACKEND)
    _step(op, ref, kw, "reference")
    _assert_same_results(mine, ref, seed, before)
    if mode.get("probe"):  # theta kept bit for bit
        assert all(_same_bits(o, p) for o, p in zip(mine["origins"], before)), f"origins (seed {seed})"
    if mode.get("limiter"):
        limited = mine["diagnostics"][-1].item() / sum(p.numel() for p in before)
        assert 0.2 < limited < 0.9, f"the limit acted on {limited:.0%} of the elements (seed {seed})"
    return mine


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", OPS)
def test_op_matches_reference(op, mode, dtype):
    _compare(op, SHAPES, DTYPES[dtype], MODES[mode])


@pytest.mark.parametrize("op", OPS)
def test_op_variants_match_reference(op):
    for variant in VARIANTS[op]:
        for dtype in ("f32", "bf16_f32states"):
            _compare(op, SHAPES, DTYPES[dtype], {**MODES["probe_correction"], **variant})


@pytest.mark.parametrize("op", OPS)
def test_many_tensors_in_one_launch(op):
    """Hundreds of tensors of random sizes (empty ones too): the chunk table and its search."""
    sizes = torch.randint(0, 6000, (300,)).tolist() + [0, 1, 40000]
    _compare(op, sizes, DTYPES["f32"], MODES["trajectory"])
    _compare(op, sizes, DTYPES["bf16_f32states"], MODES["probe_correction"])
    for mode in ("probe", "probe_step", "reuse_hvp", "limiter"):
        _compare(op, sizes, DTYPES["f32"], MODES[mode])
    _compare(op, sizes, DTYPES["bf16_f32states"], MODES["probe"])


def test_large_tensor():
    _compare("adamw", [(1 << 24) + 3], DTYPES["f32"], MODES["trajectory"])


@pytest.mark.parametrize("offset", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", ["f32", "bf16_f32states", "f16"])
def test_views_at_an_offset(offset, dtype):
    """Slices starting at element `offset` of a larger buffer: scalar loads (or vector ones when the
    offset keeps 16-byte alignment); the elements around the slices stay untouched."""
    op, n, mode = "adamw", 50001, MODES["trajectory"]
    gen, seed = _generator()
    full = _make(op, [n + offset + 5], DTYPES[dtype], mode, gen)
    views = {
        "params": [full["params"][0][offset:offset + n]], "grads": [full["grads"][0][offset:offset + n]],
        "states": [[lst[0][offset:offset + n]] for lst in full["states"]],
        "grad_refs": [full["grad_refs"][0][offset:offset + n]], "diagnostics": full["diagnostics"],
    }
    before = _clone(full)
    ref = _clone(views)
    kw = _kwargs(op, mode)
    _step(op, views, kw, BACKEND)
    _step(op, ref, kw, "reference")
    for key in ("params", "grad_refs"):
        _assert_close(key, views[key][0], ref[key][0], seed)
        a, b = full[key][0], before[key][0]
        assert torch.equal(a[:offset], b[:offset]) and torch.equal(a[offset + n:], b[offset + n:]), key
    for k in range(len(full["states"])):
        _assert_close(f"states[{k}]", views["states"][k][0], ref["states"][k][0], seed)
        assert torch.equal(full["states"][k][0][:offset], before["states"][k][0][:offset])


def test_mixed_list_dtypes():
    """Each state list and grad_refs has its own dtype: bf16 params, f32 exp_avg, bf16 exp_avg_sq, f32 refs."""
    gen, seed = _generator()
    mode = MODES["trajectory"]
    x = _make("adamw", SHAPES, DTYPES["bf16"], mode, gen)
    x["states"][0] = [t.float() for t in x["states"][0]]
    x["grad_refs"] = [t.float() for t in x["grad_refs"]]
    ref = _clone(x)
    kw = _kwargs("adamw", mode)
    _step("adamw", x, kw, BACKEND)
    _step("adamw", ref, kw, "reference")
    for k in range(2):
        for a, b in zip(x["states"][k], ref["states"][k]):
            _assert_close(f"states[{k}]", a, b, seed)
    for a, b in zip(x["params"] + x["grad_refs"], ref["params"] + ref["grad_refs"]):
        _assert_close("params/grad_refs", a, b, seed)


@pytest.mark.parametrize("name", ["amp_maximize", "probe", "probe_step"])
@pytest.mark.parametrize("op", OPS)
def test_found_inf_changes_nothing(op, name):
    """found_inf skips the step, the probe pass and the step from origins (hvps stored) alike."""
    gen, _ = _generator()
    mode = {**MODES[name], "update_grad_refs": True} if name == "amp_maximize" else MODES[name]
    x = _make(op, SHAPES, DTYPES["f32"], mode, gen)
    before = _clone(x)
    kw = {**_kwargs(op, mode), "found_inf": torch.ones((), device=DEVICE)}
    _step(op, x, kw, BACKEND)
    for key in ("params", "grad_refs", "origins", "hvps"):
        assert all(torch.equal(a, b) for a, b in zip(x[key], before[key])), key
    assert all(torch.equal(a, b) for la, lb in zip(x["states"], before["states"]) for a, b in zip(la, lb))
    for key in ("diagnostics", "probe_norms"):
        assert x[key] is None or torch.equal(x[key], before[key]), key


def test_side_stream_and_table_cache():
    """Runs on the current (non-default) stream; cached tables follow changed data pointers."""
    from memkernels.backends import cuda

    gen, seed = _generator()
    mode = MODES["probe_correction"]
    kw = _kwargs("adamw", mode)
    x = _make("adamw", SHAPES, DTYPES["f32"], mode, gen)
    ref = _clone(x)
    cuda._TABLES.cache.clear()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            _step("adamw", x, kw, BACKEND)
    stream.synchronize()
    for _ in range(3):
        _step("adamw", ref, kw, "reference")
    assert len(cuda._TABLES.cache) == 1  # uploaded once, reused twice
    for a, b in zip(x["params"], ref["params"]):
        _assert_close("params after 3 steps on a side stream", a, b, seed)
    x["params"][0] = x["params"][0].clone()  # a new data pointer: a new table
    ref["params"][0] = ref["params"][0].clone()
    _step("adamw", x, kw, BACKEND)
    _step("adamw", ref, kw, "reference")
    assert len(cuda._TABLES.cache) == 2
    for a, b in zip(x["params"], ref["params"]):
        _assert_close("params after a pointer change", a, b, seed)


@pytest.mark.parametrize("cls, kw", [("AdamW", dict()), ("AdamW", dict(memory_correction=-1.0, eps=1e-3)),
                                     ("Lion", dict(smoothing=1e-3)), ("SGD", dict(momentum=0.9, memory_correction=-1.0))])
def test_optimizer_steps_match_reference_backend(cls, kw):
    """The optimizer classes over the cuda backend and the reference backend, 10 steps, with tracking.

    AdamW's correction coefficient grows like 1/eps for gradients near zero, so with eps=1e-8
    ulp-level differences between backends grow chaotically over steps: eps=1e-3 here."""
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    model = torch.nn.Sequential(torch.nn.Linear(64, 129), torch.nn.Tanh(), torch.nn.Linear(129, 10)).to(DEVICE)
    twin = torch.nn.Sequential(torch.nn.Linear(64, 129), torch.nn.Tanh(), torch.nn.Linear(129, 10)).to(DEVICE)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(256, 64, device=DEVICE), torch.randint(0, 10, (256,), device=DEVICE)
    opt_cls = getattr(memkernels, cls)
    mine = opt_cls(model.parameters(), lr=1e-3, track_memory=True, backend=BACKEND, **kw)
    theirs = opt_cls(twin.parameters(), lr=1e-3, track_memory=True, backend="reference", **kw)
    for _ in range(10):
        for net, opt in ((model, mine), (twin, theirs)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ per-step scalars read on the device

STEP_MODES = ["plain", "trajectory", "memoryless", "amp_maximize", "limiter", "probe_step", "reuse_hvp", "probe"]
STEP_VALUES = {"given": {}, "lr_0_hvp_0": dict(lr=0.0, hvp_scale=0.0)}


def _step_values(op: str, kw: dict, **override: float) -> dict[str, float]:
    """The op's STEP_SCALARS, as floats, from the call's keyword arguments."""
    full = {"hvp_scale": 0.0, **kw, **override}
    return {name: full[name] for name in _ops.STEP_SCALARS[op]}


def _wrong_floats(op: str) -> dict[str, float]:
    """Floats the kernel must not read beside step_scalars (0 bias corrections: placeholders)."""
    return {name: 0.0 if name.startswith("bias_correction") else 7.0 for name in _ops.STEP_SCALARS[op]}


def _scalars(values: dict[str, float]) -> torch.Tensor:
    return torch.tensor(list(values.values()), dtype=torch.float64, device=DEVICE)


def _assert_identical(got: dict, want: dict, where: str) -> None:
    """Every tensor bit for bit; the diagnostics and probe_norms to rounding (blocks add their sums in any order)."""
    pairs = [(f"{key}[{i}]", a, b) for key in ("params", "grads", "grad_refs", "origins", "hvps")
             for i, (a, b) in enumerate(zip(got.get(key, []), want.get(key, [])))]
    pairs += [(f"states[{k}][{i}]", a, b) for k, (la, lb) in enumerate(zip(got["states"], want["states"]))
              for i, (a, b) in enumerate(zip(la, lb))]
    for name, a, b in pairs:
        assert _same_bits(a, b), f"{where}: {name}"
    for key in ("diagnostics", "probe_norms"):
        if want.get(key) is not None:
            torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=0.0, msg=f"{where}: {key}")


@pytest.mark.parametrize("dtype", ["f32", "bf16_f32states", "f64"])
@pytest.mark.parametrize("values", STEP_VALUES)
@pytest.mark.parametrize("mode", STEP_MODES)
@pytest.mark.parametrize("op", OPS)
def test_step_scalars_on_device_match_floats(op, mode, values, dtype):
    """step_scalars holding v, beside wrong floats, gives the bits of the float path with v."""
    gen, seed = _generator()
    floats = _make(op, SHAPES, DTYPES[dtype], MODES[mode], gen)
    device = _clone(floats)
    kw = _kwargs(op, MODES[mode])
    values = _step_values(op, kw, **STEP_VALUES[values])
    _step(op, floats, {**kw, **values}, BACKEND)
    _step(op, device, {**kw, **_wrong_floats(op), "step_scalars": _scalars(values)}, BACKEND)
    _assert_identical(device, floats, f"{op} {mode} {dtype} (seed {seed})")


@pytest.mark.parametrize("op", OPS)
def test_step_scalars_cuda_graph(op):
    """One call with step_scalars captured in a CUDA graph, replayed with three sets of values copied into the
    tensor in place: each replay gives the bits of the eager float path with those values."""
    gen, seed = _generator()
    mode = MODES["amp_maximize"]
    original = _make(op, SHAPES, DTYPES["f32"], {**mode, "update_grad_refs": True}, gen)
    kw = {**_kwargs(op, mode), "update_grad_refs": True}
    settings = [_step_values(op, kw), _step_values(op, kw, lr=0.0, hvp_scale=0.0),
                _step_values(op, kw, lr=3 * kw["lr"], hvp_scale=7.0)]
    scalars = _scalars(settings[0])
    x = _clone(original)
    call = {**kw, **_wrong_floats(op), "step_scalars": scalars}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up: builds and caches the pointer table
        _step(op, x, call, BACKEND)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _step(op, x, call, BACKEND)

    for values in settings:
        fresh = _clone(original)
        _reset_captured(x, fresh, ("params", "grads", "grad_refs"))
        scalars.copy_(_scalars(values))
        graph.replay()
        torch.cuda.synchronize()
        _step(op, fresh, {**kw, **values}, BACKEND)
        _assert_identical(x, fresh, f"{op} graph replay with {values} (seed {seed})")


def test_table_missing_during_capture_is_a_clear_error():
    """A call whose pointer table is not cached cannot upload one inside a capture: it says to warm up first."""
    from memkernels.backends import cuda

    gen, _ = _generator()
    x = _make("sgd", [(1000,)], DTYPES["f32"], MODES["plain"], gen)
    kw = _kwargs("sgd", MODES["plain"])
    cuda._TABLES.cache.clear()  # no table left over from a call at the same addresses
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="before the capture"):
        with torch.cuda.graph(graph):
            _step("sgd", x, kw, BACKEND)


# ------------------------------------------------------------------ the probe flow, probe_tau, kept estimates

@pytest.mark.parametrize("tau", [0.3, 0.0])
@pytest.mark.parametrize("op", OPS)
def test_probe_tau_replaces_hvp_scale(op, tau):
    """A step given probe_tau uses hvp_scale = 1 / tau (0 for tau = 0) computed in double, whatever hvp_scale
    says: the bits of the same step given that hvp_scale as a float (the host's rule), with and without origins."""
    gen, seed = _generator()
    for mode in (MODES["probe_correction"], {**MODES["probe_correction"], "origins": True}):
        x = _make(op, SHAPES, DTYPES["f32"], mode, gen)
        y = _clone(x)
        kw = _kwargs(op, mode)
        _step(op, x, {**kw, "hvp_scale": 123.0, "probe_tau": torch.tensor(tau, dtype=torch.float64, device=DEVICE)},
              BACKEND)
        _step(op, y, {**kw, "hvp_scale": 1.0 / tau if tau > 0.0 else 0.0}, BACKEND)
        _assert_identical(x, y, f"{op} tau={tau} origins={bool(x['origins'])} (seed {seed})")


def _probe_flow_calls(x: dict, kw: dict, tau: torch.Tensor) -> list[tuple[dict, dict]]:
    """The probe estimate of H d and a step reusing it, as the optimizers run them: the probe pass (theta kept in
    origins, theta + tau d into params), the gradient there (grad_refs: random, like grads), the step from the
    origins with probe_tau storing its estimate into hvps, then a step reusing them. (inputs, kwargs) of each."""
    return [({**x, "diagnostics": None, "grad_refs": [], "hvps": []}, {**kw, "probe": True, "probe_tau": tau}),
            ({**x, "probe_norms": None}, {**kw, "probe_tau": tau}),
            ({**x, "grad_refs": [], "origins": [], "probe_norms": None}, {**kw, "reuse_hvp": True})]


def _probe_flow(op: str, x: dict, kw: dict, tau: torch.Tensor, backend: str) -> list[dict]:
    """Runs _probe_flow_calls on x; snapshots of x after each call."""
    snapshots = []
    for inputs, call_kw in _probe_flow_calls(x, kw, tau):
        _step(op, inputs, call_kw, backend)
        snapshots.append(_clone(x))
    return snapshots


@pytest.mark.parametrize("dtype", ["f32", "bf16_f32states", "f16", "f64"])
@pytest.mark.parametrize("op", OPS)
def test_probe_flow_matches_reference(op, dtype):
    gen, seed = _generator()
    mode = dict(refs=True, diag=True, origins=True, hvps=True, norms=True)
    mine = _make(op, SHAPES, DTYPES[dtype], mode, gen)
    ref = _clone(mine)
    before = [p.clone() for p in mine["params"]]
    kw = {**_kwargs(op, mode), "correction": -1.0}
    tau = torch.tensor(3e-3, dtype=torch.float64, device=DEVICE)
    got, want = _probe_flow(op, mine, kw, tau, BACKEND), _probe_flow(op, ref, kw, tau, "reference")
    assert all(_same_bits(o, p) for o, p in zip(got[0]["origins"], before)), f"origins (seed {seed})"
    assert got[0]["probe_norms"][0].item() == pytest.approx(sum(p.double().square().sum().item() for p in before))
    for n, (a, b) in enumerate(zip(got, want)):
        _assert_same_results(a, b, seed, before if n < 2 else [p.clone() for p in got[1]["params"]])


@pytest.mark.parametrize("op", OPS)
def test_probe_flow_with_step_scalars_in_a_cuda_graph(op):
    """The probe flow with step_scalars captured in a CUDA graph: replays with new step values and a new tau,
    copied into their tensors in place, give the bits of eager calls with those values as floats."""
    gen, seed = _generator()
    mode = dict(refs=True, diag=True, origins=True, hvps=True, norms=True)
    original = _make(op, SHAPES, DTYPES["f32"], mode, gen)
    kw = {**_kwargs(op, mode), "correction": -1.0}
    settings = [(_step_values(op, kw), 1e-2), (_step_values(op, kw, lr=3 * kw["lr"]), 0.0)]
    scalars = _scalars(settings[0][0])
    tau = torch.tensor(settings[0][1], dtype=torch.float64, device=DEVICE)
    x = _clone(original)
    call = {**kw, **_wrong_floats(op), "step_scalars": scalars}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up: builds and caches the pointer tables
        _probe_flow(op, x, call, tau, BACKEND)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for inputs, call_kw in _probe_flow_calls(x, call, tau):
            _step(op, inputs, call_kw, BACKEND)

    for values, tau_value in settings:
        fresh = _clone(original)
        _reset_captured(x, fresh, ("params", "grads", "grad_refs", "origins", "hvps"))
        x["probe_norms"].copy_(fresh["probe_norms"])
        scalars.copy_(_scalars(values))
        tau.fill_(tau_value)
        graph.replay()
        torch.cuda.synchronize()
        eager = _probe_flow(op, fresh, {**kw, **values}, torch.tensor(tau_value, dtype=torch.float64, device=DEVICE),
                            BACKEND)[-1]
        _assert_identical(x, eager, f"{op} graph replay with {values}, tau {tau_value} (seed {seed})")
