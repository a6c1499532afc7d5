"""The numba kernel cache (numba/_cache.py) and threads after fork (numba/_fork.py).

Each case runs fresh processes on a cache directory of its own (XDG_CACHE_HOME), steps mk.AdamW on the numba
backend in one variant of its kernel and checks the result against the reference backend, which shares no
code with the kernels: a process served another variant's code fails that check (the variants differ by
~1e-3 after three steps, the tolerance is 1e-6).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from queue import Empty

import pytest
import torch

pytest.importorskip("numba")
from memkernels import backends  # noqa: E402

if not backends.load("numba").startswith("available"):
    pytest.skip("the numba backend cannot load here", allow_module_level=True)

import memkernels as mk  # noqa: E402
from memkernels.backends.numba import _cache as _numba_cache  # noqa: E402
from memkernels.backends import numba as nb  # noqa: E402

VARIANTS = {"plain": {}, "coupled": {"decoupled_weight_decay": False}, "eps_inside": {"eps_inside_sqrt": True}}

# One process: step a variant on both backends; print whether its AdamW kernel was compiled or loaded, and
# the largest difference. With a barrier directory, each process waits before saving its AdamW kernel
# until every process has compiled its own, so that all of them write into the cache at the same time.
STEP = r"""
import json, os, sys, time
import torch
import memkernels as mk
from memkernels.backends import numba as nb
from memkernels.backends.numba import _cache as _numba_cache

variant, kwargs, barrier, count = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if barrier:
    save = _numba_cache.KernelCache.save_overload
    def save_together(self, sig, cres):
        if self._variant.startswith("step_kernel('adamw'"):
            open(os.path.join(barrier, variant), "w").close()
            deadline = time.time() + 120
            while len(os.listdir(barrier)) < count and time.time() < deadline:
                time.sleep(0.01)
        save(self, sig, cres)
    _numba_cache.KernelCache.save_overload = save_together
results = {}
for backend in ("numba", "reference"):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5000))
    opt = mk.AdamW([p], lr=1e-2, weight_decay=0.5, eps=1e-3, backend=backend, **kwargs)
    for _ in range(3):
        p.grad = torch.randn(5000)
        opt.step()
    results[backend] = p.detach().clone()
error = ((results["numba"] - results["reference"]).abs().max() / results["reference"].abs().max()).item()
adamw = [c for c in nb.first_calls if c.kernel == "adamw"]
print(json.dumps({"error": error, "compiled": [c.compiled for c in adamw],
                  "discarded": _numba_cache.discarded, "cache": str(_numba_cache.state()[0])}))
"""


def step(cache: Path, variant: str, barrier: Path | None = None, count: int = 0, **popen) -> subprocess.Popen:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONWARNINGS": "always"}
    return subprocess.Popen([sys.executable, "-c", STEP, variant, json.dumps(VARIANTS[variant]), str(barrier or ""),
                             str(count)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(process: subprocess.Popen) -> tuple[dict, str]:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    return json.loads(out.splitlines()[-1]), err


def run(cache: Path, variant: str) -> tuple[dict, str]:
    return finish(step(cache, variant))


def test_variants_compiled_at_once_into_one_cache_each_load_their_own_code(tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    writers = [step(tmp_path, name, barrier, len(VARIANTS)) for name in VARIANTS]
    for name, writer in zip(VARIANTS, writers):
        result, _ = finish(writer)
        assert result["compiled"] == [True] and result["error"] < 1e-6, (name, result)
    assert sorted(os.listdir(barrier)) == sorted(VARIANTS)  # all three reached the save before any wrote
    for name in VARIANTS:  # a third process per variant: loaded from the cache, and right
        result, _ = run(tmp_path, name)
        assert result["compiled"] == [False] and result["error"] < 1e-6, (name, result)


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory) -> tuple[Path, Path]:
    """A cache holding the plain and the coupled kernel, and the path of the coupled one's file."""
    cache = tmp_path_factory.mktemp("warm")
    run(cache, "plain")
    before = set((cache / "memkernels" / "numba").iterdir())
    run(cache, "coupled")
    (coupled,) = [f for f in set((cache / "memkernels" / "numba").iterdir()) - before
                  if f.name.startswith("step_kernel")]
    return cache, coupled


def truncated(path: Path, other: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path, other: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def flipped_bit(path: Path, other: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 1
    path.write_bytes(bytes(data))


def another_kernels(path: Path, other: Path) -> None:
    shutil.copyfile(other, path)


def empty(path: Path, other: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("corrupt", [truncated, garbage, flipped_bit, another_kernels, empty])
def test_a_corrupt_entry_is_discarded_with_a_warning_and_compiled_again(warm_cache, tmp_path, corrupt):
    cache, coupled = warm_cache
    shutil.copytree(cache, tmp_path, dirs_exist_ok=True)
    entry = tmp_path / coupled.relative_to(cache)
    (plain,) = [f for f in entry.parent.iterdir() if f.name.startswith("step_kernel") and f != entry]
    corrupt(entry, plain)
    result, err = run(tmp_path, "coupled")
    assert result["compiled"] == [True] and result["error"] < 1e-6, result
    assert len(result["discarded"]) == 1 and entry.name in result["discarded"][0], result
    assert err.count("discarded a numba cache entry") == 1, err
    result, err = run(tmp_path, "coupled")  # healed: the next process loads it
    assert result["compiled"] == [False] and result["error"] < 1e-6 and "discarded" not in err, result


def test_an_unwritable_cache_location_compiles_in_memory_on_the_numba_backend(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result, err = run(blocker, "coupled")  # XDG_CACHE_HOME is a file: nothing can be created under it
    assert result["compiled"] == [True] and result["error"] < 1e-6 and result["cache"] == "None", result
    assert err.count("the numba kernel cache is off") == 1, err


def _reset(monkeypatch, cache: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(_numba_cache, "_state", None)
    monkeypatch.setattr(_numba_cache, "_warned", set())


@pytest.mark.parametrize("case", ["group_writable", "other_writable_parent", "symlinked", "foreign_owner"])
def test_a_cache_directory_others_could_write_is_not_used(tmp_path, monkeypatch, case):
    root = tmp_path / "memkernels"
    (root / "numba").mkdir(parents=True, mode=0o700)
    os.chmod(root, 0o700)
    if case == "group_writable":
        os.chmod(root / "numba", 0o770)
    elif case == "other_writable_parent":
        os.chmod(root, 0o707)
    elif case == "symlinked":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        shutil.rmtree(root / "numba")
        (root / "numba").symlink_to(tmp_path / "elsewhere")
    else:
        from memkernels.backends import _user_cache
        monkeypatch.setattr(_user_cache, "my_uid", lambda: os.geteuid() + 1)
    _reset(monkeypatch, tmp_path)
    with pytest.warns(RuntimeWarning, match="the numba kernel cache is off"):
        root_in_use, why = _numba_cache.state()
    assert root_in_use is None
    expected = {"group_writable": "writable by group", "other_writable_parent": "writable by others",
                "symlinked": "symlink", "foreign_owner": "owned by uid"}[case]
    assert expected in why, why


def test_the_cache_directories_are_made_private(tmp_path, monkeypatch):
    _reset(monkeypatch, tmp_path)
    root, why = _numba_cache.state()
    assert root == tmp_path / "memkernels" / "numba", why
    for path in (root, root.parent):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path


def _child_step(queue, opt: mk.AdamW, p: torch.nn.Parameter) -> None:
    torch.set_num_threads(1)  # as torch's DataLoader workers do: torch's own OpenMP pool hangs after fork
    opt.step()
    queue.put((p.detach().numpy().copy(), nb.numba_status()))  # by value: the child exits


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_a_forked_child_steps_after_the_parent_started_numba_threads():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(100_000))
    twin = torch.nn.Parameter(p.detach().clone())
    opt, ref = mk.AdamW([p], lr=1e-2, backend="numba"), torch.optim.AdamW([twin], lr=1e-2)
    for grad in (torch.randn(100_000), torch.randn(100_000)):
        p.grad, twin.grad = grad, grad.clone()
        opt.step()  # the parent's kernels run on its threads
        ref.step()
    p.grad = twin.grad = torch.randn(100_000)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_step, args=(queue, opt, p))
    child.start()
    while True:  # until the child's answer comes, or the child is gone without one (killed)
        try:
            stepped, status = queue.get(timeout=1)
            break
        except Empty:
            assert child.is_alive(), f"the child died with exit code {child.exitcode}"
    child.join(timeout=60)
    assert child.exitcode == 0
    ref.step()
    torch.testing.assert_close(torch.from_numpy(stepped), twin.detach(), rtol=1e-6, atol=1e-7)
    if nb.numba.threading_layer() == "omp":
        assert "one thread: this process was forked" in status, status


TRAINING = r"""
import torch, warnings, memkernels as mk
from memkernels.backends import numba as nb
warnings.simplefilter("ignore")
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)).to(torch.bfloat16)
x, y = torch.randn(128, 32, dtype=torch.bfloat16), torch.randn(128, 1, dtype=torch.bfloat16)
def closure():
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
    loss.backward()
    return loss
for opt in (mk.AdamW(model.parameters(), track_memory=True), mk.Lion(model.parameters(), memory_correction=-1.0),
            mk.SGD(model.parameters(), memory_correction=-1.0, hvp="trajectory")):
    for _ in range(3):
        opt.step(closure) if isinstance(opt, mk.Lion) else (closure(), opt.step())
print(sum(c.compiled for c in nb.first_calls), len(nb.first_calls))
"""


def test_info_warm_builds_the_kernels_that_a_training_script_then_loads(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    warm = subprocess.run([sys.executable, "-m", "memkernels.cli", "info", "--warm"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert warm.returncode == 0 and warm.stdout.startswith("warm: numba kernels"), warm.stdout + warm.stderr
    assert " 0 compiled" not in warm.stdout  # an empty cache: it built them
    script = subprocess.run([sys.executable, "-c", TRAINING], env=env, capture_output=True, text=True, timeout=300)
    compiled, calls = map(int, script.stdout.split())
    assert calls > 0 and compiled == 0, script.stdout + script.stderr
