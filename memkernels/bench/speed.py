"""Speed suite: each available backend x optimizer x shape set, against torch's optimizers, lion-pytorch and
other libraries' optimizers (peers.py) installed here.

Each row times `opt.step()` on parameters whose gradients are already set (the
optimizer alone: no forward or backward). All rows of a shape set share one set
of parameters and gradients and keep their own optimizer state; they run
round-robin with the bandwidth yardstick of the same size (timing.py) and the
limit of every row's byte model (limit.py), so every figure of a table comes from
the same minutes of the same machine; then each memkernels and peer row runs as
many rounds back to back with its counterpart, for its paired ratio.
"""
from __future__ import annotations

import functools
import gc
import itertools
import math
import statistics
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, NamedTuple

import torch

from .. import backends
from ..optim import SGD, AdamW, Lion
from . import peers, training
from .holdings import touched_bytes
from .limit import (ADAMW, ADAMW_BF16, ADAMW_KAHAN_BF16, COPY, PROBE_PASS, SIGN, STORING, TRAJECTORY,
                    TRAJECTORY_BF16, Pool, Traffic, bytes_per_step, reference_pass)
from .machine import describe
from .shapes import gpt2_small
from .timing import bandwidth_kernel, interleaved, median_iqr, paired


class Variant(NamedTuple):
    """A memkernels row: its op, docs/DESIGN.md's bytes per parameter and step (fp32 everything), whether its
    step takes a closure, its gradients ("new" tensors every step, the row's own tensors "reused" every step, or
    "any" tensors that hold the stored values), the steps one timed call makes (a whole hvp_every period, so
    every call does the same work), the passes over memory of one call (limit.py's reference) and the dtype of
    its parameters and gradients (other than float32: copies of its own, as a peer's that steps in bf16), and
    whether the reference backend times it beside a compiled one (the spec's bf16 rounding is torch ops, seconds
    a step at the quick sizes, which would say nothing about speed)."""

    op: str
    bytes_per_param: float
    closure: bool = False
    grads: str = "any"
    steps: int = 1
    passes: tuple[Traffic, ...] = ()
    dtype: torch.dtype = torch.float32
    beside_compiled: bool = True


def _variant(op: str, passes: tuple[Traffic, ...], steps: int = 1, **how: Any) -> Variant:
    """A Variant whose bytes per parameter and step are those of its passes."""
    return Variant(op, bytes_per_step(passes, steps), steps=steps, passes=passes, **how)


VARIANTS: dict[str, Variant] = {
    "AdamW": _variant("adamw", (ADAMW,)),
    # new gradient tensors, as after zero_grad(): the previous one is kept and read (optim/_prev_grads.py)
    "AdamW + trajectory correction": _variant("adamw", (TRAJECTORY,), grads="new"),
    # track_memory without a correction: the plain step plus memory_stats' sums and the trajectory estimate
    "AdamW + diagnostics": _variant("adamw", (TRAJECTORY,), grads="new"),
    # track_memory=10: a call of ten steps, one measured (the trajectory, reading the copy the step before made)
    "AdamW + diagnostics, track_memory=10": _variant("adamw", (ADAMW,) * 9 + (COPY, TRAJECTORY), steps=10,
                                                     grads="new"),
    "AdamW + trajectory + diagnostics": _variant("adamw", (TRAJECTORY,), grads="new"),  # + memory_stats' sums
    # one gradient tensor rewritten in place every step: + write a copy of the previous gradient
    "AdamW + trajectory + diagnostics, grads in place": _variant("adamw", (STORING,), grads="reused"),
    # the probe pass, then the step from the origin that also reads the probe gradient
    "AdamW + probe correction": _variant("adamw", (PROBE_PASS, TRAJECTORY), closure=True),
    # hvp_every=4: one probe step storing its estimate and three that read it (as the trajectory reads g_prev)
    "AdamW + probe, hvp_every=4": _variant("adamw", (PROBE_PASS, STORING) + (TRAJECTORY,) * 3, closure=True,
                                           steps=4),
    # state_dtype=torch.bfloat16: fp32 params and grads, bf16 m and v, written by stochastic rounding (the default)
    "AdamW, bf16 states": _variant("adamw", (ADAMW_BF16,), beside_compiled=False),
    "AdamW, bf16 states, nearest": _variant("adamw", (ADAMW_BF16,), beside_compiled=False),
    "AdamW + trajectory correction, bf16 states": _variant("adamw", (TRAJECTORY_BF16,), grads="new",
                                                           beside_compiled=False),
    # kahan=True on bf16 params without fp32 master weights: p g m v and the compensation in bf16
    "AdamW, bf16 params + Kahan": _variant("adamw", (ADAMW_KAHAN_BF16,), dtype=torch.bfloat16,
                                           beside_compiled=False),
    "Lion": _variant("lion", (SIGN,)),
    "heavy ball": _variant("sgd", (SIGN,)),
}
REFERENCE_ANCHOR = ("AdamW", "torch.optim fused")  # ratios of medians are taken to this row of the same shape set
NOTES = [
    "The probe rows' closure only sets .grad to stored gradient tensors (no model, no copy), so they time the "
    "optimizer side of a probe step: the probe pass, the step from the kept origins, and their host work; the "
    "training-step table times whole steps with forward and backward. The hvp_every=4 row is timed in calls of "
    "four steps (one probe step, three that reuse its estimate) and reported per step.",
    "The trajectory rows get their gradients as a training loop does after zero_grad() (each step's .grad is "
    "another tensor, with the same values), so the optimizer keeps the previous gradient instead of copying it; "
    "the 'grads in place' row steps on one gradient tensor per parameter, as a loop with "
    "zero_grad(set_to_none=False) does, and copies.",
    "paired ratio = the median over rounds of a row's time / its counterpart's time (torch fused AdamW for "
    "AdamW, torch's SGD for heavy ball, lion_pytorch for Lion; the other libraries' rows too), each round "
    "(after the round-robin, as many rounds) calling row, counterpart, counterpart, row back to back: a slow "
    "or fast spell of the machine spans the round and cancels out, which a ratio of medians keeps, and each goes "
    "first once. A row whose call takes several steps (hvp_every=4, track_memory=10) is paired with as many "
    "steps of its counterpart back to back, so both find their tensors as warm in cache. This is the ratio to "
    "read.",
    "median / torch fused AdamW = a row's median ms over torch.optim.AdamW(fused=True)'s on the same shape set, "
    "from the round-robin: it compares any two rows, but a slow spell that hit one row's rounds more than the "
    "other's moves it.",
    "% of limit = the limit's time / the row's median time. The limit is a pass over memory with the row's byte "
    "model and nothing else (limit.py): it reads every array a step reads (params, grads, states), writes back "
    "those the step writes, once each, with an add per element, timed in the same round-robin; a step that "
    "moves at least those bytes cannot beat it, so a row above 100% is noise and is marked noisy.",
    "noise: 'noisy' where the row's times or its paired ratios spread (IQR) by more than 20% of their median, "
    "where the first and second halves of its rounds disagree by more than 20%, or where the row beat its "
    "limit: the machine's speed moved during the row; rerun on an idle machine before reading it.",
    "GB/s counts the byte model (bytes per parameter and step: AdamW 28, +4 trajectory with the previous "
    "gradient kept, +8 copied, track_memory=10 29.2, probe 48, hvp_every=4 37, Lion 20, heavy ball 20, AdamW "
    "with bf16 states 20 and 24 with the trajectory correction (its previous gradient a bf16 copy: 2 bytes read, "
    "2 written), 8-bit AdamW "
    "16, bf16 AdamW with Kahan summation 18); the shape set's bandwidth line is a STREAM triad (CPU) or copy (GPU) "
    "of the same run.",
    "B/param moved (model) is that byte model: the bytes a step reads plus those it writes, per parameter (an "
    "array read and written back counts twice). B/param touched (measured) counts the actual tensors after the "
    "timed steps: the bytes of the distinct arrays one step reads or writes (params, gradients, every tensor in "
    "the optimizer's state, a kept previous gradient, the probe's origins), each once, per parameter: a step's "
    "resident footprint, not its traffic. Where a step writes only arrays it reads, in one pass, it equals the "
    "model's reads (AdamW: 16 of 28); the probe rows' model reads params twice (two passes), the touched count "
    "once.",
]


@dataclass(frozen=True)
class SpeedConfig:
    device: str = "auto"          # "auto": CUDA when torch sees one, else the CPU
    large: int = 4_000_000        # parameters of the one-tensor shape set
    gpt2_divisor: int = 4         # every GPT-2-small dimension divided by this (1: the real shapes)
    small_divisor: int = 16       # the small model: GPT-2 small's 148 tensors, every dimension divided by this
    warmup: int = 2               # rounds not recorded (the first step of each row also runs at setup)
    repeats: int = 7              # recorded rounds
    backends: tuple[str, ...] | None = None  # None: every backend available with kernels for the device
    peers: tuple[str, ...] | None = None  # other libraries' optimizers (peers.LIBRARIES); None: all of them
    training: str = "quick"       # the training-step table (training.py): "quick", "tiny" (small models), "none"

    @classmethod
    def preset(cls, mode: str, device: str = "auto") -> "SpeedConfig":
        dev = resolve_device(device)
        if mode == "quick":  # on a GPU the CPU's quick sizes would time launch latency, not memory traffic
            return cls(device=device, large=64_000_000, gpt2_divisor=1) if dev.type == "cuda" else cls(device=device)
        if mode == "full":  # no peers unless asked for: at these sizes their states and CPU paths (seconds a step
            # for the 8-bit ones) would double the run and outgrow a 24 GB machine
            return cls(device=device, large=256_000_000 if dev.type == "cuda" else 64_000_000,
                       gpt2_divisor=1, warmup=3, repeats=15, peers=())
        if mode == "tiny":
            return cls(device=device, large=4096, gpt2_divisor=64, small_divisor=256, warmup=1, repeats=3,
                       training="tiny")
        raise ValueError(f"mode must be quick, full or tiny, got {mode!r}")


def resolve_device(device: str) -> torch.device:
    """"auto", "cpu", "cuda" or "cuda:N" (the timing knows CPU wall time and CUDA events only)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
    return dev


def _scaled_gpt2(divisor: int) -> tuple[list[tuple[int, ...]], str]:
    shapes = [tuple(max(1, s // divisor) for s in shape) for shape in gpt2_small()]
    return shapes, "the real shapes" if divisor == 1 else f"every dimension divided by {divisor}"


def shape_sets(cfg: SpeedConfig) -> list[tuple[str, list[tuple[int, ...]], str]]:
    """(name, shapes, description) of the three shape sets: one large tensor (memory traffic), GPT-2 small's
    tensors (many tensors of real sizes) and a small model of as many tensors, where the host's work per step
    weighs as much as the kernel's."""
    if cfg.large < 1 or cfg.gpt2_divisor < 1 or cfg.small_divisor < 1:
        raise ValueError(f"large, gpt2_divisor and small_divisor must be >= 1, got {cfg.large}, "
                         f"{cfg.gpt2_divisor} and {cfg.small_divisor}")
    gpt2, how = _scaled_gpt2(cfg.gpt2_divisor)
    small, small_how = _scaled_gpt2(cfg.small_divisor)
    return [("large tensor", [(cfg.large,)], f"one tensor of {cfg.large:,} parameters"),
            ("GPT-2 small", gpt2, f"the 148 parameter tensors of GPT-2 small, {how}"),
            ("small model", small, f"GPT-2 small's 148 tensors, {small_how}: host time per step")]


@dataclass
class Stepping:
    """A row's call and what it steps on: its optimizer and its parameters (for the bytes a step touches)."""

    call: Callable[[], object]
    optimizer: torch.optim.Optimizer
    params: list

    def __call__(self) -> object:
        return self.call()

    @classmethod
    def plain(cls, optimizer: torch.optim.Optimizer, params: list) -> "Stepping":
        return cls(optimizer.step, optimizer, params)


@dataclass
class Candidate:
    """One timed row before timing: what it is and, once built (build()), its call (None if it cannot run here
    or has been freed)."""

    name: str
    backend: str
    kind: str  # "memkernels", "anchor" (a counterpart) or "peer" (another library's optimizer)
    passes: tuple[Traffic, ...]  # its byte model: the passes over memory of one call
    steps: int = 1  # optimizer steps per call of `step`; times and ratios are per optimizer step
    stepping: Stepping | None = None
    status: str = "ok"
    make: Callable[[], tuple[Stepping | None, str]] | None = None  # builds the row (_prepare); None: cannot run

    @property
    def step(self) -> Callable[[], object] | None:
        return None if self.stepping is None else self.stepping.call

    @property
    def bytes_per_param(self) -> float:
        return bytes_per_step(self.passes, self.steps)

    def build(self) -> None:
        if self.make is not None:
            self.stepping, self.status = self.make()


def selected_backends(cfg: SpeedConfig, device: torch.device) -> dict[str, str]:
    """Status of every requested backend; "ok" for those that will be timed."""
    names = cfg.backends or backends.BACKENDS
    unknown = [n for n in names if n not in backends.BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; choose from {backends.BACKENDS}")
    out = {}
    for name in names:
        state = backends.load(name)
        if not state.startswith("available"):
            out[name] = state
        elif not backends.has_kernel("adamw", name, device.type):
            out[name] = f"available, but no kernels for {device.type}"
        else:
            out[name] = "ok"
    return out


def variants(backend: str, backend_status: dict[str, str]) -> dict[str, Variant]:
    """The rows a timed backend runs: every variant, but the reference backend beside a compiled one only those
    that are cheap in torch ops."""
    beside = backend == "reference" and sum(state == "ok" for state in backend_status.values()) > 1
    return {name: v for name, v in VARIANTS.items() if v.beside_compiled or not beside}


def _memkernels_optimizer(variant: str, params: list, backend: str) -> torch.optim.Optimizer:
    if variant == "AdamW":
        return AdamW(params, lr=1e-3, backend=backend)
    if variant == "AdamW, bf16 states":
        return AdamW(params, lr=1e-3, state_dtype=torch.bfloat16, backend=backend)
    if variant == "AdamW, bf16 states, nearest":
        return AdamW(params, lr=1e-3, state_dtype=torch.bfloat16, state_rounding="nearest", backend=backend)
    if variant == "AdamW + trajectory correction, bf16 states":
        return AdamW(params, lr=1e-3, memory_correction=-1.0, hvp="trajectory", state_dtype=torch.bfloat16,
                     backend=backend)
    if variant == "AdamW, bf16 params + Kahan":
        return AdamW(params, lr=1e-3, kahan=True, backend=backend)
    if variant == "AdamW + diagnostics":
        return AdamW(params, lr=1e-3, track_memory=True, backend=backend)
    if variant == "AdamW + diagnostics, track_memory=10":
        return AdamW(params, lr=1e-3, track_memory=10, backend=backend)
    if variant == "AdamW + trajectory correction":
        return AdamW(params, lr=1e-3, memory_correction=-1.0, hvp="trajectory", backend=backend)
    if variant.startswith("AdamW + trajectory + diagnostics"):
        return AdamW(params, lr=1e-3, memory_correction=-1.0, hvp="trajectory", track_memory=True, backend=backend)
    if variant == "AdamW + probe correction":
        return AdamW(params, lr=1e-3, memory_correction=-1.0, hvp="probe", backend=backend)
    if variant == "AdamW + probe, hvp_every=4":
        return AdamW(params, lr=1e-3, memory_correction=-1.0, hvp="probe", hvp_every=4, backend=backend)
    if variant == "Lion":
        return Lion(params, lr=1e-4, backend=backend)
    if variant == "heavy ball":
        return SGD(params, lr=1e-3, momentum=0.9, backend=backend)
    raise ValueError(f"unknown variant {variant!r}")


def _sgd_flavour(device: torch.device) -> str:
    """'fused' where torch.optim.SGD has a fused kernel for this device, else 'foreach'."""
    try:
        torch.optim.SGD([torch.zeros(1, device=device, requires_grad=True)], lr=0.1, momentum=0.9, fused=True)
    except (RuntimeError, ValueError):
        return "foreach"
    return "fused"


def anchors(device: torch.device) -> list[tuple[str, str, tuple[Traffic, ...], Callable[[list], Any]]]:
    """(name, anchor, passes, factory) of every counterpart; factories import lazily."""
    def torch_adamw(flag: str) -> Callable[[list], Any]:
        return lambda ps: torch.optim.AdamW(ps, lr=1e-3, **{flag: True})

    sgd = _sgd_flavour(device)

    def lion_pytorch(ps: list) -> Any:
        from lion_pytorch import Lion as LionPytorch
        return LionPytorch(ps, lr=1e-4)

    return [
        ("AdamW", "torch.optim fused", (ADAMW,), torch_adamw("fused")),
        ("AdamW", "torch.optim foreach", (ADAMW,), torch_adamw("foreach")),
        ("heavy ball", f"torch.optim SGD {sgd}", (SIGN,),
         lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, **{sgd: True})),
        ("Lion", "lion_pytorch", (SIGN,), lion_pytorch),
    ]


def _prepare(make: Callable[[], Stepping], library: str | None = None) -> tuple[Stepping | None, str]:
    """Build a row and run its first step (state allocation, JIT compilation) outside the timing; where that
    fails, the reason (with the library's version)."""
    try:
        step = make()
        step()
    except ModuleNotFoundError as exc:
        return None, f"not installed ({library or exc.name})"
    except Exception as exc:  # reported in the table, never skipped silently
        what = f"{library} {peers.version(library)}: " if library else "failed: "
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return None, f"{what}{type(exc).__name__}: {message}"
    return step, "ok"


def _own_tensors(params: list, stored: list, dtype: torch.dtype) -> list:
    """Copies of the parameters in `dtype`, with the stored gradients in it (a peer that steps in bf16)."""
    own = [torch.nn.Parameter(p.detach().to(dtype)) for p in params]
    for p, g in zip(own, stored):
        p.grad = g.to(dtype)
    return own


def candidates(params: list[torch.Tensor], grads: "GradientCopies", device: torch.device,
               backend_status: dict[str, str], peer_libraries: tuple[str, ...] | None = None) -> list[Candidate]:
    """Every row of a shape set, not built yet (Candidate.build)."""
    rows, stored = [], grads.stored
    for backend, state in backend_status.items():
        if state != "ok":
            continue
        for name, variant in variants(backend, backend_status).items():
            row = Candidate(name, backend, "memkernels", variant.passes, variant.steps)
            if not backends.has_kernel(variant.op, backend, device.type):
                row.status = f"backend {backend} has no {variant.op} kernel for {device.type}"
            else:
                row.make = functools.partial(_prepare, functools.partial(_stepper, name, variant, params, grads,
                                                                         backend))
            rows.append(row)
    for name, anchor, passes, factory in anchors(device):
        row = Candidate(name, anchor, "anchor", passes)
        row.make = functools.partial(_prepare, lambda factory=factory: Stepping.plain(factory(params), params))
        rows.append(row)
    for peer in peers.rows(device, peer_libraries):
        row = Candidate(peer.optimizer, peer.implementation, "peer", peer.passes)

        def make(peer=peer) -> tuple[Stepping | None, str]:
            mine = params if peer.dtype == torch.float32 else _own_tensors(params, stored, peer.dtype)
            with peers.quiet():
                return _prepare(lambda: Stepping.plain(peer.make(mine), mine), peer.library)
        row.make = make
        rows.append(row)
    return rows


class GradientCopies:
    """Copies of a shape set's stored gradients that its rows step on, made once and shared by every row: a
    step reads its gradients and writes none (unchanged() checks after the timing), so a row needs no copies of
    its own, which at GPT-2 small's real shapes (124M parameters) took 1 GB a row, more than a 24 GB machine
    holds with the compact-state rows."""

    def __init__(self, stored: list[torch.Tensor]) -> None:
        self.stored = stored
        self._copies: list[list[torch.Tensor]] = []

    def sets(self, turns: int) -> list[list[torch.Tensor]]:
        """`turns` sets of copies, to be used in turn (2: a new tensor every step, as after zero_grad(); 1: one
        tensor reused, as with zero_grad(set_to_none=False)); the first sets are the same for every caller."""
        while len(self._copies) < turns:
            self._copies.append([g.clone() for g in self.stored])
        return self._copies[:turns]

    def unchanged(self) -> bool:
        return all(torch.equal(c, g) for copies in self._copies for c, g in zip(copies, self.stored))


def with_own_grads(step: Callable[[], object], params: list, grads: GradientCopies, turns: int
                   ) -> Callable[[], object]:
    """step() on `turns` sets of gradient copies, used in turn (GradientCopies.sets)."""
    sets = itertools.cycle(grads.sets(turns))

    def stepped() -> object:
        for p, g in zip(params, next(sets)):
            p.grad = g
        return step()

    return stepped


def _stepper(name: str, variant: Variant, params: list, grads: GradientCopies, backend: str) -> Stepping:
    """A row's call: `variant.steps` optimizer steps on VARIANTS' gradients: the rows that set .grad on the
    shared copies (GradientCopies), a row in another dtype on copies of its own."""
    if variant.dtype != torch.float32:
        params = _own_tensors(params, grads.stored, variant.dtype)
        grads = GradientCopies([p.grad for p in params])
    stored = grads.stored
    opt = _memkernels_optimizer(name, params, backend)
    if variant.grads != "any":
        step = with_own_grads(opt.step, params, grads, 2 if variant.grads == "new" else 1)
    elif not variant.closure:
        step = opt.step
    else:
        points = grads.sets(1)[0]
        probes = [1.01 * g for g in stored]

        def gradients() -> None:
            """Gradients without a model: the stored tensors, the point's or (when step() has set .grad to
            None) the probe point's; no copy."""
            for p, point, probe in zip(params, points, probes):
                p.grad = probe if p.grad is None else point

        def step() -> object:
            return opt.step(gradients)

    if variant.steps == 1:
        return Stepping(step, opt, params)

    def period() -> None:
        for _ in range(variant.steps):
            step()

    return Stepping(period, opt, params)


def set_calls(cfg: SpeedConfig, rows: int, patterns: int, pairs: int) -> int:
    """Timed calls of one shape set: round-robin rounds of its rows, the bandwidth kernel and the limits' passes,
    then the rounds of four calls of each row paired with its counterpart."""
    return (cfg.warmup + cfg.repeats) * (rows + 1 + patterns + 4 * pairs)


def planned_set_calls(cfg: SpeedConfig, device: torch.device, backend_status: dict[str, str]) -> int:
    """set_calls() if every row tried runs: known before any is built (a row that turns out unable to run ticks
    its share off, so a progress bar announced from this total ends on it)."""
    mine = [v for b, state in backend_status.items() if state == "ok" for v in variants(b, backend_status).values()
            if backends.has_kernel(v.op, b, device.type)]
    others = [passes for _, _, passes, _ in anchors(device)] + [p.passes for p in peers.rows(device, cfg.peers)]
    patterns = {t for v in mine for t in v.passes} | {t for passes in others for t in passes}
    pairs = len(mine) + len(others) - len(anchors(device))  # every memkernels and peer row has a counterpart
    return set_calls(cfg, len(mine) + len(others), len(patterns), pairs)


def _limit_passes(patterns: list[Traffic], numel: int, device: torch.device
                  ) -> tuple[dict[Traffic, Callable[[], object]], str]:
    """The limit's pass of every pattern over `numel` elements, built and run once (compilation), or none and
    why."""
    try:
        pool = Pool(patterns, numel, device)
        passes = {t: reference_pass(t, pool) for t in patterns}
        for run_once in passes.values():
            run_once()
    except Exception as exc:  # e.g. no numba, or no Triton on a GPU: the rows keep their other figures
        return {}, f"{type(exc).__name__}: {exc}"
    return passes, "ok"


RESERVE = 0.15  # of the device's memory, kept free beside a batch's rows: a step's temporaries, the timing


def _memory(device: torch.device) -> tuple[float, float]:
    """(available, total) bytes of the device's memory; the CPU's from /proc/meminfo (Linux), else unknown
    (inf: one batch)."""
    if device.type == "cuda":
        return tuple(float(b) for b in torch.cuda.mem_get_info(device))
    try:
        with open("/proc/meminfo") as handle:
            fields = {line.split(":")[0]: float(line.split()[1]) * 1024 for line in handle}
        return fields["MemAvailable"], fields["MemTotal"]
    except (OSError, KeyError, IndexError, ValueError):
        return math.inf, math.inf


def _batch(queue: list[Candidate], device: torch.device) -> list[Candidate]:
    """Build rows off the front of the queue while memory holds one more as large as the largest built (the
    memory a build took: the row's first step, its states included), beside RESERVE: the runnable ones."""
    batch, largest = [], 0.0
    while queue:
        available, total = _memory(device)
        if batch and available - largest < RESERVE * total:
            break
        row = queue.pop(0)
        row.build()
        largest = max(largest, available - _memory(device)[0])
        if row.step is not None:
            batch.append(row)
    return batch


def _capped(tick: Callable[[int], object], planned: int) -> tuple[Callable[[int], object], Callable[[], None]]:
    """tick() that stops at `planned` calls (a set timed in several batches makes more), and what ticks the
    rest off at the end (calls of rows that could not run)."""
    left = [planned]

    def capped(n: int) -> None:
        n = min(n, left[0])
        left[0] -= n
        if n:
            tick(n)

    return capped, lambda: capped(left[0])


def time_shape_set(cfg: SpeedConfig, device: torch.device, backend_status: dict[str, str], name: str,
                   shapes: list[tuple[int, ...]], description: str, planned: int, tick: Callable[[int], object]
                   ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, str]]:
    """The shape set's bandwidth and limits, its timed rows and the rows that could not run (with why); ticks
    `planned` calls in all.

    The rows are built and timed in batches (_batch), each timed with the counterparts (built once) and the
    bandwidth and limit passes in its round-robin: a set whose rows' states outgrow the machine together
    (GPT-2 small's 124M parameters, 24 GB) still runs, and a row's ratios are to its own batch's
    counterparts. The counterparts' rows and the set's bandwidth are the first batch's."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(0.02 * torch.randn(s, device=device)) for s in shapes]
    stored = [torch.randn(s, device=device) for s in shapes]
    grads = GradientCopies(stored)
    for p, g in zip(params, grads.sets(1)[0]):
        p.grad = g
    numel = sum(p.numel() for p in params)
    ticked, finish = _capped(tick, planned)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the trajectory-HVP note: a training caveat, not a timing one
        cands = candidates(params, grads, device, backend_status, cfg.peers)
        patterns = list(dict.fromkeys(t for c in cands if c.make is not None for t in c.passes))
        limits, limit_status = _limit_passes(patterns, numel, device)
        bw_name, bw_fn, bw_bytes = bandwidth_kernel(numel, device)
        fixed = [c for c in cands if c.kind == "anchor"]
        for row in fixed:
            row.build()
        fixed = [c for c in fixed if c.step is not None]
        queue = [c for c in cands if c.kind != "anchor" and c.make is not None]
        info, rows, batches = None, [], 0
        while queue or info is None:
            timed = {id(c) for c in fixed + _batch(queue, device)}
            set_info, set_rows = _time_batch(cfg, device, [c for c in cands if id(c) in timed], limits,
                                             (bw_name, bw_fn, bw_bytes), numel, name, ticked)
            info = info or dict(set_info, description=description, tensors=len(shapes))
            rows += [r for r in set_rows if batches == 0 or r["kind"] != "anchor"]
            batches += 1
            for row in cands:
                if row.kind != "anchor":
                    row.stepping = None
            gc.collect()  # free the batch's states before the next one is built
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if not grads.unchanged():
        raise RuntimeError("a row of the speed suite wrote into the gradients every row steps on")
    finish()
    info = dict(info, limit_status=limit_status, batches=batches)
    unavailable = {f"{c.name} ({'memkernels ' if c.kind == 'memkernels' else ''}{c.backend})": c.status
                   for c in cands if c.status != "ok"}
    return info, rows, unavailable


def _time_batch(cfg: SpeedConfig, device: torch.device, runnable: list[Candidate],
                limits: dict[Traffic, Callable[[], object]], bandwidth: tuple[str, Callable[[], object], int],
                numel: int, name: str, tick: Callable[[int], object]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One round-robin of the bandwidth kernel, the limits' passes and the rows, then each row paired with its
    counterpart: the set's figures and the rows'."""
    bw_name, bw_fn, bw_bytes = bandwidth
    counterparts = {i: a for i, c in enumerate(runnable)
                    if c.kind != "anchor" and (a := _anchor_of(c, runnable)) is not None}
    times = interleaved([bw_fn, *limits.values()] + [c.step for c in runnable], warmup=cfg.warmup,
                        repeats=cfg.repeats, device=device, tick=tick)
    ratios = {i: (a.backend, paired(runnable[i].step, repeated(a.step, runnable[i].steps), warmup=cfg.warmup,
                                    repeats=cfg.repeats, device=device, tick=tick))
              for i, a in counterparts.items()}
    bw_ms, bw_iqr = median_iqr(times[0])
    bandwidth_gb_s = bw_bytes / (bw_ms * 1e-3) / 1e9
    limit_ms = {t: median_iqr(sample) for t, sample in zip(limits, times[1:])}
    info = {"name": name, "params": numel,
            "bandwidth": {"kernel": bw_name, "gb_s": bandwidth_gb_s, "median_ms": bw_ms, "iqr_ms": bw_iqr,
                          "bytes": bw_bytes},
            "limits": [{"passes": t.label(), "bytes_per_param": t.bytes, "median_ms": ms, "iqr_ms": iqr,
                        "gb_s": t.bytes * numel / (ms * 1e-3) / 1e9} for t, (ms, iqr) in limit_ms.items()]}
    rows = []
    for i, (cand, calls) in enumerate(zip(runnable, times[1 + len(limits):])):
        sample = [ms / cand.steps for ms in calls]
        ms, iqr = median_iqr(sample)
        gb_s = cand.bytes_per_param * numel / (ms * 1e-3) / 1e9
        limit = sum(limit_ms[t][0] for t in cand.passes) / cand.steps if limits else None
        rows.append({"name": cand.name, "backend": cand.backend, "kind": cand.kind, "shape_set": name,
                     "params": numel, "bytes_per_param": cand.bytes_per_param, "median_ms": ms, "iqr_ms": iqr,
                     "touched_bytes_per_param": touched_bytes(cand.stepping.optimizer, cand.stepping.params) / numel,
                     "gb_s": gb_s, "pct_bandwidth": 100.0 * gb_s / bandwidth_gb_s, "repeats": len(sample),
                     "samples_ms": sample, "passes": [t.label() for t in cand.passes], "limit_ms": limit,
                     "pct_limit": None if limit is None else 100.0 * limit / ms})
        if i in ratios:
            anchor, per_call = ratios[i]
            rows[-1]["paired_ratio"] = {"anchor": anchor, "median": statistics.median(per_call), "ratios": per_call}
    fused = next((r["median_ms"] for r in rows if (r["name"], r["backend"]) == REFERENCE_ANCHOR), None)
    for row in rows:
        row["ratio_to_torch_fused"] = row["median_ms"] / fused if fused else None
    return info, rows


def optimizer_of(row_name: str) -> str:
    """The optimizer a row's name is a variant of ("AdamW + ..." and "AdamW, ...": AdamW)."""
    return row_name.split(" + ")[0].split(", ")[0]


def repeated(step: Callable[[], object], times: int) -> Callable[[], object]:
    """step() `times` times in one call: a row's counterpart takes as many steps back to back as the row's call
    does, so a step that finds its tensors still in cache (a small model's, after the step before) does so on
    both sides of the ratio."""
    if times == 1:
        return step

    def steps() -> None:
        for _ in range(times):
            step()

    return steps


def _anchor_of(row: Candidate, runnable: list[Candidate]) -> Candidate | None:
    """The first timed anchor of the row's optimizer (AdamW variants: AdamW), its counterpart."""
    return next((c for c in runnable if c.kind == "anchor" and c.name == optimizer_of(row.name)), None)


RESUME_AT = 10_000_000
RESUMED: dict[str, Callable[[list], torch.optim.Optimizer]] = {
    "AdamW + trajectory correction": lambda ps: AdamW(ps, lr=1e-3, memory_correction=-1.0, hvp="trajectory"),
    "Lion + trajectory correction": lambda ps: Lion(ps, lr=1e-4, memory_correction=-1.0, hvp="trajectory"),
}


def _at_step(make: Callable[[list], torch.optim.Optimizer], step: int, device: torch.device):
    """An optimizer over 8 small tensors (the step is host work: coefficients, checks) whose state says it has
    taken `step` steps, as after loading a checkpoint, with its first step after the load taken."""
    params = [torch.nn.Parameter(torch.randn(1024, device=device)) for _ in range(8)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make(params)
    opt.step()
    state = opt.state_dict()
    for s in state["state"].values():
        s["step"] = torch.tensor(float(step))
    opt.load_state_dict(state)
    opt.step()
    return opt


def resumed_steps(cfg: SpeedConfig, device: torch.device, tick: Callable[[int], object]) -> dict[str, Any]:
    """A step at step RESUME_AT against a step at step 10, paired: the step coefficients cost O(1) at any count
    (coefficients.py), so the ratio should be 1 within the machine's spread."""
    rows = []
    for name, make in RESUMED.items():
        late, early = _at_step(make, RESUME_AT, device), _at_step(make, 10, device)
        ratios = paired(late.step, early.step, warmup=cfg.warmup, repeats=cfg.repeats, device=device, tick=tick)
        ratio, iqr = median_iqr(ratios)
        rows.append({"name": name, "paired_ratio": ratio, "iqr": iqr, "rounds": len(ratios)})
    return {"step": RESUME_AT, "params": 8 * 1024, "rows": rows}


def run(cfg: SpeedConfig, *, tick: Callable[[int], object] = lambda n: None,
        total: Callable[[int], object] = lambda n: None) -> dict[str, Any]:
    """Time every row of every shape set, the resumed steps and the training table; total(n) announces once,
    before any call, the n calls that tick() then counts (a progress bar's total)."""
    device = resolve_device(cfg.device)
    backend_status = selected_backends(cfg, device)
    peers.rows(device, cfg.peers)  # an unknown library fails here, before anything runs
    per_set = planned_set_calls(cfg, device, backend_status)
    sets_to_time = shape_sets(cfg)
    resumed_calls = 4 * (cfg.warmup + cfg.repeats) * len(RESUMED)
    tiny = cfg.training == "tiny"
    training_calls = 0 if cfg.training == "none" else training.calls(tiny=tiny, warmup=cfg.warmup,
                                                                      repeats=cfg.repeats)
    total(len(sets_to_time) * per_set + resumed_calls + training_calls)
    sets, rows, unavailable = [], [], {}
    for name, shapes, description in sets_to_time:
        info, set_rows, missing = time_shape_set(cfg, device, backend_status, name, shapes, description, per_set,
                                                 tick)
        sets.append(info)
        rows += set_rows
        for key, why in missing.items():
            unavailable.setdefault(key, why)
        gc.collect()  # free this set's parameters and states before the next one is allocated
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"suite": "speed", "machine": describe(device), "device": str(device), "config": asdict(cfg),
              "backends": backend_status,
              "peers": {lib: peers.version(lib) for lib in (peers.LIBRARIES if cfg.peers is None else cfg.peers)},
              "shape_sets": sets, "rows": rows, "unavailable": unavailable,
              "resumed": resumed_steps(cfg, device, tick), "notes": NOTES}
    if cfg.training != "none":
        result["training"] = training.run(tiny=tiny, warmup=cfg.warmup, repeats=cfg.repeats, tick=tick)
    return result
