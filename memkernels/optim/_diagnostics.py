"""memory_stats(): the sums the kernels reduce during a step, what they mean per group (docs/THEORY.md
section 6), and the warning when a correction leaves the expansion's regime."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from ..reference import DIAGNOSTICS, NDIAG
from ._warn import warn

_OUT_OF_REGIME = ("memkernels: group {gi}'s memory correction is outside the regime where the expansion holds "
                  "(|alpha h M_i| << |F_i|): ||alpha h M|| / ||F|| = {ratio:.3g}, {limited:.1%} of elements limited "
                  "to correction_limit={kappa} times the memoryless step at step {step}. The step applied is a "
                  "bounded heuristic there, not the paper's term; see memory_stats() and the README.")
REGIME_LIMITED = 0.01  # warn when more than this fraction of elements is limited ...
REGIME_EVERY = 100  # ... read every step on the CPU, every this many steps elsewhere (a host read syncs)


class Diagnostics:
    """One optimizer's diagnostics: per (group, device, shard groups) the float64 sums its kernels add to; per
    group the last step's count, penalty prefactor and element count; per (group, device) the trajectory
    estimates skipped (a count in host mode, a tensor added to on the device in device mode)."""

    def __init__(self) -> None:
        self.sums: dict[tuple[int, torch.device, tuple], Tensor] = {}
        self.meta: dict[int, tuple[int | Tensor, float, int]] = {}
        self.skipped: dict[tuple[int, torch.device], int | Tensor] = {}

    def sums_for(self, gi: int, device: torch.device, shard_groups: tuple) -> Tensor:
        key = (gi, device, shard_groups)
        sums = self.sums.get(key)
        if sums is None:
            sums = self.sums[key] = torch.zeros(NDIAG, dtype=torch.float64, device=device)
        return sums

    def skip_counter(self, gi: int, device: torch.device) -> Tensor:
        """Device mode's count, made with the first step's states and then only added to in place (a new tensor
        each step would make a compiled step recompile)."""
        counter = self.skipped.get((gi, device))
        if not isinstance(counter, Tensor):
            counter = self.skipped[gi, device] = torch.zeros((), dtype=torch.int64, device=device)
        return counter

    def count_skip(self, gi: int, device: torch.device) -> None:
        self.skipped[gi, device] = self.skipped.get((gi, device), 0) + 1

    def start_step(self, groups: set[int]) -> None:
        """Zero the sums of the groups this step measures (mutated, not reassigned: dynamo drops attribute
        writes); the others keep their last measured step's."""
        for (gi, _, _), sums in self.sums.items():
            if gi in groups:
                sums.zero_()
        for gi in groups:
            self.meta.pop(gi, None)

    def record(self, gi: int, step: int | Tensor, prefactor: float, numel: int) -> None:
        """A bucket of group gi reduced numel more elements at this step (step: the count after it)."""
        self.meta[gi] = (step, prefactor, numel + self.meta.get(gi, (0, 0.0, 0))[2])

    def all_reduce(self) -> None:
        """Sums over the shards of DTensor params."""
        for (_, _, shard_groups), sums in self.sums.items():
            for process_group in shard_groups:
                dist.all_reduce(sums, group=process_group)

    def stats(self, ngroups: int) -> list[dict[str, float]]:
        """memory_stats(): per group, the last step's diagnostics (host reads)."""
        stats = []
        for gi in range(ngroups):
            total = [0.0] * NDIAG
            for (g, _, _), sums in self.sums.items():
                if g == gi:
                    total = [a + b for a, b in zip(total, sums.tolist())]
            step, prefactor, numel = self.meta.get(gi, (0, 0.0, 0))
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
                "skipped_estimates": sum(int(count) for (g, _), count in self.skipped.items() if g == gi),
            })
        return stats

    def check_regime(self, param_groups: list[dict], steps: int, warned: set[str]) -> None:
        """Warn once (warned) when a correction leaves the expansion's regime; a host read, so paced off the CPU
        by steps, the steps taken."""
        if "regime" in warned or torch.compiler.is_compiling():
            return
        for gi, group in enumerate(param_groups):
            alpha = group["memory_correction"]
            if alpha == 0.0 or group["capturable"] or gi not in self.meta:
                continue
            on_cpu = all(d.is_cpu for (g, _, _), d in self.sums.items() if g == gi)
            if not on_cpu and steps % REGIME_EVERY != 1:
                continue
            stats = self.stats(len(param_groups))[gi]
            update = stats["update_norm"]
            ratio = abs(alpha) * stats["correction_norm"] / update if update > 0 else 0.0
            if stats["limited_fraction"] > REGIME_LIMITED or ratio > group["correction_limit"]:
                warned.add("regime")
                warn(_OUT_OF_REGIME.format(gi=gi, ratio=ratio, limited=stats["limited_fraction"],
                                           kappa=group["correction_limit"], step=stats["step"]), RuntimeWarning)
                return
