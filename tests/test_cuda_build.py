"""The CUDA library builds with nvcc (sm_90 only, to stay fast), exports the C ABI that
memkernels/backends/cuda/_abi.py mirrors, and its Python side behaves without a GPU.

Skipped only where nvcc is absent; a failing compile fails.
"""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memkernels import backends
from memkernels.backends.cuda import _abi, _build, _cache, _layout
from memkernels.ops import SPECS

ROOT = Path(__file__).resolve().parents[1]
NVCC = _build.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA sources cannot be compiled here")


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> _build.BuildResult:
    if NVCC is None:
        pytest.skip("nvcc not found: the CUDA sources cannot be compiled here")
    out = tmp_path_factory.mktemp("mk_cuda") / _build.LIB_NAME
    try:
        return _build.build(out, "sm_90", resource_usage=True)
    except _build.BuildError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def lib(built) -> _abi.Library:
    return _abi.Library(built.path)


@needs_nvcc
def test_library_identity(built, lib):
    assert lib.archs == "sm_90"
    assert lib.source_hash == _build.source_hash(ROOT / "csrc") == _cache.embedded_hash(built.path)
    assert lib.chunk_elems > 0 and lib.chunk_elems % 8 == 0  # whole vectors of every dtype


@needs_nvcc
def test_every_kernel_is_built_without_spills(built):
    """Every op x 4 param dtypes x diagnostics (probe_norms) on/off x step scalars from the host or the device
    x 3 passes (the step, the step with origins / kept HVPs / probe_tau, the probe pass), no spills."""
    reports = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", built.log)
    assert len(reports) == len(SPECS) * 4 * 2 * 2 * 3, built.log
    assert all(r == ("0", "0", "0") for r in reports), built.log


@needs_nvcc
def test_only_the_c_abi_is_exported(built):
    """cudart is linked statically and hidden: the library exports mk_* and nothing that could clash."""
    if shutil.which("nm") is None or shutil.which("ldd") is None:
        pytest.skip("nm or ldd (binutils, libc-bin) not installed")
    nm = subprocess.run(["nm", "-D", "--defined-only", str(built.path)], capture_output=True, text=True)
    assert nm.returncode == 0, nm.stderr
    names = {line.split()[-1] for line in nm.stdout.splitlines() if line.strip()}
    assert names == {"mk_struct_size", "mk_abi_version", "mk_chunk_elems", "mk_source_hash", "mk_archs",
                     "mk_layout", "mk_error_string", *(f"mk_{op}" for op in SPECS)}
    ldd = subprocess.run(["ldd", str(built.path)], capture_output=True, text=True).stdout
    assert "libcudart" not in ldd


def _adamw_ptx(tmp_path) -> str:
    """csrc/op.cu compiled to PTX for adamw, as the build compiles it (with the generated headers)."""
    ptx = tmp_path / "adamw.ptx"
    _build.write_headers(tmp_path / "include", _build.generated_headers())
    cmd = [NVCC, *_build.NVCC_FLAGS, "-arch=compute_90", "-DMK_OP=adamw", f"-I{tmp_path / 'include'}",
           f"-I{ROOT / 'csrc' / 'include'}", "-ptx", str(ROOT / "csrc" / _build.OP_SOURCE), "-o", str(ptx)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return ptx.read_text()


@needs_nvcc
def test_vector_loads_and_stores(tmp_path):
    """The aligned path moves 16 bytes per access (the table's pointers are generic, so this is
    not automatic); checked in the PTX of one op."""
    text = _adamw_ptx(tmp_path)
    assert "ld.global.ca.v4.u32" in text and "st.global.wb.v4.u32" in text
    assert not re.search(r"^\s*(ld|st)\.v\d", text, re.MULTILINE), "generic (non-global) vector accesses"


def _adamw_entries(tmp_path) -> dict[tuple[int, int, int], str]:
    """The PTX bodies of adamw's fp32-param kernels by (DIAG, STEP, Pass)."""
    ptx = _adamw_ptx(tmp_path)
    entries = {m.group(1): m.group(2) for m in re.finditer(r"\.entry (\w+)\((.*?)\n\}", ptx, re.DOTALL)}
    f32 = {}
    for name, body in entries.items():
        m = re.search(r"ops5adamwEfLb(\d)ELb(\d)ELNS_4PassE(\d)E", name)  # <ops::adamw, P, DIAG, STEP, PASS>
        if m:
            f32[tuple(map(int, m.groups()))] = body
    assert sorted(f32) == [(d, s, p) for d in (0, 1) for s in (0, 1) for p in (0, 1, 2)], list(f32)
    return f32


@needs_nvcc
def test_step_scalar_kernels_derive_in_ieee_double(tmp_path):
    """With step_scalars the adamw steps derive bias_correction2 ** 0.5 on the device with the correctly
    rounded double sqrt; the kernels without them (fp32 params) do no double sqrt at all."""
    f32 = _adamw_entries(tmp_path)
    for (diag, step, pass_), body in f32.items():
        assert ("sqrt.rn.f64" in body) == (step == 1 and pass_ != 2), (diag, step, pass_)


def _launch(**fields) -> _abi.Launch:
    launch = _abi.Launch(n_tensors=1, n_chunks=1, table=0x1000, param_dtype=0)
    for name, value in fields.items():
        setattr(launch, name, value)
    return launch


def _adamw_args() -> ctypes.Structure:
    return _abi.ARGS["adamw"](lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, bias_correction1=0.1,
                              bias_correction2=0.001, decoupled=1)


@needs_nvcc
@pytest.mark.parametrize("fields, message", [
    (dict(table=None), "invalid mk_launch"),
    (dict(n_tensors=-1), "invalid mk_launch"),
    (dict(param_dtype=7), "unsupported params dtype"),
    (dict(param_dtype=2, state_present=(ctypes.c_int64 * _abi.MAX_STATES)(1, 1),
          state_dtype=(ctypes.c_int64 * _abi.MAX_STATES)(1, 0)),
     "neither the params' dtype"),
    (dict(has_grad_refs=1, ref_dtype=1, param_dtype=0), "neither the params' dtype"),
    (dict(grad_scale=0x1000, grad_scale_dtype=9), "grad_scale or found_inf"),
    (dict(has_hvps=1, hvp_dtype=1, param_dtype=0), "neither the params' dtype"),
    (dict(probe=1, probe_tau=0x1000), "invalid mode"),  # no origins
    (dict(probe=1, has_origins=1), "invalid mode"),  # no probe_tau
    (dict(probe=1, has_origins=1, probe_tau=0x1000, diagnostics=0x1000), "invalid mode"),
    (dict(probe=1, has_origins=1, probe_tau=0x1000, has_hvps=1, reuse_hvp=1), "invalid mode"),
    (dict(reuse_hvp=1), "invalid mode"),  # no hvps
    (dict(reuse_hvp=1, has_hvps=1, has_grad_refs=1), "invalid mode"),
])
def test_bad_launches_are_refused_before_cuda(lib, fields, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        lib.call("adamw", _launch(**fields), _adamw_args())


@needs_nvcc
def test_empty_call_needs_no_cuda(lib):
    lib.call("sgd", _launch(n_chunks=0, table=None), _abi.ARGS["sgd"](lr=0.1))


@needs_nvcc
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path of a machine without a GPU")
def test_cuda_errors_raise_with_cudas_message(lib):
    with pytest.raises(RuntimeError, match=r"lion failed with error \d+: .*(driver|device)"):
        lib.call("lion", _launch(), _abi.ARGS["lion"](lr=1e-4, beta1=0.9, beta2=0.99))


def test_struct_layout_is_all_8_byte_fields():
    """api.h keeps every field 8 bytes wide; the mirrors must too (then sizes pin the layout)."""
    for struct in (_abi.Launch, *_abi.ARGS.values()):
        assert all(getattr(struct, name).size % 8 == 0 and getattr(struct, name).offset % 8 == 0
                   for name, _ in struct._fields_)
    assert ctypes.sizeof(_abi.Launch) == (23 + 2 * _abi.MAX_STATES) * 8


def test_struct_mirrors_follow_api_h():
    """The ctypes field names and order are those of api.h and of the generated op_args.h."""
    header = (ROOT / "csrc" / "include" / "memkernels" / "api.h").read_text()
    header += _build.generated_headers()[_layout.ARGS_HEADER]
    for c_name, struct in (("mk_launch", _abi.Launch), *((f"mk_{op}_args", _abi.ARGS[op]) for op in SPECS)):
        body = re.search(r"typedef struct %s \{(.*?)\} %s;" % (c_name, c_name), header, re.DOTALL).group(1)
        body = re.sub(r"/\*.*?\*/", "", body, flags=re.DOTALL)
        declared = re.findall(r"(\w+)(?:\[\w+\])?\s*[,;]", body)
        assert declared == [name for name, _ in struct._fields_], c_name


def test_arch_spec_parsing():
    assert _build.gencode_flags("sm_80;sm_90+PTX") == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]
    assert _build.parse_archs("8.0, 90a 120+ptx") == [("80", False), ("90a", False), ("120", True)]
    with pytest.raises(ValueError, match="cannot read architecture 'hopper'"):
        _build.parse_archs("hopper")


def test_source_hash_covers_every_library_source(tmp_path):
    """Editing any file the library is built from makes a built library stale."""
    src = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", src)
    before = _build.source_hash(src)
    files = [p for p in src.rglob("*") if p.is_file() and p.name != "host_module.cpp"]
    assert {p.suffix for p in files} >= {".cu", ".h", ".cuh"}
    for path in files:
        original = path.read_bytes()
        path.write_bytes(original + b"\n// edited\n")
        assert _build.source_hash(src) != before, path.name
        path.write_bytes(original)
    assert _build.source_hash(src) == before


def test_locate_prefers_current_builds(tmp_path, monkeypatch):
    """A library built from other sources is stale: locate() skips it and, without nvcc, says why."""
    src = _build.source_dir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(_cache.LIB_ENV, raising=False)
    packaged = tmp_path / "pkg" / _build.LIB_NAME
    monkeypatch.setattr(_cache, "packaged_library", lambda: packaged)
    packaged.parent.mkdir()
    packaged.write_bytes(b"\0memkernels-source-hash:0123456789abcdef\0")
    monkeypatch.setattr(_cache, "find_nvcc", lambda: None)
    path, why = _cache.locate()
    assert path is None and "stale" in why and "nvcc not found" in why
    cached = _cache.cached_library(src, _build.requested_archs())
    cached.parent.parent.mkdir(mode=0o700, parents=True)  # private, as locate() makes it (test_cuda_cache_security)
    cached.parent.mkdir(mode=0o700)
    cached.write_bytes(b"memkernels-source-hash:" + _build.source_hash(src).encode())
    cached.chmod(0o600)
    assert _cache.locate() == (cached, f"cached {cached}")
    packaged.write_bytes(cached.read_bytes())
    assert _cache.locate() == (packaged, f"packaged {packaged}")
    monkeypatch.setenv(_cache.LIB_ENV, str(tmp_path / "missing.so"))
    assert _cache.locate() == (None, f"{_cache.LIB_ENV}={tmp_path / 'missing.so'} does not exist")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason given on a machine without a GPU")
def test_backend_unavailable_without_gpu():
    assert backends.load("cuda") == "unavailable: torch sees no CUDA device (torch.cuda.is_available() is False)"


def test_pointer_table(monkeypatch):
    """Rows skip empty tensors, number chunks across tensors, flag 16-byte alignment; cached by pointers."""
    from memkernels.backends.cuda import _host

    cache = _host.PointerTables(chunk_elems=16)
    buf = torch.zeros(200)
    params = [buf[0:40], buf[40:40], buf[41:42], buf[48:80]]  # 40 elems, empty, misaligned 1, aligned 32
    grads = [torch.zeros(40), torch.zeros(0), torch.zeros(1), torch.zeros(32)]
    columns = [params, grads, [], [], [], [], []]
    table = cache.get(torch.device("cpu"), columns)
    assert (table.n_tensors, table.n_chunks) == (3, 3 + 1 + 2)
    rows = table.rows.tolist()
    assert len(rows[0]) == _abi.table_cols(2)
    assert [r[7:] for r in rows] == [[40, 0, 1], [1, 3, 0], [32, 4, 1]]
    assert rows[0][:7] == [params[0].data_ptr(), grads[0].data_ptr(), 0, 0, 0, 0, 0]
    assert cache.get(torch.device("cpu"), columns).rows is table.rows
    grads[3] = torch.zeros(32)
    assert cache.get(torch.device("cpu"), columns).rows is not table.rows
    empty = [[torch.zeros(0)], [torch.zeros(0)], [], [], [], [], []]
    assert cache.get(torch.device("cpu"), empty) == (None, 0, 0)


def test_pointer_table_columns_of_origins_and_hvps(monkeypatch):
    """origins and hvps fill their columns (and their alignment counts in vec_ok); each is part of the key."""
    from memkernels.backends.cuda import _host

    cache = _host.PointerTables(chunk_elems=16)
    params, grads = [torch.zeros(40)], [torch.zeros(40)]
    origins, hvps = [torch.zeros(40)], [torch.zeros(41)[1:]]  # hvps misaligned: scalar loads for the row
    table = cache.get(torch.device("cpu"), [params, grads, [], [], [], origins, hvps])
    assert table.rows.tolist() == [[params[0].data_ptr(), grads[0].data_ptr(), 0, 0, 0, origins[0].data_ptr(),
                                    hvps[0].data_ptr(), 40, 0, 0]]
    assert cache.get(torch.device("cpu"), [params, grads, [], [], [], origins, []]).rows is not table.rows
    assert cache.get(torch.device("cpu"), [params, grads, [], [], [], [torch.zeros(40)], hvps]).rows is not table.rows
    assert cache.get(torch.device("cpu"), [params, grads, [], [], [], origins, hvps]).rows is table.rows


def test_setup_py_without_nvcc_is_pure_python(tmp_path):
    """MEMKERNELS_CUDA_BUILD=0 (or no nvcc): no library, but the sources travel for a first-use build."""
    env = {"MEMKERNELS_CUDA_BUILD": "0", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "memkernels" / "_csrc" / "include" / "memkernels" / "math.h").is_file()
    assert not (tmp_path / "memkernels" / "_lib").exists()
