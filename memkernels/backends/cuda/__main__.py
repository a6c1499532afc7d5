"""python -m memkernels.backends.cuda: build libmemkernels_cuda.so (by default into the package, where it is
loaded as the packaged library), e.g. here for a GPU machine elsewhere."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._build import ARCHS_ENV, DEFAULT_ARCHS, BuildError, build, packaged_library, requested_archs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memkernels.backends.cuda",
                                     description="Build libmemkernels_cuda.so from csrc/ with nvcc.")
    parser.add_argument("--archs", default=None, help=f"e.g. 'sm_90' (default: ${ARCHS_ENV} or {DEFAULT_ARCHS!r})")
    parser.add_argument("--out", type=Path, default=packaged_library(), help="output path (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel nvcc processes")
    parser.add_argument("--resource-usage", action="store_true", help="print ptxas register/spill reports")
    args = parser.parse_args(argv)
    try:
        result = build(args.out, args.archs, jobs=args.jobs, resource_usage=args.resource_usage)
    except (BuildError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.resource_usage:
        print(result.log)
    print(f"built {result.path} for {args.archs or requested_archs()} in {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
