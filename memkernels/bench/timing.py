"""Timing that holds up on a shared machine: warm-up, round-robin repeats, medians and IQRs.

Every round calls each timed function once, so a slow spell of the machine
(another process, a frequency change) hits every row alike instead of one
row's whole sample; round r starts at function r mod k, so no row always runs
right after the same other row (whose caches and memory traffic it would
inherit). A row's ratio to its anchor comes from the two called back to back
(paired). On CUDA each call sits between two CUDA events (GPU time, launch
gaps included); on the CPU it is wall time.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch


def _timed(fns: Sequence[Callable[[], object]], order: Sequence[int], device: torch.device) -> list[float]:
    """Milliseconds each function took over its calls in `order` (a function may appear more than once)."""
    sample = [0.0] * len(fns)
    if device.type == "cuda":
        events = []
        for i in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[i]()
            end.record()
            events.append((i, start, end))
        torch.cuda.synchronize(device)
        for i, start, end in events:
            sample[i] += start.elapsed_time(end)
    else:
        for i in order:
            t0 = time.perf_counter()
            fns[i]()
            sample[i] += (time.perf_counter() - t0) * 1e3
    return sample


def _check_rounds(warmup: int, repeats: int) -> None:
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")


def interleaved(fns: Sequence[Callable[[], object]], *, warmup: int, repeats: int, device: torch.device,
                tick: Callable[[int], object] = lambda n: None) -> list[list[float]]:
    """Milliseconds of each call of each function over `repeats` rounds after `warmup` rounds.

    tick(k) is called after every round with the number of calls made, for a progress bar.
    """
    _check_rounds(warmup, repeats)
    times: list[list[float]] = [[] for _ in fns]
    for r in range(warmup + repeats):
        sample = _timed(fns, [(r + j) % len(fns) for j in range(len(fns))], device)
        if r >= warmup:
            for row, ms in zip(times, sample):
                row.append(ms)
        tick(len(fns))
    return times


def paired(fn: Callable[[], object], anchor: Callable[[], object], *, warmup: int, repeats: int,
           device: torch.device, tick: Callable[[int], object] = lambda n: None) -> list[float]:
    """fn's time / anchor's time in each of `repeats` rounds of fn, anchor, anchor, fn back to back.

    In a round-robin over a dozen rows a row and its anchor run up to seconds apart, and this
    machine's memory bandwidth moves by half within seconds; back to back, a slow spell spans the
    round and cancels in its ratio. Each function runs once first and once second of the two: where
    their working sets share cache (the same parameters and gradients), the second call of a pair
    is faster, and one pair per round would make the ratio's median hang on which went first.
    """
    _check_rounds(warmup, repeats)
    ratios = []
    for r in range(warmup + repeats):
        mine, theirs = _timed((fn, anchor), (0, 1, 1, 0), device)
        if r >= warmup:
            ratios.append(mine / theirs)
        tick(4)
    return ratios


def median_iqr(sample: Sequence[float]) -> tuple[float, float]:
    """Median and interquartile range (0 for fewer than two values)."""
    if not sample:
        raise ValueError("no timings to summarize")
    if len(sample) < 2:
        return float(sample[0]), 0.0
    q1, _, q3 = statistics.quantiles(sample, n=4, method="inclusive")
    return float(statistics.median(sample)), float(q3 - q1)


def bandwidth_kernel(numel: int, device: torch.device) -> tuple[str, Callable[[], object], int]:
    """The memory-bandwidth yardstick over `numel` fp32 elements: (name, one call, bytes it moves).

    CPU: the STREAM triad a = b + s c (3 arrays x 4 bytes), on torch's threads.
    GPU: a device-to-device copy (2 arrays x 4 bytes).
    """
    numel = max(int(numel), 1)
    b = torch.rand(numel, device=device)
    a = torch.empty_like(b)
    if device.type == "cuda":
        return "copy", lambda: a.copy_(b), 8 * numel
    c = torch.rand(numel, device=device)
    return "triad", lambda: torch.add(b, c, alpha=3.0, out=a), 12 * numel
