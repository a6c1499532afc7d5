"""What mk.AdamW, mk.Lion and mk.SGD share: stepping a fused op over buckets of parameters.

A step checks everything first (hyperparameters, gradients, the op arguments of
every bucket) and only then creates state and moves parameters, so a step that
raises leaves parameters and state as they were.

Two ways to feed a step's scalars to the op. Host mode (the default) reads the
step count and lr as Python numbers and advances the coefficient recursions of
coefficients.py. Device mode (capturable=True, and always while torch.compile
traces the step) never reads a tensor on the host: the step count stays a tensor
on the params' device, lr may be a tensor, the coefficients come from their
closed forms in tensor ops and reach the op as its `step_scalars` tensor, and an
AMP skip happens inside the kernels. A compiled step therefore has no graph
break and no recompile when a scheduler changes a tensor lr, and a CUDA graph
can replay it. In device mode the params of one bucket share the step count of
its first param (they do when every param of a group has a gradient every step).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = None

from .. import _ops, backends
from ..coefficients import replay
from .._ops import check_hyperparameters
from ..reference import DIAGNOSTICS, NDIAG, compute_dtype, inv_scale, load_grad
from ._prev_grads import Mode, PrevGrads

HVP_MODES = ("trajectory", "probe", "exact")
_TRAJECTORY_NOTE = ("memkernels: hvp='trajectory' estimates H d from the change of the gradient between "
                    "steps; with minibatch noise that difference is noise/lr. Use it with full or large "
                    "batches, or use hvp='probe' (one extra gradient on the same batch).")


class Bucket:
    """Parameters of one group that one op call can update together (same device, dtype and step).

    n is the step count in host mode (None in device mode, where `step` is the first param's count).
    ref: the probe or exact mode's reference gradients and their hvp_scale, once computed.
    keep_refs: the trajectory's previous gradients are kept gradients, read and not written; keepable:
    this bucket's gradients may be kept (see _prev_grads.py).
    """

    def __init__(self, n: int | None, fresh_refs: bool, keep_refs: bool, keepable: bool) -> None:
        self.n, self.fresh_refs, self.keep_refs, self.keepable = n, fresh_refs, keep_refs, keepable
        self.step: Tensor | None = None
        self.params: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.states: list[dict[str, Any]] = []
        self.grad_refs: list[Tensor] = []
        self.prev_grad_modes: list[tuple[Tensor, Tensor, dict, Mode]] = []  # PrevGrads.record's arguments
        self.ref: tuple[list[Tensor], float] | None = None
        self.numel = 0  # global: a DTensor counts all its shards
        self.shard_groups: tuple = ()  # process groups over which the shards' diagnostics add up
        self.local: Callable[[Tensor], Tensor] = _itself  # _local for DTensor parameters


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
        self._diagnostics: dict[tuple[int, torch.device, tuple], Tensor] = {}
        self._stats_meta: dict[int, tuple[int, float, int]] = {}
        self._prev_grads = PrevGrads()
        if any(self.measures(g) and g["hvp"] == "trajectory" for g in self.param_groups):
            warnings.warn(_TRAJECTORY_NOTE, UserWarning, stacklevel=3)

    # ------------------------------------------------------------ subclass hooks

    def check_group(self, group: dict) -> None:
        """Raise ValueError naming a bad hyperparameter of this group."""
        if group["hvp"] not in HVP_MODES:
            raise ValueError(f"hvp must be one of {HVP_MODES}, got {group['hvp']!r}")
        if not math.isfinite(group["memory_correction"]):
            raise ValueError(f"memory_correction must be finite, got {group['memory_correction']}")
        lr = group["lr"]
        if isinstance(lr, Tensor) and (lr.numel() != 1 or not lr.is_floating_point()):
            raise ValueError(f"lr must be a float or a one-element floating tensor, got {tuple(lr.shape)} {lr.dtype}")
        if not (isinstance(lr, Tensor) and self.device_mode(group)):  # a tensor lr in device mode is not read
            check_hyperparameters(lr=float(lr))
        if group["capturable"] and self.measures(group) and group["hvp"] != "trajectory":
            raise ValueError(f"capturable=True measures memory with hvp='trajectory' only, got hvp={group['hvp']!r} "
                             "(the probe and exact estimates need host work between two gradients)")

    def new_state(self, p: Tensor, group: dict) -> dict[str, Tensor]:
        raise NotImplementedError

    def static_kwargs(self, group: dict) -> dict[str, Any]:
        """The op's hyperparameters that do not change from step to step (all but STEP_SCALARS)."""
        raise NotImplementedError

    def coefficients(self, group: dict, gi: int, n: int) -> dict[str, float]:
        """The op's coefficient scalars for step n, from the recursions (host mode)."""
        raise NotImplementedError

    def coefficients_at(self, group: dict, n: Tensor) -> dict[str, Tensor]:
        """The same for a step count held in a float64 tensor, from the closed forms (device mode)."""
        raise NotImplementedError

    def direction(self, kwargs: dict[str, Any], p: Tensor, g: Tensor) -> Tensor:
        """The memoryless update F(theta, ..., theta): the d whose H d the correction needs."""
        raise NotImplementedError

    def trajectory_ratio(self, group: dict, gi: int, n: int) -> float:
        """r in theta_{n-1} - theta_n ~ lr_{n-1} r d (THEORY.md section 5)."""
        return 1.0

    def trajectory_ratio_at(self, group: dict, n: Tensor) -> Tensor | float:
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

    @staticmethod
    def device_mode(group: dict) -> bool:
        return bool(group["capturable"]) or torch.compiler.is_compiling()

    @staticmethod
    def new_step(p: Tensor, group: dict) -> Tensor:
        """The step count: on the param's device when capturable, else on the CPU as torch.optim keeps it."""
        return torch.tensor(0.0, device=p.device if group["capturable"] else "cpu")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a torch.optim state_dict lacks memkernels' keys
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._tracks, self._diagnostics, self._stats_meta = {}, {}, {}
        self._prev_grads = PrevGrads()

    def _buckets(self, group: dict, scaled: bool) -> tuple[dict[tuple, Bucket], dict[Tensor, dict]]:
        """Group this group's parameters with gradients; new state is returned, not stored yet.

        scaled: the step has an AMP grad scale.
        """
        buckets: dict[tuple, Bucket] = {}
        created: dict[Tensor, dict] = {}
        measures, on_device = self.measures(group), self.device_mode(group)
        trajectory, capturable = measures and group["hvp"] == "trajectory", group["capturable"]
        keeps = trajectory and not (on_device or scaled or group["maximize"])
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise TypeError(f"memkernels.{type(self).__name__} does not support sparse gradients")
            shard_groups = _shard_groups(p)
            if shard_groups is not None and measures and not trajectory:
                raise ValueError(f"hvp={group['hvp']!r} with DTensor parameters is not supported; use "
                                 "hvp='trajectory' (its estimate is elementwise, so it needs no communication)")
            state = self.state.get(p)
            if not state:
                state = created[p] = self.new_state(p, group)
            elif "step" not in state:  # e.g. loaded from torch.optim.SGD or lion_pytorch, which keep no count
                state = created[p] = {**state, "step": self.new_step(p, group)}
            if capturable and state["step"].device != p.device:  # e.g. from a host-mode checkpoint
                state = created[p] = {**state, "step": state["step"].to(p.device)}
            mode: Mode = "copy"
            keepable = keeps and shard_groups is None
            if trajectory:  # "fresh" e.g. when loaded from torch.optim: no previous gradient, no HVP this step
                mode, prev_grad = self._prev_grads.plan(p, grad, state.get("prev_grad"), keepable, compute_dtype(p))
                if prev_grad is not None:
                    state = created[p] = {**state, "prev_grad": prev_grad}
            fresh_refs, keep_refs = mode in ("fresh", "lost"), mode == "keep"
            n = None if on_device else int(state["step"].item())
            key = (p.device, p.dtype, n, fresh_refs, keep_refs, shard_groups)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = Bucket(n, fresh_refs, keep_refs, keepable)
                bucket.step = state["step"] if on_device else None
                bucket.shard_groups = shard_groups or ()
                bucket.local = _local if shard_groups is not None else _itself  # DTensor grads and states too
            bucket.numel += p.numel()
            bucket.params.append(bucket.local(p))
            bucket.grads.append(bucket.local(grad))
            bucket.states.append(state)
            if trajectory:
                bucket.grad_refs.append(bucket.local(state["prev_grad"]))
                bucket.prev_grad_modes.append((p, grad, state, mode))
        return buckets, created

    def _call(self, group: dict, gi: int, bucket: Bucket, grad_scale: Tensor | None) -> tuple[dict[str, Any], list]:
        if bucket.n is None:  # device mode: these floats are placeholders for the step_scalars tensor
            kwargs = {**dict.fromkeys(_ops.STEP_SCALARS[self.op], 0.0), **self.static_kwargs(group)}
        else:
            kwargs = {"lr": float(group["lr"]), **self.static_kwargs(group), **self.coefficients(group, gi, bucket.n)}
        kwargs.update(correction=float(group["memory_correction"]), hvp_scale=0.0,
                      maximize=bool(group["maximize"]), memoryless=bool(group["memoryless"]),
                      update_grad_refs=group["hvp"] == "trajectory" and not bucket.keep_refs, grad_scale=grad_scale,
                      backend=self.backend)
        lists = [[bucket.local(s[k]) for s in bucket.states if k in s] for k in self.state_keys]
        return kwargs, lists

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        if not torch.compiler.is_compiling():  # traced, the checks would see symbolic floats; the ops still check
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
        host_skip = not all(self.device_mode(g) for g in self.param_groups)
        if found_inf is not None and host_skip and found_inf.item() != 0.0:
            return loss  # skipped exactly: no parameter, state or step count moves

        plans = []
        for gi, group in enumerate(self.param_groups):
            buckets, created = self._buckets(group, grad_scale is not None)
            plans.append((gi, group, buckets, created))
        calls = []
        for gi, group, buckets, _ in plans:
            for bucket in buckets.values():
                kwargs, lists = self._call(group, gi, bucket, grad_scale)
                _ops.check_tensors(self.op, bucket.params, bucket.grads, dict(zip(_ops.SCHEMAS[self.op][0], lists)),
                                   bucket.grad_refs, None, grad_scale, found_inf)
                if not torch.compiler.is_compiling():  # the op checks and resolves again as it runs, outside the graph
                    check_hyperparameters(**{k: v for k, v in kwargs.items() if isinstance(v, float)})
                    backends.resolve(self.op, self.backend, bucket.params[0].device.type)
                if self.measures(group) and group["hvp"] == "exact" and any(g.grad_fn is None for g in bucket.grads):
                    raise ValueError("hvp='exact' needs gradients with a graph: "
                                     "call loss.backward(create_graph=True)")
                calls.append((gi, group, bucket, kwargs, lists))
        for _, _, _, created in plans:  # everything checked: now state may change
            for p, state in created.items():
                self.state[p] = state

        self._reference_gradients(calls, closure)
        for diag in self._diagnostics.values():
            diag.zero_()
        self._stats_meta.clear()  # mutated, not reassigned: dynamo drops attribute writes on an optimizer
        for gi, group, bucket, kwargs, lists in calls:
            steps = [state["step"] for state in bucket.states]
            if bucket.n is None:
                kwargs.update(step_scalars=self._step_scalars(group, bucket), found_inf=found_inf)
                scalars = {**kwargs, **dict(zip(_ops.STEP_SCALARS[self.op], kwargs["step_scalars"].unbind()))}
                after: int | Tensor = steps[0]  # read by memory_stats after the increment below
            else:
                kwargs["hvp_scale"] = self._hvp_scale(group, gi, bucket)
                scalars, after = kwargs, bucket.n + 1
            grad_refs = bucket.ref[0] if bucket.ref else bucket.grad_refs
            diagnostics = self._diagnostics_for(gi, bucket) if self.track_memory else None
            # checked above, unless a probe or the exact mode brought new reference gradients; traced, the
            # op's own check is the one that runs with real tensors
            compiling = torch.compiler.is_compiling()
            op = getattr(_ops, self.op + "_") if compiling else _ops.EAGER[self.op]
            with _ops.checked_by_caller(not bucket.ref and not compiling):
                op(bucket.params, bucket.grads, *lists, grad_refs, diagnostics, **kwargs)
            for p, grad, state, mode in bucket.prev_grad_modes:
                self._prev_grads.record(p, grad, state, mode, bucket.keepable)
            if compiling or bucket.n is None or not backends.add_one(steps):
                torch._foreach_add_(steps, 1.0)
            if bucket.n is None and found_inf is not None:  # a skipped step does not count, as in torch.optim
                torch._foreach_sub_(steps, [found_inf.to(steps[0].device)] * len(steps))
            if self.track_memory:
                numel = bucket.numel + self._stats_meta.get(gi, (0, 0.0, 0))[2]
                self._stats_meta[gi] = (after, self.penalty_prefactor(group, scalars), numel)
        for (_, _, shard_groups), diag in self._diagnostics.items():  # sums over the shards of DTensor params
            for process_group in shard_groups:
                dist.all_reduce(diag, group=process_group)
        for group in self.param_groups:
            self._remember_lr(group)
        return loss

    def _remember_lr(self, group: dict) -> None:
        """prev_lr for the next step's trajectory estimate; a tensor lr is copied on its device, not read."""
        lr = group["lr"]
        if not isinstance(lr, Tensor) or not self.device_mode(group):
            group["prev_lr"] = float(lr)
        elif isinstance(group.get("prev_lr"), Tensor):
            group["prev_lr"].copy_(lr)
        else:
            group["prev_lr"] = lr.detach().clone()

    def _step_scalars(self, group: dict, bucket: Bucket) -> Tensor:
        """The op's STEP_SCALARS for this bucket as a float64 tensor on its device, with no host read."""
        device = bucket.params[0].device
        n = bucket.step.to(device=device, dtype=torch.float64)
        values = {"lr": _on(group["lr"], n), **self.coefficients_at(group, n), "hvp_scale": self._hvp_scale_at(group, bucket, n)}
        return torch.stack([values[name] for name in _ops.STEP_SCALARS[self.op]])

    def _diagnostics_for(self, gi: int, bucket: Bucket) -> Tensor:
        device = bucket.params[0].device
        key = (gi, device, bucket.shard_groups)
        diag = self._diagnostics.get(key)
        if diag is None:
            diag = self._diagnostics[key] = torch.zeros(NDIAG, dtype=torch.float64, device=device)
        return diag

    # ------------------------------------------------------------ HVP reference gradients

    def _hvp_scale(self, group: dict, gi: int, bucket: Bucket) -> float:
        if bucket.ref:
            return bucket.ref[1]
        if group["hvp"] != "trajectory" or bucket.n == 0 or bucket.fresh_refs or not self.measures(group):
            return 0.0
        prev_lr = float(group.get("prev_lr", group["lr"]))
        if prev_lr == 0.0:
            return 0.0
        return 1.0 / (prev_lr * self.trajectory_ratio(group, gi, bucket.n))

    def _hvp_scale_at(self, group: dict, bucket: Bucket, n: Tensor) -> Tensor:
        """_hvp_scale in tensor ops: 0 at step 0 and after a zero lr."""
        if bucket.ref:
            return torch.full_like(n, bucket.ref[1])
        if group["hvp"] != "trajectory" or bucket.fresh_refs or not self.measures(group):
            return torch.zeros_like(n)
        denominator = _on(group.get("prev_lr", group["lr"]), n) * self.trajectory_ratio_at(group, n)
        return torch.where((n > 0) & (denominator > 0), 1.0 / denominator, 0.0)

    def _reference_gradients(self, calls: list, closure: Callable | None) -> None:
        """Probe and exact modes: the gradient at theta + tau d (probe) or g + H d (exact), per bucket."""
        probe = [c for c in calls if self.measures(c[1]) and c[1]["hvp"] == "probe"]
        exact = [c for c in calls if self.measures(c[1]) and c[1]["hvp"] == "exact"]
        if exact:
            self._exact(exact)
        if probe:
            self._probe(probe, closure)

    def _directions(self, kwargs: dict, bucket: Bucket) -> list[Tensor]:
        factor = inv_scale(kwargs["grad_scale"])
        out = []
        for p, g in zip(bucket.params, bucket.grads):
            dtype = compute_dtype(p)
            g = load_grad(g.detach().to(dtype), factor, kwargs["maximize"])
            out.append(self.direction(kwargs, p.to(dtype), g))
        return out

    def _exact(self, calls: list) -> None:
        for _, _, bucket, kwargs, _ in calls:
            d = [x.to(p.dtype) for x, p in zip(self._directions(kwargs, bucket), bucket.params)]
            with torch.enable_grad():
                hd = torch.autograd.grad(bucket.grads, bucket.params, grad_outputs=d, allow_unused=True)
            bucket.ref = ([g.detach() + (torch.zeros_like(g) if h is None else h) for g, h in zip(bucket.grads, hd)],
                          1.0)
            for p, g in zip(bucket.params, bucket.grads):
                p.grad = g.detach()
            bucket.grads = [g.detach() for g in bucket.grads]

    def _probe(self, calls: list, closure: Callable) -> None:
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
            for bucket, _, tau in steps:
                grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in bucket.params]
                bucket.ref = (grads, 1.0 / tau if tau > 0 else 0.0)
        finally:
            for p, value, grad in saved:
                p.copy_(value)
                p.grad = grad

    # ------------------------------------------------------------ diagnostics

    def memory_stats(self) -> list[dict[str, float]]:
        """Per group, the last step's memory diagnostics of THEORY.md section 6 (needs track_memory=True)."""
        if not self.track_memory:
            raise RuntimeError("memory_stats() needs the optimizer built with track_memory=True")
        stats = []
        for gi, _ in enumerate(self.param_groups):
            total = [0.0] * NDIAG
            for (g, _, _), diag in self._diagnostics.items():
                if g == gi:
                    total = [a + b for a, b in zip(total, diag.tolist())]
            step, prefactor, numel = self._stats_meta.get(gi, (0, 0.0, 0))
            sums = dict(zip(DIAGNOSTICS, total))
            memory = sums["memory_sq"]
            stats.append({
                "step": int(step) if numel else 0,
                "update_norm": math.sqrt(sums["update_sq"]),
                "correction_norm": math.sqrt(sums["correction_sq"]),
                "memory_effect": math.sqrt(memory),
                "explained": 1.0 - sums["residual_sq"] / memory if memory > 0 else float("nan"),
                "penalty": float(prefactor) * sums["penalty_sum"],
                "sign_flip_fraction": sums["sign_flips"] / numel if numel else float("nan"),
            })
        return stats


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (an alias: updating it updates the DTensor); other tensors as they are."""
    return t.to_local() if _is_dtensor(t) else t


def _itself(t: Tensor) -> Tensor:
    return t


def _is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _shard_groups(p: Tensor) -> tuple | None:
    """None for a plain tensor; for a DTensor the process groups of the mesh dimensions it is sharded over
    (its replicated dimensions hold copies, whose sums must not be added)."""
    if not _is_dtensor(p):
        return None
    mesh = p.device_mesh
    return tuple(mesh.get_group(i) for i, placement in enumerate(p.placements) if placement.is_shard())


def _on(value: float | Tensor, like: Tensor) -> Tensor:
    """A float or one-element tensor hyperparameter as a 0-d tensor of like's dtype and device."""
    if isinstance(value, Tensor):
        return value.detach().reshape(()).to(device=like.device, dtype=like.dtype)
    return torch.full_like(like, float(value))


def _norm(tensors: list[Tensor]) -> float:
    """The 2-norm of a list of tensors taken together, one pass over each."""
    return float(torch.linalg.vector_norm(torch.stack([n.double() for n in torch._foreach_norm(tensors)])))


def check_betas(betas: Any) -> tuple[float, float]:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return float(betas[0]), float(betas[1])

