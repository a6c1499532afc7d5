// One launch updates every tensor of an op call. Op is the op's trait (memkernels::ops::<op>, generated from its
// spec into memkernels/op_traits.cuh): its Args, its number of states, set_step and the calls of math.h.
//
// A persistent grid walks the chunks of a device-side table (api.h): each block
// takes chunks blockIdx.x, blockIdx.x + gridDim.x, ..., finds the chunk's row by
// binary search over chunk_begin (unless it is the row of its previous chunk), and runs math.h's step on every element of the
// chunk with 16-byte vector loads and stores when the row is aligned (scalar
// otherwise and for the tail). Diagnostics are summed per thread in double,
// reduced per block and added with atomicAdd once per block: no second pass.
// With mk_launch.step_scalars the per-step values are read by every thread and
// the op's scalars derived from them on the device (Op::scalars: math.h's make_<op>_scalars), so
// a captured CUDA graph replays with whatever values the tensor holds then.
// The probe pass (theta kept in the origin column, theta + tau d into params,
// theta^2 and d^2 reduced like the diagnostics) and the step that reads theta
// from the origins, stores or reuses kept HVP estimates, or takes hvp_scale from
// probe_tau are their own instantiations (Pass): the plain step carries none of it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

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

template <typename S, int N>
__device__ __forceinline__ Pack<S, N> load_words(const void* base, int64_t i) {
  using P = Pack<S, N>;
  P pack;
  const auto* src = reinterpret_cast<const typename P::W*>(static_cast<const S*>(base) + i);
#pragma unroll
  for (int k = 0; k < P::kWords; ++k) pack.w[k] = __ldca(src + k);
  return pack;
}

template <typename S, int N>
__device__ __forceinline__ void store_words(void* base, int64_t i, const Pack<S, N>& pack) {
  using P = Pack<S, N>;
  auto* dst = reinterpret_cast<typename P::W*>(static_cast<S*>(base) + i);
#pragma unroll
  for (int k = 0; k < P::kWords; ++k) __stwb(dst + k, pack.w[k]);
}

template <typename S, typename C, int N>
__device__ __forceinline__ void unpack(const Pack<S, N>& pack, C (&out)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = to_compute<C>(pack.v[j]);
}

template <typename S, typename C, int N>
__device__ __forceinline__ void load_pack(const void* base, int64_t i, C (&out)[N]) {
  unpack(load_words<S, N>(base, i), out);
}

template <typename S, typename C, int N>
__device__ __forceinline__ void store_pack(void* base, int64_t i, const C (&in)[N]) {
  Pack<S, N> pack;
#pragma unroll
  for (int j = 0; j < N; ++j) pack.v[j] = from_compute<S>(in[j]);
  store_words(base, i, pack);
}

// A state, grad_ref or hvp list is stored in the params' dtype P, float32 or float64.
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

// The op's scalars as math.h's make_<op>_scalars derives them in compute type C.
template <typename C, class Op>
using ScalarsOf = decltype(Op::template scalars<C>(std::declval<const typename Op::Args&>()));

// What a kernel runs: the step; the step with origins, kept HVP estimates or probe_tau (runtime choices
// read only in this instantiation); the probe pass.
enum class Pass { kStep, kStepKept, kProbe };

template <typename C, class Op>
struct KernelParams {
  const int64_t* table;
  int n_tensors;
  int64_t n_chunks;
  int state_dtype[Op::kStates];
  bool state_present[Op::kStates];
  int ref_dtype;
  bool read_ref;   // M is needed (correction != 0 or diagnostics) and grad_refs exist
  bool write_ref;  // trajectory mode: store the processed g into grad_refs
  bool maximize, update_grad_refs;
  const void* grad_scale;
  int grad_scale_dtype;
  const void* found_inf;
  int found_inf_dtype;
  double* diagnostics;
  ScalarsOf<C, Op> s;  // derived on the host (unused with step_scalars)
};

// With step_scalars the kernel derives the scalars from args, whose per-step fields it replaces by the
// values read there. A separate type: a larger parameter block changes the code of the other kernels.
template <typename C, class Op>
struct StepKernelParams : KernelParams<C, Op> {
  typename Op::Args args;
  const double* step_scalars;
};

// The kept-HVP step's and the probe pass's fields: appended, for the same reason.
struct PassParams {
  int hvp_dtype;
  bool has_origins;         // step: theta is read from the origin column
  bool read_hvp;            // step: M is needed and hvp is read from the hvp column (reuse_hvp)
  bool write_hvp;           // step: the estimate from grad_refs is stored into the hvp column
  const double* probe_tau;  // step: hvp_scale = 1 / tau (or NULL); probe: the displacement tau
  double* probe_norms;      // probe: sum theta^2 and sum d^2 are added here (or NULL)
};

template <class Base>
struct WithPass : Base {
  PassParams pass;
};

template <typename C, class Op, bool STEP>
using StepOrHost = std::conditional_t<STEP, StepKernelParams<C, Op>, KernelParams<C, Op>>;

template <typename C, class Op, bool STEP, Pass PASS>
using KernelParamsOf = std::conditional_t<PASS == Pass::kStep, StepOrHost<C, Op, STEP>,
                                          WithPass<StepOrHost<C, Op, STEP>>>;

// The table's columns for an op of NS states (api.h): param, grad, the states, then the tail.
template <int NS>
struct Cols {
  static constexpr int kGradRef = MK_COL_STATE0 + NS + MK_TAIL_GRAD_REF;
  static constexpr int kOrigin = MK_COL_STATE0 + NS + MK_TAIL_ORIGIN;
  static constexpr int kHvp = MK_COL_STATE0 + NS + MK_TAIL_HVP;
  static constexpr int kNumel = MK_COL_STATE0 + NS + MK_TAIL_NUMEL;
  static constexpr int kChunkBegin = MK_COL_STATE0 + NS + MK_TAIL_CHUNK_BEGIN;
  static constexpr int kVecOk = MK_COL_STATE0 + NS + MK_TAIL_VEC_OK;
  static constexpr int kWidth = MK_TABLE_COLS(NS);
};

// The plain step reads the pointers up to grad_ref, the other passes up to hvp.
template <Pass PASS, int NS>
constexpr int kRowPointers = PASS == Pass::kStep ? Cols<NS>::kGradRef + 1 : Cols<NS>::kHvp + 1;

template <int NPTR>
struct Row {
  void* ptr[NPTR];  // by column: param, grad, the states, grad_ref[, origin, hvp]
  int64_t numel, chunk_begin;
  bool vec_ok;
};

template <int NPTR, int NS>
__device__ __forceinline__ Row<NPTR> load_row(const int64_t* table, int t) {
  const int64_t* r = table + int64_t(t) * Cols<NS>::kWidth;
  Row<NPTR> row;
#pragma unroll
  for (int k = 0; k < NPTR; ++k) row.ptr[k] = reinterpret_cast<void*>(__ldg(r + k));
  row.numel = __ldg(r + Cols<NS>::kNumel);
  row.chunk_begin = __ldg(r + Cols<NS>::kChunkBegin);
  row.vec_ok = __ldg(r + Cols<NS>::kVecOk) != 0;
  return row;
}

template <int NS>
__device__ __forceinline__ int64_t chunk_begin_of(const int64_t* table, int t) {
  return __ldg(table + int64_t(t) * Cols<NS>::kWidth + Cols<NS>::kChunkBegin);
}

// The last row in [lo, n) whose chunk_begin <= chunk.
template <int NS>
__device__ __forceinline__ int find_row(const int64_t* table, int lo, int n, int64_t chunk) {
  int hi = n - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (chunk_begin_of<NS>(table, mid) <= chunk) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// N consecutive elements starting at i of one row: load, step, store (backends/reference.py's _run).
template <int N, class Op, typename P, bool DIAG, Pass PASS, class K, int NPTR, typename C>
__device__ __forceinline__ void step_elements(const Row<NPTR>& row, int64_t i, const K& k,
                                              const ScalarsOf<C, Op>& scalars, const GradArgs<C>& grad_args,
                                              C hvp_scale, double (&acc)[NDIAG]) {
  constexpr bool KEPT = PASS == Pass::kStepKept;
  constexpr int NS = Op::kStates;
  using Col = Cols<NS>;
  C p[N], grad[N], ref[N], st[NS][N], hvp[N];
  const void* theta = row.ptr[MK_COL_PARAM];
  if constexpr (KEPT) {
    if (k.pass.has_origins) theta = row.ptr[Col::kOrigin];
  }
  load_pack<P>(theta, i, p);
  load_pack<P>(row.ptr[MK_COL_GRAD], i, grad);
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    if (k.state_present[s]) load_any<P>(row.ptr[MK_COL_STATE0 + s], k.state_dtype[s], i, st[s]);
    else for (int j = 0; j < N; ++j) st[s][j] = C(0);
  }
  if (k.read_ref) load_any<P>(row.ptr[Col::kGradRef], k.ref_dtype, i, ref);
  bool has_hvp = k.read_ref;
  if constexpr (KEPT) {  // the estimates first, stored before the step: they need no registers through it
    if (k.pass.read_hvp) {
      load_any<P>(row.ptr[Col::kHvp], k.pass.hvp_dtype, i, hvp);
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        C g = load_grad(grad[j], grad_args);
        hvp[j] = k.read_ref ? estimate_hvp(load_ref(ref[j], grad_args), g, hvp_scale) : C(0);
      }
    }
    if (k.pass.write_hvp) store_any<P>(row.ptr[Col::kHvp], k.pass.hvp_dtype, i, hvp);
    has_hvp = has_hvp || k.pass.read_hvp;  // grad_refs are empty when hvps are read
  }
#pragma unroll
  for (int j = 0; j < N; ++j) {
    C g = load_grad(grad[j], grad_args);
    C hvp_j;
    if constexpr (KEPT) hvp_j = hvp[j];
    else hvp_j = k.read_ref ? estimate_hvp(load_ref(ref[j], grad_args), g, hvp_scale) : C(0);
    C states[NS];
#pragma unroll
    for (int s = 0; s < NS; ++s) states[s] = st[s][j];
    Step<C, NS> out = Op::step(p[j], g, states, k.state_present, hvp_j, has_hvp, scalars);
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
  if (k.write_ref) store_any<P>(row.ptr[Col::kGradRef], k.ref_dtype, i, ref);
}

// The probe pass on N consecutive elements: origin = theta (its words: an exact copy), param = theta + tau d.
template <int N, class Op, typename P, bool NORMS, int NPTR, typename C>
__device__ __forceinline__ void probe_elements(const Row<NPTR>& row, int64_t i, const ScalarsOf<C, Op>& scalars,
                                               const GradArgs<C>& grad_args, C tau, double (&acc)[2]) {
  const Pack<P, N> theta = load_words<P, N>(row.ptr[MK_COL_PARAM], i);
  store_words(row.ptr[Cols<Op::kStates>::kOrigin], i, theta);
  C p[N], grad[N];
  unpack(theta, p);
  load_pack<P>(row.ptr[MK_COL_GRAD], i, grad);
#pragma unroll
  for (int j = 0; j < N; ++j) {
    C g = load_grad(grad[j], grad_args);
    Probe<C> out = probe(p[j], Op::direction(p[j], g, scalars), tau);
    p[j] = out.p;
    if (NORMS) {
      acc[0] += double(out.theta_sq);
      acc[1] += double(out.d_sq);
    }
  }
  store_pack<P>(row.ptr[MK_COL_PARAM], i, p);
}

// Sums acc over the block and adds it to out[0..ND).
template <int ND>
__device__ __forceinline__ void block_add(double (&acc)[ND], double* out) {
  __shared__ double partial[ND][kBlock / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int d = 0; d < ND; ++d) {
    double v = acc[d];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) partial[d][warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int d = 0; d < ND; ++d) {
      double v = lane < kBlock / 32 ? partial[d][lane] : 0.0;
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
      if (lane == 0) atomicAdd(out + d, v);
    }
  }
}

template <int N>
using Width = std::integral_constant<int, N>;

// Calls elements(Width<N>(), row, i) for this block's chunks, N = VEC consecutive elements at a time
// where the row is aligned (1 otherwise and for the tail). NS: the op's states (the table's width).
template <int VEC, int NPTR, int NS, class F>
__device__ __forceinline__ void for_each_chunk(const int64_t* table, int n_tensors, int64_t n_chunks, F&& elements) {
  int t = 0;  // the row of the previous chunk: chunks only grow, so a large tensor's row is searched once
  for (int64_t chunk = blockIdx.x; chunk < n_chunks; chunk += gridDim.x) {
    if (t + 1 < n_tensors && chunk_begin_of<NS>(table, t + 1) <= chunk) {
      t = find_row<NS>(table, t + 1, n_tensors, chunk);
    }
    // Re-read per chunk (cache hits) rather than kept: no row state lives through the element loops, where
    // ptxas would spill it to reach an occupancy step.
    const Row<NPTR> row = load_row<NPTR, NS>(table, t);
    const int64_t begin = (chunk - row.chunk_begin) * kChunkElems;
    const int n = int(min(kChunkElems, row.numel - begin));  // offsets in a chunk fit an int
    const int vectors = row.vec_ok ? n / VEC : 0;
    for (int v = threadIdx.x; v < vectors; v += kBlock) elements(Width<VEC>(), row, begin + v * VEC);
    for (int i = vectors * VEC + int(threadIdx.x); i < n; i += kBlock) elements(Width<1>(), row, begin + i);
  }
}

// The step's hvp_scale: with probe_tau, 1 / tau in double (0 if tau == 0) rounded once, the host's rule.
template <Pass PASS, typename C, class K>
__device__ __forceinline__ C step_hvp_scale(const K& k, C hvp_scale) {
  if constexpr (PASS == Pass::kStepKept) {
    if (k.pass.probe_tau != nullptr) {
      const double tau = *k.pass.probe_tau;
      return C(tau > 0.0 ? 1.0 / tau : 0.0);
    }
  }
  return hvp_scale;
}

// STEP: the per-step scalars are read from k.step_scalars and the op's scalars derived here, as the
// host derives k.s (the same make_*_scalars), so both give the same bits for the same values.
// DIAG: the per-element terms are reduced (diagnostics; in the probe pass, probe_norms).
template <class Op, typename P, bool DIAG, bool STEP, Pass PASS>
__global__ void __launch_bounds__(kBlock)
multi_tensor_step(const KernelParamsOf<typename ComputeOf<P>::type, Op, STEP, PASS> k) {
  using C = typename ComputeOf<P>::type;
  constexpr int VEC = 16 / sizeof(P);
  constexpr int NS = Op::kStates;
  constexpr int NPTR = kRowPointers<PASS, NS>;
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
  if constexpr (PASS == Pass::kProbe) {
    const C tau = C(*k.pass.probe_tau);
    double acc[2] = {};
    for_each_chunk<VEC, NPTR, NS>(k.table, k.n_tensors, k.n_chunks, [&](auto n, const Row<NPTR>& row, int64_t i) {
      probe_elements<decltype(n)::value, Op, P, DIAG>(row, i, scalars, grad_args, tau, acc);
    });
    if (DIAG) block_add(acc, k.pass.probe_norms);
  } else {
    const C hvp_scale = step_hvp_scale<PASS>(k, scalars.hvp_scale);
    double acc[NDIAG] = {};
    for_each_chunk<VEC, NPTR, NS>(k.table, k.n_tensors, k.n_chunks, [&](auto n, const Row<NPTR>& row, int64_t i) {
      step_elements<decltype(n)::value, Op, P, DIAG, PASS>(row, i, k, scalars, grad_args, hvp_scale, acc);
    });
    if (DIAG) block_add(acc, k.diagnostics);
  }
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

template <class Op, typename P, bool DIAG, bool STEP, Pass PASS>
int launch_typed(const mk_launch& L, const typename Op::Args& args) {
  using C = typename ComputeOf<P>::type;
  KernelParamsOf<C, Op, STEP, PASS> k;
  k.table = L.table;
  k.n_tensors = int(L.n_tensors);
  k.n_chunks = L.n_chunks;
  for (int s = 0; s < Op::kStates; ++s) {
    k.state_dtype[s] = int(L.state_dtype[s]);
    k.state_present[s] = L.state_present[s] != 0;
  }
  k.ref_dtype = int(L.ref_dtype);
  const bool need_hvp = args.correction != 0.0 || DIAG;
  const bool write_hvp = L.has_hvps != 0 && L.reuse_hvp == 0 && L.has_grad_refs != 0;  // stored even if unused
  k.read_ref = L.has_grad_refs != 0 && (need_hvp || write_hvp);
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
  if constexpr (PASS != Pass::kStep) {
    k.pass.hvp_dtype = int(L.hvp_dtype);
    k.pass.has_origins = L.has_origins != 0;
    k.pass.read_hvp = L.has_hvps != 0 && L.reuse_hvp != 0 && need_hvp;
    k.pass.write_hvp = write_hvp;
    k.pass.probe_tau = L.probe_tau;
    k.pass.probe_norms = L.probe_norms;
  }

  DeviceGuard guard(int(L.device));
  if (guard.status() != cudaSuccess) return guard.status();
  auto kernel = multi_tensor_step<Op, P, DIAG, STEP, PASS>;
  int sms = 0, per_sm = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, int(L.device));
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kBlock, 0);
  if (err != cudaSuccess) return err;
  int64_t blocks = int64_t(sms) * (per_sm > 0 ? per_sm : 1);
  if (blocks > L.n_chunks) blocks = L.n_chunks;
  kernel<<<unsigned(blocks), kBlock, 0, static_cast<cudaStream_t>(L.stream)>>>(k);
  return cudaGetLastError();
}

template <class Op, typename P, Pass PASS>
int launch_pass(const mk_launch& L, const typename Op::Args& args, bool diag) {
  if (L.step_scalars != nullptr) {
    return diag ? launch_typed<Op, P, true, true, PASS>(L, args) : launch_typed<Op, P, false, true, PASS>(L, args);
  }
  return diag ? launch_typed<Op, P, true, false, PASS>(L, args) : launch_typed<Op, P, false, false, PASS>(L, args);
}

// A state, grad_ref or hvp list of dtype d: P, float32 or float64.
template <typename P>
bool state_dtype_ok(int64_t d) { return d == DtypeCode<P>::value || d == MK_F32 || d == MK_F64; }

template <class Op, typename P>
int launch_dtype(const mk_launch& L, const typename Op::Args& args) {
  for (int s = 0; s < Op::kStates; ++s) {
    if (L.state_present[s] && !state_dtype_ok<P>(L.state_dtype[s])) return MK_ERR_STATE_DTYPE;
  }
  if (L.has_grad_refs && !state_dtype_ok<P>(L.ref_dtype)) return MK_ERR_STATE_DTYPE;
  if (L.has_hvps && !state_dtype_ok<P>(L.hvp_dtype)) return MK_ERR_STATE_DTYPE;
  if (L.probe) return launch_pass<Op, P, Pass::kProbe>(L, args, L.probe_norms != nullptr);
  const bool diag = L.diagnostics != nullptr;
  if (L.has_origins || L.has_hvps || L.probe_tau != nullptr) return launch_pass<Op, P, Pass::kStepKept>(L, args, diag);
  return launch_pass<Op, P, Pass::kStep>(L, args, diag);
}

// The body of every extern "C" entry point: check, then dispatch on the params' dtype.
template <class Op>
int launch(const mk_launch* L, const typename Op::Args* args) {
  static_assert(Op::kStates >= 1 && Op::kStates <= MK_MAX_STATES, "mk_launch carries 1 to MK_MAX_STATES states");
  if (L == nullptr || args == nullptr || L->n_tensors < 0 || L->n_chunks < 0 || L->n_tensors > INT32_MAX ||
      (L->n_chunks > 0 && (L->table == nullptr || L->n_tensors == 0))) {
    return MK_ERR_ARGUMENT;
  }
  if ((L->grad_scale && !is_dtype(L->grad_scale_dtype)) || (L->found_inf && !is_dtype(L->found_inf_dtype))) {
    return MK_ERR_SCALAR_DTYPE;
  }
  if ((L->probe && (!L->has_origins || L->probe_tau == nullptr || L->diagnostics != nullptr || L->reuse_hvp)) ||
      (L->reuse_hvp && (!L->has_hvps || L->has_grad_refs))) {
    return MK_ERR_MODE;
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
