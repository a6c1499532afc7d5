// The entry point mk_<op> of one op: the build compiles this file once per op of memkernels/ops/, with
// -DMK_OP=<op>. The op's trait, memkernels::ops::<op>, is generated from its spec (memkernels/op_traits.cuh).
#include "memkernels/multi_tensor.cuh"
#include "memkernels/op_traits.cuh"

#ifndef MK_OP
#error "build with -DMK_OP=<op> (memkernels/backends/cuda/_build.py does)"
#endif

#define MK_PASTE(a, b) a##b
#define MK_ENTRY(op) MK_PASTE(mk_, op)

extern "C" MK_API int MK_ENTRY(MK_OP)(const mk_launch* launch, const memkernels::ops::MK_OP::Args* args) {
  return memkernels::launch<memkernels::ops::MK_OP>(launch, args);
}
