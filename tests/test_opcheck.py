"""The ops are well-formed torch.library ops: opcheck passes, and torch.compile traces them without graph breaks.

opcheck checks the schema's mutation annotations against what the kernel
writes, the autograd registration, the fake impl and AOT dispatch with dynamic
shapes. The compiled step must give bit-identical results to eager: the fake
impl only describes the op, the same reference kernel runs in both.
"""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import memkernels  # noqa: F401  (registers torch.ops.memkernels)

F64 = torch.float64
NDIAG = 7
SHAPES = [(4, 3), (5,), (1,)]
OP_KWARGS = {
    "adamw": dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, bias_correction1=0.1,
                  bias_correction2=0.01, mean_age1=0.5, mean_age2=0.7),
    "lion": dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.1, smoothing=0.01, ema_weight=0.5, age_weight=2.0),
    "sgd": dict(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True, update_scale=1.9, memory_coef=0.9),
}


def arguments(op: str, *, refs: bool, diagnostics: bool, dtype: torch.dtype = torch.float32,
              state_dtype: torch.dtype | None = None, seed: int = 0) -> tuple:
    """(params, grads, *state lists, grad_refs, diagnostics); params do not require grad, as in a step."""
    gen = torch.Generator().manual_seed(seed)

    def tensors(dt: torch.dtype, positive: bool = False) -> list[torch.Tensor]:
        out = [torch.randn(s, generator=gen, dtype=F64) for s in SHAPES]
        return [(t.abs() if positive else t).to(dt) for t in out]

    state_dtype = state_dtype or dtype
    states = {"adamw": [tensors(state_dtype), tensors(state_dtype, positive=True)],
              "lion": [tensors(state_dtype)], "sgd": [tensors(state_dtype)]}[op]
    return (tensors(dtype), tensors(dtype), *states, tensors(state_dtype) if refs else [],
            torch.zeros(NDIAG, dtype=F64) if diagnostics else None)


def op_kwargs(op: str, *, refs: bool, **extra: Any) -> dict[str, Any]:
    kw = dict(OP_KWARGS[op], backend="reference")
    if refs:
        kw.update(correction=-1.0, hvp_scale=10.0, update_grad_refs=True)
    kw.update(extra)
    return kw


def flat(args: tuple) -> list[torch.Tensor]:
    return [t for a in args if a is not None for t in (a if isinstance(a, list) else [a])]


VARIANTS = {
    "plain": dict(refs=False, diagnostics=False),
    "refs": dict(refs=True, diagnostics=False),
    "diagnostics": dict(refs=False, diagnostics=True),
    "refs+diagnostics": dict(refs=True, diagnostics=True),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("op", OP_KWARGS)
def test_opcheck(op, variant):
    spec = VARIANTS[variant]
    args = arguments(op, **spec)
    torch.library.opcheck(getattr(torch.ops.memkernels, op + "_").default, args, op_kwargs(op, refs=spec["refs"]))


@pytest.mark.parametrize("op", OP_KWARGS)
def test_opcheck_mixed_dtypes_and_amp(op):
    """bf16 params with fp32 states, probe-style grad_refs (not written), maximize, grad_scale and found_inf."""
    args = arguments(op, refs=True, diagnostics=True, dtype=torch.bfloat16, state_dtype=torch.float32)
    kw = op_kwargs(op, refs=True, update_grad_refs=False, maximize=True, memoryless=True,
                   grad_scale=torch.tensor(64.0), found_inf=torch.tensor(0.0))
    torch.library.opcheck(getattr(torch.ops.memkernels, op + "_").default, args, kw)


def test_opcheck_sgd_without_momentum_buffers():
    args = ([torch.randn(3, 2)], [torch.randn(3, 2)], [], [torch.randn(3, 2)], None)
    kw = dict(op_kwargs("sgd", refs=True), momentum=0.0, nesterov=False, update_scale=1.0, memory_coef=0.0)
    torch.library.opcheck(torch.ops.memkernels.sgd_.default, args, kw)


def compiled_matches_eager(op: str, backend: str, *, surrounded: bool = True) -> None:
    """A step compiled with fullgraph=True (a graph break raises) changes every tensor as eager does.

    surrounded: the op sits between other ops (gradient scaling before, a reduction after).
    """
    fn = getattr(torch.ops.memkernels, op + "_")
    kw = op_kwargs(op, refs=True)

    def step(params, grads, *rest):
        *lists, diagnostics = rest
        fn(params, [2.0 * g for g in grads] if surrounded else grads, *lists, diagnostics, **kw)
        return torch.stack([p.sum() for p in params]).sum() + diagnostics.sum() if surrounded else None

    eager_args = arguments(op, refs=True, diagnostics=True)
    compiled_args = copy.deepcopy(eager_args)
    expected = step(*eager_args)
    torch._dynamo.reset()
    got = torch.compile(step, backend=backend, fullgraph=True)(*compiled_args)
    if surrounded:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0.0)  # the reduction may be reordered
    for a, b in zip(flat(compiled_args), flat(eager_args)):
        assert torch.equal(a, b)  # the same reference kernel ran


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("op", OP_KWARGS)
def test_compile_fullgraph(op, backend):
    compiled_matches_eager(op, backend)


def test_compile_inductor():
    """One inductor run: the functionalized op alone, so that no C++ kernel has to be compiled."""
    compiled_matches_eager("adamw", "inductor", surrounded=False)


@pytest.mark.parametrize("op", OP_KWARGS)
def test_explain_reports_one_graph(op):
    fn = getattr(torch.ops.memkernels, op + "_")
    kw = op_kwargs(op, refs=False)

    def step(*args):
        fn(*args, **kw)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(*arguments(op, refs=False, diagnostics=True))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
