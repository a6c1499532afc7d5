"""Real data that needs no download: the Python standard library's sources as bytes, and a small byte-level GPT.

Used by the speed suite's training-step table and by examples/char_lm.py.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from torch import Tensor, nn


def stdlib_text(limit: int) -> tuple[Tensor, Tensor]:
    """(training bytes, held-out bytes) of the standard library's .py files (not its tests), at most `limit` bytes.

    Files in sorted order, every tenth held out whole, so nothing of a held-out file is seen in training.
    """
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    files = [f for f in files if "site-packages" not in f.parts and "test" not in f.parts]
    parts: tuple[list[bytes], list[bytes]] = ([], [])
    total = 0
    for i, f in enumerate(files):
        data = f.read_bytes()
        parts[i % 10 == 9].append(data)
        total += len(data)
        if total >= limit:
            break
    return tuple(torch.frombuffer(bytearray(b"".join(p)), dtype=torch.uint8).long() for p in parts)


class TinyGPT(nn.Module):
    """Byte embedding, learned positions, pre-norm causal self-attention blocks, an output layer tied to the
    embedding."""

    def __init__(self, context: int, width: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        nn.init.normal_(self.embed.weight, std=0.02)  # also the output layer: logits start near 0
        self.position = nn.Parameter(torch.zeros(context, width))
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[1]
        h = self.embed(x) + self.position[:n]
        h = self.blocks(h, mask=self.mask[:n, :n], is_causal=True)
        return self.norm(h) @ self.embed.weight.T


def batch(data: Tensor, size: int, context: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """`size` random windows of context + 1 bytes: inputs and next-byte targets."""
    start = torch.randint(0, len(data) - context - 1, (size,), generator=gen)
    window = torch.stack([data[s:s + context + 1] for s in start.tolist()])
    return window[:, :-1], window[:, 1:]
