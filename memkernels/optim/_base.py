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

import dataclasses
import math
import numbers
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
from .._ops import check_hyperparameters, real
from ..reference import DIAGNOSTICS, NDIAG, compute_dtype
from . import _hvp
from ._prev_grads import Mode, PrevGrads

HVP_MODES = ("auto", "trajectory", "probe", "exact")
_AUTO_TRAJECTORY = ("memkernels: hvp='auto' without step(closure) estimates H d from the change of the gradient "
                    "between steps (hvp='trajectory'); with minibatch noise that difference is noise/lr. Fine "
                    "with full or large batches; with minibatches pass step(closure) (the probe estimate: one "
                    "extra gradient on the same batch), or set hvp='trajectory' to silence this.")
_OUT_OF_REGIME = ("memkernels: group {gi}'s memory correction is outside the regime where the expansion holds "
                  "(|alpha h M_i| << |F_i|): ||alpha h M|| / ||F|| = {ratio:.3g}, {limited:.1%} of elements limited "
                  "to correction_limit={kappa} times the memoryless step at step {step}. The step applied is a "
                  "bounded heuristic there, not the paper's term; see memory_stats() and the README.")
REGIME_LIMITED = 0.01  # warn when more than this fraction of elements is limited ...
REGIME_EVERY = 100  # ... read every step on the CPU, every this many steps elsewhere (a host read syncs)


class Bucket:
    """Parameters of one group that one op call can update together (same device, dtype and step).

    n is the step count in host mode (None in device mode, where `step` is the first param's count).
    hvp: how H d is estimated this step (None: not measured); estimate: it is estimated this step (else the
    kept estimates in hvps are reused, hvp_every > 1). ref: the probe or exact mode's reference gradients
    and their hvp_scale, once computed; origins and tau: the probe pass's.
    keep_refs: the trajectory's previous gradients are kept gradients, read and not written; keepable:
    this bucket's gradients may be kept (see _prev_grads.py).
    """

    def __init__(self, n: int | None, hvp: str | None, fresh_refs: bool, keep_refs: bool, keepable: bool) -> None:
        self.n, self.hvp, self.fresh_refs, self.keep_refs, self.keepable = n, hvp, fresh_refs, keep_refs, keepable
        self.estimate = True
        self.hvps: list[Tensor] = []
        self.origins: list[Tensor] = []
        self.tau: Tensor | None = None
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

    Keywords every optimizer takes (docs/THEORY.md sections 5, 6 and 9):
    - memory_correction (alpha): the step is p - h (F + alpha h M); 0 is the plain optimizer, -1 cancels
      memory's implicit term, +1 doubles it.
    - correction_limit (kappa, in (0, inf]): alpha h M is limited per element to kappa |F| (F: the step it
      corrects; u, the memoryless update, in memoryless mode), which keeps the correction where the expansion
      holds and bounds it where it does not; memory_stats()["limited_fraction"] counts where it acted. inf: no
      limit.
    - hvp: how H d is estimated. "auto": the probe when step() gets a closure (one extra gradient on the same
      batch: sound with minibatches), else "trajectory" (the change of the gradient between steps: free, sound
      with full or large batches; a warning says so once). "exact": double backward (call
      loss.backward(create_graph=True)).
    - hvp_every (k): probe and exact estimate H d every k steps and reuse the kept estimate (state "hvp")
      between; the step stays O(h^2) for a fixed k.
    - track_memory: reduce the diagnostics of memory_stats() every step (always on under a correction).
    - memoryless=True steps with F(theta, ..., theta) in place of the update with memory (the theory
      harness's memoryless approximation).
    - capturable: device mode (no host reads: CUDA graphs); backend: "auto", "numba", "triton", "cuda" or
      "reference".
    """

    op: str
    state_keys: tuple[str, ...]  # the op's state lists, in schema order, by torch's state_dict names
    optional_state_keys: tuple[str, ...] = ()  # those a state may lack (SGD's buffer without momentum)

    def __init__(self, params: Iterable, defaults: dict[str, Any], *, track_memory: bool, backend: str) -> None:
        if defaults["hvp"] not in HVP_MODES:
            raise ValueError(f"hvp must be one of {HVP_MODES}, got {defaults['hvp']!r}")
        backends.requested(backend)  # an unknown name fails here, an unavailable one at the first step
        self.track_memory, self.backend = bool(track_memory), backend
        super().__init__(params, defaults)
        for group in self.param_groups:
            self.check_group(group)
        self._step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf
        self._transient()

    def add_param_group(self, param_group: dict) -> None:
        """torch.optim's, and no parameter twice or overlapping another in memory (their updates would race), and
        no complex one; a group refused is not added."""
        super().add_param_group(param_group)
        try:
            for p in self.param_groups[-1]["params"]:
                if p.is_complex():
                    raise TypeError(f"memkernels.{type(self).__name__}: a parameter of shape {tuple(p.shape)} is "
                                    f"{p.dtype}; complex parameters are not supported (torch.optim steps them "
                                    "as torch.view_as_real views: use torch.optim for them, or real parameters)")
            _check_disjoint([p for group in self.param_groups for p in group["params"]])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        group = self.param_groups[-1]
        if (group["hvp"] != "auto" or group["hvp_every"] != 1) and not self.measures(group):
            warnings.warn(f"memkernels.{type(self).__name__}: hvp={group['hvp']!r}, hvp_every={group['hvp_every']} "
                          "is unused: H d is estimated only with a nonzero memory_correction or track_memory=True",
                          UserWarning, stacklevel=5)

    def _transient(self) -> None:
        """What the optimizer keeps besides its state_dict: caches, buffers, the last diagnostics."""
        self._tracks: dict[tuple, dict[int, Any]] = {}
        self._prepared: set[tuple] = set()  # kinds of kernel call built ahead of a step (_prepare)
        self._diagnostics: dict[tuple[int, torch.device, tuple], Tensor] = {}
        self._stats_meta: dict[int, tuple[int, float, int]] = {}
        self._skipped: dict[tuple[int, torch.device], int | Tensor] = {}  # trajectory estimates skipped (_scale_limit)
        self._prev_grads = PrevGrads()
        self._probes = _hvp.Probes()
        self._warned: set[str] = set()
        self._steps = 0  # steps taken by this object (paces the regime check off the CPU)

    # ------------------------------------------------------------ subclass hooks

    def check_group(self, group: dict) -> None:
        """Raise ValueError naming a bad hyperparameter of this group."""
        if group["hvp"] not in HVP_MODES:
            raise ValueError(f"hvp must be one of {HVP_MODES}, got {group['hvp']!r}")
        if not math.isfinite(real("memory_correction", group["memory_correction"])):
            raise ValueError(f"memory_correction must be finite, got {group['memory_correction']}")
        limit = group["correction_limit"]
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
            raise ValueError(f"correction_limit must be a number in (0, inf] (inf: no limit), got {limit!r}")
        every = group["hvp_every"]
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"hvp_every must be an integer >= 1, got {every!r}")
        if every > 1 and group["hvp"] == "trajectory":
            raise ValueError("hvp_every > 1 reuses a probe or exact estimate; the trajectory estimate is free "
                             "every step: use hvp_every=1 with hvp='trajectory'")
        lr = group["lr"]
        if isinstance(lr, Tensor) and (lr.numel() != 1 or not lr.is_floating_point()):
            raise ValueError(f"lr must be a float or a one-element floating tensor, got {tuple(lr.shape)} {lr.dtype}")
        if not (isinstance(lr, Tensor) and self.device_mode(group)):  # a tensor lr in device mode is not read
            check_hyperparameters(lr=lr)
        if group["capturable"] and self.measures(group) and (group["hvp"] == "exact" or every > 1):
            raise ValueError(f"capturable=True measures memory with hvp='trajectory' or 'probe' and hvp_every=1, "
                             f"got hvp={group['hvp']!r}, hvp_every={every} (the exact estimate needs autograd, "
                             "and a captured graph replays the same work every step)")

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
        """r in theta_{n-1} - theta_n ~ lr_{n-1} r d (docs/THEORY.md section 5)."""
        return 1.0

    def trajectory_ratio_at(self, group: dict, n: Tensor) -> Tensor | float:
        return 1.0

    def penalty_prefactor(self, group: dict, kwargs: dict[str, Any]) -> float:
        """R = prefactor * sum(psi), with psi summed by the kernel (docs/THEORY.md sections 2-4)."""
        raise NotImplementedError

    # ------------------------------------------------------------ shared machinery

    def track(self, gi: int, key: tuple, factory: Callable[[], Any], n: int) -> Any:
        """The coefficient recursion of group gi at step n: one step on from the last, O(log n) after a jump.

        The two latest step counts are kept, so a parameter one step behind its group costs no replay.
        """
        tracks = self._tracks.setdefault((gi, key), {})
        if n not in tracks:
            base = max((t for t in tracks.values() if t.n <= n), key=lambda t: t.n, default=None)
            tracks[n] = replay(dataclasses.replace(base) if base is not None else factory(), n)
            for old in sorted(tracks)[:-2]:
                del tracks[old]
        return tracks[n]

    def measures(self, group: dict) -> bool:
        """The group estimates H d and reduces the diagnostics: with tracking, and always under a correction,
        whose limit is counted there."""
        return group["memory_correction"] != 0.0 or self.track_memory

    def hvp_mode(self, group: dict, closure: Callable | None) -> str | None:
        """How this step estimates H d for the group (None: it does not measure memory).

        "auto" is the probe when step() gets a closure (sound with minibatches) and the trajectory otherwise.
        """
        if not self.measures(group):
            return None
        if group["hvp"] != "auto":
            return group["hvp"]
        if closure is not None:
            return "probe"
        if "auto" not in self._warned and not torch.compiler.is_compiling():
            self._warned.add("auto")
            warnings.warn(_AUTO_TRAJECTORY, UserWarning, stacklevel=5)
        return "trajectory"

    @staticmethod
    def device_mode(group: dict) -> bool:
        return bool(group["capturable"]) or torch.compiler.is_compiling()

    @staticmethod
    def new_step(p: Tensor, group: dict) -> Tensor:
        """The step count: on the param's device when capturable, else on the CPU as torch.optim keeps it."""
        return torch.tensor(0.0, device=p.device if group["capturable"] else "cpu")

    def __setstate__(self, state: dict) -> None:
        loaded = [st for st in state.get("state", {}).values() if isinstance(st, dict)]
        for i, st in enumerate(loaded):  # everything checked before anything changes
            self._check_loaded(st, i)
        steps = {id(st): _step_count(st["step"], i) for i, st in enumerate(loaded) if "step" in st}
        for p, st in state.get("state", {}).items():  # states in the param's element order (a checkpoint of a
            if isinstance(st, dict) and isinstance(p, Tensor):  # contiguous model into a channels_last one)
                for key, value in st.items():
                    if type(value) is Tensor and type(p) in (Tensor, torch.nn.Parameter) and _other_order(value, p):
                        st[key] = _in_order_of(p, value)
        for st in loaded:
            if id(st) in steps:
                st["step"] = steps[id(st)]
            for key in self.optional_state_keys:
                if key in st and st[key] is None:  # torch.optim.SGD's buffer before its first step
                    del st[key]
        super().__setstate__(state)
        for group in self.param_groups:  # a torch.optim state_dict lacks memkernels' keys
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._transient()

    def _check_loaded(self, st: dict, index: int) -> None:
        """A ValueError naming the key when a loaded state is another optimizer's or lacks a tensor."""
        name = f"memkernels.{type(self).__name__}"
        kept = {"step", "prev_grad", "hvp", *self.state_keys}
        foreign = sorted(set(st) - kept)
        if foreign:
            raise ValueError(f"state {index} holds {foreign}, which {name} does not keep (it keeps {sorted(kept)}): "
                             "a state_dict of another optimizer")
        for key in (*self.state_keys, "prev_grad", "hvp"):
            value = st.get(key)
            if value is None and key in self.state_keys and key not in self.optional_state_keys and st:
                raise ValueError(f"state {index} lacks {key!r}, a tensor {name} needs")
            if value is not None and not isinstance(value, Tensor):
                raise ValueError(f"state {index}: {key!r} must be a tensor, got {type(value).__name__}")

    def _buckets(self, group: dict, hvp: str | None, scaled: bool) -> tuple[dict[tuple, Bucket], dict[Tensor, dict]]:
        """Group this group's parameters with gradients; new state is returned, not stored yet.

        hvp: this step's estimate of H d (hvp_mode); scaled: the step has an AMP grad scale.
        """
        buckets: dict[tuple, Bucket] = {}
        created: dict[Tensor, dict] = {}
        on_device, trajectory, capturable = self.device_mode(group), hvp == "trajectory", group["capturable"]
        keeps = trajectory and not (on_device or scaled or group["maximize"])
        compiling = torch.compiler.is_compiling()  # traced tensors have no data pointers to compare
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise TypeError(f"memkernels.{type(self).__name__} does not support sparse gradients")
            shard_groups = _shard_groups(p)
            if shard_groups is None and not compiling and grad.stride() != p.stride():  # the rare case, tested first
                grad = self._in_param_order(p, grad)
            if shard_groups is None and not compiling and grad.numel() and grad.data_ptr() == p.data_ptr() != 0:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} is its own gradient (p.grad shares p's "
                                 "memory); the step would read the gradient it is overwriting")
            if shard_groups is not None and hvp not in (None, "trajectory"):
                raise ValueError(f"hvp={hvp!r} with DTensor parameters is not supported; use "
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
            elif "prev_grad" in state:  # another estimate this step: the next trajectory step starts afresh
                state = created[p] = {k: v for k, v in state.items() if k != "prev_grad"}
            fresh_refs, keep_refs = mode in ("fresh", "lost"), mode == "keep"
            n = None if on_device else int(state["step"].item())
            key = (p.device, p.dtype, n, fresh_refs, keep_refs, shard_groups)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = Bucket(n, hvp, fresh_refs, keep_refs, keepable)
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
        if group["hvp_every"] > 1 and hvp in ("probe", "exact"):
            for bucket in buckets.values():
                self._plan_reuse(group, bucket, created)
        return buckets, created

    def _plan_reuse(self, group: dict, bucket: Bucket, created: dict[Tensor, dict]) -> None:
        """hvp_every = k: estimate H d at steps 0, k, 2k, ... (and wherever no estimate is kept); reuse it between."""
        n = bucket.n if bucket.n is not None else int(bucket.step.item())  # device mode: a host read (documented)
        bucket.estimate = n % group["hvp_every"] == 0 or any("hvp" not in s for s in bucket.states)
        for i, (p, state) in enumerate(zip(bucket.params, bucket.states)):
            if "hvp" not in state:
                state = created[p] = bucket.states[i] = {**state, "hvp": torch.zeros_like(
                    p, dtype=compute_dtype(p), memory_format=torch.preserve_format)}
            bucket.hvps.append(state["hvp"])

    def _call(self, group: dict, gi: int, bucket: Bucket, grad_scale: Tensor | None) -> tuple[dict[str, Any], list]:
        if bucket.n is None:  # device mode: these floats are placeholders for the step_scalars tensor
            kwargs = {**dict.fromkeys(_ops.STEP_SCALARS[self.op], 0.0), **self.static_kwargs(group)}
        else:
            kwargs = {"lr": float(group["lr"]), **self.static_kwargs(group), **self.coefficients(group, gi, bucket.n)}
        kwargs.update(correction=float(group["memory_correction"]), correction_limit=float(group["correction_limit"]),
                      hvp_scale=0.0, maximize=bool(group["maximize"]), memoryless=bool(group["memoryless"]),
                      update_grad_refs=bucket.hvp == "trajectory" and not bucket.keep_refs, grad_scale=grad_scale,
                      hvps=bucket.hvps, reuse_hvp=not bucket.estimate, backend=self.backend)
        lists = [[bucket.local(s[k]) for s in bucket.states if k in s] for k in self.state_keys]
        return kwargs, lists

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        if not torch.compiler.is_compiling():  # traced, the checks would see symbolic floats; the ops still check
            for group in self.param_groups:
                self.check_group(group)
        modes = [self.hvp_mode(group, closure) for group in self.param_groups]
        if "probe" in modes and closure is None:
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
            buckets, created = self._buckets(group, modes[gi], grad_scale is not None)
            plans.append((gi, group, buckets, created))
        calls = []
        for gi, group, buckets, _ in plans:
            for bucket in buckets.values():
                kwargs, lists = self._call(group, gi, bucket, grad_scale)
                _ops.check_tensors(self.op, bucket.params, bucket.grads, dict(zip(_ops.SCHEMAS[self.op][0], lists)),
                                   bucket.grad_refs, None, grad_scale, found_inf, hvps=bucket.hvps)
                if bucket.n is None:
                    kwargs.update(step_scalars=self._step_scalars(group, gi, bucket), found_inf=found_inf)
                if not torch.compiler.is_compiling():  # the op checks and resolves again as it runs, outside the graph
                    _ops.check_scalars(self.op, kwargs)
                    backends.resolve(self.op, self.backend, bucket.params[0].device.type)
                if bucket.hvp == "exact" and bucket.estimate and any(g.grad_fn is None for g in bucket.grads):
                    raise ValueError("hvp='exact' needs gradients with a graph: "
                                     "call loss.backward(create_graph=True)")
                calls.append((gi, group, bucket, kwargs, lists))
        if not torch.compiler.is_compiling():
            self._prepare(calls)
        self._estimate(calls, closure)  # a probe that fails puts theta back
        for _, _, _, created in plans:  # everything checked, every kernel built, the estimates made
            for p, state in created.items():
                self.state[p] = state
        for diag in self._diagnostics.values():
            diag.zero_()
        self._stats_meta.clear()  # mutated, not reassigned: dynamo drops attribute writes on an optimizer
        for gi, group, bucket, kwargs, lists in calls:
            steps = [state["step"] for state in bucket.states]
            if bucket.n is None:
                scalars = self._scalars(kwargs)
                after: int | Tensor = steps[0]  # read by memory_stats after the increment below
            else:
                kwargs["hvp_scale"] = self._hvp_scale(group, gi, bucket)
                scalars, after = kwargs, bucket.n + 1
            grad_refs = bucket.ref[0] if bucket.ref is not None else bucket.grad_refs
            diagnostics = self._diagnostics_for(gi, bucket) if self.measures(group) else None
            # checked above, unless a probe or the exact mode brought new reference gradients; traced, the
            # op's own check is the one that runs with real tensors
            compiling = torch.compiler.is_compiling()
            op = getattr(_ops, self.op + "_") if compiling else _ops.EAGER[self.op]
            with _ops.checked_by_caller(bucket.ref is None and not compiling):
                op(bucket.params, bucket.grads, *lists, grad_refs, diagnostics, **kwargs,
                   origins=bucket.origins, probe_tau=bucket.tau)
            for p, grad, state, mode in bucket.prev_grad_modes:
                self._prev_grads.record(p, grad, state, mode, bucket.keepable)
            if compiling or bucket.n is None or not backends.add_one(steps):
                torch._foreach_add_(steps, 1.0)
            if bucket.n is None and found_inf is not None:  # a skipped step does not count, as in torch.optim
                torch._foreach_sub_(steps, [found_inf.to(steps[0].device)] * len(steps))
            if diagnostics is not None:
                numel = bucket.numel + self._stats_meta.get(gi, (0, 0.0, 0))[2]
                self._stats_meta[gi] = (after, self.penalty_prefactor(group, scalars), numel)
        for (_, _, shard_groups), diag in self._diagnostics.items():  # sums over the shards of DTensor params
            for process_group in shard_groups:
                dist.all_reduce(diag, group=process_group)
        for group in self.param_groups:
            self._remember_lr(group)
        self._steps += 1
        self._check_regime()
        return loss

    def _prepare(self, calls: list) -> None:
        """Build every kernel this step will call (compile, or load from a cache) before its first write, so a
        compile that fails or is interrupted changes nothing; once per kind of call. The probe's buffers that
        the step has not made yet are stood in for by tensors of their dtypes."""
        for gi, group, bucket, kwargs, lists in calls:
            kind = (gi, bucket.params[0].device, bucket.numel, bucket.hvp, bucket.estimate, bucket.fresh_refs,
                    bucket.keep_refs, *(lst[0].dtype for lst in (bucket.params, bucket.grads, *lists) if lst),
                    *sorted((k, v) for k, v in kwargs.items() if isinstance(v, bool) or v is None),
                    *sorted(k for k, v in kwargs.items() if isinstance(v, float) and v == 0.0))
            if kind in self._prepared:
                continue
            probe = bucket.hvp == "probe" and bucket.estimate
            refs = bucket.grads if bucket.hvp in ("probe", "exact") and bucket.estimate else bucket.grad_refs
            origins = self._probes.buffers(bucket.params) if probe else bucket.origins
            tau = torch.zeros(1, dtype=torch.float64, device=bucket.params[0].device) if probe else bucket.tau
            diagnostics = self._diagnostics_for(gi, bucket) if self.measures(group) else None
            op = _ops.EAGER[self.op]
            with backends.preparing():
                if probe:
                    _probe_pass(op, bucket, lists, kwargs, origins, tau, torch.zeros_like(tau.expand(2)))
                op(bucket.params, bucket.grads, *lists, refs, diagnostics, **kwargs, origins=origins, probe_tau=tau)
            self._prepared.add(kind)

    def _remember_lr(self, group: dict) -> None:
        """prev_lr for the next step's trajectory estimate; a tensor lr is copied on its device, not read."""
        lr = group["lr"]
        if not isinstance(lr, Tensor) or not self.device_mode(group):
            group["prev_lr"] = float(lr)
        elif isinstance(group.get("prev_lr"), Tensor):
            group["prev_lr"].copy_(lr)
        else:
            group["prev_lr"] = lr.detach().clone()

    def _step_scalars(self, group: dict, gi: int, bucket: Bucket) -> Tensor:
        """The op's STEP_SCALARS for this bucket as a float64 tensor on its device, with no host read."""
        device = bucket.params[0].device
        if not isinstance(self._skipped.get((gi, device)), Tensor):  # made on the first step, with the states
            self._skipped[gi, device] = torch.zeros((), dtype=torch.int64, device=device)
        n = bucket.step.to(device=device, dtype=torch.float64)
        values = {"lr": _on(group["lr"], n), **self.coefficients_at(group, n),
                  "hvp_scale": self._hvp_scale_at(group, gi, bucket, n)}
        return torch.stack([values[name] for name in _ops.STEP_SCALARS[self.op]])

    def _diagnostics_for(self, gi: int, bucket: Bucket) -> Tensor:
        device = bucket.params[0].device
        key = (gi, device, bucket.shard_groups)
        diag = self._diagnostics.get(key)
        if diag is None:
            diag = self._diagnostics[key] = torch.zeros(NDIAG, dtype=torch.float64, device=device)
        return diag

    # ------------------------------------------------------------ estimates of H d

    def _in_param_order(self, p: Tensor, grad: Tensor) -> Tensor:
        """grad, or a copy of it in p's element order where they differ (a contiguous grad of a channels_last
        param): the kernels walk every tensor of a param in one order. The copy is an extra pass over the
        grad, so it is announced once."""
        if grad.layout != torch.strided or not _other_order(grad, p):
            return grad
        if "grad_layout" not in self._warned:
            self._warned.add("grad_layout")
            warnings.warn(f"memkernels: a gradient with strides {grad.stride()} for a parameter with strides "
                          f"{p.stride()} (shape {tuple(p.shape)}) is copied into the parameter's layout at each "
                          "step, an extra pass over it; gradients in their parameter's layout avoid it",
                          RuntimeWarning, stacklevel=4)
        return _in_order_of(p, grad)

    def _hvp_scale(self, group: dict, gi: int, bucket: Bucket) -> float:
        if bucket.ref is not None:
            return bucket.ref[1]
        if bucket.hvp != "trajectory" or bucket.n == 0 or bucket.fresh_refs:
            return 0.0
        prev_lr = float(group.get("prev_lr", group["lr"]))
        if prev_lr == 0.0:
            return 0.0
        scale = 1.0 / (prev_lr * self.trajectory_ratio(group, gi, bucket.n))
        if scale > _scale_limit(bucket.params[0]):
            key = (gi, bucket.params[0].device)
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return 0.0
        return scale

    def _hvp_scale_at(self, group: dict, gi: int, bucket: Bucket, n: Tensor) -> Tensor:
        """_hvp_scale in tensor ops: 0 at step 0 and after a zero lr (a probe's comes from its tau)."""
        if bucket.hvp == "exact":
            return torch.ones_like(n)
        if bucket.hvp != "trajectory" or bucket.fresh_refs:
            return torch.zeros_like(n)
        denominator = _on(group.get("prev_lr", group["lr"]), n) * self.trajectory_ratio_at(group, n)
        estimated = (n > 0) & (denominator > 0)
        skip = estimated & (denominator * _scale_limit(bucket.params[0]) < 1.0)
        self._skipped[gi, n.device].add_(skip)  # in place: a new tensor each step would make a compiled step recompile
        return torch.where(estimated & ~skip, 1.0 / denominator, 0.0)

    def _scalars(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's scalars with the step_scalars tensor's values in place of their placeholders."""
        if kwargs.get("step_scalars") is None:
            return kwargs
        return {**kwargs, **dict(zip(_ops.STEP_SCALARS[self.op], kwargs["step_scalars"].unbind()))}

    def _estimate(self, calls: list, closure: Callable | None) -> None:
        """The exact mode's g + H d, and the probe: its pass, then the closure's gradients at the probe point."""
        direction = self.direction
        for _, _, bucket, kwargs, _ in calls:
            if bucket.hvp == "exact" and bucket.estimate:
                bucket.ref = (_hvp.exact(direction, self._scalars(kwargs), bucket.params, bucket.grads), 1.0)
                for p, g in zip(bucket.params, bucket.grads):
                    p.grad = g.detach()
                bucket.grads = [g.detach() for g in bucket.grads]
        probing = [c for c in calls if c[2].hvp == "probe" and c[2].estimate]
        if not probing:
            return
        compiling = torch.compiler.is_compiling()
        passed, kept = [], []
        try:
            for gi, _, bucket, kwargs, lists in probing:
                key = (gi, bucket.params[0].device, bucket.params[0].dtype)
                scalars = self._scalars(kwargs)
                bucket.tau = self._probes.tau(key, bucket.params, lambda: _hvp.first_norms(
                    direction, scalars, bucket.params, bucket.grads))
                bucket.origins = self._probes.buffers(bucket.params)
                norms = torch.zeros(2, dtype=torch.float64, device=bucket.params[0].device)
                op = getattr(_ops, self.op + "_") if compiling else _ops.EAGER[self.op]
                _probe_pass(op, bucket, lists, kwargs, bucket.origins, bucket.tau, norms)
                passed.append(bucket)  # its params hold theta + tau d, its origins theta (a pass that raised
                # inside its kernel is the one case left half done: docs/DESIGN.md)
                kept.append((key, bucket.params, norms))
            grads = _hvp.probe_gradients([p for _, _, bucket, _, _ in probing for p in bucket.params], closure)
        except BaseException:  # the step does not happen: theta goes back from the origins
            for bucket in passed:
                torch._foreach_copy_(bucket.params, bucket.origins)
            raise
        for key, params, norms in kept:  # the next pass's tau, from a step that happened
            self._probes.keep(key, params, norms)
        start = 0
        for _, _, bucket, _, _ in probing:
            bucket.ref = (grads[start:start + len(bucket.params)], 0.0)  # hvp_scale: 1 / tau, from the op
            start += len(bucket.params)

    # ------------------------------------------------------------ diagnostics

    def memory_stats(self) -> list[dict[str, float]]:
        """Per group, the last step's memory diagnostics (docs/THEORY.md section 6; README: what they mean).

        Needs track_memory=True or a memory_correction: groups without either report zeros.
        """
        if not any(self.measures(g) for g in self.param_groups):
            raise RuntimeError("memory_stats() needs the optimizer built with track_memory=True "
                               "(or a nonzero memory_correction)")
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
                "limited_fraction": sums["limited"] / numel if numel else float("nan"),
                "skipped_estimates": sum(int(count) for (g, _), count in self._skipped.items() if g == gi),
            })
        return stats

    def _check_regime(self) -> None:
        """Warn once when a correction leaves the expansion's regime (a host read: paced off the CPU)."""
        if "regime" in self._warned or torch.compiler.is_compiling():
            return
        for gi, group in enumerate(self.param_groups):
            alpha = group["memory_correction"]
            if alpha == 0.0 or group["capturable"] or gi not in self._stats_meta:
                continue
            on_cpu = all(d.is_cpu for (g, _, _), d in self._diagnostics.items() if g == gi)
            if not on_cpu and self._steps % REGIME_EVERY != 1:
                continue
            stats = self.memory_stats()[gi]
            update = stats["update_norm"]
            ratio = abs(alpha) * stats["correction_norm"] / update if update > 0 else 0.0
            if stats["limited_fraction"] > REGIME_LIMITED or ratio > group["correction_limit"]:
                self._warned.add("regime")
                warnings.warn(_OUT_OF_REGIME.format(gi=gi, ratio=ratio, limited=stats["limited_fraction"],
                                                    kappa=group["correction_limit"], step=stats["step"]),
                              RuntimeWarning, stacklevel=5)
                return


def _probe_pass(op: Callable, bucket: Bucket, lists: list, kwargs: dict[str, Any], origins: list[Tensor],
                tau: Tensor, norms: Tensor) -> None:
    """The op's probe pass over a bucket: origins <- theta, theta <- theta + tau d, norms += (|theta|^2, |d|^2)."""
    op(bucket.params, bucket.grads, *lists, [], None, **{**kwargs, "hvps": []}, probe=True, origins=origins,
       probe_tau=tau, probe_norms=norms)


def _check_disjoint(params: list[Tensor]) -> None:
    """A ValueError naming two parameters (their positions over all groups) that are one tensor or share memory."""
    seen: dict[int, int] = {}
    spans = []
    for i, p in enumerate(params):
        if id(p) in seen:
            raise ValueError(f"parameter {i} is parameter {seen[id(p)]} again; each parameter may appear once")
        seen[id(p)] = i
        if type(p) in (Tensor, torch.nn.Parameter) and p.device.type != "meta" and p.numel():
            start = p.untyped_storage().data_ptr() + p.storage_offset() * p.element_size()
            extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(p.shape, p.stride()))
            spans.append((start, start + extent * p.element_size(), i))
    spans.sort()
    for (_, end, i), (start, _, j) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"parameters {min(i, j)} and {max(i, j)} share memory; an optimizer step would "
                             "update it twice")


def _other_order(t: Tensor, p: Tensor) -> bool:
    """t, of dense p's shape, does not hold its elements in p's order (another order, or not dense): the kernels
    walk every tensor of a param in the param's order. Equal strides, the common case, decide at once."""
    return (t.stride() != p.stride() and t.shape == p.shape and t.numel() > 1 and _ops.dense_layout(p)
            and not (_ops.dense_layout(t) and _ops.element_order(t) == _ops.element_order(p)))


def _in_order_of(p: Tensor, t: Tensor) -> Tensor:
    """A copy of t in p's layout (t's dtype and device)."""
    return torch.empty_like(p, dtype=t.dtype, device=t.device).copy_(t)


def _step_count(step: Any, index: int) -> Tensor:
    """A checkpoint's step count as the float32 tensor a step bumps in place (older torch checkpoints hold Python
    numbers, some int64 tensors); not a finite count >= 0: a ValueError naming the state."""
    if not isinstance(step, (Tensor, numbers.Real)) or isinstance(step, Tensor) and step.numel() != 1:
        raise ValueError(f"state {index}: 'step' must be a number or a one-element tensor, got "
                         f"{type(step).__name__}{f' of shape {tuple(step.shape)}' if isinstance(step, Tensor) else ''}")
    count = float(step.detach().double() if isinstance(step, Tensor) else step)
    if not math.isfinite(count) or count < 0:
        raise ValueError(f"state {index}: 'step' must be a finite count >= 0, got {count}")
    if isinstance(step, Tensor) and step.dtype == torch.float32:
        return step
    return torch.tensor(count, dtype=torch.float32, device=step.device if isinstance(step, Tensor) else "cpu")


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


def _scale_limit(p: Tensor) -> float:
    """The largest 1/h of a trajectory estimate: the square root of the kernels' compute dtype's max (fp32:
    1.8e19, so h below ~5e-20). Beyond it M = (g - g_prev)/h can overflow to inf and the term h^2 M become
    NaN, while the step h F it would correct is below the resolution of any parameter above ~1e-12. Such
    steps go without the estimate (M = 0), counted in memory_stats()["skipped_estimates"]."""
    return math.sqrt(torch.finfo(compute_dtype(p)).max)


def _on(value: float | Tensor, like: Tensor) -> Tensor:
    """A float or one-element tensor hyperparameter as a 0-d tensor of like's dtype and device."""
    if isinstance(value, Tensor):
        return value.detach().reshape(()).to(device=like.device, dtype=like.dtype)
    return torch.full_like(like, float(value))


def check_betas(betas: Any) -> tuple[float, float]:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return real("beta1", betas[0]), real("beta2", betas[1])

