"""What a benchmark ran on: every JSON carries this, since figures mean nothing without the machine."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterator

import torch

from .. import __version__


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The commit of the checkout memkernels runs from (with '+dirty' for local changes), if it is one."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def describe(device: torch.device | None = None) -> dict[str, Any]:
    gpu = None
    if torch.cuda.is_available():
        index = device.index if device is not None and device.type == "cuda" and device.index is not None else 0
        gpu = torch.cuda.get_device_name(index)
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "memkernels": __version__,
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }


def summary(machine: dict[str, Any]) -> str:
    """One line naming the machine, for report headers."""
    gpu = f", GPU {machine['gpu']} (CUDA {machine['cuda']})" if machine.get("gpu") else ", no GPU"
    commit = ""
    if machine.get("git_commit"):
        sha, _, dirty = machine["git_commit"].partition("+")
        commit = f", commit {sha[:12]}" + (" with local changes" if dirty else "")
    return (f"{machine['cpu']}, {machine['cores']} cores (torch threads: {machine['torch_threads']}){gpu}; "
            f"torch {machine['torch']}, Python {machine['python']}, memkernels {machine['memkernels']}"
            f"{commit}; {machine['date']}")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with n intra-op threads, then restore the previous count.

    The theory and implicit suites work on tensors of 8 to 5,000 elements:
    threads buy nothing there, and on a busy machine every parallel region
    waits for a descheduled thread (measured: the same run 1 s or 100 s).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
