// Library-wide entry points: ABI checks, build identity and error strings.
#include <cuda_runtime.h>

#include "memkernels/api.h"
#include "memkernels/multi_tensor.cuh"

#ifndef MK_SOURCE_HASH
#error "build with -DMK_SOURCE_HASH=\"...\" (memkernels/backends/cuda/_build.py does)"
#endif
#ifndef MK_ARCHS
#error "build with -DMK_ARCHS=\"...\" (memkernels/backends/cuda/_build.py does)"
#endif

// The hash sits behind a marker so that _cache.embedded_hash() can read it from the file.
static const char kSourceHash[] = "memkernels-source-hash:" MK_SOURCE_HASH;
static const char kHashMarker[] = "memkernels-source-hash:";

extern "C" {

MK_API int64_t mk_struct_size(int64_t which) {
  if (which == 0) return sizeof(mk_launch);
#define MK_ARGS_SIZE(k, op) \
  if (which == k) return sizeof(mk_##op##_args);
  MK_FOR_EACH_OP(MK_ARGS_SIZE)
#undef MK_ARGS_SIZE
  return -1;
}

MK_API int64_t mk_abi_version(void) { return MK_ABI_VERSION; }

MK_API int64_t mk_chunk_elems(void) { return memkernels::kChunkElems; }

MK_API const char* mk_source_hash(void) { return kSourceHash + sizeof(kHashMarker) - 1; }

MK_API const char* mk_archs(void) { return MK_ARCHS; }

MK_API const char* mk_layout(void) { return MK_LAYOUT; }

MK_API const char* mk_error_string(int code) {
  switch (code) {
    case 0: return "no error";
    case MK_ERR_ARGUMENT: return "memkernels: invalid mk_launch (counts, table pointer)";
    case MK_ERR_PARAM_DTYPE: return "memkernels: unsupported params dtype code";
    case MK_ERR_STATE_DTYPE:
      return "memkernels: a state, grad_ref or hvp dtype is neither the params' dtype, float32 nor float64";
    case MK_ERR_SCALAR_DTYPE: return "memkernels: unsupported grad_scale or found_inf dtype code";
    case MK_ERR_MODE:
      return "memkernels: invalid mode: probe needs origins and probe_tau and takes no diagnostics or reuse_hvp; "
             "reuse_hvp needs hvps and no grad_refs";
    default: return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}

}  // extern "C"
