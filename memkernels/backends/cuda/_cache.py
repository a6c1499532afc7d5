"""Finding a current libmemkernels_cuda.so: the one packaged at install, else one in the per-user cache,
built there once (_build) when nvcc is there.

A library is current when the source hash it embeds is that of the sources beside this package (the headers
generated from the op specs included); a stale one is not loaded. The cache holds one 0700 directory per
source hash and architectures under _user_cache.cache_dir(). Loading a .so runs its code, and the hash check
only guards against stale builds, not planted ones; so a cached library is loaded only when it, its directory
and the cache directory pass _user_cache.untrusted(), and the build lock is opened without following symlinks
or truncating. MEMKERNELS_CUDA_LIB (your own choice) and the library packaged inside the install are trusted
as they are.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
from pathlib import Path
from typing import Iterator

from .. import _user_cache
from ._build import (LIB_NAME, BuildError, build, find_nvcc, packaged_library, requested_archs, source_dir,
                     source_hash)

LIB_ENV = "MEMKERNELS_CUDA_LIB"  # load this library as is (no hash check, no build)


def cached_library(src: Path, archs: str) -> Path:
    tag = re.sub(r"[^A-Za-z0-9_.+-]+", "_", archs)
    return _user_cache.cache_dir() / f"{source_hash(src)}-{tag}" / LIB_NAME


def embedded_hash(path: Path) -> str | None:
    """The source hash compiled into a library, read from its bytes (no loading)."""
    m = re.search(rb"memkernels-source-hash:([0-9a-f]{16})", path.read_bytes())
    return m.group(1).decode() if m else None


def _refusal(library: Path) -> str | None:
    """The reason locate() gives for not loading (or building) library, or None when it may: the cache
    directory, the library's directory and the library (those that exist) must pass untrusted()."""
    problem = (_user_cache.untrusted(_user_cache.cache_dir(), "directory")
               or _user_cache.untrusted(library.parent, "directory") or _user_cache.untrusted(library, "file"))
    if problem is None:
        return None
    return (f"refusing the cached CUDA library {library}: {problem}; the cache directories and the library must "
            f"be owned by you (uid {_user_cache.my_uid()}), not symlinks, and writable only by you")


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
        import fcntl  # POSIX only; here, so that this module imports anywhere

        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _build_cached(cached: Path, archs: str, nvcc: str, src: Path) -> str | None:
    """Build cached (once, under the cache's lock) into 0700 directories; None or why it is not loadable."""
    try:
        for directory in (_user_cache.cache_dir(), cached.parent):  # each checked before anything is written into it
            _user_cache.private_dir(directory)
            refusal = _refusal(cached)
            if refusal:
                return refusal
        with _lock(_user_cache.cache_dir()):
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
