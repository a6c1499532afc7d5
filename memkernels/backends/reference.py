"""The reference backend: reference.py's math looped over tensors, for any device.

Half-precision tensors are computed in fp32 and rounded once on write-back.
"""
from __future__ import annotations

import torch

from .. import reference
from . import register


def _run(op, params, grads, state_lists, grad_refs, diagnostics, *, maximize, update_grad_refs,
         grad_scale, found_inf, origins, hvps, reuse_hvp, probe, probe_tau, probe_norms, hvp_scale,
         **scalars) -> None:
    if found_inf is not None and found_inf.item() != 0.0:
        return  # AMP found an inf: skip the step exactly, as torch's fused path does
    step_math, direction = reference.OPS[op]
    inv_scale = reference.inv_scale(grad_scale)
    totals = [0.0] * (2 if probe else reference.NDIAG)
    for i, p in enumerate(params):
        dtype = reference.compute_dtype(p)
        g = reference.load_grad(grads[i].to(dtype), inv_scale, maximize)
        theta = (origins[i] if origins and not probe else p).to(dtype)
        if probe:  # theta + tau d into params, theta kept in origins
            out = reference.probe(theta, direction(theta, g, **scalars), probe_tau)
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
        step = step_math(theta, g, *states, hvp, **scalars)
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


@register("reference", "adamw", ("cpu", "cuda"))
def adamw(params, grads, exp_avgs, exp_avg_sqs, grad_refs, diagnostics, **kw) -> None:
    _run("adamw", params, grads, (exp_avgs, exp_avg_sqs), grad_refs, diagnostics, **kw)


@register("reference", "lion", ("cpu", "cuda"))
def lion(params, grads, exp_avgs, grad_refs, diagnostics, **kw) -> None:
    _run("lion", params, grads, (exp_avgs,), grad_refs, diagnostics, **kw)


@register("reference", "sgd", ("cpu", "cuda"))
def sgd(params, grads, momentum_buffers, grad_refs, diagnostics, **kw) -> None:
    _run("sgd", params, grads, (momentum_buffers,), grad_refs, diagnostics, **kw)
