"""The reference backend: reference.py's math looped over tensors, for any device.

Half-precision tensors are computed in fp32 and rounded once on write-back: to nearest even, or, given
rounding_keys, a bfloat16 state, grad_ref or kept estimate stochastically (ops/rounding.py) by its write's bits.
A step writes bfloat16 params to nearest, by reference.kahan given compensations, or stochastically under the
params' key with param_rounding="stochastic".
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .. import reference
from ..ops import SPECS, OpSpec, rounding
from . import register


def _store(dst: Tensor, value: Tensor, keys: list[int] | None, write: int) -> None:
    """dst = value; given its tensor's keys a bfloat16 dst rounds stochastically by the bits of its write
    number (rounding.key_of_write), each element by its bits at its index in memory (the offset from dst's
    first element: what the kernels count, whatever the layout)."""
    if keys is None or dst.dtype != torch.bfloat16 or dst.numel() == 0:
        dst.copy_(value)
        return
    column, shift = rounding.key_of_write(write)
    index = torch.arange(dst.numel(), dtype=torch.int64, device=dst.device).as_strided(dst.shape, dst.stride())
    dst.copy_(rounding.round_bf16(value.float(), rounding.random_bits(keys[column], index) >> shift))


def _run(spec: OpSpec, params, grads, state_lists, grad_refs, diagnostics, *, maximize, update_grad_refs,
         grad_scale, found_inf, origins, hvps, reuse_hvp, probe, probe_tau, probe_norms, hvp_scale,
         rounding_keys=None, compensations=(), param_rounding="nearest", **scalars) -> None:
    if found_inf is not None and found_inf.item() != 0.0:
        return  # AMP found an inf: skip the step exactly, as torch's fused path does
    n = len(spec.states)  # the writes: the states (0, ..., n - 1), grad_refs (n), hvps (n + 1), params (n + 2)
    keys = rounding_keys.tolist() if rounding_keys is not None else [None] * len(params)
    inv_scale = reference.inv_scale(grad_scale)
    totals = [0.0] * (2 if probe else reference.NDIAG)
    for i, p in enumerate(params):
        dtype = reference.compute_dtype(p)
        g = reference.load_grad(grads[i].to(dtype), inv_scale, maximize)
        theta = (origins[i] if origins and not probe else p).to(dtype)
        if probe:  # theta + tau d into params, theta kept in origins
            out = reference.probe(theta, spec.direction(theta, g, **scalars), probe_tau)
            origins[i].copy_(p)
            p.copy_(out.p)
            if probe_norms is not None:
                totals = [totals[0] + out.theta_sq.double().sum().item(), totals[1] + out.d_sq.double().sum().item()]
            continue
        hvp = None
        if reuse_hvp:
            hvp = hvps[i].to(dtype)
        elif grad_refs:
            g_ref = grad_refs[i].to(dtype)
            if not update_grad_refs:  # a probe or exact gradient arrives raw, like grads
                g_ref = reference.load_grad(g_ref, inv_scale, maximize)
            hvp = reference.estimate_hvp(g_ref, g, hvp_scale)
            if hvps:
                _store(hvps[i], hvp, keys[i], n + 1)
        states = [lst[i].to(dtype) if lst else None for lst in state_lists]
        step = spec.step(theta, g, *states, hvp, **scalars)
        if compensations:
            q, c = reference.kahan(theta, step.p, compensations[i].to(dtype))
            p.copy_(q)
            compensations[i].copy_(c)
        else:
            _store(p, step.p, keys[i] if param_rounding == "stochastic" else None, n + 2)
        present = [(lst, j) for j, lst in enumerate(state_lists) if lst]
        for (lst, write), new in zip(present, step.states):
            _store(lst[i], new, keys[i], write)
        if update_grad_refs and grad_refs:
            _store(grad_refs[i], step.g, keys[i], n)
        if diagnostics is not None:
            for k, term in enumerate(step.diag):
                totals[k] += term.double().sum().item()
    out = probe_norms if probe else diagnostics
    if out is not None:
        out.add_(torch.tensor(totals, dtype=torch.float64, device=out.device))


def _kernel(spec: OpSpec) -> Callable[..., None]:
    n = len(spec.states)

    def kernel(params, grads, *lists_and_diagnostics, **kw) -> None:
        _run(spec, params, grads, lists_and_diagnostics[:n], *lists_and_diagnostics[n:], **kw)
    return kernel


for _spec in SPECS.values():
    register("reference", _spec.name, ("cpu", "cuda"), stochastic_rounding=True, bf16_params=True)(_kernel(_spec))
