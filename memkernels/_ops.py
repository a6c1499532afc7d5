"""The torch ops: schemas, argument checks and fake impls, defined once.

Each op is in place and multi-tensor: one call updates a list of parameters of
one device and dtype. The CPU and CUDA impls check every argument before any
tensor is touched (a call that raises changes nothing), then run the kernel of
the backend that memkernels.backends resolves. The optimizers run the same
check on all their calls' tensors before the first call (so that a step that
raises changes nothing either) and mark their eager calls with
checked_by_caller(), which skips the second check: on a model of 150 small
tensors it is a fifth of the step's host time. Eager, they also call the impl
directly (EAGER), without the dispatcher's round trip.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import threading
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from . import backends
from .reference import NDIAG
from .ops import BOUNDS, SPECS, rounding

LIB = "memkernels"
PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# kappa: the correction term is limited to kappa * lr * |u| per element (docs/THEORY.md section 9)
CORRECTION_LIMIT = 0.5

# Beyond the step's own arguments:
# - origins: the probe pass (probe=True) keeps theta there and writes theta + tau d into params; a step
#   given origins reads theta from them and writes the new theta into params.
# - probe_tau: tau (a float64 one-element tensor on the params' device, read by the kernel): the probe
#   pass's displacement; in a step it replaces hvp_scale by 1 / tau.
# - probe_norms: float64 (2,): the probe pass adds sum theta^2 and sum d^2 (the next step's tau).
# - hvps: kept estimates of H d; a step that estimates H d from grad_refs stores it there, and with
#   reuse_hvp=True a step reads it from there instead (grad_refs empty).
# - rounding_keys: int64 [len(params), KEY_COLUMNS[op]], each a rounding.tensor_key in [0, 2**32): every bfloat16
#   write of the states (spec order), grad_refs, hvps and, with param_rounding="stochastic", params rounds
#   stochastically, writes 2j and 2j + 1 of that order under column j (rounding.key_of_write; docs/DESIGN.md,
#   "Compact states"); None: round to nearest even.
# - compensations: bfloat16 params' Kahan compensations (bfloat16, param-shaped): a step writes each param by
#   reference.kahan and keeps what the write lost there (docs/DESIGN.md, "Compact states").
# - param_rounding: "nearest", or "stochastic": a step writes bfloat16 params by rounding.round_bf16 under the
#   params' keys (not with compensations). A probe pass writes theta + tau d to nearest either way.
_COMMON = ("float correction=0., float correction_limit=%r, float hvp_scale=0., bool maximize=False, "
           "bool memoryless=False, bool update_grad_refs=False, Tensor? grad_scale=None, Tensor? found_inf=None, "
           "Tensor? step_scalars=None, Tensor(o!)[]? origins=None, Tensor(k!)[]? hvps=None, bool reuse_hvp=False, "
           "bool probe=False, Tensor? probe_tau=None, Tensor(n!)? probe_norms=None, Tensor? rounding_keys=None, "
           "Tensor(w!)[]? compensations=None, str param_rounding=\"nearest\", str backend=\"auto\""
           % CORRECTION_LIMIT)

# The per-step scalars in the order of the optional `step_scalars` tensor (float64, on the params' device). When
# it is given its values replace the float arguments of the same names, so a compiled or CUDA-graph-captured
# step can move lr and the coefficients without recompiling or syncing.
STEP_SCALARS = {name: spec.step_scalars for name, spec in SPECS.items()}

# op name -> the columns of rounding_keys: one per pair of the writes the op's states, grad_refs, hvps, params
# (ops/rounding.py, key_of_write)
KEY_COLUMNS = {name: rounding.key_columns(len(spec.states) + 3) for name, spec in SPECS.items()}
PARAM_ROUNDINGS = ("nearest", "stochastic")

# op name -> (state list names, scalar part of the schema)
SCHEMAS = {name: (spec.state_lists, spec.scalar_schema()) for name, spec in SPECS.items()}


def _schema(states: Sequence[str], scalars: str) -> str:
    letters = iter("bcdefgh")
    lists = ", ".join(f"Tensor({next(letters)}!)[] {name}" for name in (*states, "grad_refs"))
    return (f"(Tensor(a!)[] params, Tensor[] grads, {lists}, Tensor({next(letters)}!)? diagnostics, *, "
            f"{scalars}, {_COMMON}) -> ()")


_lib = torch.library.Library(LIB, "DEF")
for _name, (_states, _scalars) in SCHEMAS.items():
    _lib.define(f"{_name}_{_schema(_states, _scalars)}")


# ---------------------------------------------------------------- argument checks

def real(name: str, value: Any) -> float:
    """value as a float, if it is a real number or a one-element floating tensor. A bool or a string is refused
    by name: True would be read as 1 (memory_correction=True is +1, the opposite of cancelling) and torch
    refuses lr="1e-3"."""
    if type(value) is float:  # the common case, every step: no abstract-class check
        return value
    if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def check_hyperparameters(**values: Any) -> None:
    """The rules every entry point applies to its scalars, by name (spec.BOUNDS)."""
    for name, value in values.items():
        value = real(name, value)
        if name in BOUNDS:
            BOUNDS[name].check(name, value)


def check_scalars(op: str, kwargs: dict[str, Any]) -> None:
    """check_hyperparameters on a call's float kwargs; with a step_scalars tensor, its names' floats are
    placeholders (the kernel reads the tensor's values on the device) and are not checked."""
    placeholders = STEP_SCALARS[op] if kwargs.get("step_scalars") is not None else ()
    check_hyperparameters(**{k: v for k, v in kwargs.items() if isinstance(v, float) and k not in placeholders})


def dense_layout(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill one contiguous storage range."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def element_order(t: Tensor) -> tuple[int, ...]:
    """The strides that place elements (a dimension of size 1 places none): two dense tensors of one shape with
    the same order hold each element at the same offset, which is all the kernels need."""
    return tuple(st for s, st in zip(t.shape, t.stride()) if s != 1)


_PARAM_LISTS = ("params", "grads", "origins")  # of the params' dtype; the others are states


def state_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes a state may have beside params of dtype: theirs, float32, float64, and bfloat16 where the
    compute dtype is float32 (compact states: docs/DESIGN.md)."""
    compact = (torch.bfloat16,) if dtype in (torch.float32, torch.bfloat16) else ()
    return (dtype, torch.float32, torch.float64, *compact)


def _all_ok(lists: dict[str, Sequence[Tensor]], device: torch.device, dtype: torch.dtype) -> bool:
    """The per-tensor rules below in a few aggregated passes: the common case costs microseconds per tensor."""
    params = lists["params"]
    if not all(isinstance(t, Tensor) and t.layout == torch.strided for lst in lists.values() for t in lst):
        return False
    layout = [(t.shape, t.stride()) for t in params]
    for name, lst in lists.items():
        if not lst:
            continue
        dtypes = {t.dtype for t in lst}
        allowed = (dtype,) if name in _PARAM_LISTS else state_dtypes(dtype)
        if len(dtypes) != 1 or lst[0].dtype not in allowed or any(t.device != device for t in lst):
            return False
        if lst is not params and [(t.shape, t.stride()) for t in lst] != layout:
            return False
    return all(t.is_contiguous() or dense_layout(t) for t in params)


def check_tensors(op: str, params: Sequence[Tensor], grads: Sequence[Tensor],
                  states: dict[str, Sequence[Tensor]], grad_refs: Sequence[Tensor],
                  diagnostics: Tensor | None, grad_scale: Tensor | None, found_inf: Tensor | None,
                  step_scalars: Tensor | None = None, *, origins: Sequence[Tensor] | None = None,
                  hvps: Sequence[Tensor] | None = None, probe_tau: Tensor | None = None,
                  probe_norms: Tensor | None = None, rounding_keys: Tensor | None = None,
                  compensations: Sequence[Tensor] | None = None) -> None:
    where = f"memkernels.{op}_"
    origins, hvps, compensations = origins or (), hvps or (), compensations or ()
    if len(grads) != len(params):
        raise ValueError(f"{where}: grads has {len(grads)} tensors, params has {len(params)}")
    optional = SPECS[op].optional_state_keys
    for name, lst in states.items():
        if len(lst) != len(params) and not (name[:-1] in optional and len(lst) == 0):
            raise ValueError(f"{where}: {name} has {len(lst)} tensors, params has {len(params)}")
    for name, lst in (("grad_refs", grad_refs), ("origins", origins), ("hvps", hvps),
                      ("compensations", compensations)):
        if len(lst) not in (0, len(params)):
            raise ValueError(f"{where}: {name} has {len(lst)} tensors, expected 0 or {len(params)}")
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    if dtype not in PARAM_DTYPES:
        raise TypeError(f"{where}: params[0] has dtype {dtype}; supported: {PARAM_DTYPES}")
    if compensations and (dtype != torch.bfloat16 or compensations[0].dtype != torch.bfloat16):
        raise TypeError(f"{where}: compensations are the Kahan compensations of bfloat16 params and are bfloat16; "
                        f"got {compensations[0].dtype} beside {dtype} params")
    lists = {"params": params, "grads": grads, **states, "grad_refs": grad_refs, "origins": origins, "hvps": hvps,
             "compensations": compensations}
    if not _all_ok(lists, device, dtype):  # find and name the culprit
        for name, lst in lists.items():
            list_dtype = lst[0].dtype if lst else None
            for i, t in enumerate(lst):
                label = f"{where}: {name}[{i}]"
                if not isinstance(t, Tensor):
                    raise TypeError(f"{label} is a {type(t).__name__}, not a Tensor")
                if t.layout != torch.strided:
                    raise TypeError(f"{label} is {t.layout}; sparse tensors are not supported")
                if t.device != device:
                    raise ValueError(f"{label} is on {t.device} but params[0] is on {device}")
                if name in _PARAM_LISTS and t.dtype != dtype:
                    raise TypeError(f"{label} has dtype {t.dtype} but params[0] has {dtype}")
                if t.dtype != list_dtype:
                    raise TypeError(f"{label} has dtype {t.dtype} but {name}[0] has {list_dtype}")
                if name not in _PARAM_LISTS and t.dtype not in state_dtypes(dtype):
                    raise TypeError(f"{label} has dtype {t.dtype}; beside {dtype} params states are one of "
                                    f"{state_dtypes(dtype)}")
                p = params[i]
                if t.shape != p.shape:
                    raise ValueError(f"{label} has shape {tuple(t.shape)} but params[{i}] has {tuple(p.shape)}")
                if t.numel() > 1 and not dense_layout(t):
                    raise ValueError(f"{label} is not dense (strides {t.stride()} for shape {tuple(t.shape)}: an "
                                     "expanded or strided view); the kernels need each element stored once")
                if t.numel() > 1 and element_order(t) != element_order(p):
                    raise ValueError(f"{label} has strides {t.stride()} but params[{i}] has {p.stride()}: the "
                                     "kernels need one element order (e.g. both contiguous, or both channels_last)")
    for name, t, size in (("diagnostics", diagnostics, NDIAG), ("probe_norms", probe_norms, 2)):
        if t is not None and (t.shape != (size,) or t.dtype != torch.float64 or t.device != device):
            raise ValueError(f"{where}: {name} must be a float64 tensor of shape ({size},) on {device}")
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and (t.numel() != 1 or not t.is_floating_point()):
            raise ValueError(f"{where}: {name} must be a one-element floating tensor")
    if grad_scale is not None and grad_scale.device.type == "cpu":  # elsewhere a read would sync the device
        scale = float(grad_scale)
        if not (math.isfinite(scale) and scale > 0.0):
            raise ValueError(f"{where}: grad_scale must be finite and > 0, got {scale}")
    if probe_tau is not None and (probe_tau.numel() != 1 or probe_tau.dtype != torch.float64
                                  or probe_tau.device != device):
        raise ValueError(f"{where}: probe_tau must be a one-element float64 tensor on {device}")
    _check_keys(where, op, len(params), device, rounding_keys)
    n_step = len(STEP_SCALARS[op])
    if step_scalars is not None and (step_scalars.shape != (n_step,) or step_scalars.dtype != torch.float64
                                     or step_scalars.device != device or step_scalars.layout != torch.strided):
        raise ValueError(f"{where}: step_scalars must be a float64 tensor of shape ({n_step},) on {device} "
                         f"holding {', '.join(STEP_SCALARS[op])}; got {step_scalars.dtype} "
                         f"{tuple(step_scalars.shape)} on {step_scalars.device}")


def _check_keys(where: str, op: str, n: int, device: torch.device, keys: Tensor | None) -> None:
    if keys is None:
        return
    shape = (n, KEY_COLUMNS[op])
    if not isinstance(keys, Tensor) or keys.dtype != torch.int64 or keys.shape != shape or keys.device != device:
        got = f"{keys.dtype} {tuple(keys.shape)} on {keys.device}" if isinstance(keys, Tensor) else type(keys).__name__
        raise ValueError(f"{where}: rounding_keys must be an int64 tensor of shape {shape} on {device} (a key per "
                         f"tensor of each state, grad_refs, hvps and params), got {got}")
    if device.type == "cpu" and keys.numel() and not bool(((keys >= 0) & (keys <= 0xFFFFFFFF)).all()):
        raise ValueError(f"{where}: rounding_keys must be in [0, 2**32) (rounding.tensor_key's values)")


def rounds_stochastically(state_lists: Sequence[Sequence[Tensor]], grad_refs: Sequence[Tensor], *,
                          rounding_keys: Tensor | None, update_grad_refs: bool, hvps: Sequence[Tensor] | None,
                          reuse_hvp: bool, probe: bool, param_rounding: str, **_: object) -> bool:
    """The call has keys and writes a bfloat16 tensor: a state, a grad_ref it updates or an estimate it keeps,
    or its params with param_rounding="stochastic" (check_modes: bfloat16 ones)."""
    if rounding_keys is None or probe:
        return False
    if param_rounding == "stochastic":
        return True
    written = [*state_lists, grad_refs if update_grad_refs else (), hvps if hvps and not reuse_hvp else ()]
    return any(lst and lst[0].dtype == torch.bfloat16 for lst in written)


def check_modes(op: str, params: Sequence[Tensor], grad_refs: Sequence[Tensor], diagnostics: Tensor | None, *,
                correction: float, origins: Sequence[Tensor] | None, hvps: Sequence[Tensor] | None, reuse_hvp: bool,
                probe: bool, probe_tau: Tensor | None, rounding_keys: Tensor | None,
                compensations: Sequence[Tensor] | None, param_rounding: str, **_: object) -> None:
    """Which optional arguments each mode needs (counts and tensors are check_tensors' job)."""
    where = f"memkernels.{op}_"
    if param_rounding not in PARAM_ROUNDINGS:
        raise ValueError(f"{where}: param_rounding must be one of {PARAM_ROUNDINGS}, got {param_rounding!r}")
    if param_rounding == "stochastic":
        if compensations:
            raise ValueError(f"{where}: param_rounding='stochastic' with compensations: a bfloat16 param is written "
                             "by one of them, Kahan's compensated write or stochastic rounding")
        if params[0].dtype != torch.bfloat16:
            raise ValueError(f"{where}: param_rounding='stochastic' needs bfloat16 params, got {params[0].dtype}")
        if rounding_keys is None:
            raise ValueError(f"{where}: param_rounding='stochastic' needs rounding_keys (the params' column)")
    if probe and not (origins and probe_tau is not None and diagnostics is None and not reuse_hvp):
        raise ValueError(f"{where}: probe=True needs origins and probe_tau, and takes no diagnostics or reuse_hvp")
    if reuse_hvp and not (hvps and not grad_refs):
        raise ValueError(f"{where}: reuse_hvp=True reads hvps (needed) instead of grad_refs (must be empty)")
    if hvps and not reuse_hvp and not probe and not grad_refs:
        raise ValueError(f"{where}: hvps without reuse_hvp stores the estimate from grad_refs, which are empty")
    if correction != 0.0 and not probe and not grad_refs and not reuse_hvp:
        raise ValueError(f"{where}: correction != 0 needs grad_refs (or hvps with reuse_hvp=True)")


_caller = threading.local()


@contextlib.contextmanager
def checked_by_caller(checked: bool = True) -> Iterator[None]:
    """Op calls inside skip check_tensors: the caller ran it on exactly their tensors (checked=False: no effect)."""
    before = getattr(_caller, "checked", False)
    _caller.checked = checked
    try:
        yield
    finally:
        _caller.checked = before


def _impl(op: str):
    spec = SPECS[op]
    state_names = spec.state_lists
    schema = getattr(torch.ops.memkernels, f"{op}_").default._schema
    defaults = {a.name: a.default_value for a in schema.arguments if a.kwarg_only and a.has_default_value()}

    def impl(params, grads, *lists_and_diag, **kwargs):
        kwargs = {**defaults, **kwargs}  # the dispatcher leaves defaulted kwargs out
        *state_lists, grad_refs, diagnostics = lists_and_diag
        if not getattr(_caller, "checked", False):
            check_tensors(op, params, grads, dict(zip(state_names, state_lists)), grad_refs, diagnostics,
                          kwargs["grad_scale"], kwargs["found_inf"], kwargs["step_scalars"],
                          origins=kwargs["origins"], hvps=kwargs["hvps"], probe_tau=kwargs["probe_tau"],
                          probe_norms=kwargs["probe_norms"], rounding_keys=kwargs["rounding_keys"],
                          compensations=kwargs["compensations"])
        if not params:
            return
        check_modes(op, params, grad_refs, diagnostics, **kwargs)
        stochastic = rounds_stochastically(state_lists, grad_refs, **kwargs)
        kwargs["compensations"] = kwargs["compensations"] or []
        bf16_params = not kwargs["probe"] and (bool(kwargs["compensations"])
                                               or kwargs["param_rounding"] == "stochastic")
        name, kernel = backends.resolve(op, kwargs.pop("backend"), params[0].device.type, stochastic=stochastic,
                                        bf16_params=bf16_params)
        if not kernel.bf16_params:
            if bf16_params:
                raise ValueError(f"backend {name}: kahan / stochastic parameter rounding is not implemented yet; "
                                 "kahan=False and param_rounding='nearest', or backend='triton' (CUDA tensors) or "
                                 "'numba' (CPU)")
            del kwargs["compensations"], kwargs["param_rounding"]
        keys = kwargs.pop("rounding_keys")
        if kernel.stochastic_rounding:
            kwargs["rounding_keys"] = keys if stochastic else None
        elif stochastic:
            raise ValueError(f"backend {name}: stochastic rounding of bf16 states is not implemented yet; "
                             "state_rounding='nearest', or backend='triton' (CUDA tensors) or 'numba' (CPU)")
        kwargs["origins"], kwargs["hvps"] = kwargs["origins"] or [], kwargs["hvps"] or []
        step_scalars = kwargs.pop("step_scalars")
        if kernel.device_step_scalars:
            kwargs["step_scalars"] = step_scalars
        else:  # host reads: free for CPU tensors, the reference's way on others
            if step_scalars is not None:
                kwargs.update(zip(STEP_SCALARS[op], step_scalars.tolist()))
            tau = 0.0 if kwargs["probe_tau"] is None else float(kwargs["probe_tau"])
            if kwargs["probe_tau"] is not None and not kwargs["probe"]:
                kwargs["hvp_scale"] = 1.0 / tau if tau > 0.0 else 0.0
            kwargs["probe_tau"] = tau
        check_scalars(op, kwargs)
        for state, lst in zip(spec.states, state_lists):
            if state.absent_when_zero and kwargs[state.absent_when_zero] != 0.0 and not lst:
                raise ValueError(f"memkernels.{op}_: {state.absent_when_zero} != 0 needs {state.list_name}")
        if backends.is_preparing() and not kernel.prepares:  # nothing to build ahead: checked is prepared
            return
        kernel(params, grads, *state_lists, grad_refs, diagnostics, **kwargs)

    return impl


def _fake(*args, **kwargs) -> None:
    return None


# The impls themselves, for the optimizers' eager calls: the dispatcher adds nothing to a call on real
# tensors (one impl serves every key, and neither it nor torch's fused optimizers bump version counters)
# but costs ~25 us per call plus the conversion of every TensorList. Traced calls use the op.
EAGER: dict[str, Callable[..., None]] = {}
for _name in SCHEMAS:
    EAGER[_name] = _impl(_name)
    for _key in ("CPU", "CUDA", "SparseCPU", "SparseCUDA"):  # sparse: so the check can name the tensor
        _lib.impl(f"{_name}_", EAGER[_name], _key)
    # reached only by a call without any tensor (every list empty, no diagnostics): a no-op
    _lib.impl(f"{_name}_", EAGER[_name], "CompositeExplicitAutograd")
    torch.library.register_fake(f"{LIB}::{_name}_")(_fake)
    globals()[f"{_name}_"] = getattr(torch.ops.memkernels, f"{_name}_")  # _ops.adamw_, ...
