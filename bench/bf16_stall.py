"""bfloat16 EMA states stall under round-to-nearest; stochastic rounding (memkernels/ops/rounding.py) does not.

Adam's second moment v <- beta2 v + (1 - beta2) g^2 with beta2 = 0.999 moves by 1e-3 (g^2 / v - 1) of itself a
step, while half a bfloat16 ulp is 2**-9 to 2**-8 of it: round-to-nearest drops every decrease and every
increase short of g^2 > 3 to 5 v, so once v is of the size of g^2 it only moves on rare large gradients, upwards.
This runs the EMAs m (beta1 = 0.9) and v (beta2 = 0.999) of one tensor's gradients, stored in float32, in
bfloat16 rounded to nearest (torch's .to()) and in bfloat16 rounded stochastically (random_bits of
tensor_key(seed, step, 0), round_bf16), the math in float32 for all three, and prints each bfloat16 state's
error against float32 over time and how many of its elements moved per step.

Gradients: g = s(t) z, z standard normal per element and step, the scale s(t) 1e-2 for the first quarter of the
steps, falling geometrically to 1e-3 over the second quarter, then 1e-3, and 3e-3 from three quarters on.

    python bench/bf16_stall.py                       # 20,000 steps of 4096 elements (about 15 s on one core)
    python bench/bf16_stall.py --steps 4000 --numel 1024
"""
from __future__ import annotations

import argparse

import torch

from memkernels.ops.rounding import random_bits, round_bf16, tensor_key

BETA1, BETA2 = 0.9, 0.999


def scale(step: int, steps: int) -> float:
    quarter = steps / 4
    if step < quarter:
        return 1e-2
    if step < 2 * quarter:
        return 1e-2 * 0.1 ** ((step - quarter) / quarter)
    return 1e-3 if step < 3 * quarter else 3e-3


class Ema:
    """One EMA of a tensor, kept as float32, bfloat16 to nearest and bfloat16 stochastically rounded."""

    def __init__(self, beta: float, numel: int):
        self.beta = beta
        self.fp32 = torch.zeros(numel)
        self.nearest = torch.zeros(numel, dtype=torch.bfloat16)
        self.stochastic = torch.zeros(numel, dtype=torch.bfloat16)
        self.moved = {"nearest": 0, "stochastic": 0}  # element-steps that changed the stored value
        self.last_move = {"nearest": 0, "stochastic": 0}  # the last step that changed any element

    def update(self, step: int, x: torch.Tensor, bits: torch.Tensor) -> None:
        self.fp32.mul_(self.beta).add_(x, alpha=1 - self.beta)
        for name in self.moved:
            old = getattr(self, name)
            new = old.float().mul_(self.beta).add_(x, alpha=1 - self.beta)  # the math in float32
            new = new.to(torch.bfloat16) if name == "nearest" else round_bf16(new, bits)
            moved = int((new != old).sum())
            self.moved[name] += moved
            if moved:
                self.last_move[name] = step
            setattr(self, name, new)

    def errors(self, relative_to_each: bool) -> dict[str, tuple[float, float]]:
        """(error, bias) of each bfloat16 copy: the median of |x - fp32| / fp32 per element and the mean of
        (x - fp32) / fp32 for a positive state (v); ||x - fp32|| / ||fp32|| and 0 for a signed one (m)."""
        out = {}
        for name in self.moved:
            diff = getattr(self, name).double() - self.fp32.double()
            if relative_to_each:
                rel = diff / self.fp32.double()
                out[name] = (rel.abs().median().item(), rel.mean().item())
            else:
                out[name] = ((diff.norm() / self.fp32.double().norm()).item(), 0.0)
        return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--numel", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)
    index = torch.arange(args.numel, dtype=torch.int64)
    m, v = Ema(BETA1, args.numel), Ema(BETA2, args.numel)
    rows = sorted({s for s in (100, 300, 1000, 2000, 3000, 5000, 7500, 10_000, 12_500, 15_000, 17_500, 20_000)
                   if s <= args.steps} | {args.steps})
    print(f"{args.numel} elements, g = s(t) N(0, 1); errors against the float32 EMA; "
          "moved: share of elements whose stored value changed per step since the previous row")
    print(f"{'step':>6} {'s(t)':>8} | {'v: median |rel err|':>21} {'v: mean rel err':>17} {'v moved':>15} | "
          f"{'m: rel L2 err':>15} {'m moved':>15}")
    print(f"{'':>6} {'':>8} | {'nearest  stoch.':>21} {'nearest  stoch.':>17} {'nearest stoch.':>15} | "
          f"{'nearest stoch.':>15} {'nearest stoch.':>15}")
    last = 0
    for step in range(1, args.steps + 1):
        g = torch.randn(args.numel, generator=gen) * scale(step - 1, args.steps)
        # m and v are two tensors of the step: keys 0 and 1
        m.update(step, g, random_bits(tensor_key(args.seed, step, 0), index))
        v.update(step, g * g, random_bits(tensor_key(args.seed, step, 1), index))
        if step in rows:
            per_step = (step - last) * args.numel
            ve, me = v.errors(True), m.errors(False)
            vm = {k: n / per_step for k, n in v.moved.items()}
            mm = {k: n / per_step for k, n in m.moved.items()}
            print(f"{step:>6} {scale(step - 1, args.steps):>8.1e} | {ve['nearest'][0]:>10.2e} "
                  f"{ve['stochastic'][0]:>10.2e} {ve['nearest'][1]:>+8.1e} {ve['stochastic'][1]:>+8.1e} "
                  f"{vm['nearest']:>7.1%} {vm['stochastic']:>7.1%} | {me['nearest'][0]:>7.1e} "
                  f"{me['stochastic'][0]:>7.1e} {mm['nearest']:>7.1%} {mm['stochastic']:>7.1%}")
            for ema in (m, v):
                ema.moved = dict.fromkeys(ema.moved, 0)
            last = step
    print("the last step that changed any element of v: " +
          ", ".join(f"{name} {at}" for name, at in v.last_move.items()))


if __name__ == "__main__":
    main()
