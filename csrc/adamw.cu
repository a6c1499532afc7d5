// mk_adamw: AdamW / Adam-L2 with the memory correction, one launch per op call.
#include "memkernels/multi_tensor.cuh"

namespace memkernels {
namespace {

struct AdamWOp {
  using Args = mk_adamw_args;
  static constexpr int NSTATE = 2;  // exp_avg, exp_avg_sq
  template <typename T>
  using Scalars = AdamWScalars<T>;

  template <typename T>
  MK_HD static AdamWScalars<T> scalars(const Args& a) {
    return make_adamw_scalars<T>(a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.bias_correction1,
                                 a.bias_correction2, a.mean_age1, a.mean_age2, a.correction, a.correction_limit,
                                 a.hvp_scale, a.decoupled != 0, a.eps_inside_sqrt != 0, a.memoryless != 0);
  }

  // memkernels._ops.STEP_SCALARS["adamw"], in order, in place of the placeholders of args.
  __device__ __forceinline__ static void set_step(Args& a, const double* v) {
    a.lr = v[0];
    a.bias_correction1 = v[1];
    a.bias_correction2 = v[2];
    a.mean_age1 = v[3];
    a.mean_age2 = v[4];
    a.hvp_scale = v[5];
  }

  template <typename T>
  __device__ __forceinline__ static Step<T, 2> step(T p, T g, const T (&states)[2], bool, T hvp,
                                                    bool has_hvp, const AdamWScalars<T>& s) {
    return adamw(p, g, states[0], states[1], hvp, has_hvp, s);
  }

  template <typename T>
  __device__ __forceinline__ static T direction(T p, T g, const AdamWScalars<T>& s) {
    return adamw_direction(p, g, s);
  }
};

}  // namespace
}  // namespace memkernels

extern "C" MK_API int mk_adamw(const mk_launch* launch, const mk_adamw_args* args) {
  return memkernels::launch<memkernels::AdamWOp>(launch, args);
}
