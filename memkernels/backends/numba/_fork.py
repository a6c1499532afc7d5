"""Whether this process may run numba's parallel kernels: not in a child forked after GNU OpenMP started.

numba's "omp" threading layer (its first choice where TBB is not installed) on GNU OpenMP kills a forked
child the first time that child starts a parallel kernel ("Terminating: fork() called from a process
already using GNU OpenMP"), because GNU OpenMP's threads do not survive fork(). Such a child (a fork-method
multiprocessing worker that steps an optimizer) therefore gets the same kernels compiled without threads:
the same math, on one thread, with one warning. TBB and numba's workqueue layer survive fork(), and a child
forked before any parallel kernel ran starts its own threads: those run in parallel as usual.
"""
from __future__ import annotations

import os
import sys
import warnings

import numba
from numba.np.ufunc import parallel

single_thread_reason: str | None = None  # why this process runs the numba kernels on one thread


def _after_fork_in_child() -> None:
    global single_thread_reason
    omp = sys.modules.get("numba.np.ufunc.omppool")
    if parallel._is_initialized and numba.threading_layer() == "omp" and getattr(omp, "openmp_vendor", "") == "GNU":
        single_thread_reason = ("this process was forked after numba's GNU OpenMP threads started, and GNU OpenMP "
                                "cannot start threads after fork()")


if hasattr(os, "register_at_fork"):  # POSIX: where there is no fork there is nothing to do
    os.register_at_fork(after_in_child=_after_fork_in_child)
_warned = False


def threads_usable() -> bool:
    global _warned
    if single_thread_reason is None:
        return True
    if not _warned:
        _warned = True
        warnings.warn(f"memkernels: {single_thread_reason}; its numba kernels run on one thread. For threads in "
                      "workers, `pip install tbb` (numba then uses its fork-safe TBB layer) or start them with "
                      "the 'spawn' method", RuntimeWarning, stacklevel=4)
    return False
