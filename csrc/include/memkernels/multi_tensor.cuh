// One launch updates every tensor of an op call.
//
// A persistent grid walks the chunks of a device-side table (api.h): each block
// takes chunks blockIdx.x, blockIdx.x + gridDim.x, ..., finds the chunk's row by
// binary search over chunk_begin (unless it is the row of its previous chunk), and runs math.h's step on every element of the
// chunk with 16-byte vector loads and stores when the row is aligned (scalar
// otherwise and for the tail). Diagnostics are summed per thread in double,
// reduced per block and added with atomicAdd once per block: no second pass.
// With mk_launch.step_scalars the per-step values are read by every thread and
// the op's scalars derived from them on the device (math.h's make_*_scalars), so
// a captured CUDA graph replays with whatever values the tensor holds then.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "memkernels/api.h"
#include "memkernels/math.h"

namespace memkernels {

constexpr int kBlock = 256;
constexpr int64_t kChunkElems = 16384;  // a multiple of every vector width (at most 8 elements)

// ------------------------------------------------------------------ storage types

template <typename S> struct DtypeCode;
template <> struct DtypeCode<float> { static constexpr int value = MK_F32; };
template <> struct DtypeCode<__half> { static constexpr int value = MK_F16; };
template <> struct DtypeCode<__nv_bfloat16> { static constexpr int value = MK_BF16; };
template <> struct DtypeCode<double> { static constexpr int value = MK_F64; };

// Math runs in float for fp16/bf16/fp32 parameters, in double for fp64.
template <typename P> struct ComputeOf { using type = float; };
template <> struct ComputeOf<double> { using type = double; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename C, typename S>
__device__ __forceinline__ C to_compute(S x) { return C(to_float(x)); }
template <> __device__ __forceinline__ float to_compute<float, double>(double x) { return float(x); }
template <> __device__ __forceinline__ double to_compute<double, double>(double x) { return x; }

// Rounded once, to nearest even, on write-back.
template <typename S> __device__ __forceinline__ S from_compute(float x);
template <> __device__ __forceinline__ float from_compute<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_compute<double>(float x) { return double(x); }
template <> __device__ __forceinline__ __half from_compute<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_compute<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <typename S> __device__ __forceinline__ S from_compute(double x);
template <> __device__ __forceinline__ float from_compute<float>(double x) { return float(x); }
template <> __device__ __forceinline__ double from_compute<double>(double x) { return x; }

// N consecutive elements are moved as the widest words (at most 16 bytes) their alignment
// allows: the table pointers are generic, so the global-space intrinsics are what make
// these ld.global.v4 / st.global.v4 rather than generic accesses.
template <int BYTES> struct Word;
template <> struct Word<2> { using type = unsigned short; };
template <> struct Word<4> { using type = unsigned int; };
template <> struct Word<8> { using type = uint2; };
template <> struct Word<16> { using type = uint4; };

template <typename S, int N>
union Pack {
  static constexpr int kBytes = int(sizeof(S)) * N;
  using W = typename Word<(kBytes >= 16 ? 16 : kBytes)>::type;
  static constexpr int kWords = kBytes / int(sizeof(W));
  W w[kWords];
  S v[N];
};

template <typename S, typename C, int N>
__device__ __forceinline__ void load_pack(const void* base, int64_t i, C (&out)[N]) {
  using P = Pack<S, N>;
  P pack;
  const auto* src = reinterpret_cast<const typename P::W*>(static_cast<const S*>(base) + i);
#pragma unroll
  for (int k = 0; k < P::kWords; ++k) pack.w[k] = __ldca(src + k);
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = to_compute<C>(pack.v[j]);
}

template <typename S, typename C, int N>
__device__ __forceinline__ void store_pack(void* base, int64_t i, const C (&in)[N]) {
  using P = Pack<S, N>;
  P pack;
#pragma unroll
  for (int j = 0; j < N; ++j) pack.v[j] = from_compute<S>(in[j]);
  auto* dst = reinterpret_cast<typename P::W*>(static_cast<S*>(base) + i);
#pragma unroll
  for (int k = 0; k < P::kWords; ++k) __stwb(dst + k, pack.w[k]);
}

// A state or grad_ref list is stored in the params' dtype P, float32 or float64.
template <typename P, typename C, int N>
__device__ __forceinline__ void load_any(const void* base, int dtype, int64_t i, C (&out)[N]) {
  if (dtype == DtypeCode<P>::value) load_pack<P>(base, i, out);
  else if (dtype == MK_F32) load_pack<float>(base, i, out);
  else load_pack<double>(base, i, out);
}

template <typename P, typename C, int N>
__device__ __forceinline__ void store_any(void* base, int dtype, int64_t i, const C (&in)[N]) {
  if (dtype == DtypeCode<P>::value) store_pack<P>(base, i, in);
  else if (dtype == MK_F32) store_pack<float>(base, i, in);
  else store_pack<double>(base, i, in);
}

__device__ __forceinline__ double read_scalar(const void* ptr, int dtype) {
  switch (dtype) {
    case MK_F16: return double(__half2float(*static_cast<const __half*>(ptr)));
    case MK_BF16: return double(__bfloat162float(*static_cast<const __nv_bfloat16*>(ptr)));
    case MK_F64: return *static_cast<const double*>(ptr);
    default: return double(*static_cast<const float*>(ptr));
  }
}

// -------------------------------------------------------------------- the kernel

template <typename C, class Op>
struct KernelParams {
  const int64_t* table;
  int n_tensors;
  int64_t n_chunks;
  int state_dtype[2];
  bool state_present[2];
  int ref_dtype;
  bool read_ref;   // M is needed (correction != 0 or diagnostics) and grad_refs exist
  bool write_ref;  // trajectory mode: store the processed g into grad_refs
  bool maximize, update_grad_refs;
  const void* grad_scale;
  int grad_scale_dtype;
  const void* found_inf;
  int found_inf_dtype;
  double* diagnostics;
  typename Op::template Scalars<C> s;  // derived on the host (unused with step_scalars)
};

// With step_scalars the kernel derives the scalars from args, whose per-step fields it replaces by the
// values read there. A separate type: a larger parameter block changes the code of the other kernels.
template <typename C, class Op>
struct StepKernelParams : KernelParams<C, Op> {
  typename Op::Args args;
  const double* step_scalars;
};

template <typename C, class Op, bool STEP>
using KernelParamsOf = std::conditional_t<STEP, StepKernelParams<C, Op>, KernelParams<C, Op>>;

struct Row {
  void* ptr[5];  // param, grad, state0, state1, grad_ref
  int64_t numel, chunk_begin;
  bool vec_ok;
};

__device__ __forceinline__ Row load_row(const int64_t* table, int t) {
  const int64_t* r = table + int64_t(t) * MK_TABLE_COLS;
  Row row;
#pragma unroll
  for (int k = 0; k < 5; ++k) row.ptr[k] = reinterpret_cast<void*>(__ldg(r + k));
  row.numel = __ldg(r + MK_COL_NUMEL);
  row.chunk_begin = __ldg(r + MK_COL_CHUNK_BEGIN);
  row.vec_ok = __ldg(r + MK_COL_VEC_OK) != 0;
  return row;
}

// The last row whose chunk_begin <= chunk.
__device__ __forceinline__ int find_row(const int64_t* table, int n, int64_t chunk) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (__ldg(table + int64_t(mid) * MK_TABLE_COLS + MK_COL_CHUNK_BEGIN) <= chunk) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// N consecutive elements starting at i of one row: load, step, store.
template <typename C, class Op>
using ScalarsOf = typename Op::template Scalars<C>;

template <int N, class Op, typename P, bool DIAG, typename C>
__device__ __forceinline__ void step_elements(const Row& row, int64_t i, const KernelParams<C, Op>& k,
                                              const ScalarsOf<C, Op>& scalars, const GradArgs<C>& grad_args,
                                              double (&acc)[NDIAG]) {
  constexpr int NS = Op::NSTATE;
  C p[N], grad[N], ref[N], st[NS][N];
  load_pack<P>(row.ptr[MK_COL_PARAM], i, p);
  load_pack<P>(row.ptr[MK_COL_GRAD], i, grad);
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    if (k.state_present[s]) load_any<P>(row.ptr[MK_COL_STATE0 + s], k.state_dtype[s], i, st[s]);
    else for (int j = 0; j < N; ++j) st[s][j] = C(0);
  }
  if (k.read_ref) load_any<P>(row.ptr[MK_COL_GRAD_REF], k.ref_dtype, i, ref);
#pragma unroll
  for (int j = 0; j < N; ++j) {
    C g = load_grad(grad[j], grad_args);
    C g_ref = k.read_ref ? load_ref(ref[j], grad_args) : C(0);
    C states[NS];
#pragma unroll
    for (int s = 0; s < NS; ++s) states[s] = st[s][j];
    Step<C, NS> out = Op::step(p[j], g, states, k.state_present[0], g_ref, k.read_ref, scalars);
    p[j] = out.p;
#pragma unroll
    for (int s = 0; s < NS; ++s) st[s][j] = out.states[s];
    ref[j] = out.g;
    if (DIAG) {
#pragma unroll
      for (int d = 0; d < NDIAG; ++d) acc[d] += double(out.diag.terms[d]);
    }
  }
  store_pack<P>(row.ptr[MK_COL_PARAM], i, p);
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    if (k.state_present[s]) store_any<P>(row.ptr[MK_COL_STATE0 + s], k.state_dtype[s], i, st[s]);
  }
  if (k.write_ref) store_any<P>(row.ptr[MK_COL_GRAD_REF], k.ref_dtype, i, ref);
}

// Sums acc over the block and adds it to out[0..NDIAG).
__device__ __forceinline__ void block_add(double (&acc)[NDIAG], double* out) {
  __shared__ double partial[NDIAG][kBlock / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int d = 0; d < NDIAG; ++d) {
    double v = acc[d];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) partial[d][warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int d = 0; d < NDIAG; ++d) {
      double v = lane < kBlock / 32 ? partial[d][lane] : 0.0;
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
      if (lane == 0) atomicAdd(out + d, v);
    }
  }
}

// STEP: the per-step scalars are read from k.step_scalars and the op's scalars derived here, as the
// host derives k.s (the same make_*_scalars), so both give the same bits for the same values.
template <class Op, typename P, bool DIAG, bool STEP>
__global__ void __launch_bounds__(kBlock)
multi_tensor_step(const KernelParamsOf<typename ComputeOf<P>::type, Op, STEP> k) {
  using C = typename ComputeOf<P>::type;
  constexpr int VEC = 16 / sizeof(P);
  if (k.found_inf != nullptr && read_scalar(k.found_inf, k.found_inf_dtype) != 0.0) return;
  double inv_scale = 1.0;
  if (k.grad_scale != nullptr) inv_scale = 1.0 / read_scalar(k.grad_scale, k.grad_scale_dtype);
  const GradArgs<C> grad_args = make_grad_args<C>(inv_scale, k.maximize, k.update_grad_refs);
  ScalarsOf<C, Op> derived{};
  if constexpr (STEP) {
    typename Op::Args args = k.args;
    Op::set_step(args, k.step_scalars);
    derived = Op::template scalars<C>(args);
  }
  const ScalarsOf<C, Op>& scalars = STEP ? derived : k.s;
  double acc[NDIAG] = {};
  Row row{};
  int64_t row_end = 0;  // one past the last chunk of row: a large tensor's row is searched once
  for (int64_t chunk = blockIdx.x; chunk < k.n_chunks; chunk += gridDim.x) {
    if (chunk < row.chunk_begin || chunk >= row_end) {
      row = load_row(k.table, find_row(k.table, k.n_tensors, chunk));
      row_end = row.chunk_begin + (row.numel + kChunkElems - 1) / kChunkElems;
    }
    const int64_t begin = (chunk - row.chunk_begin) * kChunkElems;
    const int64_t n = min(kChunkElems, row.numel - begin);
    int64_t done = 0;
    if (row.vec_ok) {
      done = n / VEC * VEC;
      for (int64_t i = int64_t(threadIdx.x) * VEC; i < done; i += int64_t(kBlock) * VEC) {
        step_elements<VEC, Op, P, DIAG>(row, begin + i, k, scalars, grad_args, acc);
      }
    }
    for (int64_t i = done + threadIdx.x; i < n; i += kBlock) {
      step_elements<1, Op, P, DIAG>(row, begin + i, k, scalars, grad_args, acc);
    }
  }
  if (DIAG) block_add(acc, k.diagnostics);
}

// -------------------------------------------------------------------- the launch

inline bool is_dtype(int64_t code) { return code >= MK_F32 && code <= MK_F64; }

// Restores the caller's current device (torch's) after launching on another.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    status_ = cudaGetDevice(&previous_);
    if (status_ == cudaSuccess && previous_ != device) status_ = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  cudaError_t status() const { return status_; }

 private:
  int previous_ = -1;
  cudaError_t status_;
};

template <class Op, typename P, bool DIAG, bool STEP>
int launch_typed(const mk_launch& L, const typename Op::Args& args) {
  using C = typename ComputeOf<P>::type;
  KernelParamsOf<C, Op, STEP> k;
  k.table = L.table;
  k.n_tensors = int(L.n_tensors);
  k.n_chunks = L.n_chunks;
  for (int s = 0; s < 2; ++s) {
    k.state_dtype[s] = int(L.state_dtype[s]);
    k.state_present[s] = s < Op::NSTATE && L.state_present[s] != 0;
  }
  k.ref_dtype = int(L.ref_dtype);
  k.read_ref = L.has_grad_refs != 0 && (args.correction != 0.0 || DIAG);
  k.write_ref = L.has_grad_refs != 0 && L.update_grad_refs != 0;
  k.maximize = L.maximize != 0;
  k.update_grad_refs = L.update_grad_refs != 0;
  k.grad_scale = L.grad_scale;
  k.grad_scale_dtype = int(L.grad_scale_dtype);
  k.found_inf = L.found_inf;
  k.found_inf_dtype = int(L.found_inf_dtype);
  k.diagnostics = L.diagnostics;
  if constexpr (STEP) {  // the per-step fields of args are placeholders: nothing is derived from them here
    k.s = {};
    k.args = args;
    k.step_scalars = L.step_scalars;
  } else {
    k.s = Op::template scalars<C>(args);
  }

  DeviceGuard guard(int(L.device));
  if (guard.status() != cudaSuccess) return guard.status();
  auto kernel = multi_tensor_step<Op, P, DIAG, STEP>;
  int sms = 0, per_sm = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, int(L.device));
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kBlock, 0);
  if (err != cudaSuccess) return err;
  int64_t blocks = int64_t(sms) * (per_sm > 0 ? per_sm : 1);
  if (blocks > L.n_chunks) blocks = L.n_chunks;
  kernel<<<unsigned(blocks), kBlock, 0, static_cast<cudaStream_t>(L.stream)>>>(k);
  return cudaGetLastError();
}

template <class Op, typename P>
int launch_dtype(const mk_launch& L, const typename Op::Args& args) {
  for (int s = 0; s < Op::NSTATE; ++s) {
    int64_t d = L.state_dtype[s];
    if (L.state_present[s] && d != DtypeCode<P>::value && d != MK_F32 && d != MK_F64) return MK_ERR_STATE_DTYPE;
  }
  int64_t r = L.ref_dtype;
  if (L.has_grad_refs && r != DtypeCode<P>::value && r != MK_F32 && r != MK_F64) return MK_ERR_STATE_DTYPE;
  const bool diag = L.diagnostics != nullptr;
  if (L.step_scalars != nullptr) {
    return diag ? launch_typed<Op, P, true, true>(L, args) : launch_typed<Op, P, false, true>(L, args);
  }
  return diag ? launch_typed<Op, P, true, false>(L, args) : launch_typed<Op, P, false, false>(L, args);
}

// The body of every extern "C" entry point: check, then dispatch on the params' dtype.
template <class Op>
int launch(const mk_launch* L, const typename Op::Args* args) {
  if (L == nullptr || args == nullptr || L->n_tensors < 0 || L->n_chunks < 0 || L->n_tensors > INT32_MAX ||
      (L->n_chunks > 0 && (L->table == nullptr || L->n_tensors == 0))) {
    return MK_ERR_ARGUMENT;
  }
  if ((L->grad_scale && !is_dtype(L->grad_scale_dtype)) || (L->found_inf && !is_dtype(L->found_inf_dtype))) {
    return MK_ERR_SCALAR_DTYPE;
  }
  if (L->n_chunks == 0) return 0;  // only empty tensors: nothing to change, nothing to add
  switch (L->param_dtype) {
    case MK_F32: return launch_dtype<Op, float>(*L, *args);
    case MK_F16: return launch_dtype<Op, __half>(*L, *args);
    case MK_BF16: return launch_dtype<Op, __nv_bfloat16>(*L, *args);
    case MK_F64: return launch_dtype<Op, double>(*L, *args);
    default: return MK_ERR_PARAM_DTYPE;
  }
}

}  // namespace memkernels
