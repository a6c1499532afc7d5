"""Each op's part of libmemkernels_cuda.so's C ABI, from its spec (memkernels/ops/): one rule that the
build renders as C headers and _abi as ctypes structs, so that no per-op fact is written by hand twice.

An op's Args struct holds, in this order: its float scalars in spec order, then the common floats correction,
correction_limit and hvp_scale (all double); then its flags in spec order and the common memoryless (int64).
Every field is 8 bytes wide, so the ctypes mirror has no padding to get wrong.

The build generates two headers from it:
- memkernels/op_args.h (C, included by api.h): each op's Args struct and entry point mk_<op>, the list of ops
  and MK_LAYOUT, the text that the library reports (mk_layout) so that a library built from another spec is
  refused at load.
- memkernels/op_traits.cuh (C++): each op's trait for multi_tensor.cuh, memkernels::ops::<op>: its Args, its
  number of states, set_step (the step_scalars tensor's values, in spec.step_scalars order, into Args) and the
  calls of math.h's make_<op>_scalars (the Args fields in their order, flags as bool), <op> (p, g, each state
  (an optional one followed by whether it is present), hvp, has_hvp, scalars) and <op>_direction; and, for a
  host that fills Args from named values (csrc/host_module.cpp), for_each_field (each field by its name) and
  the states' keys and which of them may be absent.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:  # not imported: the op modules need torch, and setup.py runs this without it
    from ...ops.spec import OpSpec

COMMON_FLOATS = ("correction", "correction_limit", "hvp_scale")
COMMON_FLAGS = ("memoryless",)
DOUBLE, INT64 = "double", "int64_t"

ARGS_HEADER = "memkernels/op_args.h"
TRAITS_HEADER = "memkernels/op_traits.cuh"
_BANNER = "Generated from memkernels/ops/ by memkernels/backends/cuda/_layout.py when the library is built"


def args_fields(spec: OpSpec) -> list[tuple[str, str]]:
    """(name, C type) of the op's Args struct, in order."""
    floats = [s.name for s in spec.scalars if s.bounds is not None]
    flags = [s.name for s in spec.scalars if s.bounds is None]
    return [(name, DOUBLE) for name in (*floats, *COMMON_FLOATS)] + [(name, INT64) for name in (*flags, *COMMON_FLAGS)]


def op_layout(spec: OpSpec) -> str:
    """One line of MK_LAYOUT: what the library's code for the op assumes of its spec."""
    fields = ", ".join(f"{ctype} {name}" for name, ctype in args_fields(spec))
    return f"{spec.name}: n_states {len(spec.states)}; args {fields}; step_scalars {', '.join(spec.step_scalars)}"


def layout(specs: Mapping[str, OpSpec]) -> str:
    return "\n".join(op_layout(spec) for spec in specs.values())


def layout_difference(built: str, specs: Mapping[str, OpSpec]) -> str | None:
    """None if a library reporting `built` (mk_layout) fits these specs, else the first op that differs."""
    there = dict(line.split(": ", 1) for line in built.splitlines())
    here = dict(op_layout(spec).split(": ", 1) for spec in specs.values())
    for op in (*here, *(op for op in there if op not in here)):
        if there.get(op) != here.get(op):
            return f"{op}: built with {there.get(op, 'no such op')!r}, the spec has {here.get(op, 'no such op')!r}"
    return None if list(there) == list(here) else f"the ops are in another order: {', '.join(there)}"


def _args_struct(spec: OpSpec) -> str:
    fields = "".join(f"  {ctype} {name};\n" for name, ctype in args_fields(spec))
    return (f"typedef struct mk_{spec.name}_args {{\n{fields}}} mk_{spec.name}_args;\n"
            f"MK_API int mk_{spec.name}(const mk_launch* launch, const mk_{spec.name}_args* args);\n")


def args_header(specs: Mapping[str, OpSpec]) -> str:
    ops = " ".join(f"X({k}, {name})" for k, name in enumerate(specs, start=1))
    lines = " \\\n".join(f'  "{line}\\n"' for line in layout(specs).splitlines())
    structs = "\n".join(_args_struct(spec) for spec in specs.values())
    return f"""/* {_BANNER}: do not edit. Each op's Args struct and entry point. */
#ifndef MEMKERNELS_OP_ARGS_H
#define MEMKERNELS_OP_ARGS_H

{structs}
/* X(k, op) for every op; k is the op's mk_struct_size() index. */
#define MK_FOR_EACH_OP(X) {ops}

/* The layout this library was built for, reported by mk_layout(). */
#define MK_LAYOUT \\
{lines}

#endif /* MEMKERNELS_OP_ARGS_H */
"""


def _trait(spec: OpSpec) -> str:
    n = len(spec.states)
    scalars = ", ".join(f"a.{name}" if ctype == DOUBLE else f"a.{name} != 0" for name, ctype in args_fields(spec))
    states = []
    for i, state in enumerate(spec.states):
        states += [f"st[{i}]", f"present[{i}]"] if state.absent_when_zero else [f"st[{i}]"]
    present = "present" if any(state.absent_when_zero for state in spec.states) else ""
    set_step = "".join(f"    a.{name} = v[{i}];\n" for i, name in enumerate(spec.step_scalars))
    fields = "".join(f'    f("{name}", a.{name});\n' for name, _ in args_fields(spec))
    keys = ", ".join(f'"{key}"' for key in spec.state_keys)
    optional = ", ".join("true" if state.absent_when_zero else "false" for state in spec.states)
    return f"""// {spec.name}: states {", ".join(spec.state_keys)}
struct {spec.name} {{
  using Args = mk_{spec.name}_args;
  static constexpr int kStates = {n};
  static constexpr const char* kStateKeys[{n}] = {{{keys}}};
  static constexpr bool kOptional[{n}] = {{{optional}}};  // may be absent (the step takes whether it is present)

  template <typename T>
  MK_HD static auto scalars(const Args& a) {{
    return memkernels::make_{spec.name}_scalars<T>({scalars});
  }}

  MK_HD static void set_step(Args& a, const double* v) {{
{set_step}  }}

  // f(name, field) for every Args field, in order (host only).
  template <class F>
  static void for_each_field(Args& a, F&& f) {{
{fields}  }}

  template <typename T, class S>
  MK_HD static Step<T, {n}> step(T p, T g, const T (&st)[{n}], const bool (&{present})[{n}], T hvp,
                                bool has_hvp, const S& s) {{
    return memkernels::{spec.name}(p, g, {", ".join(states)}, hvp, has_hvp, s);
  }}

  template <typename T, class S>
  MK_HD static T direction(T p, T g, const S& s) {{
    return memkernels::{spec.name}_direction(p, g, s);
  }}
}};
"""


def traits_header(specs: Mapping[str, OpSpec]) -> str:
    traits = "\n".join(_trait(spec) for spec in specs.values())
    return f"""// {_BANNER}: do not edit.
// Each op's trait for multi_tensor.cuh: how its Args, states and step scalars meet math.h.
#pragma once

#include "memkernels/api.h"
#include "memkernels/math.h"

namespace memkernels {{
namespace ops {{

{traits}
}}  // namespace ops
}}  // namespace memkernels
"""


def headers(specs: Mapping[str, OpSpec]) -> dict[str, str]:
    """The generated headers by their path under the build's include directory."""
    return {ARGS_HEADER: args_header(specs), TRAITS_HEADER: traits_header(specs)}
