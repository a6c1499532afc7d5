"""Device tables for the multi-tensor launches (pointer tables, block maps), cached while what they are built
from does not change: the one cache of the Triton and CUDA backends.

One op call updates many tensors in one launch, which finds its data through small int64 tables on the
device. Each table is cached under exactly what it is built from (an LRU of `capacity` entries), so a cached
table is valid by construction: a tensor that is replaced gets a new address and a new table, while one that
happens to reuse a freed address gets an equal one. A training loop uploads its tables once.

On a GPU a table is uploaded without a host sync, on the current stream of its first use. A use on another
stream first waits for that upload and marks the table as used there (record_stream), so an evicted table is
not freed under a running kernel. A CUDA graph being captured can neither upload a table (a call whose table
is not cached raises: warm up first, as torch.cuda.graph's documentation asks) nor wait on another stream, and
every replay reads the table it captured: such a table is kept for the life of the process.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable

import torch
from torch import Tensor


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class _Entry:
    """A cached table (None when there is nothing to upload), what the host knows of it, and the streams it is
    known to be ready on."""

    def __init__(self, value: Tensor | None, info: Any) -> None:
        self.value, self.info = value, info
        self.stream = torch.cuda.current_stream(value.device) if value is not None and value.is_cuda else None
        self.ready_on = {self.stream}

    def ready(self) -> Tensor | None:
        """The table, safe to read by work queued next on the current stream."""
        if self.stream is None or _capturing(self.value.device):
            return self.value
        stream = torch.cuda.current_stream(self.value.device)
        if stream not in self.ready_on:
            stream.wait_stream(self.stream)
            self.value.record_stream(stream)
            self.ready_on.add(stream)
        return self.value


class DeviceTables:
    """Tables keyed by everything they are built from, least recently used first out."""

    def __init__(self, backend: str, capacity: int = 64) -> None:
        self.backend, self.capacity = backend, capacity
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._graph_held: dict[Hashable, _Entry] = {}  # tables read by captured CUDA graphs: never freed

    def get(self, device: torch.device, key: Hashable, build: Callable[[], tuple[Tensor | None, Any]]
            ) -> tuple[Tensor | None, Any]:
        """(the table on `device`, ready on the current stream; build's info). build gives the table on the host
        (None: nothing to upload) and what the launch needs to know of it."""
        key = (device, key)
        capturing = _capturing(device)
        entry = self._entries.get(key)
        if entry is None:
            if capturing:
                raise RuntimeError(f"memkernels {self.backend} backend: these tensors have no cached pointer table, "
                                   "and it cannot be uploaded during CUDA graph capture; run the step once before "
                                   "the capture (the warm-up that torch.cuda.graph's documentation asks for)")
            host, info = build()
            # A pageable host buffer is staged at once by an async copy: no device synchronization.
            value = host.to(device, non_blocking=True) if host is not None and device.type != "cpu" else host
            entry = self._entries[key] = _Entry(value, info)
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        if capturing:
            self._graph_held[key] = entry
        return entry.ready(), entry.info

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget the cached tables (those captured graphs read stay held)."""
        self._entries.clear()
