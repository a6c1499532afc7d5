"""The `memkernels` command: `bench` (speed, optimizer memory, theory, implicit-regularization and convergence
suites) and `info`."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import warnings

import torch

from . import __version__, backends
from .bench.peers import LIBRARIES as PEER_LIBRARIES
from .bench.report import SUITES


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
    if backends.status()["numba"].startswith("available"):
        from .backends import numba as numba_backend
        lines.append(f"  numba kernels: {numba_backend.numba_status()}")
    if backends.status()["cuda"].startswith("available"):
        from .backends import cuda
        lines.append(f"  cuda library: {cuda.LIBRARY_ORIGIN}")
    forced = os.environ.get("MEMKERNELS_BACKEND")
    if forced:
        lines.append(f"MEMKERNELS_BACKEND={forced!r}: optimizers made with backend='auto' use it")
    for device_type in backends.PREFERENCE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reasons are listed above
            try:
                chosen = backends.resolve("adamw", "auto", device_type)[0]
            except (backends.BackendUnavailable, ValueError) as exc:  # what a step would raise, shown
                chosen = f"none: {exc}"
        lines.append(f"auto on {device_type} tensors: {chosen}")
    return "\n".join(lines)


def add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench", help="speed vs anchors, optimizer memory, order of accuracy, implicit regularization: JSON, PNGs, "
                      "report.md",
        description="Run the benchmark suites and write <suite>.json, PNG plots and report.md into --out.")
    mode = bench.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="the default: small sizes on the CPU (4M parameters, GPT-2 shapes / 4)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="64M (CPU) or 256M (GPU) parameters, the real GPT-2-small shapes, more repeats and steps")
    mode.add_argument("--tiny", dest="mode", action="store_const", const="tiny",
                      help="seconds: checks that the harness runs; its figures mean nothing")
    bench.set_defaults(mode="quick")
    bench.add_argument("--suite", nargs="+", choices=(*SUITES, "all"),
                       help="which suites to run (default: speed, memory, theory and implicit; all adds "
                            "convergence, which takes minutes even with --quick)")
    bench.add_argument("--out", default="bench-out", help="output folder (default: ./bench-out)")
    bench.add_argument("--backends", nargs="+", choices=backends.BACKENDS,
                       help="memkernels backends the speed and memory suites run (default: every one available)")
    bench.add_argument("--size", type=int, help="parameters of the speed suite's large tensor")
    bench.add_argument("--device", default="auto",
                       help="speed and memory suites' device: auto (CUDA if present), cpu, cuda")
    bench.add_argument("--peers", nargs="+", choices=PEER_LIBRARIES + ("none",),
                       help="other libraries whose optimizers the speed and memory suites run beside torch's "
                            "(default: all, none with --full; one that cannot run is listed with why)")
    bench.add_argument("--math-backend", default="reference", choices=("auto",) + backends.BACKENDS,
                       help="backend of the theory and implicit suites' optimizers, whose tensors are tiny "
                            "(default: reference, the executable spec)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        from .bench.report import summary_lines
        from .bench.run import DEFAULT_SUITES, SUITES, configs, run
    except ModuleNotFoundError as exc:  # matplotlib, tqdm or scikit-learn: the bench extra
        parser.error(f"memkernels bench needs {exc.name}: pip install 'memkernels[bench]'")

    suites = list(DEFAULT_SUITES if args.suite is None else SUITES if "all" in args.suite else args.suite)
    peers = None if args.peers is None else tuple(p for p in args.peers if p != "none")
    options = dict(device=args.device, backends=args.backends, size=args.size, math_backend=args.math_backend,
                   peers=peers)
    try:
        configs(args.mode, **options)
    except ValueError as exc:  # a bad option: say which, without a traceback
        parser.error(str(exc))
    path = run(suites, args.mode, args.out, progress=not args.no_progress, **options)
    print("\n".join([*summary_lines(path.parent), f"report: {path}"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info_parser = sub.add_parser("info", help="versions, devices, backends and why the others are unavailable")
    info_parser.add_argument("--warm", action="store_true",
                             help="first build the numba kernels of the usual training modes into the disk cache "
                                  "(once; a first step then waits for none of them)")
    add_bench(sub)
    args = parser.parse_args(argv)
    if args.command == "info":
        if args.warm:
            if not backends.status()["numba"].startswith("available"):
                parser.error(f"--warm builds numba kernels, and numba is {backends.status()['numba']}")
            from .warm import warm
            print(warm())
        print(info())
    elif args.command == "bench":
        return bench(args, parser)
    return 0


if __name__ == "__main__":
    sys.exit(main())
