// Host build of math.h as a Python module, so the CPU test suite can check the
// exact C++ math of the CUDA kernels against memkernels/reference.py.
//
// Each function takes one tensor's worth of raw values as numpy arrays (float32
// runs the math in float, float64 in double), applies load_grad / load_ref and
// estimate_hvp as the kernels do (theta from origin, hvp from a kept estimate
// when given), and returns every per-element output of math.h's Step as arrays;
// with probe=True, those of the probe pass instead.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "memkernels/math.h"

namespace py = pybind11;
namespace mk = memkernels;

namespace {

template <typename T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <typename T>
const T* data_of(const Array<T>& a, py::ssize_t n, const char* name) {
  if (a.ndim() != 1 || a.shape(0) != n) {
    throw std::invalid_argument(std::string(name) + " must be 1-d with as many elements as p");
  }
  return a.data();
}

// Collects the outputs of one Step per element into numpy arrays.
template <typename T, int NSTATE>
struct Outputs {
  explicit Outputs(py::ssize_t n) : p(n), g(n), M(n) {
    for (auto& s : states) s = Array<T>(n);
    for (auto& d : diag) d = Array<T>(n);
  }
  void put(py::ssize_t i, const mk::Step<T, NSTATE>& st) {
    p.mutable_data()[i] = st.p;
    for (int k = 0; k < NSTATE; ++k) states[k].mutable_data()[i] = st.states[k];
    g.mutable_data()[i] = st.g;
    M.mutable_data()[i] = st.M;
    for (int k = 0; k < mk::NDIAG; ++k) diag[k].mutable_data()[i] = st.diag.terms[k];
  }
  py::dict to_dict() const {
    py::dict out;
    out["p"] = p;
    py::tuple st(NSTATE);
    for (int k = 0; k < NSTATE; ++k) st[k] = states[k];
    out["states"] = st;
    out["g"] = g;
    out["M"] = M;
    py::tuple dg(mk::NDIAG);
    for (int k = 0; k < mk::NDIAG; ++k) dg[k] = diag[k];
    out["diag"] = dg;
    return out;
  }
  Array<T> p, g, M;
  Array<T> states[NSTATE];
  Array<T> diag[mk::NDIAG];
};

struct Common {
  double inv_scale;
  bool maximize, update_grad_refs;
  bool probe;  // the probe pass instead of the step
  double tau;  // its displacement
};

// An optional input as T (held by holder), or nullptr.
template <typename T>
const T* optional_data(const std::optional<py::array>& in, std::optional<Array<T>>& holder, py::ssize_t n,
                       const char* name) {
  if (!in) return nullptr;
  holder.emplace(*in);
  return data_of(*holder, n, name);
}

// The inputs every step takes beside its states: theta is read from origin when given, hvp is estimated
// from grad_ref or read from hvp (a kept estimate), as multi_tensor.cuh's step_elements does.
struct Inputs {
  py::array p, grad;
  std::optional<py::array> grad_ref, hvp, origin;
};

// Runs step(i, theta, g, hvp, has_hvp) on every element (backends/reference.py's _run) and returns every
// output of math.h's Step, with the hvp the step used (what a step with hvps stores).
template <typename T, int NSTATE, class F>
py::dict run_step(const Inputs& in, const Common& c, T hvp_scale, F&& step) {
  Array<T> pa(in.p), ga(in.grad);
  py::ssize_t n = pa.size();
  const T* p = data_of(pa, n, "p");
  const T* grad = data_of(ga, n, "grad");
  std::optional<Array<T>> ra, ha, oa;
  const T* ref = optional_data(in.grad_ref, ra, n, "grad_ref");
  const T* kept = optional_data(in.hvp, ha, n, "hvp");
  const T* origin = optional_data(in.origin, oa, n, "origin");
  if (ref && kept) throw std::invalid_argument("hvp (reuse) reads the estimate instead of grad_ref: pass one");
  auto args = mk::make_grad_args<T>(c.inv_scale, c.maximize, c.update_grad_refs);
  Outputs<T, NSTATE> out(n);
  Array<T> hvp_out(n);
  for (py::ssize_t i = 0; i < n; ++i) {
    T theta = origin ? origin[i] : p[i];
    T g = mk::load_grad(grad[i], args);
    T hvp = ref ? mk::estimate_hvp(mk::load_ref(ref[i], args), g, hvp_scale) : kept ? kept[i] : T(0);
    hvp_out.mutable_data()[i] = hvp;
    out.put(i, step(i, theta, g, hvp, ref || kept));
  }
  py::dict d = out.to_dict();
  d["hvp"] = hvp_out;
  return d;
}

// The probe pass (math.h's probe of the op's direction): p = theta + tau d, theta^2, d^2.
template <typename T, class F>
py::dict run_probe(const Inputs& in, const Common& c, F&& direction) {
  Array<T> pa(in.p), ga(in.grad);
  py::ssize_t n = pa.size();
  const T* p = data_of(pa, n, "p");
  const T* grad = data_of(ga, n, "grad");
  auto args = mk::make_grad_args<T>(c.inv_scale, c.maximize, false);
  const T tau = T(c.tau);
  Array<T> p_out(n), theta_sq(n), d_sq(n);
  for (py::ssize_t i = 0; i < n; ++i) {
    T g = mk::load_grad(grad[i], args);
    mk::Probe<T> out = mk::probe(p[i], direction(p[i], g), tau);
    p_out.mutable_data()[i] = out.p;
    theta_sq.mutable_data()[i] = out.theta_sq;
    d_sq.mutable_data()[i] = out.d_sq;
  }
  py::dict d;
  d["p"] = p_out;
  d["theta_sq"] = theta_sq;
  d["d_sq"] = d_sq;
  return d;
}

template <typename T>
py::dict adamw_t(const Inputs& in, py::array m_in, py::array v_in, const Common& c, double lr, double beta1,
                 double beta2, double eps, double weight_decay, double bias_correction1,
                 double bias_correction2, double mean_age1, double mean_age2, double correction,
                 double correction_limit, double hvp_scale, bool decoupled, bool eps_inside_sqrt,
                 bool memoryless) {
  auto s = mk::make_adamw_scalars<T>(lr, beta1, beta2, eps, weight_decay, bias_correction1,
                                     bias_correction2, mean_age1, mean_age2, correction, correction_limit,
                                     hvp_scale, decoupled, eps_inside_sqrt, memoryless);
  if (c.probe) return run_probe<T>(in, c, [&](T p, T g) { return mk::adamw_direction(p, g, s); });
  Array<T> ma(m_in), va(v_in);
  py::ssize_t n = py::array(in.p).size();
  const T* m = data_of(ma, n, "exp_avg");
  const T* v = data_of(va, n, "exp_avg_sq");
  return run_step<T, 2>(in, c, s.hvp_scale, [&](py::ssize_t i, T theta, T g, T hvp, bool has_hvp) {
    return mk::adamw(theta, g, m[i], v[i], hvp, has_hvp, s);
  });
}

template <typename T>
py::dict lion_t(const Inputs& in, py::array m_in, const Common& c, double lr, double beta1, double beta2,
                double weight_decay, double smoothing, double ema_weight, double age_weight, double correction,
                double correction_limit, double hvp_scale, bool memoryless) {
  auto s = mk::make_lion_scalars<T>(lr, beta1, beta2, weight_decay, smoothing, ema_weight, age_weight,
                                    correction, correction_limit, hvp_scale, memoryless);
  if (c.probe) return run_probe<T>(in, c, [&](T p, T g) { return mk::lion_direction(p, g, s); });
  Array<T> ma(m_in);
  const T* m = data_of(ma, py::array(in.p).size(), "exp_avg");
  return run_step<T, 1>(in, c, s.hvp_scale, [&](py::ssize_t i, T theta, T g, T hvp, bool has_hvp) {
    return mk::lion(theta, g, m[i], hvp, has_hvp, s);
  });
}

template <typename T>
py::dict sgd_t(const Inputs& in, std::optional<py::array> buf_in, const Common& c, double lr, double momentum,
               double weight_decay, bool nesterov, double update_scale, double memory_coef, double correction,
               double correction_limit, double hvp_scale, bool memoryless) {
  auto s = mk::make_sgd_scalars<T>(lr, momentum, weight_decay, update_scale, memory_coef, correction,
                                   correction_limit, hvp_scale, nesterov, memoryless);
  if (c.probe) return run_probe<T>(in, c, [&](T p, T g) { return mk::sgd_direction(p, g, s); });
  std::optional<Array<T>> ba;
  const T* buf = optional_data(buf_in, ba, py::array(in.p).size(), "momentum_buffer");
  return run_step<T, 1>(in, c, s.hvp_scale, [&](py::ssize_t i, T theta, T g, T hvp, bool has_hvp) {
    return mk::sgd(theta, g, buf ? buf[i] : T(0), buf != nullptr, hvp, has_hvp, s);
  });
}

// float32 arrays run the float math, float64 the double math; nothing else is accepted.
bool is_double(const py::array& p) {
  if (p.dtype().is(py::dtype::of<double>())) return true;
  if (p.dtype().is(py::dtype::of<float>())) return false;
  throw std::invalid_argument("p must be a float32 or float64 array");
}

}  // namespace

// The arguments every op takes beside its own: the optional inputs, the gradient handling and the mode.
#define MK_COMMON_ARGS                                                                                    \
  py::arg("hvp") = py::none(), py::arg("origin") = py::none(), py::arg("correction") = 0.0,             \
      py::arg("correction_limit"), py::arg("hvp_scale") = 0.0, py::arg("maximize") = false,             \
      py::arg("memoryless") = false, py::arg("update_grad_refs") = false, py::arg("inv_scale") = 1.0,    \
      py::arg("probe") = false, py::arg("tau") = 0.0

PYBIND11_MODULE(_mk_host, m) {
  m.doc() = "math.h compiled for the host: the CUDA kernels' per-element math, for tests";
  m.attr("NDIAG") = mk::NDIAG;

  m.def(
      "adamw",
      [](py::array p, py::array grad, py::array exp_avg, py::array exp_avg_sq,
         std::optional<py::array> grad_ref, double lr, double beta1, double beta2, double eps,
         double weight_decay, double bias_correction1, double bias_correction2, double mean_age1,
         double mean_age2, bool decoupled, bool eps_inside_sqrt, std::optional<py::array> hvp,
         std::optional<py::array> origin, double correction, double correction_limit, double hvp_scale,
         bool maximize, bool memoryless, bool update_grad_refs, double inv_scale, bool probe, double tau) {
        Inputs in{p, grad, grad_ref, hvp, origin};
        Common c{inv_scale, maximize, update_grad_refs, probe, tau};
        auto f = is_double(p) ? adamw_t<double> : adamw_t<float>;
        return f(in, exp_avg, exp_avg_sq, c, lr, beta1, beta2, eps, weight_decay, bias_correction1,
                 bias_correction2, mean_age1, mean_age2, correction, correction_limit, hvp_scale, decoupled,
                 eps_inside_sqrt, memoryless);
      },
      py::arg("p"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("grad_ref"),
      py::kw_only(), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
      py::arg("weight_decay"), py::arg("bias_correction1"), py::arg("bias_correction2"),
      py::arg("mean_age1"), py::arg("mean_age2"), py::arg("decoupled") = true,
      py::arg("eps_inside_sqrt") = false, MK_COMMON_ARGS);

  m.def(
      "lion",
      [](py::array p, py::array grad, py::array exp_avg, std::optional<py::array> grad_ref, double lr,
         double beta1, double beta2, double weight_decay, double smoothing, double ema_weight, double age_weight,
         std::optional<py::array> hvp, std::optional<py::array> origin, double correction,
         double correction_limit, double hvp_scale, bool maximize, bool memoryless, bool update_grad_refs,
         double inv_scale, bool probe, double tau) {
        Inputs in{p, grad, grad_ref, hvp, origin};
        Common c{inv_scale, maximize, update_grad_refs, probe, tau};
        auto f = is_double(p) ? lion_t<double> : lion_t<float>;
        return f(in, exp_avg, c, lr, beta1, beta2, weight_decay, smoothing, ema_weight, age_weight, correction,
                 correction_limit, hvp_scale, memoryless);
      },
      py::arg("p"), py::arg("grad"), py::arg("exp_avg"), py::arg("grad_ref"), py::kw_only(),
      py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("weight_decay"),
      py::arg("smoothing"), py::arg("ema_weight"), py::arg("age_weight"), MK_COMMON_ARGS);

  m.def(
      "sgd",
      [](py::array p, py::array grad, std::optional<py::array> momentum_buffer,
         std::optional<py::array> grad_ref, double lr, double momentum, double weight_decay, bool nesterov,
         double update_scale, double memory_coef, std::optional<py::array> hvp, std::optional<py::array> origin,
         double correction, double correction_limit, double hvp_scale, bool maximize, bool memoryless,
         bool update_grad_refs, double inv_scale, bool probe, double tau) {
        Inputs in{p, grad, grad_ref, hvp, origin};
        Common c{inv_scale, maximize, update_grad_refs, probe, tau};
        auto f = is_double(p) ? sgd_t<double> : sgd_t<float>;
        return f(in, momentum_buffer, c, lr, momentum, weight_decay, nesterov, update_scale, memory_coef,
                 correction, correction_limit, hvp_scale, memoryless);
      },
      py::arg("p"), py::arg("grad"), py::arg("momentum_buffer"), py::arg("grad_ref"), py::kw_only(),
      py::arg("lr"), py::arg("momentum"), py::arg("weight_decay"), py::arg("nesterov"),
      py::arg("update_scale"), py::arg("memory_coef"), MK_COMMON_ARGS);
}
