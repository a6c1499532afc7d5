"""Loads and stores that convert between a tensor's storage dtype and the compute dtype.

numba has no bfloat16 or float16 arrays, so half tensors reach the kernels as
16-bit integer views of their bits: bfloat16 as uint16, float16 as int16 (the
two integer types keep the two formats apart at compile time). The
conversions are written as LLVM instructions, which the loop vectorizer turns
into SIMD code:
- bfloat16 -> float32 is exact (the 16 bits are the top of a float32);
- float32 -> bfloat16 rounds to nearest even, and a NaN stays a NaN, as
  torch's copy_ does;
- float16 <-> float32 are LLVM's fpext / fptrunc (IEEE, round to nearest
  even, subnormals kept; F16C instructions on x86).
float32 / float64 arrays load into the compute dtype of the call and store
with numba's cast (round to nearest even).

view() makes such an array from a tensor's data address (torch's data_ptr()),
so that one kernel call reaches every tensor of an op call through a table of
addresses instead of one numpy array argument per tensor. views(), loads() and
stores() do the same for a tuple of lists (an op's states, any number of them),
one per list, where a list may be absent (None): it loads as zero and stores
nothing. They are resolved per tuple type at compile time, so an absent list
costs no instruction.

stream() writes an output that a kernel only writes with non-temporal
(streaming) stores: a plain store first reads the line it writes (x86's
write-allocate), 4 bytes per fp32 element that a streaming store of a whole
line does not read. LLVM's loop vectorizer refuses to widen a non-temporal
scalar store ("nontemporal store instruction cannot be vectorized": x86 needs
the vector's alignment on the scalar store), so the kernel's loop stores into
scratch() and stream() copies that out in explicit 64-byte vectors.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

_I16, _I32, _F32 = ir.IntType(16), ir.IntType(32), ir.FloatType()
_LINE = 64  # bytes of a cache line: stream()'s vector, scratch()'s alignment
# Elements of scratch(): 2 KiB of fp32 that stay in L1 beside a block's inputs until stream() reads them. AdamW's
# probe pass + step at 16M params took 0.89-0.93 of their time with plain stores at 512, 0.94 at 1024, 1.04-1.14
# at 2048-4096 (scratch and the block's inputs outgrow L1) and 1.04 at 256 (the per-block work).
SCRATCH = 512
_BF16_NAN = 0x7FC0  # what c10::BFloat16 makes of a NaN


def _check(value, expected, what: str) -> None:
    if value != expected:
        raise TypingError(f"{what} expects {expected}, got {value}")


@intrinsic
def _bf16_to_f32(typingctx, bits):
    _check(bits, types.uint16, "bfloat16 bits")

    def codegen(context, builder, sig, args):
        wide = builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16))
        return builder.bitcast(wide, _F32)

    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_bf16(typingctx, value):
    _check(value, types.float32, "bfloat16 rounding")

    def codegen(context, builder, sig, args):
        x = args[0]
        word = builder.bitcast(x, _I32)
        lsb = builder.and_(builder.lshr(word, ir.Constant(_I32, 16)), ir.Constant(_I32, 1))
        bias = builder.add(lsb, ir.Constant(_I32, 0x7FFF))  # ties go to the even neighbour
        rounded = builder.trunc(builder.lshr(builder.add(word, bias), ir.Constant(_I32, 16)), _I16)
        is_nan = builder.fcmp_unordered("uno", x, x)
        return builder.select(is_nan, ir.Constant(_I16, _BF16_NAN), rounded)

    return types.uint16(types.float32), codegen


@njit(forceinline=True)
def bf16_nearest(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), as a float32 (exact)."""
    return _bf16_to_f32(_f32_to_bf16(x))


@intrinsic
def _f16_to_f32(typingctx, bits):
    _check(bits, types.int16, "float16 bits")

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), _F32)

    return types.float32(types.int16), codegen


@intrinsic
def _f32_to_f16(typingctx, value):
    _check(value, types.float32, "float16 rounding")

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)

    return types.int16(types.float32), codegen


@intrinsic
def _pointer(typingctx, address, start, like):
    """The address of element `start` of an array of like's dtype that begins at the integer `address`."""
    if not (isinstance(address, types.Integer) and isinstance(start, types.Integer) and isinstance(like, types.Array)):
        raise TypingError(f"_pointer expects an integer address and start and an array, got {address}, {start}, {like}")

    def codegen(context, builder, sig, args):
        base = builder.inttoptr(args[0], context.get_data_type(like.dtype).as_pointer())
        return builder.gep(base, [context.cast(builder, args[1], start, types.intp)], inbounds=True)

    return types.CPointer(like.dtype)(address, start, like), codegen


@njit(forceinline=True)
def view(address, start, count, like):
    """Elements start .. start + count of the array of like's dtype at `address`, as a 1-D array.

    The memory belongs to a torch tensor that outlives the kernel call; the view does not own it.
    """
    return carray(_pointer(address, start, like), count)


@intrinsic
def _scratch_pointer(typingctx, like):
    """The address of SCRATCH elements of like's dtype on the stack, _LINE-aligned (one buffer per call site)."""
    if not isinstance(like, types.Array):
        raise TypingError(f"_scratch_pointer expects an array, got {like}")

    def codegen(context, builder, sig, args):
        element = context.get_data_type(like.dtype)
        with builder.goto_entry_block():
            buffer = builder.alloca(ir.ArrayType(element, SCRATCH))
        buffer.align = _LINE
        return builder.bitcast(buffer, element.as_pointer())

    return types.CPointer(like.dtype)(like), codegen


@njit(forceinline=True)
def scratch(count, like):
    """A 1-D array of count <= SCRATCH elements of like's dtype, for a block's output that stream() copies out."""
    return carray(_scratch_pointer(like), count)


@intrinsic
def stream(typingctx, dst, src, count):
    """dst[:count] = src[:count], bit for bit, each whole 64-byte line of dst by one non-temporal store.

    The elements before dst's first line boundary and after its last line go by plain stores, and so do all
    of them where dst is not aligned to its element size (no line of it is then whole); src needs no
    alignment. The stores are weakly ordered: call fence() before the kernel returns.
    """
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.dtype == src.dtype
            and isinstance(count, types.Integer)):
        raise TypingError(f"stream expects two arrays of one dtype and a count, got {dst}, {src}, {count}")

    def codegen(context, builder, sig, args):
        element = context.get_data_type(dst.dtype)
        size = context.get_abi_sizeof(element)
        vector = ir.VectorType(element, _LINE // size)
        intp = context.get_value_type(types.intp)
        out = context.make_array(dst)(context, builder, args[0]).data
        src_data = context.make_array(src)(context, builder, args[1]).data
        n = context.cast(builder, args[2], count, types.intp)
        address = builder.ptrtoint(out, intp)
        to_line = builder.udiv(builder.and_(builder.neg(address), intp(_LINE - 1)), intp(size))
        element_aligned = builder.icmp_unsigned("==", builder.and_(address, intp(size - 1)), intp(0))
        head = builder.select(element_aligned, builder.select(builder.icmp_signed("<", to_line, n), to_line, n), n)
        lines = builder.udiv(builder.sub(n, head), intp(vector.count))
        tail = builder.add(head, builder.mul(lines, intp(vector.count)))
        nontemporal = builder.module.add_metadata([ir.Constant(_I32, 1)])

        def copy(lo, hi):
            with cgutils.for_range_slice(builder, lo, hi, intp(1)) as (i, _):
                builder.store(builder.load(builder.gep(src_data, [i])), builder.gep(out, [i]))

        copy(intp(0), head)
        with cgutils.for_range(builder, lines) as loop:
            i = builder.add(head, builder.mul(loop.index, intp(vector.count)))
            value = builder.load(builder.bitcast(builder.gep(src_data, [i]), vector.as_pointer()), align=size)
            builder.store(value, builder.bitcast(builder.gep(out, [i]), vector.as_pointer()),
                          align=_LINE).set_metadata("nontemporal", nontemporal)
        copy(tail, n)
        return context.get_dummy_value()

    return types.none(dst, src, count), codegen


@intrinsic
def fence(typingctx):
    """Order the calling thread's non-temporal stores before its later stores: x86's sfence (movnt stores are
    weakly ordered, and numba's parallel join is not documented to drain them), elsewhere a full fence."""
    def codegen(context, builder, sig, args):
        if builder.module.triple.startswith(("x86_64", "i386", "i686")):
            builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                        "llvm.x86.sse.sfence"), [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


def load(a, i, like):
    """a[i] in the compute dtype of `like` (a scalar of the call's compute dtype)."""


def store(a, i, value):
    """a[i] = value, rounded to a's storage dtype."""


@overload(load)
def _load(a, i, like):
    if a.dtype == types.uint16:
        return lambda a, i, like: _bf16_to_f32(a[i])
    if a.dtype == types.int16:
        return lambda a, i, like: _f16_to_f32(a[i])
    return lambda a, i, like: cast_like(a[i], like)


@overload(store)
def _store(a, i, value):
    if a.dtype == types.uint16:
        def store_bf16(a, i, value):
            a[i] = _f32_to_bf16(value)
        return store_bf16
    if a.dtype == types.int16:
        def store_f16(a, i, value):
            a[i] = _f32_to_f16(value)
        return store_f16

    def store_float(a, i, value):
        a[i] = value
    return store_float


def cast_like(value, like):
    """value converted to the dtype of the scalar `like`."""


@overload(cast_like)
def _cast_like(value, like):
    if like == types.float32:
        return lambda value, like: np.float32(value)
    return lambda value, like: np.float64(value)


def views(addresses, row, column, start, count, likes):
    """view() of each list of the tuple likes, at addresses[row, column], [row, column + 1], ...; None for
    an absent list (a None in likes)."""


def loads(arrays, i, like):
    """load() from each array of a tuple of views(); like (a zero) for an absent one."""


def stores(arrays, i, values):
    """store() of each value into its array of a tuple of views(); nothing for an absent one."""


@overload(views)
def _views(addresses, row, column, start, count, likes):
    if len(likes) == 0:
        return lambda addresses, row, column, start, count, likes: ()
    if likes[0] == types.none:
        def absent_first(addresses, row, column, start, count, likes):
            return (None,) + views(addresses, row, column + 1, start, count, likes[1:])
        return absent_first

    def first(addresses, row, column, start, count, likes):
        return ((view(addresses[row, column], start, count, likes[0]),)
                + views(addresses, row, column + 1, start, count, likes[1:]))
    return first


@overload(loads)
def _loads(arrays, i, like):
    if len(arrays) == 0:
        return lambda arrays, i, like: ()
    if arrays[0] == types.none:
        return lambda arrays, i, like: (like,) + loads(arrays[1:], i, like)
    return lambda arrays, i, like: (load(arrays[0], i, like),) + loads(arrays[1:], i, like)


@overload(stores)
def _stores(arrays, i, values):
    if len(arrays) == 0:
        return lambda arrays, i, values: None
    if arrays[0] == types.none:
        return lambda arrays, i, values: stores(arrays[1:], i, values[1:])

    def first(arrays, i, values):
        store(arrays[0], i, values[0])
        stores(arrays[1:], i, values[1:])
    return first
