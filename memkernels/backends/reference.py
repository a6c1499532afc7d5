"""The reference backend: reference.py's math looped over tensors, for any device.

Half-precision tensors are computed in fp32 and rounded once on write-back.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import reference
from ..ops import SPECS, OpSpec
from . import register


def _run(spec: OpSpec, params, grads, state_lists, grad_refs, diagnostics, *, maximize, update_grad_refs,
         grad_scale, found_inf, origins, hvps, reuse_hvp, probe, probe_tau, probe_norms, hvp_scale,
         **scalars) -> None:
    if found_inf is not None and found_inf.item() != 0.0:
        return  # AMP found an inf: skip the step exactly, as torch's fused path does
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
                hvps[i].copy_(hvp)
        states = [lst[i].to(dtype) if lst else None for lst in state_lists]
        step = spec.step(theta, g, *states, hvp, **scalars)
        p.copy_(step.p)
        for lst, new in zip((lst for lst in state_lists if lst), step.states):
            lst[i].copy_(new)
        if update_grad_refs and grad_refs:
            grad_refs[i].copy_(step.g)
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
    register("reference", _spec.name, ("cpu", "cuda"))(_kernel(_spec))
