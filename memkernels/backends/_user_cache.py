"""The per-user cache directory that the cuda and numba backends keep compiled code in, and the checks that make
loading code from it safe.

$XDG_CACHE_HOME/memkernels (else ~/.cache/memkernels). What lies there is code (a .so, numba's pickles), so a
path in it is used only when it is a real file or directory (no symlink), owned by you and writable by no one
else.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "memkernels"


def my_uid() -> int:
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
    real one of its kind (no symlink), owned by you and writable only by you. This is what stands between
    another user and code run in your process."""
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
    if st.st_uid != my_uid():
        return f"{kind} {path} is owned by uid {st.st_uid}"
    writers = [who for bit, who in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "others")) if st.st_mode & bit]
    if writers:
        return f"{kind} {path} is writable by {' and '.join(writers)} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None
