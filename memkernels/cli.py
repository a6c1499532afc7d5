"""The `memkernels` command: `info` (what runs here and why the rest does not)."""
from __future__ import annotations

import argparse
import platform
import sys
import warnings

import torch

from . import __version__, backends


def info() -> str:
    lines = [f"memkernels {__version__}", f"python {platform.python_version()}, torch {torch.__version__}",
             f"cpu: {platform.machine()}, {torch.get_num_threads()} threads"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            lines.append(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        lines.append("cuda: no CUDA device visible to torch")
    lines.append("backends:")
    for name, state in backends.status().items():
        lines.append(f"  {name:<10} {state}")
    for device_type in backends.PREFERENCE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reasons are listed above
            chosen, _ = backends.resolve("adamw", "auto", device_type)
        lines.append(f"auto on {device_type} tensors: {chosen}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, backends and why the others are unavailable")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
