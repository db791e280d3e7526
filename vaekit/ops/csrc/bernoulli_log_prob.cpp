// Bernoulli log-likelihood from logits, summed over each sample's values, with its gradient fused:
//
//   forward:  log p(x | l) = sum_k (x_k * l_k - softplus(l_k)),  softplus(l) = max(l, 0) + log1p(exp(-|l|))
//             (one value per row: minus the summed binary cross-entropy with logits)
//   backward: grad_l = g * (x - sigmoid(l)),  grad_x = g * l                        (g: the row's gradient)
//
// The forward pass keeps sigmoid(l) for the backward (it shares exp(-|l|) with the softplus), so the
// backward is one multiply-add pass.
// Defined here with its autograd (torch::autograd::Function), so a CPU training step's likelihood is
// two passes over the pixels, neither through Python.  Inputs [rows, D] contiguous float32/float64
// (vaekit/ops/bernoulli.py flattens and broadcasts; other dtypes and devices use the eager formula
// there, which is also the reference these kernels are tested against).  Under create_graph the
// backward is built from differentiable ATen operations.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "rows.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>

namespace {

using at::vec::Vectorized;

// log1p(e) for e in [0, 1] (e = exp(-|l|)): Sleef's log1p for float64; for float32, 2 atanh(t) with
// t = e / (2 + e) in [0, 1/3] from its series 2t (1 + t^2/3 + t^4/5 + ... + t^12/13), whose remainder is
// below 2e-8 of the value (t^2 <= 1/9): a few float32 ulp with the roundings, at a third of Sleef's cost
template <typename T>
inline Vectorized<T> log1p_unit(const Vectorized<T>& e) {
  if constexpr (std::is_same_v<T, float>) {
    using Vec = Vectorized<float>;
    const Vec t = e / (Vec(2.0f) + e), u = t * t;
    Vec p = Vec(1.0f / 13.0f);
    for (const float c : {1.0f / 11.0f, 1.0f / 9.0f, 1.0f / 7.0f, 1.0f / 5.0f, 1.0f / 3.0f, 1.0f})
      p = at::vec::fmadd(p, u, Vec(c));
    return Vec(2.0f) * t * p;
  } else {
    return e.log1p();
  }
}

// log p(x | l) per row, and sigmoid(l) into `sig` unless it is null (kept for the backward pass: it
// shares exp(-|l|) with softplus; without autograd nothing needs it)
template <typename T>
void log_prob_rows(const T* l, const T* x, T* out, T* sig, int64_t rows, int64_t d) {
  using Vec = Vectorized<T>;
  const int64_t n = Vec::size();
  at::parallel_for(0, rows, vaekit::grain_for(d), [&](int64_t begin, int64_t end) {
    const Vec zero{T(0)}, one{T(1)};
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * d;
      Vec acc{T(0)};
      int64_t k = 0;
      for (; k + n <= d; k += n) {
        const Vec vl = Vec::loadu(l + o + k);
        const Vec e = (zero - vl.abs()).exp();  // exp(-|l|) in (0, 1]
        const Vec inv = one / (one + e);
        if (sig) Vec::blendv(e * inv, inv, vl >= zero).store(sig + o + k);  // sigmoid(l)
        // x l - max(l, 0) first: exact for 0/1 pixels, so a confident logit's tiny term is not lost
        acc = acc + ((Vec::loadu(x + o + k) * vl - at::vec::maximum(vl, zero)) - log1p_unit(e));
      }
      T sum = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, acc);
      for (; k < d; ++k) {
        const T e = std::exp(-std::abs(l[o + k])), inv = T(1) / (T(1) + e);
        if (sig) sig[o + k] = l[o + k] >= T(0) ? inv : e * inv;
        sum += (x[o + k] * l[o + k] - std::max(l[o + k], T(0))) - std::log1p(e);
      }
      out[r] = sum;
    }
  });
}

// grad_l = g * (x - sigmoid(l)) per row
template <typename T>
void grad_logits_rows(const T* g, const T* sig, const T* x, T* gl, int64_t rows, int64_t d) {
  using Vec = Vectorized<T>;
  const int64_t n = Vec::size();
  at::parallel_for(0, rows, vaekit::grain_for(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * d;
      const Vec vg{g[r]};
      int64_t k = 0;
      for (; k + n <= d; k += n) (vg * (Vec::loadu(x + o + k) - Vec::loadu(sig + o + k))).store(gl + o + k);
      for (; k < d; ++k) gl[o + k] = g[r] * (x[o + k] - sig[o + k]);
    }
  });
}

void check_inputs(const at::Tensor& logits, const at::Tensor& x) {
  TORCH_CHECK(logits.dim() == 2 && x.sizes() == logits.sizes(), "vaekit::bernoulli_log_prob: logits and x must be one shape [rows, D]");
  TORCH_CHECK(logits.scalar_type() == x.scalar_type() &&
                  (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble),
              "vaekit::bernoulli_log_prob: the C++ kernel takes float32 or float64 inputs of one dtype");
}

// logits, x [rows, D] -> (log p(x | logits) [rows], sigmoid(logits) [rows, D] if keep_sigmoid, else undefined)
std::tuple<at::Tensor, at::Tensor> log_prob_and_sigmoid(const at::Tensor& logits, const at::Tensor& x, bool keep_sigmoid) {
  check_inputs(logits, x);
  const at::Tensor l = logits.contiguous(), xc = x.contiguous();
  at::Tensor out = at::empty({l.size(0)}, l.options()), sig;
  if (keep_sigmoid) sig = at::empty_like(l);
  AT_DISPATCH_FLOATING_TYPES(l.scalar_type(), "bernoulli_log_prob", [&] {
    log_prob_rows<scalar_t>(l.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                            keep_sigmoid ? sig.data_ptr<scalar_t>() : nullptr, l.size(0), l.size(1));
  });
  return {out, sig};
}

at::Tensor log_prob_cpu(const at::Tensor& logits, const at::Tensor& x) { return std::get<0>(log_prob_and_sigmoid(logits, x, false)); }

// grad [rows], sigmoid(logits), x [rows, D] -> grad_logits [rows, D]
at::Tensor grad_logits_cpu(const at::Tensor& grad, const at::Tensor& sig, const at::Tensor& x) {
  const at::Tensor xc = x.contiguous(), g = grad.to(sig.scalar_type()).contiguous();
  TORCH_CHECK(g.numel() == sig.size(0), "vaekit::bernoulli_log_prob backward: one gradient per row");
  at::Tensor gl = at::empty_like(sig);
  AT_DISPATCH_FLOATING_TYPES(sig.scalar_type(), "bernoulli_log_prob_backward", [&] {
    grad_logits_rows<scalar_t>(g.data_ptr<scalar_t>(), sig.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
                               gl.data_ptr<scalar_t>(), sig.size(0), sig.size(1));
  });
  return gl;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class BernoulliLogProb : public torch::autograd::Function<BernoulliLogProb> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, sig] = log_prob_and_sigmoid(logits, x, true);
    ctx->save_for_backward({logits, x, sig});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &logits = saved[0], &x = saved[1];
    const at::Tensor g = grads[0];
    at::Tensor grad_logits, grad_x;
    if (at::GradMode::is_enabled()) {  // create_graph: differentiable operations
      const at::Tensor gc = g.unsqueeze(-1);
      if (ctx->needs_input_grad(0)) grad_logits = gc * (x - at::sigmoid(logits));
      if (ctx->needs_input_grad(1)) grad_x = gc * logits;
    } else {
      if (ctx->needs_input_grad(0)) grad_logits = grad_logits_cpu(g, saved[2], x);
      if (ctx->needs_input_grad(1)) grad_x = g.unsqueeze(-1) * logits;
    }
    return {grad_logits, grad_x};
  }
};

at::Tensor log_prob_autograd(const at::Tensor& logits, const at::Tensor& x) { return BernoulliLogProb::apply(logits, x); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(vaekit, m) {
  m.def("bernoulli_log_prob(Tensor logits, Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(vaekit, CPU, m) { m.impl("bernoulli_log_prob", &log_prob_cpu); }

TORCH_LIBRARY_IMPL(vaekit, AutogradCPU, m) { m.impl("bernoulli_log_prob", &log_prob_autograd); }
