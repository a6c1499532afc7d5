// mk_lion: Lion / Lion-K with the memory correction, one launch per op call.
#include "memkernels/multi_tensor.cuh"

namespace memkernels {
namespace {

struct LionOp {
  using Args = mk_lion_args;
  static constexpr int NSTATE = 1;  // exp_avg
  template <typename T>
  using Scalars = LionScalars<T>;

  template <typename T>
  MK_HD static LionScalars<T> scalars(const Args& a) {
    return make_lion_scalars<T>(a.lr, a.beta1, a.beta2, a.weight_decay, a.smoothing, a.ema_weight,
                                a.age_weight, a.correction, a.correction_limit, a.hvp_scale,
                                a.memoryless != 0);
  }

  // memkernels._ops.STEP_SCALARS["lion"], in order, in place of the placeholders of args.
  __device__ __forceinline__ static void set_step(Args& a, const double* v) {
    a.lr = v[0];
    a.ema_weight = v[1];
    a.age_weight = v[2];
    a.hvp_scale = v[3];
  }

  template <typename T>
  __device__ __forceinline__ static Step<T, 1> step(T p, T g, const T (&states)[1], bool, T hvp,
                                                    bool has_hvp, const LionScalars<T>& s) {
    return lion(p, g, states[0], hvp, has_hvp, s);
  }

  template <typename T>
  __device__ __forceinline__ static T direction(T p, T g, const LionScalars<T>& s) {
    return lion_direction(p, g, s);
  }
};

}  // namespace
}  // namespace memkernels

extern "C" MK_API int mk_lion(const mk_launch* launch, const mk_lion_args* args) {
  return memkernels::launch<memkernels::LionOp>(launch, args);
}
