"""A byte-level transformer language model on the Python standard library's own sources, with memkernels.

The training loop passes a closure to opt.step: with memory_correction set, hvp="auto" then estimates H d
by the probe (one extra gradient on the same minibatch), the estimate that is sound with minibatches.

    python examples/char_lm.py                         # AdamW, alpha = 0 and -1, a table at the end
    python examples/char_lm.py --opt lion sgd --steps 600 --seeds 0 1 2
    python examples/char_lm.py --alpha -1 --correction-limit inf       # the correction without its limit
    python examples/char_lm.py --tiny                  # seconds: a small model, few steps, little text

Data: the .py files of the running interpreter's standard library, as bytes (memkernels.bench.lm:
every tenth file held out whole). No download.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

import memkernels as mk
from memkernels.bench.lm import TinyGPT, batch, stdlib_text

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    # torch's defaults for AdamW; Lion-K with a smoothing far below the gradients' squares (~1e-8 here), since
    # phi(x) = x / sqrt(x^2 + s) is ~ x / sqrt(s) where x^2 << s, a step too small to train; Nesterov SGD
    "adamw": lambda ps, **kw: mk.AdamW(ps, **kw),
    "lion": lambda ps, **kw: mk.Lion(ps, lr=1e-4, smoothing=1e-12, **kw),
    "sgd": lambda ps, **kw: mk.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, **kw),
}


def train(name: str, alpha: float, seed: int, args: argparse.Namespace, data) -> dict:
    train_data, held_out = data
    torch.manual_seed(seed)
    model = TinyGPT(args.context, width=args.width)
    opt = OPTIMIZERS[name](model.parameters(), memory_correction=alpha, correction_limit=args.correction_limit,
                           hvp_every=args.hvp_every, backend=args.backend)
    gen = torch.Generator().manual_seed(1000 + seed)
    x, y = batch(train_data, args.batch, args.context, gen)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        return loss

    limited, losses, start = [], [], time.perf_counter()
    for _ in range(args.steps):
        x, y = batch(train_data, args.batch, args.context, gen)  # the closure reads this minibatch
        losses.append(opt.step(closure).item())
        if alpha != 0.0:
            limited.append(statistics.fmean(s["limited_fraction"] for s in opt.memory_stats()))
    seconds = (time.perf_counter() - start) / args.steps
    with torch.no_grad():
        eval_gen = torch.Generator().manual_seed(7)
        held_out_loss = statistics.fmean(F.cross_entropy(model(xb).flatten(0, 1), yb.flatten()).item()
                                         for xb, yb in (batch(held_out, 64, args.context, eval_gen)
                                                        for _ in range(args.eval_batches)))
    return {"opt": name, "alpha": alpha, "seed": seed, "finite": all(map(math.isfinite, losses)),
            "held_out": held_out_loss,
            "first": losses[0], "last": losses[-1], "limited": statistics.fmean(limited) if limited else 0.0,
            "ms_per_step": 1e3 * seconds}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--opt", nargs="+", choices=tuple(OPTIMIZERS), default=["adamw"])
    parser.add_argument("--alpha", nargs="+", type=float, default=[0.0, -1.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--hvp-every", type=int, default=1)
    parser.add_argument("--correction-limit", type=float, default=0.5, help="kappa; inf: no limit")
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--text-bytes", type=int, default=8_000_000)
    parser.add_argument("--width", type=int, default=128, help="the model's embedding width")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--tiny", action="store_true", help="a smoke run: small model, few steps, little text")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.batch, args.context, args.width, args.eval_batches, args.text_bytes = 30, 8, 32, 32, 2, 300_000
    data = stdlib_text(args.text_bytes)
    print(f"text: {len(data[0]):,} training bytes, {len(data[1]):,} held out")
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the regime note: the table's limited column says it
        for name in args.opt:
            for alpha in args.alpha:
                for seed in args.seeds:
                    rows.append(train(name, alpha, seed, args, data))
                    r = rows[-1]
                    print(f"{name:6} alpha={alpha:+.1f} seed={seed}: held-out loss {r['held_out']:.4f}, "
                          f"finite {r['finite']}, limited {r['limited']:.0%}, {r['ms_per_step']:.0f} ms/step\n"
                          f"loss {r['first']:.6f} -> {r['last']:.6f}", flush=True)  # first and last minibatch
    print("\n| optimizer | alpha | held-out loss (mean over seeds) | vs alpha = 0 | limited | finite |")
    print("|---|---|---|---|---|---|")
    for name in args.opt:
        base = statistics.fmean(r["held_out"] for r in rows if r["opt"] == name and r["alpha"] == 0.0) \
            if 0.0 in args.alpha else math.nan
        for alpha in args.alpha:
            group = [r for r in rows if r["opt"] == name and r["alpha"] == alpha]
            mean = statistics.fmean(r["held_out"] for r in group)
            print(f"| {name} | {alpha:+.1f} | {mean:.4f} | {mean / base:.3f} | "
                  f"{statistics.fmean(r['limited'] for r in group):.0%} | {all(r['finite'] for r in group)} |")
    return rows


if __name__ == "__main__":
    main()
