// mk_sgd: heavy-ball / Nesterov SGD with the memory correction, one launch per op call.
#include "memkernels/multi_tensor.cuh"

namespace memkernels {
namespace {

struct SGDOp {
  using Args = mk_sgd_args;
  static constexpr int NSTATE = 1;  // momentum_buffer; absent when momentum == 0
  template <typename T>
  using Scalars = SGDScalars<T>;

  template <typename T>
  MK_HD static SGDScalars<T> scalars(const Args& a) {
    return make_sgd_scalars<T>(a.lr, a.momentum, a.weight_decay, a.nesterov != 0, a.update_scale,
                               a.memory_coef, a.correction, a.correction_limit, a.hvp_scale,
                               a.memoryless != 0);
  }

  // memkernels._ops.STEP_SCALARS["sgd"], in order, in place of the placeholders of args.
  __device__ __forceinline__ static void set_step(Args& a, const double* v) {
    a.lr = v[0];
    a.update_scale = v[1];
    a.memory_coef = v[2];
    a.hvp_scale = v[3];
  }

  template <typename T>
  __device__ __forceinline__ static Step<T, 1> step(T p, T g, const T (&states)[1], bool has_momentum,
                                                    T hvp, bool has_hvp, const SGDScalars<T>& s) {
    return sgd(p, g, states[0], has_momentum, hvp, has_hvp, s);
  }

  template <typename T>
  __device__ __forceinline__ static T direction(T p, T g, const SGDScalars<T>& s) {
    return sgd_direction(p, g, s);
  }
};

}  // namespace
}  // namespace memkernels

extern "C" MK_API int mk_sgd(const mk_launch* launch, const mk_sgd_args* args) {
  return memkernels::launch<memkernels::SGDOp>(launch, args);
}
