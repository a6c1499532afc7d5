"""What track_memory costs, every step and sampled (track_memory=k), on GPT-2 small's 148 tensors scaled down.

Each row is called for ten steps at a time on new gradient tensors every step (as after zero_grad()), so a call
holds one sampled step of track_memory=10 and its counterpart as many plain steps; rounds alternate which goes
first and report the median over rounds of row / counterpart (torch's fused AdamW, and memkernels' plain AdamW).

    python bench/track_memory_ab.py --divisor 16 --rounds 40   # the 0.49M-parameter small model
    python bench/track_memory_ab.py --divisor 4 --rounds 12    # the quick GPT-2 shapes (7.8M)
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable

import torch

import memkernels as mk
from memkernels.bench.speed import _scaled_gpt2

STEPS = 10  # per call: one period of track_memory=10


def caller(make: Callable[[list], torch.optim.Optimizer], shapes: list[tuple[int, ...]]) -> Callable[[], None]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(0.02 * torch.randn(s)) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(2)]
    opt, count = make(params), [0]

    def call() -> None:
        for _ in range(STEPS):
            for p, g in zip(params, grads[count[0] % 2]):
                p.grad = g
            count[0] += 1
            opt.step()

    call()  # state allocation and kernel compilation outside the timing
    return call


def paired(row: Callable[[], None], counterpart: Callable[[], None], rounds: int) -> list[float]:
    ratios = []
    for r in range(rounds):
        order = (row, counterpart, counterpart, row) if r % 2 else (counterpart, row, row, counterpart)
        times = []
        for call in order:
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        mine = times[0] + times[3] if r % 2 else times[1] + times[2]
        ratios.append(mine / (sum(times) - mine))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--divisor", type=int, default=16, help="every GPT-2-small dimension divided by this")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the trajectory's "auto" note
    torch.set_num_threads(args.threads)
    shapes, _ = _scaled_gpt2(args.divisor)
    calls = {"torch fused": caller(lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), shapes)}
    for track in (False, True, 10, 50):
        calls[f"mk track_memory={track}"] = caller(
            lambda ps, track=track: mk.AdamW(ps, lr=1e-3, backend="numba", track_memory=track), shapes)
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(f"{len(shapes)} tensors, {numel:,} params, {args.threads} threads, {args.rounds} rounds of {STEPS} steps")
    plain = calls["mk track_memory=False"]
    for name, call in calls.items():
        if name == "torch fused":
            continue
        for counterpart, against in (("torch fused", calls["torch fused"]), ("mk plain", plain)):
            if call is against:
                continue
            ratios = paired(call, against, args.rounds)
            print(f"  {name:24s} / {counterpart:11s} {statistics.median(ratios):.3f} "
                  f"[{min(ratios):.3f}-{max(ratios):.3f}]")


if __name__ == "__main__":
    main()
