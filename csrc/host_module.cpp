// Host build of math.h as a Python module, so the CPU test suite can check the
// exact C++ math of the CUDA kernels against each op's reference (memkernels/ops/).
//
// Every op of the generated op list (MK_FOR_EACH_OP, memkernels/op_args.h, generated at build time) is bound
// through its generated trait (memkernels/op_traits.cuh), as the kernels call it:
//   <op>(p, grad, states, grad_ref=None, *, hvp=None, origin=None, maximize=False,
//        update_grad_refs=False, inv_scale=1.0, probe=False, tau=0.0, keys=None, index=0, **args)
// args are the op's Args fields by name (every one, nothing else); states are its
// state arrays in spec order (None for an absent optional one). Each array is one
// tensor's worth of raw values: float32 runs the math in float, float64 in double.
// The driver's per-element part is repeated here as multi_tensor.cuh's step_elements
// does it: load_grad / load_ref, theta from origin, hvp estimated from grad_ref or a
// kept one. Returns every per-element output of math.h's Step (and the hvp the step
// used); with probe=True, those of the probe pass instead. Given keys (int64, a tensor's row of rounding_keys: a
// key per two writes of the op's states, grad_refs, hvps, params) and float32 arrays, also "bf16": each state, g
// (a grad_ref written) and hvp (a kept estimate stored) as the stochastic step writes them to bfloat16 lists
// (rounding.h's rounded_write of the list's write number, Writes), element i at index + i: the bits (uint16),
// None for an absent state.
// Also bound: rounding.h's random_bits and round_bf16 over arrays (bind_rounding).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "memkernels/op_traits.cuh"  // with api.h and op_args.h

namespace py = pybind11;
namespace mk = memkernels;

namespace {

template <typename T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

// The raw values of an input as T (held by holder), checked to be 1-d with n elements; nullptr for None.
template <typename T>
const T* data_of(const py::object& in, std::optional<Array<T>>& holder, py::ssize_t n, const std::string& name) {
  if (in.is_none()) return nullptr;
  holder.emplace(in);
  if (holder->ndim() != 1 || holder->shape(0) != n) {
    throw std::invalid_argument(name + " must be 1-d with as many elements as p");
  }
  return holder->data();
}

// The op's Args from keyword values: every field by its name, flags as bools; a missing or unknown name raises.
template <class Op>
typename Op::Args make_args(const char* op, const py::kwargs& values) {
  typename Op::Args a{};
  std::vector<std::string> names;
  Op::for_each_field(a, [&](const char* name, auto& field) {
    names.emplace_back(name);
    if (!values.contains(name)) throw std::invalid_argument(std::string(op) + ": missing scalar " + name);
    using F = std::remove_reference_t<decltype(field)>;
    if constexpr (std::is_same_v<F, double>) {
      field = py::cast<double>(values[name]);
    } else {
      field = py::cast<bool>(values[name]);
    }
  });
  for (auto item : values) {
    auto name = py::cast<std::string>(item.first);
    if (std::find(names.begin(), names.end(), name) == names.end()) {
      throw std::invalid_argument(std::string(op) + ": unknown scalar " + name);
    }
  }
  return a;
}

// What every op takes beside its states and Args.
struct Inputs {
  py::array p, grad;
  std::vector<py::object> states;  // None: absent
  py::object grad_ref, hvp, origin;
  bool maximize, update_grad_refs;
  double inv_scale;
  bool probe;
  double tau;  // the probe's displacement
  py::object keys;  // None: no stochastic writes
  std::int64_t index;  // the tensor index of the first element
};

// Every output of math.h's Step per element, as numpy arrays.
template <typename T, int NS>
struct Outputs {
  explicit Outputs(py::ssize_t n) : p(n), g(n), M(n), hvp(n) {
    for (auto& s : states) s = Array<T>(n);
    for (auto& d : diag) d = Array<T>(n);
  }
  void put(py::ssize_t i, const mk::Step<T, NS>& st, T hvp_used) {
    p.mutable_data()[i] = st.p;
    for (int k = 0; k < NS; ++k) states[k].mutable_data()[i] = st.states[k];
    g.mutable_data()[i] = st.g;
    M.mutable_data()[i] = st.M;
    hvp.mutable_data()[i] = hvp_used;
    for (int k = 0; k < mk::NDIAG; ++k) diag[k].mutable_data()[i] = st.diag.terms[k];
  }
  py::dict to_dict() const {
    py::tuple st(NS), dg(mk::NDIAG);
    for (int k = 0; k < NS; ++k) st[k] = states[k];
    for (int k = 0; k < mk::NDIAG; ++k) dg[k] = diag[k];
    py::dict out;
    out["p"] = p, out["states"] = st, out["g"] = g, out["M"] = M, out["hvp"] = hvp, out["diag"] = dg;
    return out;
  }
  Array<T> p, g, M, hvp;
  Array<T> states[NS];
  Array<T> diag[mk::NDIAG];
};

// The stochastic step's bfloat16 writes (multi_tensor.cuh's store_list) of each element's states, g and hvp.
template <int NS>
struct Rounded {
  Rounded(py::ssize_t n, const std::int64_t* keys, std::uint64_t index, const bool (&present)[NS])
      : g(n), hvp(n), keys(keys), index(index) {
    for (int k = 0; k < NS; ++k) {
      if (present[k]) states[k].emplace(n);
    }
  }
  void put(py::ssize_t i, const mk::Step<float, NS>& st, float hvp_used) {
    using Write = mk::Writes<NS>;
    const std::uint64_t at = index + std::uint64_t(i);
    for (int k = 0; k < NS; ++k) {
      if (states[k]) states[k]->mutable_data()[i] = mk::rounded_write(st.states[k], keys, k, at);
    }
    g.mutable_data()[i] = mk::rounded_write(st.g, keys, Write::kGradRef, at);
    hvp.mutable_data()[i] = mk::rounded_write(hvp_used, keys, Write::kHvp, at);
  }
  py::dict to_dict() const {
    py::tuple st(NS);
    for (int k = 0; k < NS; ++k) st[k] = states[k] ? py::object(*states[k]) : py::object(py::none());
    py::dict out;
    out["states"] = st, out["g"] = g, out["hvp"] = hvp;
    return out;
  }
  std::optional<Array<std::uint16_t>> states[NS];
  Array<std::uint16_t> g, hvp;
  const std::int64_t* keys;
  std::uint64_t index;
};

// The probe pass: p = theta + tau d for the op's direction d, theta^2, d^2.
template <class Op, typename T, class S>
py::dict run_probe(const T* p, const T* grad, py::ssize_t n, const mk::GradArgs<T>& args, T tau, const S& s) {
  Array<T> p_out(n), theta_sq(n), d_sq(n);
  for (py::ssize_t i = 0; i < n; ++i) {
    mk::Probe<T> out = mk::probe(p[i], Op::direction(p[i], mk::load_grad(grad[i], args), s), tau);
    p_out.mutable_data()[i] = out.p;
    theta_sq.mutable_data()[i] = out.theta_sq;
    d_sq.mutable_data()[i] = out.d_sq;
  }
  py::dict d;
  d["p"] = p_out, d["theta_sq"] = theta_sq, d["d_sq"] = d_sq;
  return d;
}

template <class Op, typename T>
py::dict run(const Inputs& in, const typename Op::Args& a) {
  constexpr int NS = Op::kStates;
  const auto s = Op::template scalars<T>(a);
  std::optional<Array<T>> pa, ga, ra, ha, oa, sa[NS];
  const py::ssize_t n = in.p.size();
  const T* p = data_of(in.p, pa, n, "p");
  const T* grad = data_of(in.grad, ga, n, "grad");
  const T* st[NS];
  bool present[NS];
  for (int k = 0; k < NS; ++k) {
    st[k] = data_of(in.states[k], sa[k], n, Op::kStateKeys[k]);
    present[k] = st[k] != nullptr;
    if (!present[k] && !Op::kOptional[k]) throw std::invalid_argument(std::string(Op::kStateKeys[k]) + " is required");
  }
  const T* ref = data_of(in.grad_ref, ra, n, "grad_ref");
  const T* kept = data_of(in.hvp, ha, n, "hvp");
  const T* origin = data_of(in.origin, oa, n, "origin");
  if (ref && kept) throw std::invalid_argument("hvp (reuse) reads the estimate instead of grad_ref: pass one");
  const auto args = mk::make_grad_args<T>(in.inv_scale, in.maximize, in.update_grad_refs && !in.probe);
  if (in.probe) return run_probe<Op>(p, grad, n, args, T(in.tau), s);
  std::optional<Array<std::int64_t>> ka;
  const std::int64_t* keys = nullptr;
  if (!in.keys.is_none()) {
    ka.emplace(in.keys);
    if (ka->ndim() != 1 || ka->shape(0) != mk::Writes<NS>::kWidth) {
      throw std::invalid_argument("keys must be 1-d: a key per two writes (states, grad_refs, hvps, params)");
    }
    keys = ka->data();
    for (int k = 0; k < mk::Writes<NS>::kWidth; ++k) {
      if (keys[k] < 0 || keys[k] > 0xFFFFFFFFll) throw std::invalid_argument("keys must be in [0, 2**32)");
    }
    if (!std::is_same_v<T, float>) throw std::invalid_argument("keys: bfloat16 writes round float32 values");
  }
  if (in.index < 0) throw std::invalid_argument("index must be >= 0");
  std::optional<Rounded<NS>> rounded;
  if (keys) rounded.emplace(n, keys, std::uint64_t(in.index), present);
  Outputs<T, NS> out(n);
  for (py::ssize_t i = 0; i < n; ++i) {
    T theta = origin ? origin[i] : p[i];
    T g = mk::load_grad(grad[i], args);
    T hvp = ref ? mk::estimate_hvp(mk::load_ref(ref[i], args), g, s.hvp_scale) : kept ? kept[i] : T(0);
    T values[NS];
    for (int k = 0; k < NS; ++k) values[k] = present[k] ? st[k][i] : T(0);
    const mk::Step<T, NS> step = Op::step(theta, g, values, present, hvp, ref || kept, s);
    out.put(i, step, hvp);
    if constexpr (std::is_same_v<T, float>) {
      if (rounded) rounded->put(i, step, hvp);
    }
  }
  py::dict d = out.to_dict();
  if (rounded) d["bf16"] = rounded->to_dict();
  return d;
}

template <class Op>
void bind(py::module_& m, py::dict& state_keys, const char* op) {
  py::tuple keys(Op::kStates);
  for (int k = 0; k < Op::kStates; ++k) keys[k] = Op::kStateKeys[k];
  state_keys[op] = keys;
  m.def(
      op,
      [op](py::array p, py::array grad, std::vector<py::object> states, py::object grad_ref, py::object hvp,
           py::object origin, bool maximize, bool update_grad_refs, double inv_scale, bool probe, double tau,
           py::object keys, std::int64_t index, py::kwargs values) {
        if (states.size() != std::size_t(Op::kStates)) {
          throw std::invalid_argument(std::string(op) + " takes " + std::to_string(Op::kStates) + " states, got " +
                                      std::to_string(states.size()));
        }
        Inputs in{p, grad, std::move(states), grad_ref, hvp, origin, maximize, update_grad_refs, inv_scale,
                  probe, tau, keys, index};
        const auto a = make_args<Op>(op, values);
        if (p.dtype().is(py::dtype::of<double>())) return run<Op, double>(in, a);
        if (p.dtype().is(py::dtype::of<float>())) return run<Op, float>(in, a);
        throw std::invalid_argument("p must be a float32 or float64 array");
      },
      py::arg("p"), py::arg("grad"), py::arg("states"), py::arg("grad_ref") = py::none(), py::kw_only(),
      py::arg("hvp") = py::none(), py::arg("origin") = py::none(), py::arg("maximize") = false,
      py::arg("update_grad_refs") = false, py::arg("inv_scale") = 1.0, py::arg("probe") = false,
      py::arg("tau") = 0.0, py::arg("keys") = py::none(), py::arg("index") = 0);
}

// rounding.h over arrays: random_bits(key, index) of each int64 index; round_bf16(x, bits) of float32 x with
// uint32 bits (exact dtypes: no silent conversion), as bfloat16 bits (uint16).
void bind_rounding(py::module_& m) {
  constexpr int Exact = py::array::c_style;  // with noconvert(): the dtype must be the one named
  m.def(
      "random_bits",
      [](std::uint32_t key, py::array_t<std::int64_t, Exact> index) {
        if (index.ndim() != 1) throw std::invalid_argument("random_bits: index must be 1-d");
        const py::ssize_t n = index.size();
        const std::int64_t* in = index.data();
        for (py::ssize_t i = 0; i < n; ++i) {
          if (in[i] < 0) throw std::invalid_argument("random_bits: element indices must be >= 0");
        }
        Array<std::uint32_t> out(n);
        for (py::ssize_t i = 0; i < n; ++i) out.mutable_data()[i] = mk::random_bits(key, std::uint64_t(in[i]));
        return out;
      },
      py::arg("key"), py::arg("index").noconvert());
  m.def(
      "round_bf16",
      [](py::array_t<float, Exact> x, py::array_t<std::uint32_t, Exact> bits) {
        if (x.ndim() != 1 || bits.ndim() != 1 || bits.size() != x.size()) {
          throw std::invalid_argument("round_bf16: x and bits must be 1-d of the same size");
        }
        Array<std::uint16_t> out(x.size());
        for (py::ssize_t i = 0; i < x.size(); ++i) out.mutable_data()[i] = mk::round_bf16(x.data()[i], bits.data()[i]);
        return out;
      },
      py::arg("x").noconvert(), py::arg("bits").noconvert());
}

}  // namespace

PYBIND11_MODULE(_mk_host, m) {
  m.doc() = "math.h compiled for the host: the CUDA kernels' per-element math, for tests";
  m.attr("NDIAG") = mk::NDIAG;
  py::dict state_keys;  // op -> its state keys, for every op bound
#define MK_BIND(k, op) bind<mk::ops::op>(m, state_keys, #op);
  MK_FOR_EACH_OP(MK_BIND)
#undef MK_BIND
  m.attr("STATES") = state_keys;
  bind_rounding(m);
}
