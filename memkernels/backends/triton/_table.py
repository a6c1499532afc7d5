"""Pointer tables for the multi-tensor Triton launches, cached while pointers do not change.

One op call updates many tensors in one launch. The kernel finds its data
through two int64 tensors on the params' device:

- the pointer table, one row per tensor: the data address of that tensor in
  each list (0 for an absent list), then its numel;
- the block map, one (row, start) pair per program: which tensor it updates and
  the first element of its tile of `block` elements.

The block map depends only on the sizes and the tile size; the pointer table
on the addresses. Each is cached under exactly what it is built from (an LRU
of CACHE_SIZE entries), so a cached table is valid by construction: a tensor
that is replaced gets a new address and a new table, while one that happens
to reuse a freed address gets an equal one.

On a GPU a table is uploaded without a host sync on the stream of its first
use. A use on another stream first waits for that upload and marks the table
as used there (so that an evicted table is not reused under a running kernel);
a table read by a CUDA graph being captured is kept for the life of the
process, since the graph reads it at every replay.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import Tensor

CACHE_SIZE = 64
ALIGNMENT = 16  # bytes: the widest vector access the kernels are allowed to assume


class _Entry:
    """A cached device tensor and the streams it is known to be ready on."""

    def __init__(self, value: Tensor, aligned: bool = True) -> None:
        self.value, self.aligned = value, aligned
        self.stream = torch.cuda.current_stream(value.device) if value.is_cuda else None
        self.ready_on = {self.stream}

    def ready(self) -> Tensor:
        """The tensor, safe to read by work queued next on the current stream."""
        if self.stream is None:
            return self.value
        if torch.cuda.is_current_stream_capturing():
            _graph_held[id(self.value)] = self.value  # waiting on another stream would break the capture
            return self.value
        stream = torch.cuda.current_stream(self.value.device)
        if stream not in self.ready_on:
            stream.wait_stream(self.stream)
            self.value.record_stream(stream)
            self.ready_on.add(stream)
        return self.value


class _LRU(OrderedDict):
    def get_or_build(self, key, build: Callable[[], _Entry]) -> _Entry:
        entry = self.get(key)
        if entry is None:
            entry = self[key] = build()
            if len(self) > CACHE_SIZE:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return entry


_tables: _LRU = _LRU()
_block_maps: _LRU = _LRU()
_graph_held: dict[int, Tensor] = {}  # tables that captured CUDA graphs read


def _upload(values: Tensor, device: torch.device) -> Tensor:
    # A pageable host buffer is staged at once by an async copy: no device synchronization.
    return values.to(device, non_blocking=True) if device.type != "cpu" else values


def pointer_table(lists: Sequence[Sequence[Tensor]], numels: Sequence[int],
                  device: torch.device) -> tuple[Tensor, bool]:
    """int64 [len(numels) * (len(lists) + 1)]: per tensor, each list's data address, then numel.

    An empty list (no grad_refs, no momentum buffers) contributes a column of zeros.
    The flag says whether every address is 16-byte aligned (vectorized tile access is safe).
    """
    addresses = tuple(tuple(t.data_ptr() for t in lst) if lst else None for lst in lists)
    key = (device, addresses, tuple(numels))

    def build() -> _Entry:
        columns = [list(a) if a is not None else [0] * len(numels) for a in addresses]
        rows = [[col[i] for col in columns] + [n] for i, n in enumerate(numels)]
        table = _upload(torch.tensor(rows, dtype=torch.int64).reshape(-1), device)
        return _Entry(table, all(a % ALIGNMENT == 0 for col in columns for a in col))

    entry = _tables.get_or_build(key, build)
    return entry.ready(), entry.aligned


def block_map(numels: Sequence[int], block: int, device: torch.device) -> Tensor:
    """int64 [nblocks * 2]: (table row, first element) of each program's tile; empty tensors get none."""
    key = (device, tuple(numels), block)

    def build() -> _Entry:
        counts = torch.tensor([-(-n // block) for n in numels], dtype=torch.int64)
        rows = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
        first = torch.cumsum(counts, 0) - counts  # first program of each tensor
        starts = (torch.arange(rows.numel(), dtype=torch.int64) - first[rows]) * block
        return _Entry(_upload(torch.stack((rows, starts), dim=1).reshape(-1), device))

    return _block_maps.get_or_build(key, build).ready()


def clear() -> None:
    _tables.clear()
    _block_maps.clear()
