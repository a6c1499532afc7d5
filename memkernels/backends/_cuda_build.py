"""Building libmemkernels_cuda.so from csrc/ with nvcc, and finding a built one.

Used by setup.py (at install, when nvcc is there), by the cuda backend (first use,
into a per-user cache) and by `python -m memkernels.backends._cuda_build` (a build to
carry elsewhere). Standard library only: setup.py loads this file without importing
the package (which needs torch).

The library embeds a hash of the sources it was built from; a library whose hash
differs from the sources beside it is stale and is not loaded (it is rebuilt).

The per-user cache is $XDG_CACHE_HOME/memkernels (else ~/.cache/memkernels), one 0700
directory per source hash and architectures. Loading a .so runs its code, and the hash
check only guards against stale builds, not planted ones; so a cached library is loaded
only when it, its directory and the cache directory are real files/directories (no
symlinks) owned by you and writable by no one else, and the build lock is opened without
following symlinks or truncating. MEMKERNELS_CUDA_LIB (your own choice) and the library
packaged inside the install are trusted as they are.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

LIB_NAME = "libmemkernels_cuda.so"
SOURCES = ("common.cu", "adamw.cu", "lion.cu", "sgd.cu")
DEFAULT_ARCHS = "sm_80;sm_90+PTX"
ARCHS_ENV = "MEMKERNELS_CUDA_ARCHS"
LIB_ENV = "MEMKERNELS_CUDA_LIB"  # load this library as is (no hash check, no build)
PACKAGE_DIR = Path(__file__).resolve().parents[1]
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


def _library_sources(src: Path) -> list[Path]:
    return [src / name for name in SOURCES] + sorted(p for p in (src / "include").rglob("*") if p.is_file())


def source_hash(src: Path) -> str:
    """sha256 over the names and contents of everything the library is built from."""
    digest = hashlib.sha256()
    for path in _library_sources(src):
        digest.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes() + b"\0")
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
    """Compile csrc/*.cu (in parallel) and link out atomically; raise BuildError on failure."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    src = src or source_dir()
    if src is None:
        raise BuildError("the CUDA sources (csrc/) are not beside this copy of memkernels")
    archs = archs or requested_archs()
    gencode = gencode_flags(archs)
    defines = [f'-DMK_SOURCE_HASH="{source_hash(src)}"', f'-DMK_ARCHS="{archs}"']
    extra = ["-Xptxas", "-v"] if resource_usage else []
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memkernels-build-") as tmp:
        objects = [Path(tmp) / (name + ".o") for name in SOURCES]
        commands = [[nvcc, *NVCC_FLAGS, *gencode, *defines, *extra, f"-I{src / 'include'}", "-c",
                     str(src / name), "-o", str(obj)] for name, obj in zip(SOURCES, objects)]
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


# ------------------------------------------------------------------------ finding one

def packaged_library() -> Path:
    return PACKAGE_DIR / "_lib" / LIB_NAME


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "memkernels"


def cached_library(src: Path, archs: str) -> Path:
    tag = re.sub(r"[^A-Za-z0-9_.+-]+", "_", archs)
    return cache_dir() / f"{source_hash(src)}-{tag}" / LIB_NAME


def embedded_hash(path: Path) -> str | None:
    """The source hash compiled into a library, read from its bytes (no loading)."""
    m = re.search(rb"memkernels-source-hash:([0-9a-f]{16})", path.read_bytes())
    return m.group(1).decode() if m else None


def _my_uid() -> int:
    """The owner a trusted cache path must have (a function so tests can pose as another user)."""
    return os.geteuid()


def private_dir(path: Path) -> None:
    """Create path with mode 0700 (its parents as usual); an existing one is left for untrusted() to judge."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    os.chmod(path, 0o700)  # exactly: an odd umask could have taken our own bits away


def untrusted(path: Path, kind: str) -> str | None:
    """Why a cache path (kind "directory" or "file") must not be used, or None: if it exists, it must be a
    real one of its kind (no symlink), owned by you and writable only by you. The caches hold code (a .so,
    numba's pickles), so this is what stands between another user and code run in your process."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return f"{kind} {path} is a symlink"
    if not (stat.S_ISDIR if kind == "directory" else stat.S_ISREG)(st.st_mode):
        return f"{path} is not a {'regular file' if kind == 'file' else kind}"
    if not hasattr(os, "geteuid"):  # no POSIX owners or modes (Windows): the profile's ACLs guard ~/.cache
        return None
    if st.st_uid != _my_uid():
        return f"{kind} {path} is owned by uid {st.st_uid}"
    writers = [who for bit, who in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "others")) if st.st_mode & bit]
    if writers:
        return f"{kind} {path} is writable by {' and '.join(writers)} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _refusal(library: Path) -> str | None:
    """The reason locate() gives for not loading (or building) library, or None when it may: the cache
    directory, the library's directory and the library (those that exist) must pass untrusted()."""
    problem = (untrusted(cache_dir(), "directory") or untrusted(library.parent, "directory")
               or untrusted(library, "file"))
    if problem is None:
        return None
    return (f"refusing the cached CUDA library {library}: {problem}; the cache directories and the library must "
            f"be owned by you (uid {_my_uid()}), not symlinks, and writable only by you")
@contextlib.contextmanager
def _lock(directory: Path) -> Iterator[None]:
    """Hold directory/.lock exclusively. Opened with O_NOFOLLOW and without truncating, so a planted
    symlink fails (an OSError saying so) rather than clobbering its target."""
    path = directory / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        problem = "is a symlink" if exc.errno == errno.ELOOP else f"cannot be opened ({exc.strerror})"
        raise OSError(f"the build lock {path} {problem}") from exc
    try:
        import fcntl  # POSIX only; here, so that the numba cache, which shares this module's checks, imports anywhere

        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _build_cached(cached: Path, archs: str, nvcc: str, src: Path) -> str | None:
    """Build cached (once, under the cache's lock) into 0700 directories; None or why it is not loadable."""
    try:
        for directory in (cache_dir(), cached.parent):  # each checked before anything is written into it
            private_dir(directory)
            refusal = _refusal(cached)
            if refusal:
                return refusal
        with _lock(cache_dir()):
            if not os.path.lexists(cached):
                print(f"memkernels: building the CUDA library for {archs} into {cached.parent} (once)",
                      file=sys.stderr)
                build(cached, archs, nvcc=nvcc, src=src)
    except OSError as exc:
        return f"cannot build the CUDA library into {cached.parent}: {exc}"
    except BuildError as exc:
        return f"building the CUDA library failed: {exc}"
    return _refusal(cached)


def locate(build_if_missing: bool = True) -> tuple[Path | None, str]:
    """(path of a library to load, how it was found) or (None, why there is none)."""
    explicit = os.environ.get(LIB_ENV)
    if explicit:
        path = Path(explicit)
        return (path, f"{LIB_ENV}={path}") if path.is_file() else (None, f"{LIB_ENV}={path} does not exist")
    src = source_dir()
    packaged = packaged_library()
    if src is None:  # an install without sources: its own build is all there is
        if packaged.is_file():
            return packaged, f"packaged {packaged}"
        return None, "no CUDA library was built at install and the CUDA sources are not installed"
    current = source_hash(src)
    if packaged.is_file() and embedded_hash(packaged) == current:
        return packaged, f"packaged {packaged}"
    archs = requested_archs()
    cached = cached_library(src, archs)
    if os.path.lexists(cached):
        refusal = _refusal(cached)  # before reading it, too: it may be a FIFO or anyone's file
        if refusal:
            return None, refusal
        if embedded_hash(cached) == current:
            return cached, f"cached {cached}"
    stale = " (the packaged one is stale)" if packaged.is_file() else ""
    nvcc = find_nvcc()
    if nvcc is None:
        return None, f"no built CUDA library{stale} and nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if not build_if_missing:
        return None, f"no built CUDA library{stale}"
    problem = _build_cached(cached, archs, nvcc, src)
    return (None, problem) if problem else (cached, f"built {cached}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memkernels.backends._cuda_build",
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
