"""Implicit-regularization suite: what optimizer memory does to a small network trained on real data.

scikit-learn's digits (ships with the package, no download), a fixed stratified
train/test split, a 64-H-10 tanh MLP trained full batch (so hvp="trajectory" is
sound) until the training loss reaches a threshold. Per optimizer and seed it
records the test accuracy at that threshold, the memory penalty R over training
(memory_stats(), THEORY.md sections 2-4) and the sharpness at the end (top
Hessian eigenvalue of the training loss, power iteration on autograd HVPs).
The paper predicts: AdamW's R < 0 growing with beta2 (anti-regularization,
sharper minima, lower accuracy at large beta2), R > 0 for heavy ball, R = 0 for
sign-Lion. The suite reports what it measures either way.
"""
from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor

from ..optim import SGD, AdamW, Lion
from .machine import describe, torch_threads

DIVERGED = 3.0  # a run whose training loss exceeds this multiple of its initial loss (or is not finite) stops


@dataclass(frozen=True)
class ImplicitConfig:
    seeds: int = 3
    loss_threshold: float = 0.02   # train until the full-batch training loss is at most this
    max_steps: int = 3000          # step cap per run (a run that hits it is reported as such)
    hidden: int = 64
    beta1: float = 0.9
    beta2s: tuple[float, ...] = (0.9, 0.95, 0.99, 0.999)
    corrected_beta2: float = 0.999  # AdamW with memory_correction = -1 at this beta2
    lr_adamw: float = 1e-3
    lr_lion: float = 3e-4
    lr_heavy_ball: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0      # the same for every optimizer, so R is memory's alone
    record_every: int = 10         # steps between two readings of R
    power_iterations: int = 20
    test_fraction: float = 0.3
    backend: str = "reference"  # math, not speed: the executable spec (tiny tensors: per-call overhead rules)

    @classmethod
    def preset(cls, mode: str, backend: str = "reference") -> "ImplicitConfig":
        if mode == "quick":
            return cls(backend=backend)
        if mode == "full":
            return cls(max_steps=20000, backend=backend)
        if mode == "tiny":
            return cls(seeds=1, loss_threshold=1.5, max_steps=40, hidden=16, beta2s=(0.9, 0.999), lr_adamw=1e-2,
                       lr_lion=3e-3,
                       record_every=5, power_iterations=5, backend=backend)
        raise ValueError(f"mode must be quick, full or tiny, got {mode!r}")


def digits(test_fraction: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train/test tensors of scikit-learn's 8x8 digits, pixels scaled to [0, 1]; the split is fixed."""
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=test_fraction, random_state=0, stratify=y)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_x(xtr), torch.tensor(ytr), as_x(xte), torch.tensor(yte)


def configurations(cfg: ImplicitConfig) -> list[dict[str, Any]]:
    """name, family, beta2 and make(params) of every optimizer compared."""
    common = dict(weight_decay=cfg.weight_decay, track_memory=True, backend=cfg.backend)
    out = [{"name": f"AdamW b2={b2}", "family": "AdamW", "beta2": b2,
            "make": lambda ps, b2=b2: AdamW(ps, lr=cfg.lr_adamw, betas=(cfg.beta1, b2), **common)}
           for b2 in cfg.beta2s]
    b2 = cfg.corrected_beta2
    out.append({"name": f"AdamW b2={b2} alpha=-1", "family": "AdamW alpha=-1", "beta2": b2,
                "make": lambda ps: AdamW(ps, lr=cfg.lr_adamw, betas=(cfg.beta1, b2), memory_correction=-1.0,
                                         hvp="trajectory", **common)})
    out.append({"name": "Lion", "family": "Lion", "beta2": None,
                "make": lambda ps: Lion(ps, lr=cfg.lr_lion, **common)})
    out.append({"name": "heavy ball", "family": "heavy ball", "beta2": None,
                "make": lambda ps: SGD(ps, lr=cfg.lr_heavy_ball, momentum=cfg.momentum, **common)})
    return out


def mlp(hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # every optimizer of one seed starts from the same weights
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10))


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


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def train(cfg: ImplicitConfig, conf: dict[str, Any], seed: int, data: tuple[Tensor, ...]) -> dict[str, Any]:
    """One run: full-batch steps until the loss threshold, the step cap or divergence."""
    xtr, ytr, xte, yte = data
    model = mlp(cfg.hidden, seed)
    opt = conf["make"](list(model.parameters()))
    start = time.perf_counter()
    steps, penalties, flips, explained = [], [], [], []
    initial, status, loss_value, step = None, "step cap", math.nan, 0
    for step in range(cfg.max_steps + 1):
        opt.zero_grad()
        loss = F.cross_entropy(model(xtr), ytr)
        loss_value = loss.item()
        initial = loss_value if initial is None else initial
        if not math.isfinite(loss_value) or loss_value > DIVERGED * initial:
            status = "diverged"
            break
        if loss_value <= cfg.loss_threshold:
            status = "reached"
            break
        if step == cfg.max_steps:
            break
        loss.backward()
        opt.step()
        if step % cfg.record_every == 0:
            stats = opt.memory_stats()
            steps.append(step + 1)
            penalties.append(sum(s["penalty"] for s in stats))
            flips.append(stats[0]["sign_flip_fraction"])
            explained.append(stats[0]["explained"])
    with torch.no_grad():
        logits = model(xte)
        accuracy = float((logits.argmax(dim=1) == yte).float().mean())
        test_loss = float(F.cross_entropy(logits, yte))
    sharp = sharpness(model, xtr, ytr, cfg.power_iterations, seed) if status != "diverged" else math.nan
    finite = [e for e in explained if math.isfinite(e)]
    return {"name": conf["name"], "family": conf["family"], "beta2": conf["beta2"], "seed": seed,
            "status": status, "steps": step, "train_loss": _finite(loss_value), "test_accuracy": accuracy,
            "test_loss": _finite(test_loss), "sharpness": _finite(sharp),
            "penalty": {"steps": steps, "values": [_finite(v) for v in penalties]},
            "final_penalty": _finite(penalties[-1]) if penalties else None,
            "sign_flip_fraction": _finite(statistics.fmean(flips)) if flips and all(map(math.isfinite, flips)) else None,
            "explained_median": statistics.median(finite) if finite else None,
            "seconds": time.perf_counter() - start}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per optimizer: mean and standard deviation over the seeds that reached the threshold."""
    out = []
    for name in dict.fromkeys(r["name"] for r in runs):
        group = [r for r in runs if r["name"] == name]
        ok = [r for r in group if r["status"] == "reached"]

        def stat(key: str) -> tuple[float | None, float | None]:
            values = [r[key] for r in ok if r[key] is not None]
            if not values:
                return None, None
            return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

        acc, acc_sd = stat("test_accuracy")
        sharp, sharp_sd = stat("sharpness")
        pen, pen_sd = stat("final_penalty")
        steps, _ = stat("steps")
        explained = [r["explained_median"] for r in group if r["explained_median"] is not None]
        out.append({"name": name, "family": group[0]["family"], "beta2": group[0]["beta2"], "seeds": len(group),
                    "reached": len(ok), "statuses": sorted({r["status"] for r in group}),
                    "stopped_at": [r["steps"] for r in group if r["status"] != "reached"],
                    "explained": statistics.median(explained) if explained else None,
                    "test_accuracy": acc, "test_accuracy_sd": acc_sd, "sharpness": sharp, "sharpness_sd": sharp_sd,
                    "final_penalty": pen, "final_penalty_sd": pen_sd, "steps": steps})
    return out


def run(cfg: ImplicitConfig, *, tick: Callable[[int], object] = lambda n: None,
        total: Callable[[int], object] = lambda n: None) -> dict[str, Any]:
    if cfg.seeds < 1 or cfg.max_steps < 1 or cfg.loss_threshold <= 0:
        raise ValueError(f"need seeds >= 1, max_steps >= 1 and loss_threshold > 0, got {cfg.seeds}, "
                         f"{cfg.max_steps}, {cfg.loss_threshold}")
    data = digits(cfg.test_fraction)
    confs = configurations(cfg)
    total(len(confs) * cfg.seeds)
    runs = []
    with warnings.catch_warnings(), torch_threads(1):
        warnings.simplefilter("ignore")  # the trajectory-HVP note: this training is full batch
        machine = describe(torch.device("cpu"))
        for seed in range(cfg.seeds):
            for conf in confs:
                runs.append(train(cfg, conf, seed, data))
                tick(1)
    return {"suite": "implicit", "machine": machine, "config": asdict(cfg),
            "data": {"name": "scikit-learn digits", "train": len(data[1]), "test": len(data[3]),
                     "features": 64, "classes": 10},
            "runs": runs, "summary": summarize(runs)}
