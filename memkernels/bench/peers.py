"""Other libraries' optimizers, timed beside torch's and memkernels' in the speed suite.

Each peer is a row named after its optimizer (AdamW or Lion), so its paired ratio
is taken to the same counterpart as memkernels' row of that optimizer. A peer that
cannot run here is not skipped: the row is listed with what its library said when
it was tried (import, construction or first step), and the library's version.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
from typing import Any, Callable, Iterator, NamedTuple

import torch

from .limit import ADAMW, ADAMW_8BIT, ADAMW_KAHAN_BF16, LION_8BIT, LION_KAHAN_BF16, SIGN, Traffic

ADAMW_HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)  # torch.optim.AdamW's defaults
LION_HYPER = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)  # lion_pytorch's
LIBRARIES = ("bitsandbytes", "torch-optimi", "torchao", "deepspeed")  # distribution names


class Peer(NamedTuple):
    optimizer: str  # "AdamW" or "Lion": the row's name
    implementation: str
    library: str  # its distribution, one of LIBRARIES
    passes: tuple[Traffic, ...]  # its byte model (limit.py)
    make: Callable[[list], Any]  # the optimizer over a list of parameters (imports its library)
    dtype: torch.dtype = torch.float32  # of its parameters and gradients (and so of its states)


def version(library: str) -> str:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Logging below ERROR off while a peer is imported and built: on a CPU machine bitsandbytes and torchao log
    at import that their GPU or 4-bit extras are missing, over the progress bar; whether the optimizer runs is
    what its row reports."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(before)


def _bitsandbytes(cls: str, hyper: dict) -> Callable[[list], Any]:
    def make(params: list) -> Any:
        import bitsandbytes
        return getattr(bitsandbytes.optim, cls)(params, **hyper)
    return make


def _optimi(cls: str, hyper: dict, **options: Any) -> Callable[[list], Any]:
    def make(params: list) -> Any:
        import optimi
        return getattr(optimi, cls)(params, **hyper, **options)
    return make


def _torchao(cls: str, hyper: dict) -> Callable[[list], Any]:
    def make(params: list) -> Any:
        from torchao import optim
        return getattr(optim, cls)(params, **hyper)
    return make


def _deepspeed(device: torch.device) -> Callable[[list], Any]:
    def make(params: list) -> Any:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        if device.type != "cpu":
            raise RuntimeError(f"DeepSpeedCPUAdam updates CPU tensors only; this run is on {device.type}")
        return DeepSpeedCPUAdam(params, adamw_mode=True, **ADAMW_HYPER)
    return make


def rows(device: torch.device, libraries: tuple[str, ...] | None = None) -> list[Peer]:
    """The peer rows of `libraries` (None: all of LIBRARIES)."""
    unknown = set(libraries or ()) - set(LIBRARIES)
    if unknown:
        raise ValueError(f"unknown peer librar{'ies' if len(unknown) > 1 else 'y'} {sorted(unknown)}; "
                         f"choose from {LIBRARIES}")
    bf16 = torch.bfloat16
    rows = [
        Peer("AdamW", "bitsandbytes AdamW32bit", "bitsandbytes", (ADAMW,), _bitsandbytes("AdamW32bit", ADAMW_HYPER)),
        Peer("AdamW", "bitsandbytes AdamW8bit (8-bit states)", "bitsandbytes", (ADAMW_8BIT,),
             _bitsandbytes("AdamW8bit", ADAMW_HYPER)),
        Peer("Lion", "bitsandbytes Lion32bit", "bitsandbytes", (SIGN,), _bitsandbytes("Lion32bit", LION_HYPER)),
        Peer("Lion", "bitsandbytes Lion8bit (8-bit state)", "bitsandbytes", (LION_8BIT,),
             _bitsandbytes("Lion8bit", LION_HYPER)),
        Peer("AdamW", "torch-optimi AdamW", "torch-optimi", (ADAMW,), _optimi("AdamW", ADAMW_HYPER)),
        # optimi's Kahan summation is for 16-bit parameters: on fp32 ones it is off whatever kahan_sum says
        Peer("AdamW", "torch-optimi AdamW, bf16 + Kahan summation", "torch-optimi", (ADAMW_KAHAN_BF16,),
             _optimi("AdamW", ADAMW_HYPER, kahan_sum=True), bf16),
        Peer("Lion", "torch-optimi Lion", "torch-optimi", (SIGN,), _optimi("Lion", LION_HYPER)),
        Peer("Lion", "torch-optimi Lion, bf16 + Kahan summation", "torch-optimi", (LION_KAHAN_BF16,),
             _optimi("Lion", LION_HYPER, kahan_sum=True), bf16),
        Peer("AdamW", "torchao AdamW8bit (8-bit states)", "torchao", (ADAMW_8BIT,), _torchao("AdamW8bit", ADAMW_HYPER)),
        Peer("AdamW", "DeepSpeedCPUAdam", "deepspeed", (ADAMW,), _deepspeed(device)),
    ]
    return [p for p in rows if libraries is None or p.library in libraries]
