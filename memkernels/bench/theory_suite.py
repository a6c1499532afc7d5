"""Theory suite: the order-of-accuracy experiment of docs/THEORY.md section 7 for every shipped optimizer.

Two experiments per optimizer and problem, each with the exact, probe and
trajectory HVPs:
- memoryless approximation: target = the optimizer with memory; the memoryless
  path without M should be first order, with +hM (alpha = +1) second order;
- memory cancellation: target = the memoryless path; the optimizer with memory
  should be first order, with alpha = -1 (memory-cancelled) second order.
Then the theory engine (memkernels.theory.engine): the memoryless approximation
of the rules that have no closed form in docs/THEORY.md, whose M only the engine
computes (exact HVPs), and engine_cost, its time relative to one gradient.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..optim import SGD, AdamW, Lion
from ..theory import engine_cost, order_of_accuracy, problems, rule_order, rules
from ..theory.engine import WITH_M, WITHOUT_M, Rule
from .machine import describe, torch_threads

# name -> make(params, h, **extra): the configurations of docs/THEORY.md section 7
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "heavy ball": lambda ps, h, **kw: SGD(ps, lr=h, momentum=0.8, **kw),
    "Nesterov": lambda ps, h, **kw: SGD(ps, lr=h, momentum=0.8, nesterov=True, **kw),
    "AdamW (eps outside)": lambda ps, h, **kw: AdamW(ps, lr=h, betas=(0.8, 0.9), eps=0.1, weight_decay=0.1, **kw),
    "AdamW (eps inside)": lambda ps, h, **kw: AdamW(ps, lr=h, betas=(0.8, 0.9), eps=0.1, weight_decay=0.1,
                                                    eps_inside_sqrt=True, **kw),
    "Adam + L2": lambda ps, h, **kw: AdamW(ps, lr=h, betas=(0.8, 0.9), eps=0.1, weight_decay=0.1,
                                           decoupled_weight_decay=False, **kw),
    "smoothed Lion": lambda ps, h, **kw: Lion(ps, lr=h, betas=(0.8, 0.9), weight_decay=0.1, smoothing=0.0025, **kw),
}
PROBLEMS = {"logistic": problems.logistic, "tanh_regression": problems.tanh_regression}
HVPS = ("exact", "trajectory", "probe")
EXPERIMENTS = ("memoryless approximation", "memory cancellation")
ENGINE_EXPERIMENT = "memoryless approximation (engine)"
# The engine's rules without a closed form: name -> (rule, history truncation tol), as tests/test_theory_engine.py
ENGINE_RULES: dict[str, Callable[[], tuple[Rule, float]]] = {
    "RMSprop (engine)": lambda: (rules.rmsprop(alpha=0.8, eps=0.3, momentum=0.5, weight_decay=0.1), 1e-8),
    "AdaBelief (engine)": lambda: (rules.adabelief((0.8, 0.9), eps=0.1, weight_decay=0.1), 1e-6),
}


@dataclass(frozen=True)
class TheoryConfig:
    hs: tuple[float, ...] = (0.02, 0.01, 0.005, 0.0025)  # docs/THEORY.md section 7's step sizes
    horizon: float = 0.6
    problems: tuple[str, ...] = tuple(PROBLEMS)
    optimizers: tuple[str, ...] = tuple(OPTIMIZERS)
    hvps: tuple[str, ...] = HVPS
    experiments: tuple[str, ...] = EXPERIMENTS
    engine_rules: tuple[str, ...] = tuple(ENGINE_RULES)
    engine_cost_params: int = 50_000  # model size of the engine_cost measurement (0: skip it)
    engine_cost_batch: int = 256
    backend: str = "reference"  # memkernels backend of the optimizer paths (math, not speed: the spec)

    @classmethod
    def preset(cls, mode: str, backend: str = "reference") -> "TheoryConfig":
        if mode == "quick":
            return cls(backend=backend)
        if mode == "full":
            return cls(hs=(0.02, 0.01, 0.005, 0.0025, 0.00125), engine_cost_params=1_000_000, backend=backend)
        if mode == "tiny":
            return cls(backend=backend, hs=(0.04, 0.02, 0.01), problems=("logistic",), optimizers=("heavy ball",),
                       hvps=("exact", "trajectory"), engine_rules=("RMSprop (engine)",), engine_cost_params=2000,
                       engine_cost_batch=16)
        raise ValueError(f"mode must be quick, full or tiny, got {mode!r}")

    def check(self) -> None:
        for name, chosen, known in (("problem", self.problems, PROBLEMS), ("optimizer", self.optimizers, OPTIMIZERS),
                                    ("hvp", self.hvps, HVPS), ("experiment", self.experiments, EXPERIMENTS),
                                    ("engine rule", self.engine_rules, ENGINE_RULES)):
            bad = [c for c in chosen if c not in known]
            if bad:
                raise ValueError(f"unknown {name}(s) {bad}; choose from {tuple(known)}")
        if len(self.hs) < 2 or sorted(self.hs, reverse=True) != list(self.hs) or min(self.hs) <= 0:
            raise ValueError(f"hs must be at least two decreasing positive step sizes, got {self.hs}")


def _paths(make: Callable[..., torch.optim.Optimizer], experiment: str, hvp: str | None, backend: str):
    """The factory of one path: hvp None is the uncorrected one, "target" the experiment's target."""
    memoryless_target = experiment == "memory cancellation"
    if hvp == "target":
        return lambda ps, h: make(ps, h, memoryless=memoryless_target, backend=backend)
    if hvp is None:
        return lambda ps, h: make(ps, h, memoryless=not memoryless_target, backend=backend)
    alpha = -1.0 if memoryless_target else 1.0
    return lambda ps, h: make(ps, h, memoryless=not memoryless_target, memory_correction=alpha, hvp=hvp,
                              backend=backend)


def experiment(cfg: TheoryConfig, problem: str, optimizer: str, name: str) -> dict[str, Any]:
    """Errors and slopes of the uncorrected and each corrected path of one experiment."""
    make, prob = OPTIMIZERS[optimizer], PROBLEMS[problem]()
    target = _paths(make, name, "target", cfg.backend)
    plain = {"uncorrected": _paths(make, name, None, cfg.backend)}
    plain.update({hvp: _paths(make, name, hvp, cfg.backend) for hvp in cfg.hvps if hvp != "exact"})
    start = time.perf_counter()
    results = [order_of_accuracy(target, plain, prob, cfg.hs, cfg.horizon)]
    if "exact" in cfg.hvps:  # double backward needs gradients with a graph
        results.append(order_of_accuracy(target, {"exact": _paths(make, name, "exact", cfg.backend)}, prob, cfg.hs,
                                         cfg.horizon, create_graph=True))
    errors, slopes = {}, {}
    for res in results:
        for path in res.errors:
            errors[path], slopes[path] = res.errors[path], res.slopes(path)
    return {"problem": problem, "optimizer": optimizer, "experiment": name, "hs": list(cfg.hs),
            "errors": errors, "slopes": slopes, "seconds": time.perf_counter() - start}


def engine_experiment(cfg: TheoryConfig, problem: str, name: str) -> dict[str, Any]:
    """rule_order of the engine: its memoryless path without M and with M (exact HVPs)."""
    rule, tol = ENGINE_RULES[name]()
    start = time.perf_counter()
    res = rule_order(rule, PROBLEMS[problem](), cfg.hs, cfg.horizon, tol=tol)
    errors = {"uncorrected": res.errors[WITHOUT_M], "engine": res.errors[WITH_M]}
    slopes = {"uncorrected": res.slopes(WITHOUT_M), "engine": res.slopes(WITH_M)}
    return {"problem": problem, "optimizer": name, "experiment": ENGINE_EXPERIMENT, "rule": rule.name,
            "hs": list(cfg.hs), "errors": errors, "slopes": slopes, "seconds": time.perf_counter() - start}


def jobs(cfg: TheoryConfig) -> list[Callable[[], dict[str, Any]]]:
    cfg.check()
    todo: list[Callable[[], dict[str, Any]]] = [
        lambda p=p, o=o, e=e: experiment(cfg, p, o, e)
        for p in cfg.problems for o in cfg.optimizers for e in cfg.experiments]
    todo += [lambda p=p, r=r: engine_experiment(cfg, p, r) for p in cfg.problems for r in cfg.engine_rules]
    return todo


def run(cfg: TheoryConfig, *, tick: Callable[[int], object] = lambda n: None,
        total: Callable[[int], object] = lambda n: None) -> dict[str, Any]:
    todo = jobs(cfg)
    total(len(todo))
    results = []
    with warnings.catch_warnings(), torch_threads(1):
        warnings.simplefilter("ignore")  # the trajectory-HVP note: these problems are full batch
        machine = describe(torch.device("cpu"))
        for job in todo:
            results.append(job())
            tick(1)
    cost = None
    if cfg.engine_cost_params:
        cost = engine_cost(cfg.engine_cost_params, batch=cfg.engine_cost_batch, device="cpu")
    return {"suite": "theory", "machine": machine, "config": asdict(cfg),
            "results": results, "engine_cost": cost}
