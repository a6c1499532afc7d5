"""A LightningModule whose configure_optimizers returns a memkernels optimizer with a memory correction.

    pip install lightning scikit-learn
    python examples/lightning_module.py
    python examples/lightning_module.py --steps 30 --hidden 16      # a quick run

In automatic optimization Lightning calls optimizer.step(closure), its closure running training_step, zero_grad
and backward. memkernels then estimates H d by the probe: it calls the closure a second time, at a shifted
point on the same batch. So training_step runs twice per optimizer step (the script counts), and any metric it
logs sees both calls: the losses below are evaluated on whole sets before and after training instead.

Data: scikit-learn's 8x8 digits (1,797 images, shipped with the package; no download). The last line reads
`loss <before> -> <after>` (held-out loss).
"""
from __future__ import annotations

import argparse
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import memkernels as mk


class DigitsMLP(L.LightningModule):
    def __init__(self, hidden: int, lr: float, alpha: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
        self.training_steps = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.training_steps += 1
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> mk.AdamW:
        # track_memory=10: memory_stats() at alpha = 0 too, measured in one step of 10 (a correction measures
        # every step)
        return mk.AdamW(self.parameters(), lr=self.hparams.lr, memory_correction=self.hparams.alpha,
                        track_memory=10)

    def on_train_end(self) -> None:
        # The optimizer Lightning stepped, unwrapped: its last step's memory diagnostics (README: what they mean).
        stats = self.optimizers().optimizer.memory_stats()[0]
        print("memory_stats:", {k: round(v, 6) for k, v in stats.items()})


def load(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """Training and held-out digits (pixels scaled to [0, 1]); every fifth image, after a shuffle, held out."""
    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32) / 16.0, torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[::5], order[torch.arange(len(y)) % 5 != 0]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def loss_on(model: nn.Module, data: TensorDataset) -> float:
    with torch.no_grad():
        x, y = data.tensors
        return F.cross_entropy(model(x), y).item()


def main(argv: list[str] | None = None) -> tuple[float, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--alpha", type=float, default=-1.0, help="memory_correction: 0 is the plain AdamW")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    train, test = load(args.seed)
    model = DigitsMLP(args.hidden, args.lr, args.alpha)
    first = loss_on(model, test)
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")  # in-memory tensors need none
        trainer.fit(model, DataLoader(train, batch_size=args.batch, shuffle=True))
    train_loss, last = loss_on(model, train), loss_on(model, test)
    print(f"after {args.steps} steps: training loss {train_loss:.4f}, held-out loss {last:.4f}; "
          f"training_step calls per step: {model.training_steps / trainer.global_step:g}")
    print(f"loss {first:.6f} -> {last:.6f}")
    return first, last


if __name__ == "__main__":
    main()
