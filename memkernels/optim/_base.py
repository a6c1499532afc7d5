"""What mk.AdamW, mk.Lion and mk.SGD share: stepping a fused op over buckets of parameters.

A step checks everything first (hyperparameters, gradients, the op arguments of
every bucket) and only then creates state and moves parameters, so a step that
raises leaves parameters and state as they were.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .. import _ops, backends
from ..coefficients import replay
from ..reference import DIAGNOSTICS, NDIAG, compute_dtype, inv_scale, load_grad

HVP_MODES = ("trajectory", "probe", "exact")
_TRAJECTORY_NOTE = ("memkernels: hvp='trajectory' estimates H d from the change of the gradient between "
                    "steps; with minibatch noise that difference is noise/lr. Use it with full or large "
                    "batches, or use hvp='probe' (one extra gradient on the same batch).")


class Bucket:
    """Parameters of one group that one op call can update together (same device, dtype and step)."""

    def __init__(self, n: int, fresh_refs: bool) -> None:
        self.n, self.fresh_refs = n, fresh_refs
        self.params: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.states: list[dict[str, Any]] = []
        self.grad_refs: list[Tensor] = []


class MemoryOptimizer(torch.optim.Optimizer):
    """Base class; subclasses name their op, their state and their coefficients.

    memoryless=True steps with F(theta, ..., theta) in place of the update with
    memory (the theory harness's memoryless approximation, THEORY.md section 6).
    """

    op: str
    state_keys: tuple[str, ...]  # the op's state lists, in schema order, by torch's state_dict names

    def __init__(self, params: Iterable, defaults: dict[str, Any], *, track_memory: bool, backend: str) -> None:
        if defaults["hvp"] not in HVP_MODES:
            raise ValueError(f"hvp must be one of {HVP_MODES}, got {defaults['hvp']!r}")
        backends.requested(backend)  # an unknown name fails here, an unavailable one at the first step
        self.track_memory, self.backend = bool(track_memory), backend
        super().__init__(params, defaults)
        for group in self.param_groups:
            self.check_group(group)
        self._step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf
        self._tracks: dict[tuple, Any] = {}
        self._diagnostics: dict[tuple[int, torch.device], Tensor] = {}
        self._stats_meta: dict[int, tuple[int, float, int]] = {}
        if any(self.measures(g) and g["hvp"] == "trajectory" for g in self.param_groups):
            warnings.warn(_TRAJECTORY_NOTE, UserWarning, stacklevel=3)

    # ------------------------------------------------------------ subclass hooks

    def check_group(self, group: dict) -> None:
        """Raise ValueError naming a bad hyperparameter of this group."""
        if group["hvp"] not in HVP_MODES:
            raise ValueError(f"hvp must be one of {HVP_MODES}, got {group['hvp']!r}")
        if not math.isfinite(group["memory_correction"]):
            raise ValueError(f"memory_correction must be finite, got {group['memory_correction']}")

    def new_state(self, p: Tensor, group: dict) -> dict[str, Tensor]:
        raise NotImplementedError

    def op_kwargs(self, group: dict, gi: int, n: int) -> dict[str, Any]:
        """Hyperparameters and coefficient scalars of the op for step n."""
        raise NotImplementedError

    def direction(self, kwargs: dict[str, Any], p: Tensor, g: Tensor) -> Tensor:
        """The memoryless update F(theta, ..., theta): the d whose H d the correction needs."""
        raise NotImplementedError

    def trajectory_ratio(self, group: dict, gi: int, n: int) -> float:
        """r in theta_{n-1} - theta_n ~ lr_{n-1} r d (THEORY.md section 5)."""
        return 1.0

    def penalty_prefactor(self, group: dict, kwargs: dict[str, Any]) -> float:
        """R = prefactor * sum(psi), with psi summed by the kernel (THEORY.md sections 2-4)."""
        raise NotImplementedError

    # ------------------------------------------------------------ shared machinery

    def track(self, gi: int, key: tuple, factory: Callable[[], Any], n: int) -> Any:
        """The coefficient recursion of group gi at step n: O(1) per step, replayed only after a jump."""
        track = self._tracks.get((gi, key))
        if track is None or track.n > n:
            track = self._tracks[(gi, key)] = factory()
        return replay(track, n)

    def measures(self, group: dict) -> bool:
        return group["memory_correction"] != 0.0 or self.track_memory

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a torch.optim state_dict lacks memkernels' keys
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._tracks, self._diagnostics, self._stats_meta = {}, {}, {}

    def _buckets(self, group: dict) -> tuple[dict[tuple, Bucket], dict[Tensor, dict]]:
        """Group this group's parameters with gradients; new state is returned, not stored yet."""
        buckets: dict[tuple, Bucket] = {}
        created: dict[Tensor, dict] = {}
        measures = self.measures(group)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError(f"memkernels.{type(self).__name__} does not support sparse gradients")
            state = self.state.get(p)
            if not state:
                state = created[p] = self.new_state(p, group)
            elif "step" not in state:  # e.g. loaded from torch.optim.SGD or lion_pytorch, which keep no count
                state = created[p] = {**state, "step": torch.tensor(0.0)}
            fresh_refs = False
            if measures and group["hvp"] == "trajectory" and "prev_grad" not in state:
                state = created[p] = {**state, "prev_grad": torch.zeros_like(p, dtype=compute_dtype(p))}
                fresh_refs = True  # no previous gradient yet (e.g. loaded from torch.optim): no HVP this step
            n = int(state["step"].item())
            key = (p.device, p.dtype, n, fresh_refs)
            bucket = buckets.setdefault(key, Bucket(n, fresh_refs))
            bucket.params.append(p)
            bucket.grads.append(p.grad)
            bucket.states.append(state)
            if measures and group["hvp"] == "trajectory":
                bucket.grad_refs.append(state["prev_grad"])
        return buckets, created

    def _call(self, group: dict, gi: int, bucket: Bucket, grad_scale: Tensor | None) -> tuple[dict[str, Any], list]:
        kwargs = self.op_kwargs(group, gi, bucket.n)
        kwargs.update(correction=float(group["memory_correction"]), hvp_scale=0.0,
                      maximize=bool(group["maximize"]), memoryless=bool(group["memoryless"]),
                      update_grad_refs=group["hvp"] == "trajectory", grad_scale=grad_scale,
                      backend=self.backend)
        lists = [[s[k] for s in bucket.states if k in s] for k in self.state_keys]
        return kwargs, lists

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        for group in self.param_groups:
            self.check_group(group)
        probing = [g for g in self.param_groups if self.measures(g) and g["hvp"] == "probe"]
        if probing and closure is None:
            raise ValueError("hvp='probe' needs step(closure): the closure re-evaluates the loss "
                             "and its gradient at the probe point")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if found_inf is not None and found_inf.item() != 0.0:
            return loss  # skipped exactly: no parameter, state or step count moves

        plans = []
        for gi, group in enumerate(self.param_groups):
            buckets, created = self._buckets(group)
            plans.append((gi, group, buckets, created))
        calls = []
        for gi, group, buckets, _ in plans:
            for bucket in buckets.values():
                kwargs, lists = self._call(group, gi, bucket, grad_scale)
                _ops.check_tensors(self.op, bucket.params, bucket.grads, dict(zip(_ops.SCHEMAS[self.op][0], lists)),
                                   bucket.grad_refs, None, grad_scale, None)
                _ops.check_hyperparameters(**{k: v for k, v in kwargs.items() if isinstance(v, float)})
                backends.resolve(self.op, self.backend, bucket.params[0].device.type)
                if self.measures(group) and group["hvp"] == "exact" and any(g.grad_fn is None for g in bucket.grads):
                    raise ValueError("hvp='exact' needs gradients with a graph: "
                                     "call loss.backward(create_graph=True)")
                calls.append((gi, group, bucket, kwargs, lists))
        for _, _, _, created in plans:  # everything checked: now state may change
            for p, state in created.items():
                self.state[p] = state

        refs = self._reference_gradients(calls, closure)
        for diag in self._diagnostics.values():
            diag.zero_()
        self._stats_meta = {}
        for gi, group, bucket, kwargs, lists in calls:
            kwargs["hvp_scale"] = self._hvp_scale(group, gi, bucket, refs)
            grad_refs = refs[id(bucket)][0] if id(bucket) in refs else bucket.grad_refs
            diagnostics = self._diagnostics_for(gi, bucket) if self.track_memory else None
            getattr(_ops, self.op + "_")(bucket.params, bucket.grads, *lists, grad_refs, diagnostics, **kwargs)
            for state in bucket.states:
                state["step"] += 1
            if self.track_memory:
                numel = sum(p.numel() for p in bucket.params)
                numel += self._stats_meta.get(gi, (0, 0.0, 0))[2]
                self._stats_meta[gi] = (bucket.n, self.penalty_prefactor(group, kwargs), numel)
        for gi, group in enumerate(self.param_groups):
            group["prev_lr"] = float(group["lr"])
        return loss

    def _diagnostics_for(self, gi: int, bucket: Bucket) -> Tensor:
        device = bucket.params[0].device
        key = (gi, device)
        diag = self._diagnostics.get(key)
        if diag is None:
            diag = self._diagnostics[key] = torch.zeros(NDIAG, dtype=torch.float64, device=device)
        return diag

    # ------------------------------------------------------------ HVP reference gradients

    def _hvp_scale(self, group: dict, gi: int, bucket: Bucket, refs: dict) -> float:
        if id(bucket) in refs:
            return refs[id(bucket)][1]
        if group["hvp"] != "trajectory" or bucket.n == 0 or bucket.fresh_refs or not self.measures(group):
            return 0.0
        prev_lr = group.get("prev_lr", group["lr"])
        if prev_lr == 0.0:
            return 0.0
        return 1.0 / (prev_lr * self.trajectory_ratio(group, gi, bucket.n))

    def _reference_gradients(self, calls: list, closure: Callable | None) -> dict[int, tuple[list[Tensor], float]]:
        """Probe and exact modes: the gradient at theta + tau d (probe) or g + H d (exact), per bucket."""
        probe = [c for c in calls if self.measures(c[1]) and c[1]["hvp"] == "probe"]
        exact = [c for c in calls if self.measures(c[1]) and c[1]["hvp"] == "exact"]
        refs: dict[int, tuple[list[Tensor], float]] = {}
        if exact:
            refs.update(self._exact(exact))
        if probe:
            refs.update(self._probe(probe, closure))
        return refs

    def _directions(self, kwargs: dict, bucket: Bucket) -> list[Tensor]:
        factor = inv_scale(kwargs["grad_scale"])
        out = []
        for p, g in zip(bucket.params, bucket.grads):
            dtype = compute_dtype(p)
            g = load_grad(g.detach().to(dtype), factor, kwargs["maximize"])
            out.append(self.direction(kwargs, p.to(dtype), g))
        return out

    def _exact(self, calls: list) -> dict[int, tuple[list[Tensor], float]]:
        refs = {}
        for _, _, bucket, kwargs, _ in calls:
            d = [x.to(p.dtype) for x, p in zip(self._directions(kwargs, bucket), bucket.params)]
            with torch.enable_grad():
                hd = torch.autograd.grad(bucket.grads, bucket.params, grad_outputs=d, allow_unused=True)
            refs[id(bucket)] = ([g.detach() + (torch.zeros_like(g) if h is None else h)
                                 for g, h in zip(bucket.grads, hd)], 1.0)
            for p, g in zip(bucket.params, bucket.grads):
                p.grad = g.detach()
            bucket.grads = [g.detach() for g in bucket.grads]
        return refs

    def _probe(self, calls: list, closure: Callable) -> dict[int, tuple[list[Tensor], float]]:
        steps = []
        for _, _, bucket, kwargs, _ in calls:
            d = self._directions(kwargs, bucket)
            eps = max(torch.finfo(compute_dtype(p)).eps for p in bucket.params)
            theta_norm, d_norm = _norm(bucket.params), _norm(d)
            tau = math.sqrt(eps) * (1.0 + theta_norm) / d_norm if d_norm > 0 else 0.0
            steps.append((bucket, d, tau))
        saved = [(p, p.detach().clone(), p.grad) for bucket, _, _ in steps for p in bucket.params]
        try:
            for bucket, d, tau in steps:
                for p, x in zip(bucket.params, d):
                    p.add_(x.to(p.dtype), alpha=tau)
                    p.grad = None
            with torch.enable_grad():
                closure()
            refs = {}
            for bucket, _, tau in steps:
                grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in bucket.params]
                refs[id(bucket)] = (grads, 1.0 / tau if tau > 0 else 0.0)
        finally:
            for p, value, grad in saved:
                p.copy_(value)
                p.grad = grad
        return refs

    # ------------------------------------------------------------ diagnostics

    def memory_stats(self) -> list[dict[str, float]]:
        """Per group, the last step's memory diagnostics of THEORY.md section 6 (needs track_memory=True)."""
        if not self.track_memory:
            raise RuntimeError("memory_stats() needs the optimizer built with track_memory=True")
        stats = []
        for gi, _ in enumerate(self.param_groups):
            total = [0.0] * NDIAG
            for (g, _), diag in self._diagnostics.items():
                if g == gi:
                    total = [a + b for a, b in zip(total, diag.tolist())]
            n, prefactor, numel = self._stats_meta.get(gi, (0, 0.0, 0))
            sums = dict(zip(DIAGNOSTICS, total))
            memory = sums["memory_sq"]
            stats.append({
                "step": n + 1 if numel else 0,
                "update_norm": math.sqrt(sums["update_sq"]),
                "correction_norm": math.sqrt(sums["correction_sq"]),
                "memory_effect": math.sqrt(memory),
                "explained": 1.0 - sums["residual_sq"] / memory if memory > 0 else float("nan"),
                "penalty": prefactor * sums["penalty_sum"],
                "sign_flip_fraction": sums["sign_flips"] / numel if numel else float("nan"),
            })
        return stats


def _norm(tensors: list[Tensor]) -> float:
    """The 2-norm of a list of tensors taken together, one pass over each."""
    return float(torch.linalg.vector_norm(torch.stack([n.double() for n in torch._foreach_norm(tensors)])))


def check_betas(betas: Any) -> tuple[float, float]:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return float(betas[0]), float(betas[1])

