"""Each op's part of the CUDA library's ABI comes from its spec (memkernels/backends/cuda/_layout.py): the
generated headers, compiled with the host compiler, bind every op's step scalars and states as the spec orders
them; a three-state op fits the launch as it is; the source hash covers the generated headers; and a library
that reports another layout than the spec's is refused, saying which op differs. No GPU or nvcc needed.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memkernels.backends.cuda import _abi, _build, _host, _layout
from memkernels.ops import SPECS
from memkernels.ops.spec import State

ROOT = Path(__file__).resolve().parents[1]
CXX, CC = shutil.which("g++"), shutil.which("gcc")
# AdEMAMix's shape: AdamW's scalars and three states.
THREE = dataclasses.replace(SPECS["adamw"], name="three", states=(State("m1"), State("m2"), State("v")))

# Element functions of the op "three" that return its states as they get them, so the order shows.
_THREE_MATH = """
namespace memkernels {
template <typename T> struct ThreeScalars { T lr; };
template <typename T, typename... Rest> ThreeScalars<T> make_three_scalars(double lr, Rest...) { return {T(lr)}; }
template <typename T>
Step<T, 3> three(T p, T g, T m1, T m2, T v, T hvp, bool, const ThreeScalars<T>&) {
  return {p, {m1, m2, v}, g, hvp, {}};
}
template <typename T> T three_direction(T p, T, const ThreeScalars<T>&) { return p; }
}  // namespace memkernels
"""


def _set_step_check(spec) -> str:
    """C++ that runs the op's set_step on 1, 2, ... and prints every Args field as JSON."""
    fields = [name for name, _ in _layout.args_fields(spec)]
    values = ", ".join(str(i + 1) for i in range(len(spec.step_scalars)))
    printed = ", ".join(f'\\"{name}\\": %g' for name in fields)
    return (f"  {{ memkernels::ops::{spec.name}::Args a{{}}; const double v[] = {{{values}}};\n"
            f"    memkernels::ops::{spec.name}::set_step(a, v);\n"
            f'    std::printf("{{{printed}}}\\n", {", ".join(f"double(a.{name})" for name in fields)}); }}\n')


@pytest.fixture(scope="module")
def bound(tmp_path_factory) -> dict:
    """The generated headers of SPECS and THREE compiled with g++ into a program that prints what they do."""
    if CXX is None:
        pytest.skip("no C++ compiler (g++) on PATH")
    tmp = tmp_path_factory.mktemp("mk_layout")
    specs = {**SPECS, "three": THREE}
    _build.write_headers(tmp / "include", _layout.headers(specs))
    program = tmp / "bound.cpp"
    program.write_text(
        '#include <cstdio>\n#include "memkernels/api.h"\n#include "memkernels/math.h"\n' + _THREE_MATH
        + '#include "memkernels/op_traits.cuh"\n\nint main() {\n  std::printf("%s", MK_LAYOUT);\n'
        + "".join(_set_step_check(spec) for spec in specs.values())
        + "  { using Op = memkernels::ops::three; Op::Args a{}; a.lr = 0.5;\n"
        + "    const double st[3] = {10, 20, 30}; const bool present[3] = {true, true, true};\n"
        + "    auto out = Op::step(1.0, 2.0, st, present, 0.0, false, Op::scalars<double>(a));\n"
        + '    std::printf("{\\"three states\\": [%g, %g, %g], \\"lr\\": %g}\\n", out.states[0], out.states[1],\n'
        + "                out.states[2], Op::scalars<double>(a).lr); }\n}\n")
    exe = tmp / "bound"
    cmd = [CXX, "-std=c++17", "-Wall", "-Werror", f"-I{tmp / 'include'}", f"-I{ROOT / 'csrc' / 'include'}",
           str(program), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    n = len(specs)
    return {"specs": specs, "layout": "\n".join(lines[:n]), "set_step": [json.loads(line) for line in lines[n:2 * n]],
            "three": json.loads(lines[2 * n])}


def test_the_library_reports_the_spec_layout(bound):
    assert bound["layout"] == _layout.layout(bound["specs"])
    assert _layout.layout_difference(bound["layout"] + "\n", bound["specs"]) is None


def test_set_step_reads_the_step_scalars_in_spec_order(bound):
    """v[i] lands in the field named spec.step_scalars[i]; every other field is left as it was."""
    for spec, fields in zip(bound["specs"].values(), bound["set_step"]):
        expected = {name: 0.0 for name, _ in _layout.args_fields(spec)}
        expected.update({name: float(i + 1) for i, name in enumerate(spec.step_scalars)})
        assert fields == expected, spec.name


def test_a_three_state_op_gets_its_states_in_order(bound):
    assert bound["three"] == {"three states": [10.0, 20.0, 30.0], "lr": 0.5}


def test_a_three_state_op_fits_without_an_abi_change():
    """Its states take table columns and slots of mk_launch's MK_MAX_STATES; more states are refused by name."""
    assert _abi.MAX_STATES >= 3
    assert [name for name, _ in _abi.args_struct(THREE)._fields_] == [name for name, _ in _abi.ARGS["adamw"]._fields_]

    lists = [[torch.zeros(40)] for _ in range(5)]  # params, grads, m1, m2, v
    table = _host.PointerTables(chunk_elems=16).get(torch.device("cpu"), [*lists, [], [], []])
    assert table.rows.tolist() == [[t[0].data_ptr() for t in lists] + [0, 0, 0, 40, 0, 1]]
    assert len(table.rows[0]) == _abi.table_cols(3)
    too_many = dataclasses.replace(THREE, states=tuple(State(f"s{i}") for i in range(_abi.MAX_STATES + 1)))
    with pytest.raises(ValueError, match=rf"1 to {_abi.MAX_STATES} states \(MK_MAX_STATES\); three has 5"):
        _abi.args_struct(too_many)


def test_args_hold_what_the_kernels_are_called_with():
    """Every scalar of the op's schema that is not a mode, plus the common ones, by name; every step scalar
    is one of them."""
    common = {"correction", "correction_limit", "hvp_scale", "memoryless"}
    for op, spec in SPECS.items():
        fields = {name for name, _ in _abi.ARGS[op]._fields_}
        assert fields == {s.name for s in spec.scalars} | common, op
        assert set(spec.step_scalars) <= fields, op


def test_the_build_reads_the_spec_as_memkernels_does():
    """setup.py's way (the op modules read without memkernels, and without torch, which a build's isolated
    environment lacks) gives the same layout."""
    assert _layout.layout(_build.op_specs()) == _layout.layout(SPECS)
    # nothing it read stays importable (tools that walk sys.modules, such as hypothesis, read every __file__)
    assert not [name for name in sys.modules if name.startswith(_build._ROOT)]
    script = ("import sys; sys.modules['torch'] = None; import importlib.util as u; "  # None: import torch fails
              f"s = u.spec_from_file_location('b', {str(_build.__file__)!r}); "
              "import types; p = types.ModuleType('p'); p.__path__ = [s.origin.rsplit('/', 1)[0]]; "
              "sys.modules['p'] = p; b = __import__('importlib').import_module('p._build'); "
              "import p._layout as l; print(l.layout(b.op_specs()))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == _layout.layout(SPECS)


def test_source_hash_covers_the_generated_headers():
    """Another spec (here: sgd's momentum moved to the step scalars) generates other headers, so a library
    built for it is stale."""
    src = ROOT / "csrc"
    sgd = SPECS["sgd"]
    moved = dataclasses.replace(sgd, scalars=tuple(dataclasses.replace(s, per_step=True) if s.name == "momentum"
                                                   else s for s in sgd.scalars))
    other = _layout.headers({**SPECS, "sgd": moved})
    assert other != _build.generated_headers()
    assert _build.source_hash(src, other) != _build.source_hash(src)
    assert _build.source_hash(src) == _build.source_hash(src, _build.generated_headers())


def _fake_library(tmp_path: Path, version: int, layout: str) -> Path:
    """A library with the identity functions of libmemkernels_cuda.so, reporting version and layout."""
    source = tmp_path / "fake.c"
    source.write_text(f"""#include <stdint.h>
int64_t mk_abi_version(void) {{ return {version}; }}
const char* mk_layout(void) {{ return {json.dumps(layout)}; }}
int64_t mk_struct_size(int64_t which) {{ return -1; }}
int64_t mk_chunk_elems(void) {{ return 16; }}
const char* mk_source_hash(void) {{ return "0"; }}
const char* mk_archs(void) {{ return "sm_90"; }}
const char* mk_error_string(int code) {{ return "fake"; }}
""")
    out = tmp_path / "libfake.so"
    proc = subprocess.run([CC, "-shared", "-fPIC", str(source), "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


def _without_last_scalar(op: str) -> dict:
    return {**SPECS, op: dataclasses.replace(SPECS[op], scalars=SPECS[op].scalars[:-1])}


@pytest.mark.skipif(CC is None, reason="no C compiler (gcc) on PATH")
@pytest.mark.parametrize("version, specs, message", [
    (_abi.ABI_VERSION - 1, SPECS, f"ABI version {_abi.ABI_VERSION - 1}, this memkernels expects {_abi.ABI_VERSION}"),
    (_abi.ABI_VERSION, _without_last_scalar("adamw"),
     "built from another memkernels/ops/ (adamw: built with 'n_states 2; args double lr"),
    (_abi.ABI_VERSION, {op: s for op, s in SPECS.items() if op != "lion"},
     "built from another memkernels/ops/ (lion: built with 'no such op', the spec has 'n_states 1;"),
    (_abi.ABI_VERSION, {**SPECS, "three": THREE}, "(three: built with 'n_states 3;"),
    (_abi.ABI_VERSION, dict(reversed(SPECS.items())), "the ops are in another order: " + ", ".join(reversed(SPECS))),
    (_abi.ABI_VERSION, SPECS, "Launch is -1 bytes there"),  # the layout fits: the sizes are checked next
])
def test_a_library_built_otherwise_is_refused(tmp_path, version, specs, message):
    library = _fake_library(tmp_path, version, _layout.layout(specs))
    with pytest.raises(_abi.AbiMismatch) as caught:
        _abi.Library(library)
    assert message in str(caught.value)
    assert str(caught.value).startswith(str(library))
