"""The Triton launches' two tables, in the backends' shared cache (backends/_device_tables.py).

The kernel finds its data through two int64 tensors on the params' device:

- the pointer table, one row per tensor: the data address of that tensor in
  each list (0 for an absent list), then its numel;
- the block map, one (row, start) pair per program: which tensor it updates and
  the first element of its tile of `block` elements.

The block map depends only on the sizes and the tile size; the pointer table
on the addresses and sizes.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .._device_tables import DeviceTables

ALIGNMENT = 16  # bytes: the widest vector access the kernels are allowed to assume

TABLES = DeviceTables("triton")


def pointer_table(lists: Sequence[Sequence[Tensor]], numels: Sequence[int],
                  device: torch.device) -> tuple[Tensor, bool]:
    """int64 [len(numels) * (len(lists) + 1)]: per tensor, each list's data address, then numel.

    An empty list (no grad_refs, no momentum buffers) contributes a column of zeros.
    The flag says whether every address is 16-byte aligned (vectorized tile access is safe).
    """
    addresses = tuple(tuple(t.data_ptr() for t in lst) if lst else None for lst in lists)

    def build() -> tuple[Tensor, bool]:
        columns = [list(a) if a is not None else [0] * len(numels) for a in addresses]
        rows = [[col[i] for col in columns] + [n] for i, n in enumerate(numels)]
        aligned = all(a % ALIGNMENT == 0 for col in columns for a in col)
        return torch.tensor(rows, dtype=torch.int64).reshape(-1), aligned

    return TABLES.get(device, ("pointers", addresses, tuple(numels)), build)


def block_map(numels: Sequence[int], block: int, device: torch.device) -> Tensor:
    """int64 [nblocks * 2]: (table row, first element) of each program's tile; empty tensors get none."""
    def build() -> tuple[Tensor, None]:
        counts = torch.tensor([-(-n // block) for n in numels], dtype=torch.int64)
        rows = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
        first = torch.cumsum(counts, 0) - counts  # first program of each tensor
        starts = (torch.arange(rows.numel(), dtype=torch.int64) - first[rows]) * block
        return torch.stack((rows, starts), dim=1).reshape(-1), None

    return TABLES.get(device, ("blocks", tuple(numels), block), build)[0]
