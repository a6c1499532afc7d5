"""Warnings that point at the caller's line (its step() or constructor call), however deep in the optimizer
or in torch.optim's wrappers they are raised."""
from __future__ import annotations

import os
import sys
import warnings

import torch

_INSIDE = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def warn(message: str, category: type[Warning]) -> None:
    frame, level = sys._getframe(1), 2  # stacklevel 2: warn's caller
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
