"""mk.SGD: torch.optim.SGD (heavy ball or Nesterov, dampening 0) plus the correction of docs/THEORY.md section 2."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from .._ops import CORRECTION_LIMIT, check_hyperparameters
from ..ops import SPECS
from ._base import MemoryOptimizer
from ._schedule import SGDSchedule


class SGD(MemoryOptimizer):
    """SGD with heavy-ball or Nesterov momentum (dampening 0) whose memory regularizes.

    The implicit penalty is R = lr c_n / (2 S_n) ||grad L~||^2 (docs/THEORY.md section 2); memory_correction=0
    is torch.optim.SGD with the same momentum, -1 cancels R.

    Args:
        params (iterable): the parameters to optimize, or dicts that define param groups; every argument but
            track_memory and backend may be set per group.
        lr (float or Tensor, optional): the step size; a one-element tensor is read on the host except in device
            mode (default: 1e-2).
        momentum (float, optional): mu, the heavy-ball coefficient; 0 is plain SGD without a buffer. Unlike
            torch.optim.SGD's, the default is nonzero (default: 0.9).
        weight_decay (float, optional): lambda, L2 as in torch.optim.SGD: lambda p added to the gradient
            (default: 0.0).
        nesterov (bool, optional): Nesterov momentum; needs momentum > 0 (default: False).
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
        track_memory (bool, optional): reduce the diagnostics of memory_stats() in every step; always on under
            a nonzero memory_correction (default: False).
        maximize (bool, optional): ascend the objective instead of descending it (default: False).
        memoryless (bool, optional): step with the memoryless update F(theta, ..., theta) in place of the update
            with memory, the approximation the theory compares with (default: False).
        capturable (bool, optional): device mode: the step count and a tensor lr stay on the params' device and
            nothing is read on the host, so CUDA graphs can capture a step (torch.compile traces in this mode
            anyway) (default: False).
        backend (str, optional): "numba", "triton", "cuda", "reference", or "auto": cuda > triton > reference
            on CUDA tensors and numba > reference on the CPU, unless MEMKERNELS_BACKEND names one; a named
            backend that cannot run raises at the first step, saying why (default: "auto").
    """

    op = "sgd"
    state_keys = SPECS["sgd"].state_keys
    optional_state_keys = SPECS["sgd"].optional_state_keys
    schedule = SGDSchedule

    def __init__(self, params: Iterable, lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False, *, memory_correction: float = 0.0,
                 correction_limit: float = CORRECTION_LIMIT, hvp: str = "auto", hvp_every: int = 1,
                 track_memory: bool = False, maximize: bool = False, memoryless: bool = False,
                 capturable: bool = False, backend: str = "auto") -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        memory_correction=memory_correction, correction_limit=correction_limit, hvp=hvp,
                        hvp_every=hvp_every, maximize=maximize, memoryless=memoryless, capturable=capturable)
        super().__init__(params, defaults, track_memory=track_memory, backend=backend)

    def check_group(self, group: dict) -> None:
        super().check_group(group)
        check_hyperparameters(momentum=group["momentum"], weight_decay=group["weight_decay"])
        if group["nesterov"] and group["momentum"] == 0.0:
            raise ValueError("nesterov=True needs momentum > 0")

    def new_state(self, p: Tensor, group: dict) -> dict[str, Tensor]:
        state = {"step": self.new_step(p, group)}
        if group["momentum"] != 0.0:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def static_kwargs(self, group: dict) -> dict[str, Any]:
        return dict(momentum=float(group["momentum"]), weight_decay=float(group["weight_decay"]),
                    nesterov=bool(group["nesterov"]))

    def direction(self, kwargs: dict[str, Any], p: Tensor, g: Tensor) -> Tensor:
        return SPECS["sgd"].direction(p, g, weight_decay=kwargs["weight_decay"])

    def penalty_prefactor(self, group: dict, kwargs: dict[str, Any]) -> float:
        return kwargs["lr"] * kwargs["memory_coef"] / kwargs["update_scale"]
