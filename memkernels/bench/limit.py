"""The limit of a step: one pass over memory with the step's own byte model and nothing else.

A STREAM triad is not what an optimizer step does: it writes an array it never
read (on a write-allocate cache that write also reads it) and moves 12 bytes per
element, so a step could "exceed 100%" of it. The reference here reads every
array the step's byte model reads and writes back the ones the step writes
(params and states: read-modify-write), in one pass, with an add per element. A
step that moves at least those bytes cannot beat it except by noise, so
reference time / step time is at most 100%.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch

class Traffic(NamedTuple):
    """One pass over memory per parameter: arrays read, and how many of those written back, by element size
    (fp32, 16-bit and 8-bit elements)."""

    read: int
    written: int
    read16: int = 0
    written16: int = 0
    read8: int = 0
    written8: int = 0

    @property
    def bytes(self) -> int:
        return 4 * (self.read + self.written) + 2 * (self.read16 + self.written16) + self.read8 + self.written8

    def label(self) -> str:
        parts = [f"{r}r{w}w x{size}B" for r, w, size in ((self.read, self.written, 4),
                                                          (self.read16, self.written16, 2),
                                                          (self.read8, self.written8, 1)) if r]
        return " + ".join(parts)

    def check(self) -> "Traffic":
        for read, written in ((self.read, self.written), (self.read16, self.written16), (self.read8, self.written8)):
            if not 0 <= written <= read:
                raise ValueError(f"a pass writes back arrays it has read: need 0 <= written <= read, got {self}")
        if self.read + self.read16 + self.read8 == 0:
            raise ValueError("a pass reads at least one array")
        return self


# docs/DESIGN.md's byte models as passes (fp32 unless said)
ADAMW = Traffic(4, 3)  # read p g m v, write p m v
TRAJECTORY = Traffic(5, 3)  # + read the previous gradient, kept as a tensor of its own
STORING = Traffic(5, 4)  # the same, also writing what the next step reads (a gradient copy, an estimate of H d)
COPY = Traffic(1, 1)  # a gradient copied (8 bytes: read, and written to a new tensor)
PROBE_PASS = Traffic(2, 2)  # the probe: read p g, write the origin and p + tau d
SIGN = Traffic(3, 2)  # Lion and heavy ball: read p g m, write p m
ADAMW_BF16 = Traffic(2, 1, read16=2, written16=2)  # fp32 p g, bf16 m v (state_dtype=torch.bfloat16)
# + the previous gradient: a bf16 buffer read and rewritten with this gradient (an fp32 gradient is not kept as a
# bf16 state, optim/_prev_grads.py), as many bytes as a kept fp32 gradient read
TRAJECTORY_BF16 = Traffic(2, 1, read16=3, written16=3)
ADAMW_8BIT = Traffic(2, 1, read8=2, written8=2)  # 8-bit m and v (their block scales are negligible)
LION_8BIT = Traffic(2, 1, read8=1, written8=1)
ADAMW_KAHAN_BF16 = Traffic(0, 0, read16=5, written16=4)  # bf16 p g m v and the Kahan compensation (torch-optimi;
# also mk.AdamW(kahan=True, state_dtype=torch.bfloat16): 18 bytes a parameter)
LION_KAHAN_BF16 = Traffic(0, 0, read16=4, written16=3)


def bytes_per_step(passes: tuple[Traffic, ...], steps: int) -> float:
    """Bytes per parameter and optimizer step of a call made of `passes`, `steps` optimizer steps."""
    total = sum(t.bytes for t in passes)
    return total // steps if total % steps == 0 else total / steps


class Pool:
    """The arrays the reference passes run over: as many of each element size as the widest pass reads,
    `numel` elements each, filled (a zero-filled page is the kernel's shared zero page, not memory)."""

    def __init__(self, patterns: list[Traffic], numel: int, device: torch.device):
        numel = max(int(numel), 1)
        gen = torch.Generator(device="cpu").manual_seed(0)

        def stack(rows: int, dtype: torch.dtype, high: int) -> torch.Tensor:
            if dtype == torch.float32:
                values = torch.rand(rows, numel, generator=gen)
            else:
                values = torch.randint(0, high, (rows, numel), generator=gen, dtype=dtype)
            return values.to(device)

        self.f32 = stack(max((t.read for t in patterns), default=0), torch.float32, 1)
        self.i16 = stack(max((t.read16 for t in patterns), default=0), torch.int16, 1000)
        self.u8 = stack(max((t.read8 for t in patterns), default=0), torch.uint8, 256)
        self.numel, self.device = numel, device


def reference_pass(traffic: Traffic, pool: Pool) -> Callable[[], object]:
    """One call of the reference pass of `traffic` over the pool's first arrays."""
    traffic.check()
    f32, i16, u8 = pool.f32[:traffic.read], pool.i16[:traffic.read16], pool.u8[:traffic.read8]
    if pool.device.type == "cuda":
        kernel, block = _triton_kernel(), 1024
        grid = ((pool.numel + block - 1) // block,)
        return lambda: kernel[grid](f32, i16, u8, pool.numel, *traffic, BLOCK=block)
    kernel = _numba_kernel(traffic)
    arrays = [a.numpy() for stack in (f32, i16, u8) for a in stack]
    return lambda: kernel(*arrays, pool.numel)


# an element of each size, read as float32 in [0, 1), and the element that stores a value s in [0, 1)
_READ = {"f": "{}[i]", "h": "np.float32({}[i]) * np.float32(1.0 / 1000.0)",
         "b": "np.float32({}[i]) * np.float32(1.0 / 256.0)"}
_STORE = {"f": "s", "h": "np.int16(s * np.float32(999.0))", "b": "np.uint8(s * np.float32(255.0))"}


def numba_source(traffic: Traffic) -> str:
    """The pass as one parallel loop over the elements that reads every array once and stores the written ones
    (the first `written` of each size) from the mean of what it read: all streams advance together, as in a
    fused optimizer kernel. Generated per pattern so that every array is a plain argument the loop vectorizes
    over."""
    groups = [("f", traffic.read, traffic.written), ("h", traffic.read16, traffic.written16),
              ("b", traffic.read8, traffic.written8)]
    names = [(kind, f"{kind}{j}", j < written) for kind, read, written in groups for j in range(read)]
    mean = " + ".join(_READ[kind].format(name) for kind, name, _ in names)
    lines = [f"def rmw({', '.join(name for _, name, _ in names)}, n):",
             "    for i in numba.prange(n):",
             f"        s = ({mean}) * np.float32({1.0 / len(names)!r})"]
    lines += [f"        {name}[i] = {_STORE[kind]}" for kind, name, written in names if written]
    return "\n".join(lines) + "\n"


@functools.cache
def _numba_kernel(traffic: Traffic) -> Callable[..., None]:
    """numba_source(traffic) compiled (in memory, under a second per pattern)."""
    import numba
    import numpy as np

    namespace = {"numba": numba, "np": np}
    exec(compile(numba_source(traffic), f"<memkernels limit {traffic.label()}>", "exec"), namespace)
    return numba.njit(parallel=True)(namespace["rmw"])


@functools.cache
def _triton_kernel():
    """The same pass on the GPU: each program reads its block of every array once and stores the written ones."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["n"])
    def rmw(f32, i16, u8, n, R32: tl.constexpr, W32: tl.constexpr, R16: tl.constexpr, W16: tl.constexpr,
            R8: tl.constexpr, W8: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        row = n.to(tl.int64)
        acc = tl.zeros([BLOCK], tl.float32)
        for j in tl.static_range(R32):
            acc += tl.load(f32 + j * row + offs, mask=mask, other=0.0)
        for j in tl.static_range(R16):
            acc += tl.load(i16 + j * row + offs, mask=mask, other=0).to(tl.float32) * (1.0 / 1000.0)
        for j in tl.static_range(R8):
            acc += tl.load(u8 + j * row + offs, mask=mask, other=0).to(tl.float32) * (1.0 / 256.0)
        share = acc * (1.0 / (R32 + R16 + R8))
        for j in tl.static_range(W32):
            tl.store(f32 + j * row + offs, share, mask=mask)
        for j in tl.static_range(W16):
            tl.store(i16 + j * row + offs, (share * 999.0).to(tl.int16), mask=mask)
        for j in tl.static_range(W8):
            tl.store(u8 + j * row + offs, (share * 255.0).to(tl.uint8), mask=mask)

    return rmw
