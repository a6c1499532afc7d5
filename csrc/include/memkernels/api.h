/* The C ABI of libmemkernels_cuda.so, loaded by memkernels/backends/cuda/_abi.py with ctypes.
 *
 * Plain C types only (no torch headers), so one build serves every torch version.
 * Every struct field is 8 bytes wide so the ctypes mirror has no padding to get
 * wrong; mk_struct_size() lets the loader check the layout it mirrors.
 * Each op's part (its Args struct and entry point mk_<op>) is generated from
 * memkernels/ops/ into memkernels/op_args.h, in the build's include directory
 * (memkernels/backends/cuda/_layout.py says how); mk_layout() reports it.
 * Entry points return 0 or an error code; mk_error_string() says what it means.
 */
#ifndef MEMKERNELS_API_H
#define MEMKERNELS_API_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MK_API __attribute__((visibility("default")))

#define MK_ABI_VERSION 4

/* The most param-shaped states (state lists) an op may have: mk_launch's state arrays hold this many. */
#define MK_MAX_STATES 4

/* dtype codes */
#define MK_F32 0
#define MK_F16 1
#define MK_BF16 2
#define MK_F64 3

/* A table row (int64 each) per tensor with numel > 0, in device memory: param, grad, the op's
 * n_states state columns (its number of states, in spec order), then the tail below, so that a row
 * has MK_TABLE_COLS(n_states) columns. Chunks of mk_chunk_elems() elements are numbered across the
 * rows: row t owns chunks [chunk_begin, chunk_begin + ceil(numel / chunk_elems)). vec_ok is 1 when
 * every pointer of the row is 16-byte aligned (vector loads), else 0 (scalar loads). The pointer of
 * an absent list is 0. */
#define MK_COL_PARAM 0
#define MK_COL_GRAD 1
#define MK_COL_STATE0 2
enum mk_tail_column {  /* after the states: column MK_COL_STATE0 + n_states + MK_TAIL_... */
  MK_TAIL_GRAD_REF = 0,
  MK_TAIL_ORIGIN = 1, /* theta kept by the probe pass, read by the step after it */
  MK_TAIL_HVP = 2,    /* kept estimates of H d */
  MK_TAIL_NUMEL = 3,
  MK_TAIL_CHUNK_BEGIN = 4,
  MK_TAIL_VEC_OK = 5,
  MK_TAIL_COLS = 6
};
#define MK_TABLE_COLS(n_states) (MK_COL_STATE0 + (n_states) + MK_TAIL_COLS)

/* Error codes beyond CUDA's (cudaError_t values are returned as they are). */
#define MK_ERR_ARGUMENT 100001    /* a count or pointer of mk_launch is invalid */
#define MK_ERR_PARAM_DTYPE 100002 /* param_dtype is not a dtype code */
#define MK_ERR_STATE_DTYPE 100003 /* a state, grad_ref or hvp dtype is neither the params' nor f32/f64 */
#define MK_ERR_SCALAR_DTYPE 100004 /* grad_scale or found_inf has no dtype code */
#define MK_ERR_MODE 100005        /* probe / reuse_hvp without what they need (memkernels._ops.check_modes) */

/* What every op call passes besides its hyperparameters. */
typedef struct mk_launch {
  const int64_t* table;     /* device pointer: n_tensors rows of MK_TABLE_COLS(the op's number of states) */
  int64_t n_tensors;
  int64_t n_chunks;         /* total chunks over all rows */
  int64_t device;           /* CUDA device index of every pointer */
  void* stream;             /* cudaStream_t to launch on (torch's current stream) */
  int64_t param_dtype;      /* params and grads */
  int64_t state_dtype[MK_MAX_STATES];   /* the op's state lists, in spec order; the rest are not read */
  int64_t state_present[MK_MAX_STATES]; /* 0 for an absent list (sgd without momentum) */
  int64_t ref_dtype;
  int64_t has_grad_refs;    /* grad_refs given: M uses them, trajectory mode rewrites them */
  int64_t update_grad_refs; /* trajectory mode: read g_ref as is, then store the processed g */
  int64_t maximize;
  const void* grad_scale;   /* device scalar or NULL: g = grad / grad_scale */
  int64_t grad_scale_dtype;
  const void* found_inf;    /* device scalar or NULL: nonzero means change nothing */
  int64_t found_inf_dtype;
  double* diagnostics;      /* device float64[7] to add the diagnostic sums to, or NULL */
  const double* step_scalars; /* device float64[] or NULL: the op's spec.step_scalars in order, read
                                 by the kernel in place of the args' fields of those names */
  int64_t has_origins;      /* step: theta is read from the origin column; probe: it is stored there */
  int64_t has_hvps;         /* the hvp column: a step stores its estimate there, or reads it (reuse_hvp) */
  int64_t hvp_dtype;
  int64_t reuse_hvp;        /* hvp is read from the hvp column instead of estimated from grad_refs */
  int64_t probe;            /* the probe pass: origin = theta, param = theta + tau d (needs origins, probe_tau) */
  const double* probe_tau;  /* device float64 or NULL: probe: tau; step: hvp_scale = 1 / tau (0 if tau == 0) */
  double* probe_norms;      /* device float64[2] or NULL: the probe pass adds sum theta^2, sum d^2 */
} mk_launch;

#include "memkernels/op_args.h" /* generated: mk_<op>_args, mk_<op>(), MK_FOR_EACH_OP, MK_LAYOUT */

/* The struct mk_struct_size(k) measures: k = 0 mk_launch, k = 1, 2, ... the ops' Args in MK_FOR_EACH_OP's
 * order; -1 otherwise. */
MK_API int64_t mk_struct_size(int64_t which);
MK_API int64_t mk_abi_version(void);
MK_API int64_t mk_chunk_elems(void);
MK_API const char* mk_source_hash(void); /* hash of the sources it was built from, generated headers included */
MK_API const char* mk_archs(void);       /* the MEMKERNELS_CUDA_ARCHS it was built for */
MK_API const char* mk_layout(void);      /* MK_LAYOUT: each op's states, Args fields and step scalars */
MK_API const char* mk_error_string(int code);

#ifdef __cplusplus
}
#endif

#endif /* MEMKERNELS_API_H */
