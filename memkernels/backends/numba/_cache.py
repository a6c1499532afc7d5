"""The numba kernels' disk cache: one file per kernel variant and signature, that cannot serve wrong code.

numba's own cache keeps one index per Python function for all of its closure variants and signatures, and
updates it without a lock: two processes compiling two variants at once can leave one variant's entry
pointing at the other's code, for every later process. Here each (variant, signature, CPU, numba, Python)
has its own file, named by a digest of that key and holding the key and a digest of its content: a file
is written whole (os.replace) and used only if the key inside is the one asked for and the content matches
its digest. A file that cannot be read back (truncated, corrupt, another kernel's) is deleted and the kernel
compiled again, with one warning.

A cache entry is a pickle, so it is code: the cache lives in the user's own cache directory
(cache_dir()/numba, made 0700) and is read only if that directory and the one above it are the user's own,
are not symlinks and nobody else can write them. Where the cache cannot be trusted or written, kernels
compile in memory in each process (never the reference backend), with one warning; `memkernels info`
says which.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import sys
import tempfile
import warnings
from pathlib import Path

import numba
from numba.core.caching import _Cache
from numba.core.compiler import CompileResult
from numba.core.serialize import dumps

from .._user_cache import cache_dir, private_dir, untrusted

SUFFIX = ".nbk"
discarded: list[str] = []  # entries this process found unreadable and deleted, with the reason
_warned: set[str] = set()


def _warn_once(kind: str, message: str) -> None:
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(f"memkernels: {message}", RuntimeWarning, stacklevel=4)


def directory() -> Path:
    return cache_dir() / "numba"


def _usable() -> tuple[Path | None, str]:
    """(the cache directory, "") if kernels may be loaded from it and saved in it, else (None, why not)."""
    path = directory()
    try:
        for folder in (path.parent, path):  # each checked before anything is written into it
            private_dir(folder)
            problem = untrusted(folder, "directory")
            if problem:
                return None, problem
    except OSError as exc:
        return None, f"cannot create {path} ({exc})"
    if not os.access(path, os.W_OK | os.X_OK):
        return None, f"{path} is not writable"
    return path, ""


_state: tuple[Path | None, str] | None = None


def state() -> tuple[Path | None, str]:
    """The cache directory in use, or None and why kernels compile in memory; decided once per process."""
    if _state is None:
        _set(*_usable())
    return _state


def _set(root: Path | None, why_off: str) -> None:
    global _state
    _state = (root, why_off)
    if root is None:
        _warn_once("unusable", f"the numba kernel cache is off ({why_off}); kernels compile in memory in each "
                               "process (seconds to a minute for the first step of each kind)")


class KernelCache(_Cache):
    """numba's cache interface for one kernel variant, named by `variant` (its factory and arguments), whose
    code is fixed by `sources` (a digest of the modules it is built from)."""

    def __init__(self, variant: str, sources: str):
        self._variant = variant
        self._sources = sources

    def _key(self, sig, codegen) -> str:
        return repr((self._variant, self._sources, str(sig), codegen.magic_tuple(), numba.__version__,
                     sys.version))

    def _path(self, root: Path, key: str) -> Path:
        name = self._variant.split("(")[0]
        return root / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:32]}{SUFFIX}"

    @property
    def cache_path(self) -> str:
        return str(directory())

    def load_overload(self, sig, target_context) -> CompileResult | None:
        root = state()[0]
        if root is None:
            return None
        target_context.refresh()
        key = self._key(sig, target_context.codegen())
        path = self._path(root, key)
        try:
            with open(path, "rb") as handle:
                inside, digest = pickle.load(handle)
                payload = handle.read()
            if inside != key:
                raise ValueError("the key inside is another kernel's")
            if hashlib.sha256(payload).hexdigest() != digest:
                raise ValueError("its content does not match its digest")
            return CompileResult._rebuild(target_context, *pickle.loads(payload))
        except FileNotFoundError:
            return None
        except Exception as exc:  # any unreadable entry: numba raises EOFError, UnpicklingError, LLVM errors
            path.unlink(missing_ok=True)
            discarded.append(f"{path.name}: {exc!r}")
            _warn_once("discarded", f"discarded a numba cache entry that could not be loaded ({path}: {exc!r}); "
                                    "the kernel is compiled again")
            return None

    def save_overload(self, sig, cres: CompileResult) -> None:
        root = state()[0]
        if root is None or cres.lifted or cres.library.has_dynamic_globals:
            return
        key = self._key(sig, cres.codegen)
        path = self._path(root, key)
        try:
            fd, partial = tempfile.mkstemp(prefix=path.name + ".", dir=root)
            try:
                payload = dumps(cres._reduce())
                with os.fdopen(fd, "wb") as handle:
                    pickle.dump((key, hashlib.sha256(payload).hexdigest()), handle, protocol=pickle.HIGHEST_PROTOCOL)
                    handle.write(payload)
                os.replace(partial, path)
            except BaseException:
                os.unlink(partial)
                raise
        except OSError as exc:
            _set(None, f"cannot write {root} ({exc})")

    def enable(self) -> None:
        """Always on: state() decides."""

    def disable(self) -> None:
        """Always on: state() decides."""

    def flush(self) -> None:
        """Entries are per variant and key: nothing to flush."""


def cached(dispatcher, variant: str, sources: str):
    """The dispatcher, its compiled code kept in and loaded from this cache."""
    dispatcher._cache = KernelCache(variant, sources)  # numba has no public hook for a cache class
    return dispatcher
