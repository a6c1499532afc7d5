"""Every numba op mode and a few optimizer runs on fixed seeds, saved bit for bit or compared with a saved run.

A refactor that must not change the numba backend's results (or the optimizers') runs
`python bench/fingerprint.py save FILE` on the tree before it and `... compare FILE` after:
every written tensor (parameters, states, references, origins, kept estimates, diagnostics, norms)
must have the same bits.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_numba as tn  # noqa: E402  (its MODES, inputs and runner)

import memkernels as mk  # noqa: E402

SHAPES = [(3 * tn.CHUNK + 17,), (5, 7), (1,), (0,), (tn.SUB_BLOCK + 3,)]
DTYPES = [(torch.float32, None), (torch.bfloat16, torch.float32), (torch.float64, None), (torch.float16, None)]


def op_runs() -> dict[str, list[torch.Tensor]]:
    out = {}
    for op, name, kwargs, refs, diag in tn.MODES:
        for dtype, state_dtype in DTYPES:
            momentum = kwargs.get("momentum", 1.0) != 0.0
            inputs = tn.make_inputs(op, SHAPES, dtype, state_dtype, refs=refs, momentum=momentum, seed=1)
            for d in (diag, not diag):
                out[f"{op}/{name}/{dtype}/diag={d}"] = tn.flat(tn.run(op, "numba", inputs, kwargs, d))
            probe = dict(kwargs, probe=True, probe_tau=torch.tensor(1e-2, dtype=torch.float64))
            origin_inputs = tn.make_inputs(op, SHAPES, dtype, state_dtype, refs=False, momentum=momentum, seed=2,
                                           origins=True)
            out[f"{op}/{name}/{dtype}/probe"] = tn.flat(tn.run(op, "numba", origin_inputs, probe, False))
            step = dict(kwargs, probe_tau=torch.tensor(1e-2, dtype=torch.float64))
            both = tn.make_inputs(op, SHAPES, dtype, state_dtype, refs=True, momentum=momentum, seed=3,
                                  origins=True, hvps=True)
            out[f"{op}/{name}/{dtype}/from_origins_store"] = tn.flat(tn.run(op, "numba", both, step, True))
    return out


OPTIMIZERS = {
    "adamw": lambda ps, **kw: mk.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw),
    "adamw_coupled": lambda ps, **kw: mk.AdamW(ps, lr=1e-2, decoupled_weight_decay=False, eps_inside_sqrt=True, **kw),
    "lion": lambda ps, **kw: mk.Lion(ps, lr=1e-3, weight_decay=0.1, **kw),
    "lion_smooth": lambda ps, **kw: mk.Lion(ps, lr=1e-3, smoothing=1e-4, **kw),
    "sgd": lambda ps, **kw: mk.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.01, **kw),
    "sgd_nesterov": lambda ps, **kw: mk.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, **kw),
}
OPTIONS = {"plain": {}, "track": dict(track_memory=True),
           "trajectory": dict(memory_correction=-1.0, hvp="trajectory", track_memory=True),
           "probe": dict(memory_correction=-1.0, hvp="probe"), "exact": dict(memory_correction=0.5, hvp="exact"),
           "memoryless": dict(memoryless=True, memory_correction=-1.0, hvp="trajectory")}


def optimizer_runs() -> dict[str, list[torch.Tensor]]:
    out = {}
    for oname, make in OPTIMIZERS.items():
        for xname, options in OPTIONS.items():
            gen = torch.Generator().manual_seed(4)
            w = [torch.randn(s, generator=gen, requires_grad=True) for s in ((40, 30), (30,), (7, 3, 2))]
            targets = [torch.randn(t.shape, generator=gen) for t in w]
            opt = make(w, backend="numba", **options)

            def closure():
                opt.zero_grad()
                loss = sum(((t - y) ** 2 * (1 + t.abs())).sum() for t, y in zip(w, targets))
                loss.backward(create_graph=options.get("hvp") == "exact")
                return loss
            for _ in range(4):
                opt.step(closure)
            stats = [torch.tensor(list(s.values()), dtype=torch.float64) for s in opt.memory_stats()] \
                if options.get("track_memory") else []
            state = [v for p in w for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
            out[f"optim/{oname}/{xname}"] = [t.detach().clone() for t in (*w, *state, *stats)]
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(torch.uint8) if t.numel() else t


def main() -> None:
    action, path = sys.argv[1], sys.argv[2]
    runs = {**op_runs(), **optimizer_runs()}
    if action == "save":
        torch.save(runs, path)
        print(f"saved {len(runs)} runs to {path}")
        return
    saved = torch.load(path)
    differ = [k for k in saved if k not in runs or len(saved[k]) != len(runs[k])
              or not all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))
                         for a, b in zip(saved[k], runs[k]))]
    print(f"{len(saved) - len(differ)}/{len(saved)} runs bit-identical")
    for k in differ:
        print("  differs:", k)
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
