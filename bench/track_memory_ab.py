"""What track_memory costs, every step and sampled (track_memory=k), on GPT-2 small's 148 tensors scaled down.

Each row is called for ten steps at a time on new gradient tensors every step (as after zero_grad()), so a call
holds one sampled step of track_memory=10 and its counterpart as many plain steps; each round runs row,
counterpart, counterpart, row (memkernels.bench.timing.paired), and the median over rounds of row / counterpart
is reported against torch's fused AdamW and memkernels' plain AdamW.

    python bench/track_memory_ab.py --divisor 16 --rounds 40   # the 0.49M-parameter small model
    python bench/track_memory_ab.py --divisor 4 --rounds 12    # the quick GPT-2 shapes (7.8M)
"""
from __future__ import annotations

import argparse
import statistics
import warnings
from typing import Callable

import torch

import memkernels as mk
from memkernels.bench.speed import GradientCopies, _scaled_gpt2, repeated, with_own_grads
from memkernels.bench.timing import paired

STEPS = 10  # per call: one period of track_memory=10


def caller(make: Callable[[list], torch.optim.Optimizer], shapes: list[tuple[int, ...]]) -> Callable[[], object]:
    """Ten steps of the optimizer on new gradient tensors every step (two sets used in turn)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(0.02 * torch.randn(s)) for s in shapes]
    stored = [torch.randn(s) for s in shapes]
    return repeated(with_own_grads(make(params).step, params, GradientCopies(stored), 2), STEPS)


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
    cpu = torch.device("cpu")
    for name, call in calls.items():
        if name == "torch fused":
            continue
        for counterpart, against in (("torch fused", calls["torch fused"]), ("mk plain", plain)):
            if call is against:
                continue
            ratios = paired(call, against, warmup=1, repeats=args.rounds, device=cpu)
            print(f"  {name:24s} / {counterpart:11s} {statistics.median(ratios):.3f} "
                  f"[{min(ratios):.3f}-{max(ratios):.3f}]")


if __name__ == "__main__":
    main()
