"""capturable=True on a GPU: the whole optimizer step recorded in a CUDA graph replays like eager steps.

The reference is the same optimizer in host mode stepping eagerly on the same gradients and lr
schedule (host mode is itself tested against torch.optim). Runs on the lent GPU (bench/gpu_check.sh).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import memkernels as mk

pytestmark = pytest.mark.gpu

SHAPES = [(257, 129), (1000,), (3,), (64, 64)]
CASES = {
    "adamw_correction": (mk.AdamW, dict(memory_correction=-0.5)),
    "heavy_ball": (mk.SGD, dict(momentum=0.9, memory_correction=0.5)),
    "lion_smooth": (mk.Lion, dict(smoothing=1e-3, memory_correction=-1.0)),
    # stochastic rounding: the keys come from the step count on the device; CUDA does not round so (_ops)
    "adamw_bf16_states": (mk.AdamW, dict(memory_correction=-0.5, state_dtype=torch.bfloat16)),
}
RUNS = [(case, backend) for case in CASES for backend in ("cuda", "triton")
        if backend == "triton" or "state_dtype" not in CASES[case][1]]


def _grads(n: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(1000 + n)
    return [torch.randn(s, device="cuda", generator=g) * 0.1 for s in SHAPES]


def _lr(n: int) -> float:
    return 1e-2 * 0.8 ** n


def _params() -> list[torch.nn.Parameter]:
    g = torch.Generator(device="cuda").manual_seed(7)
    return [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g)) for s in SHAPES]


def _make(case: str, params, lr, backend: str, capturable: bool):
    cls, kw = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trajectory-HVP note
        return cls(params, lr=lr, capturable=capturable, track_memory=True, backend=backend, **kw)


@pytest.mark.parametrize("case,backend", RUNS)
def test_cuda_graph_replay_matches_eager(case, backend):
    """Params, step counts and diagnostics as eager host mode's; bf16 states rounded stochastically to the bit
    (each replay rounds under its own step's keys; the gradients are the same, so the states do not depend
    on the params)."""
    mine, twin = _params(), _params()
    lr = torch.tensor(_lr(0), device="cuda")
    opt = _make(case, mine, lr, backend, capturable=True)
    ref = _make(case, twin, _lr(0), backend, capturable=False)

    def feed(n: int) -> None:
        for p, q, g in zip(mine, twin, _grads(n)):
            if p.grad is None:
                p.grad, q.grad = g.clone(), g.clone()
            else:
                p.grad.copy_(g)  # the graph reads these addresses: refill in place
                q.grad.copy_(g)
        lr.fill_(_lr(n))
        ref.param_groups[0]["lr"] = _lr(n)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: state, pointer tables and compiled kernels exist before capture
        for n in range(3):
            feed(n)
            opt.step()
            ref.step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for n in range(3, 9):
        feed(n)
        graph.replay()
        ref.step()
    torch.cuda.synchronize()

    for p, q in zip(mine, twin):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert all(s["step"].item() == 9 for s in opt.state.values())
    got, want = opt.memory_stats()[0], ref.memory_stats()[0]
    assert got["step"] == want["step"] == 9
    for key in ("update_norm", "correction_norm", "memory_effect", "penalty"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-12), key
    if "state_dtype" in CASES[case][1]:
        for p, q in zip(mine, twin):
            for key, value in ref.state[q].items():
                if key != "step":
                    assert value.dtype == torch.bfloat16 and torch.equal(opt.state[p][key], value), key
