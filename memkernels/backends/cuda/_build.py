"""Building libmemkernels_cuda.so from csrc/ and the op specs (memkernels/ops/) with nvcc.

Used by setup.py (at install, when nvcc is there), by _cache (a first-use build into the per-user cache)
and by `python -m memkernels.backends.cuda` (a build to carry elsewhere). Standard library only: setup.py
loads it and _layout without importing memkernels (which needs torch), and it reads the op specs from
memkernels/ops/ the same way (op_specs).

Each op's part of the ABI is generated from its spec (_layout) into the build's include directory, and
csrc/op.cu is compiled once per op. The library embeds a hash of the sources it was built from, the
generated headers included; a library whose hash differs from that of the sources beside it is stale.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from . import _layout

if TYPE_CHECKING:  # not imported: the op modules need torch (op_specs reads them without)
    from ...ops.spec import OpSpec

LIB_NAME = "libmemkernels_cuda.so"
COMMON_SOURCE, OP_SOURCE = "common.cu", "op.cu"  # op.cu: compiled once per op, with -DMK_OP=<op>
DEFAULT_ARCHS = "sm_80;sm_90+PTX"
ARCHS_ENV = "MEMKERNELS_CUDA_ARCHS"
PACKAGE_DIR = Path(__file__).resolve().parents[2]  # memkernels/
# Device flags: no FMA contraction, so the device math rounds exactly as math.h does on
# the host (tests/test_cuda_host.py); the kernels are memory-bound, FMAs would buy nothing.
NVCC_FLAGS = ("-O3", "-std=c++17", "--fmad=false", "-Xcompiler", "-fPIC,-fno-math-errno,-fvisibility=hidden")
LINK_FLAGS = ("-shared", "-cudart", "static", "-Xlinker", "--exclude-libs,ALL")


class BuildError(RuntimeError):
    """nvcc failed; the message holds the command and its output."""


@dataclass
class BuildResult:
    path: Path
    seconds: float
    log: str  # nvcc's output, ptxas resource reports included


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, PATH, or /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.access(Path(root) / "bin" / "nvcc", os.X_OK):
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if os.access(default, os.X_OK) else None


def source_dir() -> Path | None:
    """csrc/ beside the package (a checkout) or memkernels/_csrc (a wheel); None if neither."""
    for candidate in (PACKAGE_DIR / "_csrc", PACKAGE_DIR.parent / "csrc"):
        if (candidate / "include" / "memkernels" / "math.h").is_file():
            return candidate
    return None


def _stand_in(module: str) -> types.ModuleType:
    """A module whose every public attribute is a function that says it is not loaded here (a module's own
    dunder attributes, such as __file__, stay missing)."""
    stand_in = types.ModuleType(module)

    def attribute(name: str) -> Callable[..., Any]:
        if name.startswith("__"):
            raise AttributeError(name)

        def not_loaded(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"{module}.{name} is not loaded in the CUDA build (memkernels/backends/cuda/_build.py)")
        return not_loaded

    stand_in.__getattr__ = attribute  # type: ignore[method-assign]
    return stand_in


_ROOT = "_memkernels_build"  # the package name the op modules are read under


@functools.lru_cache(maxsize=None)
def op_specs() -> Mapping[str, OpSpec]:
    """memkernels.ops.SPECS, read from this package's files without importing memkernels (setup.py runs
    without torch). At import the op modules only take names from reference.py, coefficients.py and torch
    (their math runs when called, never here), so stand-in modules take those places (torch's only where
    torch is missing, and only while the modules load)."""
    stand_ins = {name: _stand_in(name) for name in (f"{_ROOT}.reference", f"{_ROOT}.coefficients")}
    if importlib.util.find_spec("torch") is None:
        stand_ins["torch"] = _stand_in("torch")
    root = types.ModuleType(_ROOT)
    root.__path__ = []
    sys.modules.update({_ROOT: root, **stand_ins})
    try:
        spec = importlib.util.spec_from_file_location(f"{_ROOT}.ops", PACKAGE_DIR / "ops" / "__init__.py",
                                                      submodule_search_locations=[str(PACKAGE_DIR / "ops")])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses and relative imports look their modules up there
        spec.loader.exec_module(module)
    finally:  # the specs keep what they need; nothing read here stays importable
        for name in [name for name in sys.modules if name == _ROOT or name.startswith(_ROOT + ".")]:
            del sys.modules[name]
        if "torch" in stand_ins:
            del sys.modules["torch"]
    return module.SPECS


def generated_headers() -> dict[str, str]:
    """The headers generated from the op specs, by their path under the build's include directory."""
    return _layout.headers(op_specs())


def write_headers(include: Path, headers: Mapping[str, str]) -> None:
    for name, text in headers.items():
        (include / name).parent.mkdir(parents=True, exist_ok=True)
        (include / name).write_text(text)


def _library_sources(src: Path) -> list[Path]:
    return [src / COMMON_SOURCE, src / OP_SOURCE] + sorted(p for p in (src / "include").rglob("*") if p.is_file())


def source_hash(src: Path, headers: Mapping[str, str] | None = None) -> str:
    """sha256 over the names and contents of everything the library is built from: the sources and the
    generated headers (by default those of the op specs)."""
    headers = generated_headers() if headers is None else headers
    digest = hashlib.sha256()
    for path in _library_sources(src):
        digest.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes() + b"\0")
    for name, text in sorted(headers.items()):
        digest.update(f"generated/{name}".encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()[:16]


def parse_archs(spec: str) -> list[tuple[str, bool]]:
    """'sm_80;sm_90+PTX' (also '80,90', '8.0 9.0+ptx') -> [('80', False), ('90', True)]."""
    archs = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d*[af]?)(\+ptx)?", item, re.IGNORECASE)
        if m is None:
            raise ValueError(f"{ARCHS_ENV}: cannot read architecture {item!r} (write e.g. 'sm_80;sm_90+PTX')")
        archs.append((m.group(1) + m.group(2), m.group(3) is not None))
    if not archs:
        raise ValueError(f"{ARCHS_ENV} names no architecture: {spec!r}")
    return archs


def gencode_flags(spec: str) -> list[str]:
    flags = []
    for arch, ptx in parse_archs(spec):
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def requested_archs() -> str:
    return os.environ.get(ARCHS_ENV) or DEFAULT_ARCHS


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"nvcc failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


def build(out: Path, archs: str | None = None, *, nvcc: str | None = None, src: Path | None = None,
          jobs: int | None = None, resource_usage: bool = False) -> BuildResult:
    """Generate the op headers, compile common.cu and op.cu for each op (in parallel) and link out atomically;
    raise BuildError on failure."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    src = src or source_dir()
    if src is None:
        raise BuildError("the CUDA sources (csrc/) are not beside this copy of memkernels")
    archs = archs or requested_archs()
    gencode = gencode_flags(archs)
    headers = generated_headers()
    extra = ["-Xptxas", "-v"] if resource_usage else []
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memkernels-build-") as tmp:
        include = Path(tmp) / "include"
        write_headers(include, headers)
        compile_flags = [nvcc, *NVCC_FLAGS, *gencode, *extra, f"-I{include}", f"-I{src / 'include'}", "-c"]
        objects = {Path(tmp) / "common.o": [f'-DMK_SOURCE_HASH="{source_hash(src, headers)}"',
                                             f'-DMK_ARCHS="{archs}"', str(src / COMMON_SOURCE)]}
        for op in op_specs():
            objects[Path(tmp) / f"op_{op}.o"] = [f"-DMK_OP={op}", str(src / OP_SOURCE)]
        commands = [[*compile_flags, *args, "-o", str(obj)] for obj, args in objects.items()]
        workers = jobs or min(len(commands), os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            logs = list(pool.map(_run, commands))
        staged = Path(tmp) / LIB_NAME
        logs.append(_run([nvcc, *LINK_FLAGS, *gencode, *map(str, objects), "-o", str(staged)]))
        fd, partial = tempfile.mkstemp(prefix=LIB_NAME + ".", dir=out.parent)
        os.close(fd)
        shutil.copyfile(staged, partial)
        os.chmod(partial, 0o755)
        os.replace(partial, out)
    return BuildResult(out, time.perf_counter() - start, "".join(logs))


def packaged_library() -> Path:
    """Where setup.py puts the library it builds at install."""
    return PACKAGE_DIR / "_lib" / LIB_NAME
