"""ctypes view of libmemkernels_cuda.so: api.h's mk_launch, each op's Args struct built from its spec by the rule
the build generates the C side with (_layout), and a loader that refuses a library built otherwise.

Needs no GPU: loading the library and reading its build identity work on any Linux machine (CUDA is
initialised only by an op call).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

from ...ops import SPECS, OpSpec
from . import _layout

ABI_VERSION = 4
MAX_STATES = 4  # MK_MAX_STATES: mk_launch's state arrays
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}
TAIL_COLS = 6  # after the states: grad_ref, origin, hvp, numel, chunk_begin, vec_ok

_i64, _f64, _ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p


def table_cols(n_states: int) -> int:
    """MK_TABLE_COLS: a pointer table row holds param, grad, the op's states, then the tail."""
    return 2 + n_states + TAIL_COLS


class Launch(ctypes.Structure):
    """mk_launch: what every op call passes besides its hyperparameters."""

    _fields_ = [("table", _ptr), ("n_tensors", _i64), ("n_chunks", _i64), ("device", _i64),
                ("stream", _ptr), ("param_dtype", _i64), ("state_dtype", _i64 * MAX_STATES),
                ("state_present", _i64 * MAX_STATES), ("ref_dtype", _i64), ("has_grad_refs", _i64),
                ("update_grad_refs", _i64), ("maximize", _i64), ("grad_scale", _ptr),
                ("grad_scale_dtype", _i64), ("found_inf", _ptr), ("found_inf_dtype", _i64),
                ("diagnostics", _ptr), ("step_scalars", _ptr), ("has_origins", _i64), ("has_hvps", _i64),
                ("hvp_dtype", _i64), ("reuse_hvp", _i64), ("probe", _i64), ("probe_tau", _ptr),
                ("probe_norms", _ptr)]


_CTYPES = {_layout.DOUBLE: _f64, _layout.INT64: _i64}


def args_struct(spec: OpSpec) -> type[ctypes.Structure]:
    """mk_<op>_args of the op's spec; an op with more states than mk_launch carries is refused here."""
    if not 1 <= len(spec.states) <= MAX_STATES:
        raise ValueError(f"the cuda backend runs ops of 1 to {MAX_STATES} states (MK_MAX_STATES); "
                         f"{spec.name} has {len(spec.states)}")
    fields = [(name, _CTYPES[ctype]) for name, ctype in _layout.args_fields(spec)]
    return type(f"mk_{spec.name}_args", (ctypes.Structure,), {"_fields_": fields})


ARGS = {name: args_struct(spec) for name, spec in SPECS.items()}


class AbiMismatch(RuntimeError):
    """The library was built from other headers or another spec than this Python side mirrors."""


class Library:
    """A loaded libmemkernels_cuda.so whose ABI matches the structs above."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        lib = ctypes.CDLL(str(self.path))
        for name in ("mk_struct_size", "mk_abi_version", "mk_chunk_elems"):
            getattr(lib, name).restype = _i64
        lib.mk_struct_size.argtypes = [_i64]
        for name in ("mk_source_hash", "mk_archs", "mk_error_string"):
            getattr(lib, name).restype = ctypes.c_char_p
        lib.mk_error_string.argtypes = [ctypes.c_int]
        self._lib = lib
        version = lib.mk_abi_version()
        if version != ABI_VERSION:
            raise AbiMismatch(f"{self.path}: ABI version {version}, this memkernels expects {ABI_VERSION}")
        lib.mk_layout.restype = ctypes.c_char_p
        difference = _layout.layout_difference(lib.mk_layout().decode(), SPECS)
        if difference:
            raise AbiMismatch(f"{self.path} was built from another memkernels/ops/ ({difference}); rebuild it "
                              "(python -m memkernels.backends.cuda --out PATH) or remove it")
        for which, struct in enumerate((Launch, *ARGS.values())):
            size = lib.mk_struct_size(which)
            if size != ctypes.sizeof(struct):
                raise AbiMismatch(f"{self.path}: {struct.__name__} is {size} bytes there, "
                                  f"{ctypes.sizeof(struct)} here")
        self._entry = {}
        for op, args in ARGS.items():
            fn = getattr(lib, f"mk_{op}")
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.POINTER(Launch), ctypes.POINTER(args)]
            self._entry[op] = fn
        self.chunk_elems = int(lib.mk_chunk_elems())
        self.source_hash = lib.mk_source_hash().decode()
        self.archs = lib.mk_archs().decode()

    def error_string(self, code: int) -> str:
        return self._lib.mk_error_string(code).decode()

    def call(self, op: str, launch: Launch, args: ctypes.Structure) -> None:
        """Run mk_<op>; a nonzero code raises RuntimeError with the library's (CUDA's) message."""
        code = self._entry[op](ctypes.byref(launch), ctypes.byref(args))
        if code != 0:
            raise RuntimeError(f"memkernels cuda backend: {op} failed with error {code}: {self.error_string(code)}")
