// Host build of math.h as a Python module, so the CPU test suite can check the
// exact C++ math of the CUDA kernels against memkernels/reference.py.
//
// Each function takes one tensor's worth of raw values as numpy arrays (float32
// runs the math in float, float64 in double), applies load_grad / load_ref as the
// kernels do, and returns every per-element output of math.h's Step as arrays.
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
};

template <typename T>
py::dict adamw_t(py::array p_in, py::array grad_in, py::array m_in, py::array v_in,
                 std::optional<py::array> ref_in, const Common& c, double lr, double beta1,
                 double beta2, double eps, double weight_decay, double bias_correction1,
                 double bias_correction2, double mean_age1, double mean_age2, double correction,
                 double hvp_scale, bool decoupled, bool eps_inside_sqrt, bool memoryless) {
  Array<T> pa(p_in), ga(grad_in), ma(m_in), va(v_in);
  py::ssize_t n = pa.size();
  const T* p = data_of(pa, n, "p");
  const T* grad = data_of(ga, n, "grad");
  const T* m = data_of(ma, n, "exp_avg");
  const T* v = data_of(va, n, "exp_avg_sq");
  std::optional<Array<T>> ra;
  if (ref_in) ra.emplace(*ref_in);
  const T* ref = ra ? data_of(*ra, n, "grad_ref") : nullptr;
  auto args = mk::make_grad_args<T>(c.inv_scale, c.maximize, c.update_grad_refs);
  auto s = mk::make_adamw_scalars<T>(lr, beta1, beta2, eps, weight_decay, bias_correction1,
                                     bias_correction2, mean_age1, mean_age2, correction, hvp_scale,
                                     decoupled, eps_inside_sqrt, memoryless);
  Outputs<T, 2> out(n);
  for (py::ssize_t i = 0; i < n; ++i) {
    T g = mk::load_grad(grad[i], args);
    T g_ref = ref ? mk::load_ref(ref[i], args) : T(0);
    out.put(i, mk::adamw(p[i], g, m[i], v[i], g_ref, ref != nullptr, s));
  }
  return out.to_dict();
}

template <typename T>
py::dict lion_t(py::array p_in, py::array grad_in, py::array m_in, std::optional<py::array> ref_in,
                const Common& c, double lr, double beta1, double beta2, double weight_decay,
                double smoothing, double ema_weight, double age_weight, double correction,
                double hvp_scale, bool memoryless) {
  Array<T> pa(p_in), ga(grad_in), ma(m_in);
  py::ssize_t n = pa.size();
  const T* p = data_of(pa, n, "p");
  const T* grad = data_of(ga, n, "grad");
  const T* m = data_of(ma, n, "exp_avg");
  std::optional<Array<T>> ra;
  if (ref_in) ra.emplace(*ref_in);
  const T* ref = ra ? data_of(*ra, n, "grad_ref") : nullptr;
  auto args = mk::make_grad_args<T>(c.inv_scale, c.maximize, c.update_grad_refs);
  auto s = mk::make_lion_scalars<T>(lr, beta1, beta2, weight_decay, smoothing, ema_weight,
                                    age_weight, correction, hvp_scale, memoryless);
  Outputs<T, 1> out(n);
  for (py::ssize_t i = 0; i < n; ++i) {
    T g = mk::load_grad(grad[i], args);
    T g_ref = ref ? mk::load_ref(ref[i], args) : T(0);
    out.put(i, mk::lion(p[i], g, m[i], g_ref, ref != nullptr, s));
  }
  return out.to_dict();
}

template <typename T>
py::dict sgd_t(py::array p_in, py::array grad_in, std::optional<py::array> buf_in,
               std::optional<py::array> ref_in, const Common& c, double lr, double momentum,
               double weight_decay, bool nesterov, double update_scale, double memory_coef,
               double correction, double hvp_scale, bool memoryless) {
  Array<T> pa(p_in), ga(grad_in);
  py::ssize_t n = pa.size();
  const T* p = data_of(pa, n, "p");
  const T* grad = data_of(ga, n, "grad");
  std::optional<Array<T>> ba, ra;
  if (buf_in) ba.emplace(*buf_in);
  if (ref_in) ra.emplace(*ref_in);
  const T* buf = ba ? data_of(*ba, n, "momentum_buffer") : nullptr;
  const T* ref = ra ? data_of(*ra, n, "grad_ref") : nullptr;
  auto args = mk::make_grad_args<T>(c.inv_scale, c.maximize, c.update_grad_refs);
  auto s = mk::make_sgd_scalars<T>(lr, momentum, weight_decay, nesterov, update_scale, memory_coef,
                                   correction, hvp_scale, memoryless);
  Outputs<T, 1> out(n);
  for (py::ssize_t i = 0; i < n; ++i) {
    T g = mk::load_grad(grad[i], args);
    T g_ref = ref ? mk::load_ref(ref[i], args) : T(0);
    out.put(i, mk::sgd(p[i], g, buf ? buf[i] : T(0), buf != nullptr, g_ref, ref != nullptr, s));
  }
  return out.to_dict();
}

// float32 arrays run the float math, float64 the double math; nothing else is accepted.
bool is_double(const py::array& p) {
  if (p.dtype().is(py::dtype::of<double>())) return true;
  if (p.dtype().is(py::dtype::of<float>())) return false;
  throw std::invalid_argument("p must be a float32 or float64 array");
}

}  // namespace

PYBIND11_MODULE(_mk_host, m) {
  m.doc() = "math.h compiled for the host: the CUDA kernels' per-element math, for tests";
  m.attr("NDIAG") = mk::NDIAG;

  m.def(
      "adamw",
      [](py::array p, py::array grad, py::array exp_avg, py::array exp_avg_sq,
         std::optional<py::array> grad_ref, double lr, double beta1, double beta2, double eps,
         double weight_decay, double bias_correction1, double bias_correction2, double mean_age1,
         double mean_age2, bool decoupled, bool eps_inside_sqrt, double correction,
         double hvp_scale, bool maximize, bool memoryless, bool update_grad_refs,
         double inv_scale) {
        Common c{inv_scale, maximize, update_grad_refs};
        auto f = is_double(p) ? adamw_t<double> : adamw_t<float>;
        return f(p, grad, exp_avg, exp_avg_sq, grad_ref, c, lr, beta1, beta2, eps, weight_decay,
                 bias_correction1, bias_correction2, mean_age1, mean_age2, correction, hvp_scale,
                 decoupled, eps_inside_sqrt, memoryless);
      },
      py::arg("p"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("grad_ref"),
      py::kw_only(), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
      py::arg("weight_decay"), py::arg("bias_correction1"), py::arg("bias_correction2"),
      py::arg("mean_age1"), py::arg("mean_age2"), py::arg("decoupled") = true,
      py::arg("eps_inside_sqrt") = false, py::arg("correction") = 0.0, py::arg("hvp_scale") = 0.0,
      py::arg("maximize") = false, py::arg("memoryless") = false,
      py::arg("update_grad_refs") = false, py::arg("inv_scale") = 1.0);

  m.def(
      "lion",
      [](py::array p, py::array grad, py::array exp_avg, std::optional<py::array> grad_ref,
         double lr, double beta1, double beta2, double weight_decay, double smoothing,
         double ema_weight, double age_weight, double correction, double hvp_scale, bool maximize,
         bool memoryless, bool update_grad_refs, double inv_scale) {
        Common c{inv_scale, maximize, update_grad_refs};
        auto f = is_double(p) ? lion_t<double> : lion_t<float>;
        return f(p, grad, exp_avg, grad_ref, c, lr, beta1, beta2, weight_decay, smoothing,
                 ema_weight, age_weight, correction, hvp_scale, memoryless);
      },
      py::arg("p"), py::arg("grad"), py::arg("exp_avg"), py::arg("grad_ref"), py::kw_only(),
      py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("weight_decay"),
      py::arg("smoothing"), py::arg("ema_weight"), py::arg("age_weight"),
      py::arg("correction") = 0.0, py::arg("hvp_scale") = 0.0, py::arg("maximize") = false,
      py::arg("memoryless") = false, py::arg("update_grad_refs") = false,
      py::arg("inv_scale") = 1.0);

  m.def(
      "sgd",
      [](py::array p, py::array grad, std::optional<py::array> momentum_buffer,
         std::optional<py::array> grad_ref, double lr, double momentum, double weight_decay,
         bool nesterov, double update_scale, double memory_coef, double correction,
         double hvp_scale, bool maximize, bool memoryless, bool update_grad_refs,
         double inv_scale) {
        Common c{inv_scale, maximize, update_grad_refs};
        auto f = is_double(p) ? sgd_t<double> : sgd_t<float>;
        return f(p, grad, momentum_buffer, grad_ref, c, lr, momentum, weight_decay, nesterov,
                 update_scale, memory_coef, correction, hvp_scale, memoryless);
      },
      py::arg("p"), py::arg("grad"), py::arg("momentum_buffer"), py::arg("grad_ref"), py::kw_only(),
      py::arg("lr"), py::arg("momentum"), py::arg("weight_decay"), py::arg("nesterov"),
      py::arg("update_scale"), py::arg("memory_coef"), py::arg("correction") = 0.0,
      py::arg("hvp_scale") = 0.0, py::arg("maximize") = false, py::arg("memoryless") = false,
      py::arg("update_grad_refs") = false, py::arg("inv_scale") = 1.0);
}
