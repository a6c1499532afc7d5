"""ctypes view of libmemkernels_cuda.so: the structs of csrc/include/memkernels/api.h and a loader.

Needs no GPU and no torch: loading the library and reading its build identity work on
any Linux machine (CUDA is initialised only by an op call).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

ABI_VERSION = 3
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}
TABLE_COLS = 10  # param, grad, state0, state1, grad_ref, origin, hvp, numel, chunk_begin, vec_ok

_i64, _f64, _ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p


class Launch(ctypes.Structure):
    """mk_launch: what every op call passes besides its hyperparameters."""

    _fields_ = [("table", _ptr), ("n_tensors", _i64), ("n_chunks", _i64), ("device", _i64),
                ("stream", _ptr), ("param_dtype", _i64), ("state_dtype", _i64 * 2),
                ("state_present", _i64 * 2), ("ref_dtype", _i64), ("has_grad_refs", _i64),
                ("update_grad_refs", _i64), ("maximize", _i64), ("grad_scale", _ptr),
                ("grad_scale_dtype", _i64), ("found_inf", _ptr), ("found_inf_dtype", _i64),
                ("diagnostics", _ptr), ("step_scalars", _ptr), ("has_origins", _i64), ("has_hvps", _i64),
                ("hvp_dtype", _i64), ("reuse_hvp", _i64), ("probe", _i64), ("probe_tau", _ptr),
                ("probe_norms", _ptr)]


class AdamWArgs(ctypes.Structure):
    _fields_ = [(name, _f64) for name in ("lr", "beta1", "beta2", "eps", "weight_decay", "bias_correction1",
                                          "bias_correction2", "mean_age1", "mean_age2", "correction",
                                          "correction_limit", "hvp_scale")] + \
               [(name, _i64) for name in ("decoupled", "eps_inside_sqrt", "memoryless")]


class LionArgs(ctypes.Structure):
    _fields_ = [(name, _f64) for name in ("lr", "beta1", "beta2", "weight_decay", "smoothing", "ema_weight",
                                          "age_weight", "correction", "correction_limit", "hvp_scale")] + \
               [("memoryless", _i64)]


class SGDArgs(ctypes.Structure):
    _fields_ = [(name, _f64) for name in ("lr", "momentum", "weight_decay", "update_scale", "memory_coef",
                                          "correction", "correction_limit", "hvp_scale")] + \
               [(name, _i64) for name in ("nesterov", "memoryless")]


ARGS = {"adamw": AdamWArgs, "lion": LionArgs, "sgd": SGDArgs}
_STRUCT_IDS = {Launch: 0, AdamWArgs: 1, LionArgs: 2, SGDArgs: 3}


class AbiMismatch(RuntimeError):
    """The library was built from other headers than this Python side mirrors."""


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
        self._entry = {}
        for op, args in ARGS.items():
            fn = getattr(lib, f"mk_{op}")
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.POINTER(Launch), ctypes.POINTER(args)]
            self._entry[op] = fn
        self._lib = lib
        version = lib.mk_abi_version()
        if version != ABI_VERSION:
            raise AbiMismatch(f"{self.path}: ABI version {version}, this memkernels expects {ABI_VERSION}")
        for struct, which in _STRUCT_IDS.items():
            size = lib.mk_struct_size(which)
            if size != ctypes.sizeof(struct):
                raise AbiMismatch(f"{self.path}: {struct.__name__} is {size} bytes there, "
                                  f"{ctypes.sizeof(struct)} here")
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
