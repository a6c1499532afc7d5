"""How Lion-K's smoothing changes training on examples/char_lm.py's byte-level transformer.

phi(x) = x / sqrt(x^2 + smoothing) is a sign only where |x| >> sqrt(smoothing); below it the step shrinks
to |x| / sqrt(smoothing) of Lion's. This trains one seed per smoothing (lr 1e-4, betas (0.9, 0.99),
minibatches of 32 x 64 bytes, alpha = 0) and prints the held-out loss next to the gradients' typical size
per element, the scale smoothing must stay far below (squared):

    python bench/lion_smoothing.py                                   # 200 steps: 0, 1e-12, 1e-8, 1e-4
    python bench/lion_smoothing.py --steps 60 --smoothing 0 1e-10 1e-6
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import memkernels as mk
from memkernels.bench.lm import TinyGPT, batch, stdlib_text


def train(smoothing: float, args: argparse.Namespace, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    train_data, held_out = data
    torch.manual_seed(0)
    model = TinyGPT(64)
    opt = mk.Lion(model.parameters(), lr=1e-4, smoothing=smoothing, backend=args.backend)
    gen = torch.Generator().manual_seed(1000)
    grad_sizes = []
    for step in range(args.steps):
        x, y = batch(train_data, 32, 64, gen)
        opt.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        if step in (0, args.steps // 2, args.steps - 1):
            g = torch.cat([p.grad.flatten().abs() for p in model.parameters()])
            grad_sizes.append(f"step {step}: {g.median().item():.1e}")
        opt.step()
    with torch.no_grad():
        eval_gen = torch.Generator().manual_seed(7)
        loss = statistics.fmean(F.cross_entropy(model(xb).flatten(0, 1), yb.flatten()).item()
                                for xb, yb in (batch(held_out, 64, 64, eval_gen) for _ in range(10)))
    print(f"smoothing {smoothing:<7g} held-out loss after {args.steps} steps {loss:.3f}; "
          f"median |g| per element at {', '.join(grad_sizes)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--smoothing", nargs="+", type=float, default=[0.0, 1e-12, 1e-8, 1e-4])
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = stdlib_text(2_000_000)
    for smoothing in args.smoothing:
        train(smoothing, args, data)


if __name__ == "__main__":
    main()
