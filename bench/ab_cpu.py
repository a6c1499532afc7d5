"""Long interleaved A/B of the numba optimizers against torch's fused ones on one set of CPU parameters.

The speed suite's 15 rounds leave about +-5% on rows that sit at parity on a shared 2-core machine; this
script runs more rounds of a few rows only, alternating their order, and prints medians and ratios. The
trajectory rows step on a new gradient tensor every step, as after zero_grad() (the previous one is kept),
but for the 'grads in place' row, which reuses one and copies it; the bf16-state rows are issue 20's
(state_dtype=torch.bfloat16, stochastic rounding unless said):

    python bench/ab_cpu.py --params 64000000 --rounds 101
    python bench/ab_cpu.py --gpt2 --rounds 61      # the 148 tensors of GPT-2 small instead
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable

import torch

import memkernels as mk
from memkernels.bench.shapes import gpt2_small
from memkernels.bench.speed import GradientCopies, with_own_grads


def rows(params: list[torch.nn.Parameter]) -> dict[str, Callable[[], object]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trajectory-HVP note is a training caveat, not a timing one
        grads = GradientCopies([p.grad for p in params])
        bf16 = dict(state_dtype=torch.bfloat16)

        def trajectory(turns: int, **kw) -> Callable[[], object]:  # 2: a new gradient tensor every step, 1: reused
            opt = mk.AdamW(params, lr=1e-3, memory_correction=-1.0, hvp="trajectory", backend="numba", **kw)
            return with_own_grads(opt.step, params, grads, turns)

        return {
            "torch AdamW fused": torch.optim.AdamW(params, lr=1e-3, fused=True).step,
            "numba AdamW": mk.AdamW(params, lr=1e-3, backend="numba").step,
            "numba AdamW + trajectory": trajectory(2),
            "numba AdamW + trajectory + diagnostics": trajectory(2, track_memory=True),
            "numba AdamW + trajectory + diagnostics, grads in place": trajectory(1, track_memory=True),
            "numba AdamW, bf16 states": mk.AdamW(params, lr=1e-3, backend="numba", **bf16).step,
            "numba AdamW, bf16 states, nearest": mk.AdamW(params, lr=1e-3, backend="numba", state_rounding="nearest",
                                                          **bf16).step,
            "numba AdamW + trajectory, bf16 states": trajectory(2, **bf16),
            "torch SGD fused": torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=True).step,
            "numba heavy ball": mk.SGD(params, lr=1e-3, momentum=0.9, backend="numba").step,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=64_000_000)
    parser.add_argument("--rounds", type=int, default=101)
    parser.add_argument("--gpt2", action="store_true", help="the real shapes of GPT-2 small (ignores --params)")
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = gpt2_small() if args.gpt2 else [(args.params,)]
    params = [torch.nn.Parameter(0.02 * torch.randn(shape)) for shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    steps = rows(params)
    for step in steps.values():  # state allocation and JIT compilation outside the timing
        step()
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(sample) * 1e3 for name, sample in times.items()}
    for name in names:
        anchor = "torch SGD fused" if "SGD" in name or "heavy" in name else "torch AdamW fused"
        paired = statistics.median(a / b for a, b in zip(times[name], times[anchor]))
        print(f"{name:56s} {median[name]:8.2f} ms  {median[name] / median[anchor]:.3f}x {anchor} "
              f"(per round: {paired:.3f}x)")


if __name__ == "__main__":
    main()
