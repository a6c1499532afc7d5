"""What mk.AdamW, mk.Lion and mk.SGD share: stepping a fused op over buckets of parameters.

A step plans, checks, then runs. It groups the parameters into op calls and makes any new state without
storing it (_buckets.py; a group's plan is reused while nothing it was made from changes, _reuse.py);
checks every hyperparameter, tensor and op argument and builds every kernel; and only then makes the probe
or exact estimates of H d (_estimates.py), stores the new state and moves the parameters. So a step that
raises leaves parameters and state as they were (docs/DESIGN.md).

Two ways to feed a step's scalars to the op. Host mode (the default) reads the
step count and lr as Python numbers and advances the coefficient recursions of
the optimizer's schedule (_schedule.py). Device mode (capturable=True, and always
while torch.compile traces the step) never reads a tensor on the host: the step
count stays a tensor on the params' device, lr may be a tensor, the coefficients
come from their closed forms in tensor ops and reach the op as its `step_scalars`
tensor, and an AMP skip happens inside the kernels. A compiled step therefore has
no graph break and no recompile when a scheduler changes a tensor lr, and a CUDA
graph can replay it. In device mode the params of one bucket share the step count
of its first param (they do when every param of a group has a gradient every step).
"""
from __future__ import annotations

import math
import textwrap
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import Tensor

from .. import _ops, backends
from .._ops import check_hyperparameters, real
from ..ops import SPECS
from . import _checkpoint, _compact, _hvp, _reuse
from ._buckets import Bucket, op_function, plan_group, scalars
from ._diagnostics import Diagnostics
from ._estimates import HVP_MODES, estimate, hvp_scale, hvp_scale_at, on, probe_pass, resolve_auto
from ._layout import check_disjoint
from ._prev_grads import PrevGrads
from ._sampling import TRAJECTORY, SampledGradients
from ._schedule import TRAJECTORY_RATIO, Schedule
from ._warn import warn


class _Plan(NamedTuple):
    """A step's op calls, the states they make (stored once the step is sure to happen) and its AMP tensors;
    per group, the flags it was planned with, the kept plan it reused (_reuse.py) and its buckets."""

    buckets: list[Bucket]
    created: dict[Tensor, dict]
    grad_scale: Tensor | None
    found_inf: Tensor | None
    groups: list[tuple[int, tuple, _reuse.Kept | None, list[Bucket]]]


# The Args every optimizer takes, appended to each subclass's own Args (MemoryOptimizer.__init_subclass__).
COMMON_ARGS = """\
memory_correction (float, optional): alpha: the step is p - lr (F + alpha lr M). 0 is the plain
    optimizer, -1 cancels memory's implicit term to O(lr^2) where the expansion holds, +1 doubles it
    (default: 0.0).
correction_limit (float, optional): kappa in (0, inf]: per element |alpha lr M_i| <= kappa |F_i|, so
    each element's step is the plain one times a factor in [1 - kappa, 1 + kappa], bounded where the
    expansion fails; memory_stats()["limited_fraction"] counts where it acted; inf: no limit
    (default: 0.5).
hvp (str, optional): how H d is estimated: "probe" (one extra gradient at theta + tau d on the same
    batch: needs step(closure), sound with minibatches), "trajectory" (the change of the gradient
    between steps: free, but noise / lr with minibatches), "exact" (double backward: call
    loss.backward(create_graph=True)), or "auto": the probe when step() gets a closure, else the
    trajectory, with a warning once (default: "auto").
hvp_every (int, optional): k: the probe or exact estimate is made every k steps and reused in between
    (state "hvp"); an O(k lr) error in H d keeps the step O(lr^2) for a fixed k (default: 1).
track_memory (bool or int, optional): reduce the diagnostics of memory_stats() in every step (True), or in
    one step of every k (an integer k >= 1: the first step, then every k-th), for k-th of the cost where
    logging every k steps is enough; a sampled trajectory estimate keeps the step before's gradient. A group
    with a nonzero memory_correction, and device mode, measure every step (default: False).
maximize (bool, optional): ascend the objective instead of descending it (default: False).
memoryless (bool, optional): step with the memoryless update F(theta, ..., theta) in place of the update
    with memory, the approximation the theory compares with (default: False).
capturable (bool, optional): device mode: the step count and a tensor lr stay on the params' device and
    nothing is read on the host, so CUDA graphs can capture a step (torch.compile traces in this mode
    anyway) (default: False).
state_dtype (torch.dtype, optional): torch.bfloat16 keeps the op's states, the kept estimate "hvp" and a
    copied previous gradient in bfloat16 (half the bytes; the math stays float32; params must be float32 or
    bfloat16); torch.float32: states as torch.optim keeps them, in the param's dtype (default: torch.float32).
state_rounding (str, optional): how bfloat16 states are written: "stochastic" (unbiased: an EMA's small
    increments survive on average; backends numba, triton and reference) or "nearest" (round to nearest even:
    an increment below half an ulp is lost, so EMAs with beta near 1 stall) (default: "stochastic").
kahan (bool, optional): bfloat16 params without float32 master weights: each step writes a param by compensated
    (Kahan) summation, keeping what the bfloat16 write lost in the state "compensation" (bfloat16, param-shaped,
    2 bytes per parameter) and adding it to the next update, so updates far below a param's precision are not
    lost; params must be bfloat16; not with param_rounding="stochastic" (default: False).
param_rounding (str, optional): how bfloat16 params are written: "nearest" (round to nearest even: an update
    below half an ulp is lost, so a param stalls) or "stochastic" (unbiased, under the seed like the states';
    not with kahan=True) (default: "nearest"). Both need backend numba, triton or reference ("auto" passes
    over cuda for them, with a warning).
seed (int, optional): the stochastic rounding's seed (not per group): a step's bits are a function of the
    seed, the step count and the param's index, the same on every backend and in device mode, where the keys
    are computed on the device from its step count (default: 0).
backend (str, optional): "numba", "triton", "cuda", "reference", or "auto": cuda > triton > reference
    on CUDA tensors and numba > reference on the CPU, unless MEMKERNELS_BACKEND names one; a named
    backend that cannot run raises at the first step, saying why; "auto" passes over backends that cannot
    round stochastically for a group that asks it, with a warning (default: "auto").

Checkpoints: load_state_dict keeps this optimizer's state_dtype and state_rounding per group and casts the
loaded states to them, as torch.optim casts states to the param's dtype: a bfloat16-state checkpoint loads into
a float32-state optimizer and back, and a torch.optim.AdamW checkpoint into AdamW(state_dtype=torch.bfloat16)
(its float32 states rounded to nearest once). kahan and param_rounding are this optimizer's too: a checkpoint
without "compensation" (float32 params, or kahan=False) loads into a kahan optimizer, whose first step makes it
zero; one with it loads into an optimizer without kahan, which drops it.
"""


class MemoryOptimizer(torch.optim.Optimizer):
    """Base class; subclasses name their op, their state and their coefficients (its schedule). The keywords
    every optimizer takes are documented once, in COMMON_ARGS (docs/THEORY.md sections 5, 6 and 9)."""

    op: str
    state_keys: tuple[str, ...]  # the op's state lists, in schema order, by torch's state_dict names
    optional_state_keys: tuple[str, ...] = ()  # those a state may lack (SGD's buffer without momentum)
    schedule: type[Schedule]  # the op's coefficients at each step

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A public optimizer's docstring ends with its own Args; the shared ones follow them (help(mk.AdamW))."""
        super().__init_subclass__(**kwargs)
        if cls.__doc__ and "Args:" in cls.__doc__:
            cls.__doc__ = cls.__doc__.rstrip() + "\n" + textwrap.indent(COMMON_ARGS, " " * 8)

    def __init__(self, params: Iterable, defaults: dict[str, Any], *, track_memory: bool | int, backend: str,
                 state_dtype: torch.dtype, state_rounding: str, seed: int, kahan: bool = False,
                 param_rounding: str = "nearest") -> None:
        if defaults["hvp"] not in HVP_MODES:
            raise ValueError(f"hvp must be one of {HVP_MODES}, got {defaults['hvp']!r}")
        backends.requested(backend)  # an unknown name fails here, an unavailable one at the first step
        self.track_memory, self.track_every = tracking(track_memory)
        self.backend, self.seed = backend, _compact.check_seed(seed)
        defaults = dict(defaults, state_dtype=state_dtype, state_rounding=state_rounding, kahan=kahan,
                        param_rounding=param_rounding)
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
            check_disjoint([p for group in self.param_groups for p in group["params"]])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        group = self.param_groups[-1]
        if (group["hvp"] != "auto" or group["hvp_every"] != 1) and not self.measures(group):
            warn(f"memkernels.{type(self).__name__}: hvp={group['hvp']!r}, hvp_every={group['hvp_every']} is "
                 "unused: H d is estimated only with a nonzero memory_correction or track_memory=True", UserWarning)

    def _transient(self) -> None:
        """What the optimizer keeps besides its state_dict: caches, buffers, the last diagnostics."""
        self._schedule = self.schedule()
        self._prepared: set[tuple] = set()  # kinds of kernel call built ahead of a step (_prepare)
        self._kept: dict[int, _reuse.Kept] = {}  # per group, the plan the next step may reuse
        self._diagnostics = Diagnostics()
        self._prev_grads = PrevGrads()
        self._sampled = SampledGradients()
        self._probes = _hvp.Probes()
        self._warned: set[str] = set()
        self._steps = 0  # steps taken by this object (paces the regime check off the CPU and track_memory=k)
        self._measured: set[int] = set()  # the groups whose diagnostics this step reduces
        self._key_tensors: dict[tuple, Tensor] = {}  # the stochastic rounding's per-param numbers (_compact.keys)

    # ------------------------------------------------------------ subclass hooks

    def check_group(self, group: dict) -> None:
        """Raise ValueError naming a bad hyperparameter of this group."""
        _compact.check_group(group)
        _compact.check_params(group)
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
        if self.track_every > 1 and every > 1 and group["memory_correction"] == 0.0:
            raise ValueError(f"track_memory={self.track_every} measures one step in {self.track_every} and "
                             f"hvp_every={every} reuses an estimate between steps: without a memory_correction, "
                             "use hvp_every=1 (each measured step estimates H d)")

    def new_state(self, p: Tensor, group: dict) -> dict[str, Tensor]:
        """The step count and the op's states (its spec's; one absent where its scalar is 0), zeros in the
        group's state dtype, and with kahan the param's compensation (zeros)."""
        dtype = _compact.state_dtype(p, group)
        state = {"step": self.new_step(p, group),
                 **{s.key: torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                    for s in SPECS[self.op].states if not (s.absent_when_zero and group[s.absent_when_zero] == 0.0)}}
        if group["kahan"]:
            state["compensation"] = _compact.new_compensation(p)
        return state

    def static_kwargs(self, group: dict) -> dict[str, Any]:
        """The op's hyperparameters that do not change from step to step (all but STEP_SCALARS)."""
        raise NotImplementedError

    def direction(self, kwargs: dict[str, Any], p: Tensor, g: Tensor) -> Tensor:
        """The memoryless update F(theta, ..., theta): the d whose H d the correction needs."""
        raise NotImplementedError

    def penalty_prefactor(self, group: dict, kwargs: dict[str, Any]) -> float:
        """R = prefactor * sum(psi), with psi summed by the kernel (docs/THEORY.md sections 2-4)."""
        raise NotImplementedError

    # ------------------------------------------------------------ shared machinery

    def measures(self, group: dict) -> bool:
        """The group estimates H d and reduces the diagnostics: with tracking, and always under a correction,
        whose limit is counted there."""
        return group["memory_correction"] != 0.0 or self.track_memory

    def measuring(self, group: dict) -> bool:
        """This step measures the group: every step of a measuring group, but one in track_every of a group
        that only tracks (host mode: device mode has no step count on the host, and a graph replays one step)."""
        if group["memory_correction"] != 0.0 or self.track_every == 1 or self.device_mode(group):
            return self.measures(group)
        return self._steps % self.track_every == 0

    def hvp_mode(self, group: dict, closure: Callable | None) -> str | None:
        """How this step estimates H d for the group (None: it does not measure memory).

        "auto" is the probe when step() gets a closure (sound with minibatches) and the trajectory otherwise.
        """
        if not self.measuring(group):
            return None
        return resolve_auto(group["hvp"], closure, self._warned)

    def samples(self, group: dict) -> bool:
        """The group measures one step in track_every (host mode, no correction): _sampling.py."""
        return self.track_every > 1 and group["memory_correction"] == 0.0 and not self.device_mode(group)

    @property
    def _keys(self) -> tuple[str, ...]:
        """A state's step count and the op's state tensors."""
        return ("step", *self.state_keys)

    @staticmethod
    def device_mode(group: dict) -> bool:
        return bool(group["capturable"]) or torch.compiler.is_compiling()

    @staticmethod
    def new_step(p: Tensor, group: dict) -> Tensor:
        """The step count: on the param's device when capturable, else on the CPU as torch.optim keeps it."""
        return torch.tensor(0.0, device=p.device if group["capturable"] else "cpu")

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's, keeping each group's state_dtype, state_rounding, kahan and param_rounding and casting
        the loaded states to them (COMMON_ARGS, Checkpoints)."""
        kept = ("state_dtype", "state_rounding", "kahan", "param_rounding")
        storage = [{key: g[key] for key in kept} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, options in zip(self.param_groups, storage):
            group.update(options)
            for p in group["params"]:
                if p in self.state:
                    _compact.cast_loaded(self.state[p], p, group, self.state_keys)

    def __setstate__(self, state: dict) -> None:
        _checkpoint.adopt(state, f"memkernels.{type(self).__name__}", self.state_keys, self.optional_state_keys)
        super().__setstate__(state)
        for group in self.param_groups:  # a torch.optim state_dict lacks memkernels' keys
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._transient()

    def memory_stats(self) -> list[dict[str, float]]:
        """Per group, the last measured step's memory diagnostics, "step" its count (docs/THEORY.md section 6;
        README: what they mean).

        Needs track_memory or a memory_correction: groups without either report zeros.
        """
        if not any(self.measures(g) for g in self.param_groups):
            raise RuntimeError("memory_stats() needs the optimizer built with track_memory=True "
                               "(or a nonzero memory_correction)")
        return self._diagnostics.stats(len(self.param_groups))

    # ------------------------------------------------------------ the step: plan, check, run

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        modes = self._hvp_modes(closure)
        loss = _evaluate(closure)
        if self._skipped_by_amp():
            return loss  # skipped exactly: no parameter, state or step count moves
        plan = self._plan(modes)
        self._check(plan)
        self._run(plan, closure)
        return loss

    def _hvp_modes(self, closure: Callable | None) -> list[str | None]:
        """Every group's hyperparameters checked, and its estimate of H d this step."""
        if not torch.compiler.is_compiling():  # traced, the checks would see symbolic floats; the ops still check
            for group in self.param_groups:
                self.check_group(group)
        modes = [self.hvp_mode(group, closure) for group in self.param_groups]
        self._measured = {gi for gi, group in enumerate(self.param_groups) if self.measuring(group)}
        if "probe" in modes and closure is None:
            raise ValueError("hvp='probe' needs step(closure): the closure re-evaluates the loss "
                             "and its gradient at the probe point")
        return modes

    def _skipped_by_amp(self) -> bool:
        """GradScaler found an inf, read on the host unless every group is in device mode (whose kernels skip)."""
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        return (found_inf is not None and not all(self.device_mode(g) for g in self.param_groups)
                and found_inf.item() != 0.0)

    def _plan(self, modes: list[str | None]) -> _Plan:
        """Every group's buckets with their op calls, reused from the last step where nothing they were planned
        from changed; new states are made, not stored."""
        plan = _Plan([], {}, getattr(self, "grad_scale", None), getattr(self, "found_inf", None), [])
        for gi, group in enumerate(self.param_groups):
            sampled = modes[gi] == "trajectory" and self.samples(group)  # planned as the steps between samples
            mode = None if sampled else modes[gi]
            flags = _reuse.flags(group, mode, plan.grad_scale is not None)
            kept = self._kept.get(gi)
            buckets = None
            if kept is not None and not self.device_mode(group):
                buckets = _reuse.reuse(kept, group, flags, self.state, self._prev_grads)
            if buckets is None:
                kept = None
                buckets, created = plan_group(self, gi, group, mode, plan.grad_scale is not None)
                plan.created.update(created)
            plan.groups.append((gi, flags, kept, buckets))
            plan.buckets.extend(self._sampled.measured(buckets, plan.grad_scale) if sampled else buckets)
        for bucket in plan.buckets:
            self._call(bucket, plan.grad_scale, plan.found_inf)
        return plan

    def _call(self, bucket: Bucket, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """The bucket's op scalars (kwargs): this step's lr and coefficients, and the group's hyperparameters."""
        group = bucket.group
        if bucket.n is None:  # device mode: these floats are placeholders for the step_scalars tensor
            kwargs = {**dict.fromkeys(_ops.STEP_SCALARS[self.op], 0.0), **self.static_kwargs(group)}
        else:
            coefficients = self._schedule.host(group, bucket.gi, bucket.n)
            bucket.ratio = coefficients.pop(TRAJECTORY_RATIO)
            kwargs = {"lr": float(group["lr"]), **self.static_kwargs(group), **coefficients}
        kwargs.update(correction=float(group["memory_correction"]), correction_limit=float(group["correction_limit"]),
                      hvp_scale=0.0, maximize=bool(group["maximize"]), memoryless=bool(group["memoryless"]),
                      update_grad_refs=bucket.hvp == "trajectory" and not bucket.keep_refs, grad_scale=grad_scale,
                      hvps=bucket.hvps, reuse_hvp=not bucket.estimate, backend=self.backend)
        if bucket.n is None:
            kwargs.update(step_scalars=self._step_scalars(bucket), found_inf=found_inf)
        kwargs.update(compensations=bucket.compensations, param_rounding=group["param_rounding"])
        if _compact.stochastic(group):
            step = bucket.step + 1 if bucket.n is None else bucket.n + 1  # the count this step makes
            kwargs["rounding_keys"] = _compact.keys(self.seed, step, bucket.indices, _ops.KEY_COLUMNS[self.op],
                                                    bucket.params[0].device, self._key_tensors)
        bucket.kwargs = kwargs

    def _step_scalars(self, bucket: Bucket) -> Tensor:
        """The op's STEP_SCALARS for this bucket as a float64 tensor on its device, with no host read."""
        device = bucket.params[0].device
        self._diagnostics.skip_counter(bucket.gi, device)  # made with the states, on the first step
        n = bucket.step.to(device=device, dtype=torch.float64)
        coefficients = self._schedule.device(bucket.group, n)
        bucket.ratio = coefficients.pop(TRAJECTORY_RATIO)
        scale, bucket.skip = hvp_scale_at(bucket, n)
        values = {"lr": on(bucket.group["lr"], n), **coefficients, "hvp_scale": scale}
        return torch.stack([values[name] for name in _ops.STEP_SCALARS[self.op]])

    def _check(self, plan: _Plan) -> None:
        """Every op call's tensors and scalars, then every kernel built: nothing has changed yet."""
        compiling = torch.compiler.is_compiling()
        for bucket in plan.buckets:
            if bucket.checked:  # a kept plan's tensors: only this step's AMP tensors are new (checked with one param)
                if plan.grad_scale is not None or plan.found_inf is not None:
                    _ops.check_tensors(self.op, bucket.params[:1], bucket.grads[:1], {}, [], None, plan.grad_scale,
                                       plan.found_inf)
                _ops.check_scalars(self.op, bucket.kwargs)
                continue
            _ops.check_tensors(self.op, bucket.params, bucket.grads, dict(zip(_ops.SCHEMAS[self.op][0], bucket.lists)),
                               bucket.grad_refs, None, plan.grad_scale, plan.found_inf, hvps=bucket.hvps,
                               compensations=bucket.compensations)
            if not compiling:  # the op checks and resolves again as it runs, outside the graph
                _ops.check_scalars(self.op, bucket.kwargs)
                backends.resolve(self.op, self.backend, bucket.params[0].device.type)
            if bucket.hvp == "exact" and bucket.estimate and any(g.grad_fn is None for g in bucket.grads):
                raise ValueError("hvp='exact' needs gradients with a graph: call loss.backward(create_graph=True)")
        if not compiling:
            self._prepare(plan.buckets)

    def _prepare(self, buckets: list[Bucket]) -> None:
        """Build every kernel this step will call (compile, or load from a cache) before its first write, so a
        compile that fails or is interrupted changes nothing; once per kind of call. The probe's buffers that
        the step has not made yet are stood in for by tensors of their dtypes."""
        for bucket in buckets:
            kwargs = bucket.kwargs
            kind = (bucket.gi, bucket.params[0].device, bucket.numel, bucket.hvp, bucket.gi in self._measured,
                    bucket.estimate, bucket.fresh_refs, bucket.keep_refs,
                    *(lst[0].dtype for lst in (bucket.params, bucket.grads, *bucket.lists) if lst),
                    *sorted((k, v) for k, v in kwargs.items() if isinstance(v, bool) or v is None),
                    *sorted(k for k, v in kwargs.items() if isinstance(v, float) and v == 0.0))
            if kind in self._prepared:
                continue
            probe = bucket.hvp == "probe" and bucket.estimate
            refs = bucket.grads if bucket.hvp in ("probe", "exact") and bucket.estimate else bucket.grad_refs
            origins = self._probes.buffers(bucket.params) if probe else bucket.origins
            tau = torch.zeros(1, dtype=torch.float64, device=bucket.params[0].device) if probe else bucket.tau
            op = _ops.EAGER[self.op]
            with backends.preparing():
                if probe:
                    probe_pass(op, bucket, origins, tau, torch.zeros_like(tau.expand(2)))
                op(bucket.params, bucket.grads, *bucket.lists, refs, self._sums(bucket), **kwargs, origins=origins,
                   probe_tau=tau)
            self._prepared.add(kind)

    def _run(self, plan: _Plan, closure: Callable | None) -> None:
        """The estimates (a probe that fails puts theta back), then the new states stored and every op call; the
        plans kept for the next step once every call ran."""
        for gi, _, _, _ in plan.groups:
            self._kept.pop(gi, None)
        estimate(self.op, plan.buckets, closure, self.direction, self._probes)
        for p, state in plan.created.items():  # everything checked, every kernel built, the estimates made
            self.state[p] = state
        self._diagnostics.start_step(self._measured)
        for bucket in plan.buckets:
            self._run_call(bucket, plan.found_inf)
        self._diagnostics.all_reduce()
        for group in self.param_groups:
            self._remember_lr(group)
        for gi, flags, kept, buckets in plan.groups:
            group = self.param_groups[gi]
            if (self.samples(group) and (self._steps + 1) % self.track_every == 0 and closure is None
                    and group["hvp"] in TRAJECTORY):
                self._sampled.keep(buckets, plan.grad_scale)
            kept = None if self.device_mode(group) else _reuse.keep(group, flags, buckets, self._keys, kept)
            if kept is not None:
                self._kept[gi] = kept
        self._steps += 1
        self._diagnostics.check_regime(self.param_groups, self._steps, self._warned)

    def _run_call(self, bucket: Bucket, found_inf: Tensor | None) -> None:
        """One op call, then its step counts and diagnostics."""
        steps = bucket.counts
        device = bucket.params[0].device
        if bucket.n is None:
            call_scalars = scalars(self.op, bucket.kwargs)
            after: int | Tensor = steps[0]  # read by memory_stats after the increment below
            if bucket.skip is not None:
                self._diagnostics.skip_counter(bucket.gi, device).add_(bucket.skip)
        else:
            bucket.kwargs["hvp_scale"], skipped = hvp_scale(bucket)
            if skipped:
                self._diagnostics.count_skip(bucket.gi, device)
            call_scalars, after = bucket.kwargs, bucket.n + 1
        grad_refs = bucket.ref[0] if bucket.ref is not None else bucket.grad_refs
        diagnostics = self._sums(bucket)
        # checked by _check, unless a probe or the exact mode brought new reference gradients; traced, the
        # op's own check is the one that runs with real tensors
        with _ops.checked_by_caller(bucket.ref is None and not torch.compiler.is_compiling()):
            op_function(self.op)(bucket.params, bucket.grads, *bucket.lists, grad_refs, diagnostics, **bucket.kwargs,
                                 origins=bucket.origins, probe_tau=bucket.tau)
        if bucket.kept_again:
            self._prev_grads.record_kept(bucket.params, bucket.grads, bucket.states)
        for p, grad, state, prev_grad_mode in bucket.prev_grad_modes:
            self._prev_grads.record(p, grad, state, prev_grad_mode, bucket.keepable)
        if bucket.n is None:  # tensor ops only: traced and captured with the step
            torch._foreach_add_(steps, 1.0)
            if found_inf is not None:  # a skipped step does not count, as in torch.optim
                torch._foreach_sub_(steps, [found_inf.to(steps[0].device)] * len(steps))
        else:
            backends.add_one(steps)
        if diagnostics is not None:
            self._diagnostics.record(bucket.gi, after, self.penalty_prefactor(bucket.group, call_scalars),
                                     bucket.numel)

    def _sums(self, bucket: Bucket) -> Tensor | None:
        """The diagnostics tensor the bucket's kernel adds to, where its group measures memory this step."""
        if bucket.gi not in self._measured:
            return None
        return self._diagnostics.sums_for(bucket.gi, bucket.params[0].device, bucket.shard_groups)

    def _remember_lr(self, group: dict) -> None:
        """prev_lr for the next step's trajectory estimate; a tensor lr is copied on its device, not read."""
        lr = group["lr"]
        if not isinstance(lr, Tensor) or not self.device_mode(group):
            group["prev_lr"] = float(lr)
        elif isinstance(group.get("prev_lr"), Tensor):
            group["prev_lr"].copy_(lr)
        else:
            group["prev_lr"] = lr.detach().clone()


def tracking(track_memory: bool | int) -> tuple[bool, int]:
    """track_memory as (whether the optimizer tracks, one step in how many): True is every step, as 1 is."""
    if isinstance(track_memory, bool):
        return track_memory, 1
    if isinstance(track_memory, int) and track_memory >= 0:
        return track_memory > 0, max(track_memory, 1)
    raise ValueError(f"track_memory must be a bool or an integer k >= 1 (measure one step in k), got {track_memory!r}")


def _evaluate(closure: Callable[[], Any] | None) -> Any:
    """The closure's loss, with autograd on (step() runs under no_grad)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def check_betas(betas: Any) -> tuple[float, float]:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return real("beta1", betas[0]), real("beta2", betas[1])
