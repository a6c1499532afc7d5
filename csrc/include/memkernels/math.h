// Per-element math of the fused steps, for the CUDA kernels and the host test module.
//
// Mirrors memkernels/reference.py line by line, with the same variable names and
// the same order of operations: rounding then matches torch's float32 (or float64)
// evaluation of reference.py. Python-side scalar expressions (1 - beta1,
// correction * lr * lr, correction_limit * lr, bias_correction2 ** 0.5, ...) are
// evaluated in double by make_*_scalars and rounded once to T, as torch does when
// a Python float meets a tensor: on the host, or on the device when the per-step
// values are read there (mk_launch.step_scalars). Branches that reference.py takes
// on Python scalars are taken on flags computed from the double values. The driver
// (multi_tensor.cuh, and backends/reference.py's _run) forms hvp with estimate_hvp
// or reads a kept one, and runs probe() on the op's *_direction in the probe pass.
//
// Each op <op> of memkernels/ops/ has here make_<op>_scalars (its Args fields in their order: the op's
// floats, correction, correction_limit, hvp_scale, the op's flags, memoryless), <op> (p, g, each state, an
// optional one followed by whether it is present, hvp, has_hvp, the scalars) and <op>_direction (p, g, the
// scalars): the build binds them to the op's Args (memkernels/backends/cuda/_layout.py).
//
// T is the compute type: float for fp16/bf16/fp32 parameters, double for fp64.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define MK_HD __host__ __device__ __forceinline__
#else
#define MK_HD inline
#endif

#include "memkernels/rounding.h"  // uses MK_HD

namespace memkernels {

// update_sq, correction_sq, memory_sq, residual_sq, penalty_sum, sign_flips, limited
constexpr int NDIAG = 7;

MK_HD float mk_sqrt(float x) { return sqrtf(x); }
MK_HD double mk_sqrt(double x) { return sqrt(x); }
MK_HD float mk_abs(float x) { return fabsf(x); }
MK_HD double mk_abs(double x) { return fabs(x); }
MK_HD float mk_log1p(float x) { return log1pf(x); }
MK_HD double mk_log1p(double x) { return log1p(x); }

// bias_correction2 ** 0.5 as Python evaluates it: libm's pow on the host. The device has no such pow
// (CUDA's is within 2 ulp); its sqrt is correctly rounded, which libm's pow(x, 0.5) is too but in
// the rarest cases, and the result is rounded once more to T.
MK_HD double pow_half(double x) {
#if defined(__CUDA_ARCH__)
  return sqrt(x);
#else
  return std::pow(x, 0.5);
#endif
}

// A Python float divided by a tensor: torch evaluates `scalar / x` as x.reciprocal() * scalar.
template <typename T>
MK_HD T rdiv(T scalar, T x) { return (T(1) / x) * scalar; }

// reference.decay_term: weight_decay * p, or 0 when weight_decay == 0 (0 * inf is NaN; torch.optim skips the term).
template <typename T>
MK_HD T decay_term(T weight_decay, T p) { return weight_decay != T(0) ? weight_decay * p : T(0); }

// torch.sign: 0 for +-0 and for NaN.
template <typename T>
MK_HD T mk_sign(T x) { return T(T(0) < x) - T(x < T(0)); }

template <typename T>
struct Diag {
  T terms[NDIAG];
};

// What one element's step produces (reference.Step): new p and states, the
// processed gradient g (next trajectory reference), M and the diagnostic terms.
template <typename T, int NSTATE>
struct Step {
  T p;
  T states[NSTATE];
  T g;
  T M;
  Diag<T> diag;
};

// How raw gradients are turned into g (reference.load_grad) and how g_ref arrives.
template <typename T>
struct GradArgs {
  T inv_scale;
  bool unscale;           // inv_scale != 1.0, decided in double
  bool maximize;
  bool update_grad_refs;  // trajectory mode: g_ref is read as is and then overwritten by g
};

template <typename T>
MK_HD GradArgs<T> make_grad_args(double inv_scale, bool maximize, bool update_grad_refs) {
  return {T(inv_scale), inv_scale != 1.0, maximize, update_grad_refs};
}

// reference.load_grad
template <typename T>
MK_HD T load_grad(T grad, const GradArgs<T>& a) {
  T g = a.unscale ? grad * a.inv_scale : grad;
  return a.maximize ? -g : g;
}

// backends/reference.py: a probe or exact gradient arrives raw, like grads.
template <typename T>
MK_HD T load_ref(T grad_ref, const GradArgs<T>& a) {
  return a.update_grad_refs ? grad_ref : load_grad(grad_ref, a);
}

// reference.estimate_hvp: H d from two gradients (the caller keeps it, or passes a kept one).
template <typename T>
MK_HD T estimate_hvp(T g_ref, T g, T hvp_scale) { return (g_ref - g) * hvp_scale; }

// reference.descend: p <- p * shrink - step_size * step - term, term = correction * lr^2 * M limited to
// kappa lr |update| (update: F, or u in memoryless mode); `limited` is set where the limit acted (a NaN term
// is not limited: it propagates).
template <typename T>
MK_HD T descend(T p, T shrink, bool shrink_on, T step_size, T step, T M, T correction_lr2,
                bool correction_on, T update, T kappa_lr, bool& limited) {
  if (shrink_on) p = p * shrink;
  p = p - step_size * step;
  limited = false;
  if (correction_on) {
    T term = correction_lr2 * M;
    T bound = kappa_lr * mk_abs(update);
    limited = mk_abs(term) > bound;
    term = limited ? (term < T(0) ? -bound : bound) : term;
    p = p - term;
  }
  return p;
}

// reference.diagnostics
template <typename T>
MK_HD Diag<T> diagnostics(T F, T u, T M, T lr, T penalty, T sign_flips, bool limited) {
  T hM = lr * M;
  T memory = F - u;
  T residual = memory - hM;
  return {{F * F, hM * hM, memory * memory, residual * residual, penalty, sign_flips, T(limited)}};
}

// reference.Probe: theta + tau d, and this element's terms of the norms that set the next tau.
template <typename T>
struct Probe {
  T p, theta_sq, d_sq;
};

// reference.probe (the caller keeps theta)
template <typename T>
MK_HD Probe<T> probe(T p, T d, T tau) { return {p + tau * d, p * p, d * d}; }

// ------------------------------------------------------------------------ adamw

template <typename T>
struct AdamWScalars {
  T lr, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay;
  T bias_correction1, bias_correction2, bias_correction2_sqrt, mean_age1, mean_age2, hvp_scale;
  T shrink, step_size, correction_lr2, kappa_lr;
  bool shrink_on, correction_on, decoupled, eps_inside_sqrt, memoryless;
};

template <typename T>
MK_HD AdamWScalars<T> make_adamw_scalars(double lr, double beta1, double beta2, double eps,
                                          double weight_decay, double bias_correction1,
                                          double bias_correction2, double mean_age1, double mean_age2,
                                          double correction, double correction_limit, double hvp_scale,
                                          bool decoupled, bool eps_inside_sqrt, bool memoryless) {
  double shrink = decoupled ? 1 - lr * weight_decay : 1.0;
  double step_size = memoryless ? lr : lr / bias_correction1;
  return {T(lr), T(beta2), T(1 - beta1), T(1 - beta2), T(eps), T(weight_decay),
          T(bias_correction1), T(bias_correction2), T(pow_half(bias_correction2)),
          T(mean_age1), T(mean_age2), T(hvp_scale),
          T(shrink), T(step_size), T(correction * lr * lr), T(correction_limit * lr),
          shrink != 1.0, correction != 0.0, decoupled, eps_inside_sqrt, memoryless};
}

// reference.adamw; has_hvp false stands for hvp is None (M = 0).
template <typename T>
MK_HD Step<T, 2> adamw(T p, T g, T exp_avg, T exp_avg_sq, T hvp, bool has_hvp,
                       const AdamWScalars<T>& s) {
  T g_raw = g;
  if (!s.decoupled) g = g + decay_term(s.weight_decay, p);  // coupled L2: the EMAs see g~ = g + lambda theta
  exp_avg = exp_avg + s.one_minus_beta1 * (g - exp_avg);
  exp_avg_sq = s.beta2 * exp_avg_sq + s.one_minus_beta2 * g * g;
  // decay_term(weight_decay, 0) is reference.py's 0 (weight_decay is finite); selecting p rather than the term
  // keeps the fp64 step kernel within the registers ptxas allots it (no spills, tests/test_cuda_build.py).
  T decay = decay_term(s.weight_decay, s.decoupled ? p : T(0));
  T denom, a, g_over_a, coef, penalty;
  if (s.eps_inside_sqrt) {
    denom = mk_sqrt(exp_avg_sq / s.bias_correction2 + s.eps);
    a = mk_sqrt(g * g + s.eps);
    g_over_a = g / a;
    coef = rdiv(s.mean_age1, a) - s.mean_age2 * (g_over_a * g_over_a) / a;
    penalty = a;
  } else {
    denom = mk_sqrt(exp_avg_sq) / s.bias_correction2_sqrt + s.eps;
    a = mk_abs(g) + s.eps;
    g_over_a = g / a;
    coef = (s.mean_age1 - s.mean_age2 * mk_abs(g_over_a)) / a;
    penalty = mk_abs(g) - s.eps * mk_log1p(mk_abs(g) / s.eps);
  }
  T F = exp_avg / s.bias_correction1 / denom + decay;
  T u = g_over_a + decay;
  T M;
  if (!has_hvp) {
    M = T(0);
  } else {
    if (!s.decoupled) hvp = hvp + s.weight_decay * u;  // H~ = H + lambda I
    M = coef * hvp;
  }
  bool limited;
  if (s.memoryless) {
    p = descend(p, s.shrink, s.shrink_on, s.step_size, g_over_a, M, s.correction_lr2, s.correction_on, u,
                s.kappa_lr, limited);
  } else {
    p = descend(p, s.shrink, s.shrink_on, s.step_size, exp_avg / denom, M, s.correction_lr2,
                s.correction_on, F, s.kappa_lr, limited);
  }
  Diag<T> diag = diagnostics(F, u, M, s.lr, penalty, T(0), limited);
  return {p, {exp_avg, exp_avg_sq}, g_raw, M, diag};
}

// ------------------------------------------------------------------------- lion

// reference.smooth_sign: phi_eps(x) = x / sqrt(x^2 + eps); eps = 0 is sign(x).
template <typename T>
MK_HD T smooth_sign(T x, T smoothing, bool smoothing_on) {
  return !smoothing_on ? mk_sign(x) : x / mk_sqrt(x * x + smoothing);
}

// reference.smooth_sign_slope: phi'_eps(x) = eps / (x^2 + eps)^(3/2); zero for sign.
template <typename T>
MK_HD T smooth_sign_slope(T x, T smoothing, bool smoothing_on) {
  if (!smoothing_on) return T(0);
  T s = x * x + smoothing;
  return rdiv(smoothing, s * mk_sqrt(s));
}

template <typename T>
struct LionScalars {
  T lr, beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay, smoothing;
  T ema_weight, age_weight, hvp_scale, shrink, correction_lr2, kappa_lr;
  bool smoothing_on, shrink_on, correction_on, memoryless;
};

template <typename T>
MK_HD LionScalars<T> make_lion_scalars(double lr, double beta1, double beta2, double weight_decay,
                                        double smoothing, double ema_weight, double age_weight,
                                        double correction, double correction_limit, double hvp_scale,
                                        bool memoryless) {
  double shrink = 1 - lr * weight_decay;
  return {T(lr), T(beta1), T(1 - beta1), T(beta2), T(1 - beta2), T(weight_decay), T(smoothing),
          T(ema_weight), T(age_weight), T(hvp_scale), T(shrink), T(correction * lr * lr),
          T(correction_limit * lr), smoothing != 0.0, shrink != 1.0, correction != 0.0, memoryless};
}

// reference.lion
template <typename T>
MK_HD Step<T, 1> lion(T p, T g, T exp_avg, T hvp, bool has_hvp, const LionScalars<T>& s) {
  T c = s.beta1 * exp_avg + s.one_minus_beta1 * g;
  T wg = s.ema_weight * g;  // W_n g: c_n with every past gradient replaced by the current one
  T decay = decay_term(s.weight_decay, p);
  T phi_c = smooth_sign(c, s.smoothing, s.smoothing_on);
  T phi_wg = smooth_sign(wg, s.smoothing, s.smoothing_on);
  T F = phi_c + decay;
  T u = phi_wg + decay;
  T M;
  if (!has_hvp) {
    M = T(0);
  } else {
    M = smooth_sign_slope(wg, s.smoothing, s.smoothing_on) * s.age_weight * hvp;
  }
  exp_avg = s.beta2 * exp_avg + s.one_minus_beta2 * g;
  T penalty = mk_sqrt(wg * wg + s.smoothing);
  T sign_flips = T(mk_sign(c) != mk_sign(g));
  bool limited;
  p = descend(p, s.shrink, s.shrink_on, s.lr, s.memoryless ? phi_wg : phi_c, M, s.correction_lr2,
              s.correction_on, s.memoryless ? u : F, s.kappa_lr, limited);
  Diag<T> diag = diagnostics(F, u, M, s.lr, penalty, sign_flips, limited);
  return {p, {exp_avg}, g, M, diag};
}

// -------------------------------------------------------------------------- sgd

template <typename T>
struct SGDScalars {
  T lr, momentum, weight_decay, update_scale, memory_coef, hvp_scale, correction_lr2, kappa_lr;
  bool correction_on, nesterov, memoryless;
};

template <typename T>
MK_HD SGDScalars<T> make_sgd_scalars(double lr, double momentum, double weight_decay, double update_scale,
                                      double memory_coef, double correction, double correction_limit,
                                      double hvp_scale, bool nesterov, bool memoryless) {
  return {T(lr), T(momentum), T(weight_decay), T(update_scale), T(memory_coef), T(hvp_scale),
          T(correction * lr * lr), T(correction_limit * lr), correction != 0.0, nesterov, memoryless};
}

// reference.sgd; has_momentum false stands for momentum_buffer is None (states[0] is unused).
template <typename T>
MK_HD Step<T, 1> sgd(T p, T g, T momentum_buffer, bool has_momentum, T hvp, bool has_hvp,
                     const SGDScalars<T>& s) {
  T g_raw = g;
  g = g + decay_term(s.weight_decay, p);  // g~
  T F;
  if (!has_momentum) {
    F = g;
  } else {
    momentum_buffer = s.momentum * momentum_buffer + g;
    F = s.nesterov ? g + s.momentum * momentum_buffer : momentum_buffer;
  }
  T u = s.update_scale * g;
  T M;
  if (!has_hvp) {
    M = T(0);
  } else {
    hvp = hvp + s.weight_decay * g;  // H~ g~ = H g~ + lambda g~
    M = s.memory_coef * hvp;
  }
  bool limited;
  T update = s.memoryless ? u : F;
  p = descend(p, T(1), false, s.lr, update, M, s.correction_lr2, s.correction_on, update, s.kappa_lr, limited);
  Diag<T> diag = diagnostics(F, u, M, s.lr, T(0.5) * g * g, T(0), limited);
  return {p, {momentum_buffer}, g_raw, M, diag};
}

// ------------------------------------------------------------------- directions
// reference.*_direction: the memoryless d = F(theta, ..., theta) whose H d the probe pass estimates;
// the same operations, in the same order, as the steps' u (SGD's without the factor update_scale).

template <typename T>
MK_HD T adamw_direction(T p, T g, const AdamWScalars<T>& s) {
  if (!s.decoupled) g = g + decay_term(s.weight_decay, p);
  T a = s.eps_inside_sqrt ? mk_sqrt(g * g + s.eps) : mk_abs(g) + s.eps;
  T u = g / a;
  return s.decoupled ? u + decay_term(s.weight_decay, p) : u;
}

template <typename T>
MK_HD T lion_direction(T p, T g, const LionScalars<T>& s) {
  return smooth_sign(s.ema_weight * g, s.smoothing, s.smoothing_on) + decay_term(s.weight_decay, p);
}

// H~ is applied to g~ itself (M = c_n H~ g~), so d = g~ without the factor S_n.
template <typename T>
MK_HD T sgd_direction(T p, T g, const SGDScalars<T>& s) {
  return g + decay_term(s.weight_decay, p);
}

// --------------------------------------------------------------------- ademamix

template <typename T>
struct AdEMAMixScalars {
  T lr, beta2, one_minus_beta1, one_minus_beta2, one_minus_beta3, alpha, eps, weight_decay;
  T bias_correction1, bias_correction2_sqrt, update_scale, age_sum, scaled_age2, hvp_scale;
  T shrink, step_size, correction_lr2, kappa_lr;
  bool shrink_on, correction_on, memoryless;
};

// ops/ademamix.py's ademamix_derived: update_scale c_n = 1 + alpha S_n, age_sum A1 + alpha Y3, scaled_age2 c_n B.
template <typename T>
MK_HD AdEMAMixScalars<T> make_ademamix_scalars(double lr, double beta1, double beta2, double beta3, double alpha,
                                                double eps, double weight_decay, double bias_correction1,
                                                double bias_correction2, double slow_sum, double mean_age1,
                                                double mean_age2, double slow_age, double correction,
                                                double correction_limit, double hvp_scale, bool memoryless) {
  double shrink = 1 - lr * weight_decay;
  double update_scale = 1.0 + alpha * slow_sum;
  return {T(lr), T(beta2), T(1 - beta1), T(1 - beta2), T(1 - beta3), T(alpha), T(eps), T(weight_decay),
          T(bias_correction1), T(pow_half(bias_correction2)), T(update_scale), T(mean_age1 + alpha * slow_age),
          T(update_scale * mean_age2), T(hvp_scale), T(shrink), T(lr), T(correction * lr * lr),
          T(correction_limit * lr), shrink != 1.0, correction != 0.0, memoryless};
}

// ops/ademamix.py's ademamix; has_hvp false stands for hvp is None (M = 0).
template <typename T>
MK_HD Step<T, 3> ademamix(T p, T g, T exp_avg, T exp_avg_slow, T exp_avg_sq, T hvp, bool has_hvp,
                          const AdEMAMixScalars<T>& s) {
  exp_avg = exp_avg + s.one_minus_beta1 * (g - exp_avg);
  exp_avg_slow = exp_avg_slow + s.one_minus_beta3 * (g - exp_avg_slow);
  exp_avg_sq = s.beta2 * exp_avg_sq + s.one_minus_beta2 * g * g;
  T decay = decay_term(s.weight_decay, p);
  T denom = mk_sqrt(exp_avg_sq) / s.bias_correction2_sqrt + s.eps;
  T step = (exp_avg / s.bias_correction1 + s.alpha * exp_avg_slow) / denom;
  T a = mk_abs(g) + s.eps;
  T g_over_a = g / a;
  T memoryless_step = s.update_scale * g_over_a;
  T F = step + decay;
  T u = memoryless_step + decay;
  T M = has_hvp ? (s.age_sum - s.scaled_age2 * mk_abs(g_over_a)) / a * hvp : T(0);
  T penalty = mk_abs(g) - s.eps * mk_log1p(mk_abs(g) / s.eps);
  bool limited;
  if (s.memoryless) {
    p = descend(p, s.shrink, s.shrink_on, s.step_size, memoryless_step, M, s.correction_lr2, s.correction_on, u,
                s.kappa_lr, limited);
  } else {
    p = descend(p, s.shrink, s.shrink_on, s.step_size, step, M, s.correction_lr2, s.correction_on, F, s.kappa_lr,
                limited);
  }
  Diag<T> diag = diagnostics(F, u, M, s.lr, penalty, T(0), limited);
  return {p, {exp_avg, exp_avg_slow, exp_avg_sq}, g, M, diag};
}

// ops/ademamix.py's ademamix_direction: u = c_n g / a + decay.
template <typename T>
MK_HD T ademamix_direction(T p, T g, const AdEMAMixScalars<T>& s) {
  return g / (mk_abs(g) + s.eps) * s.update_scale + decay_term(s.weight_decay, p);
}

}  // namespace memkernels
