"""Memory suite: the optimizer memory per parameter of each AdamW, measured, beside torch.optim's and other
libraries' (peers.py).

Each row builds its optimizer over a tensor of its own (`size` parameters in the row's dtype) and takes `steps`
steps, each on a new gradient tensor followed by zero_grad(set_to_none=True), as a training loop does. Then, per
parameter:
- state: the bytes of the distinct storages in opt.state;
- held: the same over everything reachable from the optimizer (holdings.py): its state and whatever else it
  keeps alive after zero_grad(), e.g. a gradient. This is its persistent memory.
- peak: held before one more step, plus the most that step allocates above what it started with (allocations
  minus frees, in order): on CUDA torch.cuda.max_memory_allocated() around step(); on the CPU the torch
  allocator's events that torch.profiler records with profile_memory=True. What torch's allocator does not
  serve (numba's runtime, a library's own malloc) is not seen on the CPU, and a block allocated before the step
  and freed in it is not subtracted there (the profiler knows no size for it), so a CPU peak is an upper bound
  of what the step took from torch's allocator, and a lower bound where a library allocates on its own.
"""
from __future__ import annotations

import contextlib
import gc
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, NamedTuple

import torch

from . import peers
from .holdings import held_bytes
from .machine import describe
from .speed import Stepping, _memkernels_optimizer, _prepare, resolve_device, selected_backends, variants

MEMKERNELS_ROWS = ("AdamW", "AdamW, bf16 states", "AdamW + trajectory correction",
                   "AdamW + trajectory correction, bf16 states", "AdamW, bf16 params + Kahan")
NOTES = [
    "state = the bytes of the distinct tensors (storages) in the optimizer's state after the steps, per parameter; "
    "held = the same over everything the optimizer keeps alive after zero_grad(set_to_none=True): its state and "
    "what it holds besides (a gradient, quantization maps); the parameters themselves are not counted.",
    "peak = held before a step + the most the step allocated above its start (CUDA: torch.cuda.max_memory_allocated "
    "around step(); CPU: the torch allocator's allocation and free events recorded by torch.profiler). On the CPU "
    "what torch's allocator does not serve (numba's runtime, a library's own malloc) is not seen, and a block "
    "allocated before the step and freed in it is not subtracted.",
    "Every step gets a new gradient tensor, as after zero_grad(): the trajectory rows keep the previous fp32 "
    "gradient as their state (4 bytes; with bf16 states it is a bf16 copy, 2 bytes).",
]


@dataclass(frozen=True)
class MemoryConfig:
    device: str = "auto"          # "auto": CUDA when torch sees one, else the CPU
    size: int = 4_000_000         # parameters of each row's tensor
    steps: int = 3                # steps before the measured one (the first allocates the state)
    backends: tuple[str, ...] | None = None  # memkernels backends (speed.selected_backends); None: every one
    peers: tuple[str, ...] | None = None  # other libraries (peers.LIBRARIES); None: all of them

    @classmethod
    def preset(cls, mode: str, device: str = "auto") -> "MemoryConfig":
        if mode in ("quick", "full"):  # bytes per parameter do not grow with size: seconds at 4M
            return cls(device=device)
        if mode == "tiny":
            return cls(device=device, size=4096, steps=2)
        raise ValueError(f"mode must be quick, full or tiny, got {mode!r}")


class Row(NamedTuple):
    """One optimizer of the table: its factory over a list of parameters, the dtype of those parameters and its
    library (None: torch or memkernels)."""

    name: str
    implementation: str
    make: Callable[[list], Any]
    dtype: torch.dtype = torch.float32
    library: str | None = None


def rows(cfg: MemoryConfig, device: torch.device) -> tuple[list[Row], dict[str, str]]:
    """The table's rows, and the memkernels backends that cannot run here with why."""
    out = [Row("AdamW", f"torch.optim {flag}", lambda ps, flag=flag: torch.optim.AdamW(ps, lr=1e-3, **{flag: True}))
           for flag in ("fused", "foreach")]
    status = selected_backends(cfg, device)
    for backend in (b for b, state in status.items() if state == "ok"):
        mine = variants(backend, status)  # the speed suite's rule: no bf16 spec rows beside a compiled backend
        out += [Row(name, f"memkernels {backend}",
                    lambda ps, name=name, backend=backend: _memkernels_optimizer(name, ps, backend),
                    mine[name].dtype) for name in MEMKERNELS_ROWS if name in mine]
    out += [Row(p.optimizer, p.implementation, p.make, p.dtype, p.library)
            for p in peers.rows(device, cfg.peers) if p.optimizer == "AdamW"]
    return out, {b: state for b, state in status.items() if state != "ok"}


def allocated_during(step: Callable[[], object], device: torch.device) -> int:
    """The most that step() allocated above what was allocated when it began, in bytes (0 if it freed first)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with _quiet_profiler(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:  # signed: an allocation adds its bytes, a free subtracts them
        running += event.nbytes()
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _quiet_profiler() -> Iterator[None]:
    """The profiler's start/stop and allocator notes written straight to fd 2 kept off the progress bar."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def measure(row: Row, cfg: MemoryConfig, device: torch.device) -> dict[str, Any] | str:
    """The row's state, held and peak bytes per parameter, or why it cannot run."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(0.02 * torch.randn(cfg.size, device=device).to(row.dtype))]
    gradient = torch.randn(cfg.size, device=device).to(row.dtype)

    def new_gradients() -> None:
        for p in params:
            p.grad = gradient.clone()

    def build() -> Stepping:
        new_gradients()
        return Stepping.plain(row.make(params), params)

    with peers.quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the trajectory-HVP note: a training caveat, not a memory one
        stepping, status = _prepare(build, row.library)
        if stepping is None:
            return status
        opt = stepping.optimizer
        for _ in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            new_gradients()
            opt.step()
        opt.zero_grad(set_to_none=True)
        new_gradients()
        gc.collect()
        before = held_bytes(opt, params)
        allocated = allocated_during(opt.step, device)
    opt.zero_grad(set_to_none=True)
    gc.collect()
    numel = cfg.size
    return {"name": row.name, "implementation": row.implementation, "params": numel,
            "param_dtype": str(row.dtype).removeprefix("torch."),
            "state_bytes_per_param": held_bytes(opt.state, params) / numel,
            "held_bytes_per_param": held_bytes(opt, params) / numel,
            "peak_bytes_per_param": (before + allocated) / numel, "step_allocated_per_param": allocated / numel}


def run(cfg: MemoryConfig, *, tick: Callable[[int], object] = lambda n: None,
        total: Callable[[int], object] = lambda n: None) -> dict[str, Any]:
    """Measure every row; total(n) announces the rows that tick() then counts."""
    if cfg.size < 1 or cfg.steps < 1:
        raise ValueError(f"size and steps must be >= 1, got {cfg.size} and {cfg.steps}")
    device = resolve_device(cfg.device)
    table, skipped = rows(cfg, device)
    total(len(table))
    measured, unavailable = [], []
    for row in table:
        result = measure(row, cfg, device)
        if isinstance(result, str):
            unavailable.append({"name": row.name, "implementation": row.implementation, "why": result})
        else:
            measured.append(result)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        tick(1)
    peak_source = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                   else "torch.profiler memory events (torch's CPU allocator)")
    return {"suite": "memory", "machine": describe(device), "device": str(device), "config": asdict(cfg),
            "backends": skipped, "peak_source": peak_source, "rows": measured, "unavailable": unavailable,
            "notes": NOTES}
