"""A whole training step (forward, backward, memkernels' AdamW) recorded once as a CUDA graph, then replayed.

    python examples/compile_cuda_graphs.py               # needs a CUDA device
    python examples/compile_cuda_graphs.py --steps 50    # a quick run

torch.compile fuses the model's kernels; the CUDA graph removes the per-kernel launch cost of everything in
the step, the optimizer included. What makes the optimizer capturable (capturable=True): its step count lives
on the GPU, the learning rate is a GPU tensor the graph reads (a schedule writes it in place between replays),
and nothing in the step reads a value back to the host. A graph replays fixed addresses, so every input is
copied into static tensors and the gradients are zeroed in place, never set to None.

The model predicts each byte of the Python standard library's sources from the bytes before it
(memkernels.bench.lm; no download). The last line reads `loss <first> -> <last>` (the losses of the first
and the last minibatch).
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import memkernels as mk
from memkernels.bench.lm import stdlib_text

WARMUP = 3  # eager steps before the capture: they compile the model and create the optimizer's state


def main(argv: list[str] | None = None) -> tuple[float, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=8, help="bytes seen before the one predicted")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--alpha", type=float, default=-1.0, help="memory_correction: 0 is the plain AdamW")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("compile_cuda_graphs.py needs a CUDA device")

    torch.manual_seed(args.seed)
    train_bytes, held_out_bytes = (t.cuda() for t in stdlib_text(4_000_000))
    offsets = torch.arange(args.context + 1, device="cuda")

    def windows(data: Tensor, count: int) -> tuple[Tensor, Tensor]:
        """count random windows: context bytes, and the byte after them (drawn on the GPU: no host sync)."""
        w = data[torch.randint(len(data) - args.context, (count, 1), device="cuda") + offsets]
        return w[:, :-1], w[:, -1]

    model = nn.Sequential(nn.Embedding(256, 32), nn.Flatten(), nn.Linear(32 * args.context, args.hidden),
                          nn.Tanh(), nn.Linear(args.hidden, 256)).cuda()
    lr = torch.tensor(args.lr, device="cuda")
    # A graph cannot call a closure, so the correction estimates H d from the change of the gradient between
    # steps (hvp="trajectory"), every step (capturable=True allows no hvp_every > 1).
    opt = mk.AdamW(model.parameters(), lr=lr, capturable=True, memory_correction=args.alpha, hvp="trajectory")
    forward = torch.compile(model)
    static_x, static_y = windows(train_bytes, args.batch)  # their contents change, never their addresses

    def train_step() -> Tensor:
        opt.zero_grad(set_to_none=False)  # in place: backward then accumulates into the same gradient tensors
        loss = F.cross_entropy(forward(static_x), static_y)
        loss.backward()
        opt.step()
        return loss

    def next_batch(n: int) -> None:
        x, y = windows(train_bytes, args.batch)
        static_x.copy_(x)
        static_y.copy_(y)
        lr.fill_(args.lr * 0.5 * (1 + math.cos(math.pi * n / args.steps)))  # cosine decay, written in place

    # Warm-up on a side stream, as torch's CUDA graph docs ask: the compiled kernels, the optimizer's state and
    # its kernels' pointer tables exist before the capture, which so records only the steady-state step.
    losses = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for n in range(WARMUP):
            next_batch(n)
            losses.append(train_step().detach())
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = train_step()  # recorded, not run: replay() runs it on whatever static_x, static_y, lr hold
    for n in range(WARMUP, args.steps):
        next_batch(n)
        graph.replay()
        losses.append(static_loss.detach().clone())

    with torch.no_grad():
        x_test, y_test = windows(held_out_bytes, 10_000)
        print(f"held-out loss {F.cross_entropy(model(x_test), y_test).item():.4f}")
    print("memory_stats:", {k: round(v, 6) for k, v in opt.memory_stats()[0].items()})
    print(f"loss {losses[0].item():.6f} -> {losses[-1].item():.6f}")
    return losses[0].item(), losses[-1].item()


if __name__ == "__main__":
    main()
