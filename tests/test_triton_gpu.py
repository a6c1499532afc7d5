"""The Triton backend on CUDA at large sizes (bench/gpu_check.sh runs these on the lent GPU machine).

The checks of test_triton.py on millions of elements and on the GPT-2-small
shape list, plus what only a GPU shows: no host synchronization (the op is
captured in a CUDA graph and replayed with found_inf flipped on the device, or
with another tau written into probe_tau), repeatable results (no race between
programs), cached tables used from another stream, and agreement with
torch.optim.AdamW(fused=True).
"""
from __future__ import annotations

import pytest
import torch

# First: test_triton sets TRITON_INTERPRET when there is no GPU, before triton is imported (and skips without triton).
from test_triton import (HYPER, LIMITED, MODES, PROBE, STEP_MODES, STEP_VALUES, TAU, TRAJECTORY, assert_diag,
                         assert_identical, assert_same, check, check_more, check_step_scalars, like, make_case, run,
                         run_more, step_scalars, step_values, tau_tensor, with_slope, wrong_floats)

from memkernels.bench.shapes import gpt2_small
from memkernels.reference import NDIAG

pytestmark = pytest.mark.gpu

LARGE = [(4_000_037,), (1,), (0,), (1023, 1025), (3, 5)]  # ~5M elements: full tiles and tails
GPU_MODES = ["plain", "traj-correct", "probe-correct", "memoryless", "maximize"]


@pytest.mark.parametrize("mode", GPU_MODES)
@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_large_matches_reference(op, mode):
    refs, diagnostics, kw = MODES[mode]
    check(op, make_case(op, shapes=LARGE, refs=refs, seed=len(mode)), diagnostics=diagnostics, **kw)


@pytest.mark.parametrize("op, kw", [
    ("adamw", dict(eps_inside_sqrt=True)),
    ("adamw", dict(decoupled=False)),
    ("lion", dict(smoothing=1e-3)),
    ("sgd", dict(nesterov=True)),
    ("sgd", dict(momentum=0.0)),
])
def test_large_variants(op, kw):
    case = make_case(op, shapes=LARGE, momentum=kw.get("momentum", 1.0) != 0.0, seed=21)
    check(op, case, **TRAJECTORY, correction=-1.0, **kw)


@pytest.mark.parametrize("op, dtype, state_dtype", [
    ("adamw", torch.bfloat16, None), ("adamw", torch.float16, None), ("adamw", torch.bfloat16, torch.float32),
    ("lion", torch.bfloat16, None), ("sgd", torch.float16, torch.float32),
])
def test_large_half_precision(op, dtype, state_dtype):
    case = make_case(op, shapes=LARGE, dtype=dtype, state_dtype=state_dtype, seed=22)
    check(op, case, **TRAJECTORY, correction=-1.0)


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_large_grad_scale(op):
    scale = torch.tensor(65536.0, device="cuda")
    check(op, make_case(op, shapes=LARGE, scale=65536.0, seed=23), **PROBE, correction=-1.0, grad_scale=scale)


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_large_probe_limit_and_kept_estimates(op):
    """The probe pass, the step from its origins that keeps its estimate (the limit acting), a step reusing it."""
    case = make_case(op, shapes=LARGE, seed=42)
    probed = check_more(op, case, diagnostics=False, origins=like(case[0], 43), probe=True, probe_tau=tau_tensor(),
                        probe_norms=torch.zeros(2, dtype=torch.float64, device="cuda"), **with_slope(op))
    moved = [probed.lists[0]] + case[1:]  # params at theta + tau d; grad_refs stand for the gradients there
    stepped = check_more(op, moved, origins=probed.origins, hvps=like(case[0], 44), probe_tau=tau_tensor(), **PROBE,
                         correction=0.5, **with_slope(op))
    assert stepped.diag[LIMITED].item() > 0
    check_more(op, case[:-1] + [[]], hvps=stepped.hvps, reuse_hvp=True, correction=0.5, **with_slope(op))


def test_gpt2_small_shapes_in_one_launch():
    """All 148 tensors of GPT-2 small (124M parameters) in one call, trajectory correction and diagnostics."""
    check("adamw", make_case("adamw", shapes=gpt2_small(), seed=24), **TRAJECTORY, correction=-1.0)


def test_misaligned_views_large():
    """Views starting at element 1 of their storage: no 16-byte alignment, the scalar-access path."""
    case = make_case("adamw", shapes=[(3_000_001,), (4097,)], seed=25)
    views = [[torch.cat([t.new_zeros(1), t.reshape(-1)])[1:].view(t.shape) for t in lst] for lst in case]
    assert all(v.data_ptr() % 16 for v in views[0])
    check("adamw", views, **TRAJECTORY, correction=-1.0)


def test_repeatable():
    """The same inputs give bit-identical updates (no race between programs); diagnostics to rounding."""
    case = make_case("adamw", shapes=LARGE, seed=26)
    start = torch.zeros(NDIAG, dtype=torch.float64, device="cuda")
    first, d1 = run("adamw", "triton", case, start, **TRAJECTORY, correction=-1.0)
    second, d2 = run("adamw", "triton", case, start, **TRAJECTORY, correction=-1.0)
    assert all(torch.equal(a, b) for la, lb in zip(first, second) for a, b in zip(la, lb))
    assert_diag(d1, d2, rtol=1e-12)


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_no_host_sync_cuda_graph(op):
    """The op captures into a CUDA graph (no host sync); found_inf flipped on the device skips the replay."""
    case = make_case(op, shapes=LARGE, scale=8.0, seed=27)
    grad_scale = torch.tensor(8.0, device="cuda")
    found_inf = torch.tensor(0.0, device="cuda")
    kw = dict(HYPER[op], **TRAJECTORY, correction=-1.0, grad_scale=grad_scale, found_inf=found_inf)
    want, want_diag = run(op, "reference", case, torch.zeros(NDIAG, dtype=torch.float64, device="cuda"), **kw)

    lists = [[t.clone() for t in lst] for lst in case]
    diag = torch.zeros(NDIAG, dtype=torch.float64, device="cuda")
    op_fn = getattr(torch.ops.memkernels, f"{op}_")
    saved = [[t.clone() for t in lst] for lst in lists]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up: compile, build and cache the pointer tables
        op_fn(*lists, diag, backend="triton", **kw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op_fn(*lists, diag, backend="triton", **kw)

    def restore():
        for lst, old in zip(lists, saved):
            for t, o in zip(lst, old):
                t.copy_(o)
        diag.zero_()

    restore()
    graph.replay()
    torch.cuda.synchronize()
    assert_same(lists, want)
    assert_diag(diag, want_diag)

    restore()
    found_inf.fill_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(t, o) for lst, old in zip(lists, saved) for t, o in zip(lst, old))
    assert torch.equal(diag, torch.zeros_like(diag))


@pytest.mark.parametrize("values", STEP_VALUES)
@pytest.mark.parametrize("mode", STEP_MODES)
@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_step_scalars_on_device_match_floats_large(op, mode, values):
    """Compiled: step_scalars (wrong floats beside it) gives the bits of the float path; the diagnostics to
    rounding, since tiles add their sums in any order."""
    scale = 1024.0 if mode == "maximize-scaled" else 1.0
    case = make_case(op, shapes=LARGE, refs=STEP_MODES[mode][0], scale=scale, seed=40)
    check_step_scalars(op, case, mode, STEP_VALUES[values], diag_rtol=1e-12)


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_step_scalars_cuda_graph(op):
    """One call with step_scalars captured in a CUDA graph, replayed with three sets of values written into the
    tensor in place: each replay gives the bits of the eager float path with those values."""
    case = make_case(op, shapes=LARGE, scale=8.0, seed=41)
    kw = dict(TRAJECTORY, correction=-1.0, grad_scale=torch.tensor(8.0, device="cuda"))
    settings = [step_values(op, kw), step_values(op, kw, lr=0.0, hvp_scale=0.0),
                step_values(op, kw, lr=3 * HYPER[op]["lr"], hvp_scale=7.0)]
    scalars = step_scalars(settings[0])
    lists = [[t.clone() for t in lst] for lst in case]
    diag = torch.zeros(NDIAG, dtype=torch.float64, device="cuda")
    op_fn = getattr(torch.ops.memkernels, f"{op}_")
    call = {**HYPER[op], **kw, **wrong_floats(op), "step_scalars": scalars, "backend": "triton"}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up: compile, build and cache the pointer tables
        op_fn(*lists, diag, **call)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op_fn(*lists, diag, **call)

    for values in settings:
        for lst, original in zip(lists, case):  # the captured tensors, reset in place
            for t, o in zip(lst, original):
                t.copy_(o)
        diag.zero_()
        scalars.copy_(step_scalars(values))
        graph.replay()
        torch.cuda.synchronize()
        want, want_diag = run(op, "triton", case, torch.zeros(NDIAG, dtype=torch.float64, device="cuda"),
                              **{**kw, **values})
        assert_identical(lists, want, diag, want_diag, diag_rtol=1e-12)


@pytest.mark.parametrize("op", ["adamw", "lion", "sgd"])
def test_probe_and_step_cuda_graph(op):
    """The probe pass and the step after it captured in one CUDA graph, replayed with taus written into probe_tau
    in place: each replay gives the bits of the eager calls with that tau (tau is never read on the host)."""
    case = make_case(op, shapes=LARGE, seed=45)
    origins, hvps = like(case[0], 46), like(case[0], 47)
    tau = tau_tensor()
    lists = [[t.clone() for t in lst] for lst in case]
    buffers = dict(origins=[t.clone() for t in origins], hvps=[t.clone() for t in hvps],
                   norms=torch.zeros(2, dtype=torch.float64, device="cuda"),
                   diag=torch.zeros(NDIAG, dtype=torch.float64, device="cuda"))
    op_fn = getattr(torch.ops.memkernels, f"{op}_")
    kw = dict(HYPER[op], **with_slope(op), probe_tau=tau, backend="triton")

    def calls():
        op_fn(*lists, None, origins=buffers["origins"], probe=True, probe_norms=buffers["norms"], **kw)
        op_fn(*lists, buffers["diag"], origins=buffers["origins"], hvps=buffers["hvps"], **PROBE, correction=0.5,
              **kw)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up: compile, build and cache the pointer tables
        calls()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        calls()

    for value in (TAU, 3 * TAU, 0.0):
        for lst, original in zip(lists + [buffers["origins"], buffers["hvps"]], case + [origins, hvps]):
            for t, o in zip(lst, original):  # the captured tensors, reset in place
                t.copy_(o)
        buffers["norms"].zero_()
        buffers["diag"].zero_()
        tau.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        probed = run_more(op, "triton", case, origins=origins, probe=True, probe_tau=tau_tensor(value),
                          probe_norms=torch.zeros(2, dtype=torch.float64, device="cuda"), **with_slope(op))
        want = run_more(op, "triton", [probed.lists[0]] + case[1:], torch.zeros(NDIAG, dtype=torch.float64,
                        device="cuda"), origins=probed.origins, hvps=hvps, probe_tau=tau_tensor(value), **PROBE,
                        correction=0.5, **with_slope(op))
        assert_identical(lists + [buffers["origins"], buffers["hvps"]], want.lists + [want.origins, want.hvps],
                         buffers["diag"], want.diag, diag_rtol=1e-12)
        assert_diag(buffers["norms"], probed.norms, rtol=1e-12)


def test_tables_cached_on_one_stream_serve_another():
    """A table uploaded on the default stream is waited for, and kept alive, on a side stream."""
    case = make_case("lion", shapes=LARGE, seed=29)
    want, _ = run("lion", "reference", case)
    run("lion", "triton", case)  # builds and caches the tables on the default stream
    lists = [[t.clone() for t in lst] for lst in case]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.memkernels.lion_(*lists, None, backend="triton", **HYPER["lion"])
    torch.cuda.current_stream().wait_stream(side)
    assert_same(lists, want)


def test_adamw_matches_torch_fused():
    """mk.AdamW on the triton backend follows torch.optim.AdamW(fused=True) over 10 steps."""
    import memkernels as mk

    gen = torch.Generator("cuda").manual_seed(28)
    shapes = gpt2_small()[2:40]  # ~24M parameters, small and large tensors
    init = [torch.randn(s, generator=gen, device="cuda") for s in shapes]
    ours = [torch.nn.Parameter(p.clone()) for p in init]
    theirs = [torch.nn.Parameter(p.clone()) for p in init]
    opt_ours = mk.AdamW(ours, lr=1e-3, weight_decay=0.1, backend="triton")
    opt_theirs = torch.optim.AdamW(theirs, lr=1e-3, weight_decay=0.1, fused=True)
    for _ in range(10):
        grads = [torch.randn(s, generator=gen, device="cuda") * 0.01 for s in shapes]
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
