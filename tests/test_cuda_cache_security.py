"""The per-user cache of the CUDA library is trusted only when it is the user's own: a .so runs code
when loaded, so a library that someone else could have planted or swapped is refused, never loaded
or built over, and the build lock never follows a symlink. No GPU or nvcc needed: the libraries are
fakes that carry the right source hash, and the build runs a fake nvcc script.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable

import pytest

from memkernels.backends import _user_cache
from memkernels.backends.cuda import _build, _cache

SRC = _build.source_dir()
HASH = _build.source_hash(SRC)
FAKE_LIBRARY = b"\x7fELF fake\0memkernels-source-hash:" + HASH.encode() + b"\0"


@pytest.fixture
def library(tmp_path, monkeypatch) -> Path:
    """Where locate() looks for the cached library: under a fresh XDG_CACHE_HOME, nothing else to load."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(_cache.LIB_ENV, raising=False)
    monkeypatch.setattr(_cache, "packaged_library", lambda: tmp_path / "no-package" / _build.LIB_NAME)
    monkeypatch.setattr(_cache, "find_nvcc", lambda: None)
    return _cache.cached_library(SRC, _build.requested_archs())


def _plant(library: Path, dir_mode: int = 0o700, file_mode: int = 0o755) -> None:
    for directory in (library.parent.parent, library.parent):
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, dir_mode)
    library.write_bytes(FAKE_LIBRARY)
    os.chmod(library, file_mode)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _no_build(monkeypatch) -> None:
    """nvcc is there, but building must not happen."""
    monkeypatch.setattr(_cache, "find_nvcc", lambda: "/fake/nvcc")
    monkeypatch.setattr(_cache, "build", lambda *a, **kw: pytest.fail("built over a refused cache"))


@pytest.mark.parametrize("dir_mode, file_mode", [(0o700, 0o600), (0o700, 0o755), (0o755, 0o755)])
def test_own_private_cached_library_is_found(library, dir_mode, file_mode):
    """The positive control: a library of the user's own, in directories only they can write, loads
    (0755 directories too: caches written before the directories were made 0700)."""
    _plant(library, dir_mode, file_mode)
    assert _cache.locate(build_if_missing=False) == (library, f"cached {library}")


def _symlink_to_moved(path: Path) -> None:
    """Move path aside (still trusted where it lands) and leave a symlink to it in its place."""
    moved = path.with_name(path.name + ".real")
    path.rename(moved)
    path.symlink_to(moved)


def _dangling_symlink_at(library: Path) -> None:
    library.unlink()
    library.symlink_to(library.parent / "gone.so")


def _directory_at(library: Path) -> None:
    library.unlink()
    library.mkdir()


# Each case spoils a planted cache one way and says (given the library) which path is named and why.
SPOILED: dict[str, tuple[Callable[[Path], None], Callable[[Path], str]]] = {
    "cache dir group-writable": (lambda lib: os.chmod(lib.parent.parent, 0o770),
                                 lambda lib: f"directory {lib.parent.parent} is writable by group (mode 0770)"),
    "hash dir writable by all": (lambda lib: os.chmod(lib.parent, 0o777),
                                 lambda lib: f"directory {lib.parent} is writable by group and others (mode 0777)"),
    "file other-writable": (lambda lib: os.chmod(lib, 0o646),
                            lambda lib: f"file {lib} is writable by others (mode 0646)"),
    "file symlinked": (_symlink_to_moved, lambda lib: f"file {lib} is a symlink"),
    "file a dangling symlink": (_dangling_symlink_at, lambda lib: f"file {lib} is a symlink"),
    "hash dir symlinked": (lambda lib: _symlink_to_moved(lib.parent),
                           lambda lib: f"directory {lib.parent} is a symlink"),
    "cache dir symlinked": (lambda lib: _symlink_to_moved(lib.parent.parent),
                            lambda lib: f"directory {lib.parent.parent} is a symlink"),
    "not a file": (_directory_at, lambda lib: f"{lib} is not a regular file"),
}


@pytest.mark.parametrize("case", SPOILED)
def test_spoiled_cache_is_refused_and_not_built_over(library, monkeypatch, case):
    spoil, problem = SPOILED[case]
    _plant(library)
    spoil(library)
    _no_build(monkeypatch)
    expected = (f"refusing the cached CUDA library {library}: {problem(library)}; the cache directories and "
                f"the library must be owned by you (uid {os.geteuid()}), not symlinks, and writable only by you")
    assert _cache.locate(build_if_missing=False) == (None, expected)
    assert _cache.locate() == (None, expected)


@pytest.mark.parametrize("owned_by_other", ["cache dir", "hash dir", "file"])
def test_cache_of_another_user_is_refused(library, monkeypatch, owned_by_other):
    """As root the path is really given to nobody (uid 65534); as anyone else the check is made to
    expect another uid, so the first path (the cache directory) is the one named."""
    _plant(library)
    _no_build(monkeypatch)
    if os.geteuid() == 0:
        path = {"cache dir": library.parent.parent, "hash dir": library.parent, "file": library}[owned_by_other]
        os.chown(path, 65534, -1, follow_symlinks=False)
        owner, me = 65534, 0
    else:
        me = os.geteuid() + 1
        monkeypatch.setattr(_user_cache, "my_uid", lambda: me)
        path, owner = library.parent.parent, os.geteuid()
    kind = "file" if path == library else "directory"
    path_, why = _cache.locate()
    assert path_ is None
    assert why.startswith(f"refusing the cached CUDA library {library}: {kind} {path} is owned by uid {owner};")
    assert f"owned by you (uid {me})" in why


@pytest.mark.parametrize("victim_exists", [True, False])
def test_symlinked_lock_touches_nothing(library, tmp_path, monkeypatch, victim_exists):
    """A .lock planted as a symlink is not followed: its target is neither truncated nor created."""
    _plant(library)
    library.unlink()
    victim = tmp_path / "victim"
    if victim_exists:
        victim.write_text("precious\n")
    lock = library.parent.parent / ".lock"
    lock.symlink_to(victim)
    with pytest.raises(OSError, match=f"the build lock {lock} is a symlink"):
        with _cache._lock(lock.parent):
            pytest.fail("locked through a symlink")
    _no_build(monkeypatch)
    assert _cache.locate() == (None, f"cannot build the CUDA library into {library.parent}: "
                                     f"the build lock {lock} is a symlink")
    assert (victim.read_text() == "precious\n") if victim_exists else not victim.exists()


def test_built_cache_is_private(library, tmp_path, monkeypatch):
    """A first-use build (by a fake nvcc, through the real build()) makes the cache directories 0700 whatever
    the umask, leaves the XDG root it did not create alone, and loads what it wrote."""
    xdg = library.parent.parent.parent
    xdg.mkdir(mode=0o755)
    nvcc = tmp_path / "nvcc"
    nvcc.write_text(f"#!/bin/sh\nfor out; do :; done\nprintf 'memkernels-source-hash:{HASH}' > \"$out\"\n")
    nvcc.chmod(0o755)
    monkeypatch.setattr(_cache, "find_nvcc", lambda: str(nvcc))
    umask = os.umask(0o002)  # the usual umask of user-private groups: without modes, directories come out 0775
    try:
        assert _cache.locate() == (library, f"built {library}")
    finally:
        os.umask(umask)
    assert (_mode(xdg), _mode(library.parent.parent), _mode(library.parent)) == (0o755, 0o700, 0o700)
    assert (_mode(library), _mode(library.parent.parent / ".lock")) == (0o755, 0o600)
    assert sorted(p.name for p in library.parent.iterdir()) == [_build.LIB_NAME]  # no staged copies left
    assert _cache.locate(build_if_missing=False) == (library, f"cached {library}")
