"""setup.py: builds libmemkernels_cuda.so from csrc/ with nvcc when nvcc is there.

Without nvcc the install is pure Python (the cuda backend then builds the library
on first use if nvcc appears later, or reports itself unavailable). The build
logic lives in memkernels/backends/cuda/_build.py, loaded here by path because
importing the package needs torch. Environment:
  MEMKERNELS_CUDA_ARCHS   architectures, default "sm_80;sm_90+PTX"
  MEMKERNELS_CUDA_BUILD=0 skip the nvcc build even when nvcc is there
"""
import importlib
import os
import shutil
import sys
import types
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _load_build_module():
    """memkernels/backends/cuda/_build.py: its folder is registered as a package of its own, without running the
    folder's __init__.py (the backend, which needs torch), so that _build imports only what it names beside it."""
    package = types.ModuleType("_memkernels_cuda")
    package.__path__ = [str(ROOT / "memkernels" / "backends" / "cuda")]
    sys.modules[package.__name__] = package
    return importlib.import_module(f"{package.__name__}._build")


cuda_build = _load_build_module()
WANT_CUDA = os.environ.get("MEMKERNELS_CUDA_BUILD", "1") != "0" and cuda_build.find_nvcc() is not None


class BuildPyWithCuda(build_py):
    """build_py, plus the CUDA library (when nvcc is there) and the CUDA sources (for first-use builds)."""

    def run(self):
        super().run()
        editable = getattr(self, "editable_mode", False)
        package = ROOT / "memkernels" if editable else Path(self.build_lib) / "memkernels"
        if not editable:  # a wheel carries csrc/ so that a later first use can build with nvcc
            shutil.copytree(ROOT / "csrc", package / "_csrc", dirs_exist_ok=True)
        if WANT_CUDA:
            out = package / "_lib" / cuda_build.LIB_NAME
            print(f"memkernels: building {out} for {cuda_build.requested_archs()} with nvcc")
            try:
                result = cuda_build.build(out, src=ROOT / "csrc")
            except cuda_build.BuildError as exc:
                raise SystemExit(f"{exc}\nmemkernels: the nvcc build failed; set MEMKERNELS_CUDA_BUILD=0 "
                                 "for a pure-Python install") from exc
            print(f"memkernels: built {out} in {result.seconds:.0f} s")


class PlatformDistribution(Distribution):
    """A wheel holding the compiled library is platform-specific."""

    def has_ext_modules(self):
        return WANT_CUDA


setup(cmdclass={"build_py": BuildPyWithCuda}, distclass=PlatformDistribution)
