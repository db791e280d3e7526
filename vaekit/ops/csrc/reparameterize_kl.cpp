// Fused reparameterize + KL for a diagonal Gaussian posterior and a standard-normal prior.
//
//   forward:  lv_c = clamp(logvar, lo, hi),  s = exp(lv_c / 2)
//             z  = mu + s * eps
//             kl = 1/2 * sum_k (s_k^2 + mu_k^2 - 1 - lv_c_k)              (one value per row)
//   backward: grad_mu     = grad_z + grad_kl * mu
//             grad_logvar = 1/2 * (grad_z * s * eps + grad_kl * (s^2 - 1))   (straight through the clamp)
//
// One pass over the inputs each way, vectorised with ATen's Vectorized (Sleef exp where the CPU
// has AVX2/AVX-512), rows split across threads with at::parallel_for. Inputs are [rows, d],
// contiguous, float32 or float64: half types are computed in float32, z is rounded back to the input
// dtype and the KL returned in float32. The bounds [lo, hi] come from vaekit/ops/reference.py
// (logvar_bounds) as compiler definitions, so every implementation clamps alike.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "rows.h"
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>

namespace {

using at::vec::Vectorized;

#if !defined(VAEKIT_LOGVAR_MIN) || !defined(VAEKIT_LOGVAR_MAX) || !defined(VAEKIT_LOGVAR_MAX_FLOAT16)
#error "build through vaekit/ops/cpu_kernel.py, which defines the clamp bounds from vaekit/ops/reference.py"
#endif

// the clamp (lo, hi) for inputs of `dtype`: vaekit.ops.reference.logvar_bounds
std::pair<double, double> logvar_bounds(at::ScalarType dtype) {
  return {VAEKIT_LOGVAR_MIN, dtype == at::kHalf ? VAEKIT_LOGVAR_MAX_FLOAT16 : VAEKIT_LOGVAR_MAX};
}

template <typename T>
void forward_rows(const T* mu, const T* lv, const T* eps, T* z, T* kl, int64_t rows, int64_t d, T lo_, T hi_) {
  using Vec = Vectorized<T>;
  const int64_t n = Vec::size();
  at::parallel_for(0, rows, vaekit::grain_for(d), [&](int64_t begin, int64_t end) {
    const Vec half{T(0.5)}, one{T(1)}, lo{lo_}, hi{hi_};
    for (int64_t r = begin; r < end; ++r) {
      const T* m = mu + r * d;
      const T* l = lv + r * d;
      const T* e = eps + r * d;
      T* zr = z + r * d;
      Vec acc{T(0)};
      int64_t k = 0;
      for (; k + n <= d; k += n) {
        Vec vm = Vec::loadu(m + k);
        Vec vl = at::vec::clamp(Vec::loadu(l + k), lo, hi);
        Vec s = (vl * half).exp();
        at::vec::fmadd(s, Vec::loadu(e + k), vm).store(zr + k);
        acc = acc + (s * s + vm * vm - one - vl);
      }
      T sum = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, acc);
      for (; k < d; ++k) {
        T vl = std::min(std::max(l[k], lo_), hi_);
        T s = std::exp(T(0.5) * vl);
        zr[k] = m[k] + s * e[k];
        sum += s * s + m[k] * m[k] - T(1) - vl;
      }
      kl[r] = T(0.5) * sum;
    }
  });
}

template <typename T>
void backward_rows(const T* gz, const T* gkl, const T* mu, const T* lv, const T* eps, T* gmu, T* glv,
                   int64_t rows, int64_t d, T lo_, T hi_) {
  using Vec = Vectorized<T>;
  const int64_t n = Vec::size();
  at::parallel_for(0, rows, vaekit::grain_for(d), [&](int64_t begin, int64_t end) {
    const Vec half{T(0.5)}, one{T(1)}, lo{lo_}, hi{hi_};
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * d;
      const T g = gkl[r];
      const Vec vg{g};
      int64_t k = 0;
      for (; k + n <= d; k += n) {
        Vec vm = Vec::loadu(mu + o + k);
        Vec vl = at::vec::clamp(Vec::loadu(lv + o + k), lo, hi);
        Vec s = (vl * half).exp();
        Vec vgz = Vec::loadu(gz + o + k);
        at::vec::fmadd(vg, vm, vgz).store(gmu + o + k);
        (half * (vgz * s * Vec::loadu(eps + o + k) + vg * (s * s - one))).store(glv + o + k);
      }
      for (; k < d; ++k) {
        T vl = std::min(std::max(lv[o + k], lo_), hi_);
        T s = std::exp(T(0.5) * vl);
        gmu[o + k] = gz[o + k] + g * mu[o + k];
        glv[o + k] = T(0.5) * (gz[o + k] * s * eps[o + k] + g * (s * s - T(1)));
      }
    }
  });
}

// [..., d] -> [rows, d] contiguous in the compute dtype (float32 for half types).
at::Tensor as_rows(const at::Tensor& t, int64_t rows, int64_t d, at::ScalarType compute) {
  return t.reshape({rows, d}).to(compute).contiguous();
}

at::ScalarType compute_type(const at::Tensor& mu) {
  const auto dtype = mu.scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), "vaekit::reparameterize_kl needs floating-point inputs, got ", dtype);
  return (dtype == at::kHalf || dtype == at::kBFloat16) ? at::kFloat : dtype;
}

int64_t leading_rows(const at::Tensor& mu) {
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < mu.dim(); ++i) rows *= mu.size(i);
  return rows;
}

}  // namespace

// mu, logvar, eps: [..., d] -> (z [..., d], kl [...]); CPU kernel of vaekit::reparameterize_kl.
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& eps) {
  TORCH_CHECK(mu.dim() >= 1 && logvar.sizes() == mu.sizes() && eps.sizes() == mu.sizes(),
              "vaekit::reparameterize_kl: mu, logvar and eps must have one shape [..., d]");
  const auto compute = compute_type(mu);
  const int64_t d = mu.size(-1), rows = leading_rows(mu);
  at::Tensor m = as_rows(mu, rows, d, compute), l = as_rows(logvar, rows, d, compute), e = as_rows(eps, rows, d, compute);
  at::Tensor z = at::empty({rows, d}, m.options());
  at::Tensor kl = at::empty({rows}, m.options());
  const std::pair<double, double> bounds = logvar_bounds(mu.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(compute, "reparameterize_kl_forward", [&] {
    forward_rows<scalar_t>(m.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(),
                           z.data_ptr<scalar_t>(), kl.data_ptr<scalar_t>(), rows, d, scalar_t(bounds.first), scalar_t(bounds.second));
  });
  auto batch = mu.sizes().slice(0, mu.dim() - 1);
  return {z.view(mu.sizes()).to(mu.scalar_type()), kl.view(batch)};  // the KL stays in the compute dtype
}

// grad_z [..., d], grad_kl [...], inputs [..., d] -> (grad_mu, grad_logvar); CPU kernel of
// vaekit::reparameterize_kl_backward.
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& mu,
                                            const at::Tensor& logvar, const at::Tensor& eps) {
  const auto compute = compute_type(mu);
  const int64_t d = mu.size(-1), rows = leading_rows(mu);
  TORCH_CHECK(grad_kl.numel() == rows, "vaekit::reparameterize_kl_backward: grad_kl must have one value per row");
  at::Tensor gz = as_rows(grad_z, rows, d, compute), m = as_rows(mu, rows, d, compute);
  at::Tensor l = as_rows(logvar, rows, d, compute), e = as_rows(eps, rows, d, compute);
  at::Tensor gk = grad_kl.reshape({rows}).to(compute).contiguous();
  at::Tensor gmu = at::empty({rows, d}, m.options());
  at::Tensor glv = at::empty({rows, d}, m.options());
  const std::pair<double, double> bounds = logvar_bounds(mu.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(compute, "reparameterize_kl_backward", [&] {
    backward_rows<scalar_t>(gz.data_ptr<scalar_t>(), gk.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(),
                            l.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(), gmu.data_ptr<scalar_t>(),
                            glv.data_ptr<scalar_t>(), rows, d, scalar_t(bounds.first), scalar_t(bounds.second));
  });
  return {gmu.view(mu.sizes()).to(mu.scalar_type()), glv.view(mu.sizes()).to(mu.scalar_type())};
}

namespace {

// --- autograd on the CPU -------------------------------------------------------------------------
// The same formulas as the op's Python autograd (vaekit/ops/fused.py: _backward), as a C++ node: a
// CPU training step's sample and KL go through no Python either way.  Both directions call the ops
// through the dispatcher (below autograd), so under torch.compile/opcheck they trace as the ops.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("vaekit::reparameterize_kl", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(mu, logvar, eps);
}

std::tuple<at::Tensor, at::Tensor> backward_op(const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& mu,
                                               const at::Tensor& logvar, const at::Tensor& eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("vaekit::reparameterize_kl_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_z, grad_kl, mu, logvar, eps);
}

// exp(clamp(logvar) / 2) in the compute dtype with the gradient straight through the clamp
// (vaekit.ops.reference.clamp_logvar): differentiable, for double backward and the gradient w.r.t. eps
at::Tensor clamped_std(const at::Tensor& logvar_c, at::ScalarType dtype) {
  const auto bounds = logvar_bounds(dtype);
  return at::exp(0.5 * (logvar_c + (logvar_c.clamp(bounds.first, bounds.second) - logvar_c).detach()));
}

// vaekit::reparameterize_kl_backward's CPU autograd: the kernel, or where a gradient of it is wanted
// (double backward) the same formulas in differentiable ATen operations
// (vaekit.ops.reference.reparameterize_kl_backward_eager)
std::tuple<at::Tensor, at::Tensor> backward_autograd(const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& mu,
                                                     const at::Tensor& logvar, const at::Tensor& eps) {
  const bool differentiable = at::GradMode::is_enabled() && (grad_z.requires_grad() || grad_kl.requires_grad() ||
                                                              mu.requires_grad() || logvar.requires_grad() || eps.requires_grad());
  if (!differentiable) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return backward_op(grad_z, grad_kl, mu, logvar, eps);
  }
  const auto dtype = mu.scalar_type(), compute = compute_type(mu);
  const at::Tensor gz = grad_z.to(compute), g = grad_kl.to(compute).unsqueeze(-1);
  const at::Tensor s = clamped_std(logvar.to(compute), dtype);
  return {(gz + g * mu.to(compute)).to(dtype), (0.5 * (gz * s * eps.to(compute) + g * (s.square() - 1.0))).to(dtype)};
}

class ReparameterizeKL : public torch::autograd::Function<ReparameterizeKL> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [z, kl] = forward_op(mu, logvar, eps);
    ctx->save_for_backward({mu, logvar, eps});
    return {z, kl};
  }

  // grads: (grad_z [..., d], grad_kl [...]) -> (grad_mu, grad_logvar, grad_eps)
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &mu = saved[0], &logvar = saved[1], &eps = saved[2];
    const at::Tensor &grad_z = grads[0], &grad_kl = grads[1];
    const auto compute = compute_type(mu);
    at::Tensor grad_mu, grad_logvar, grad_eps;
    std::tie(grad_mu, grad_logvar) = backward_autograd(grad_z, grad_kl, mu, logvar, eps);  // create_graph: differentiable
    if (ctx->needs_input_grad(2))  // vaekit.ops.reference.reparameterize_grad_eps
      grad_eps = (grad_z.to(compute) * clamped_std(logvar.to(compute), mu.scalar_type())).to(logvar.scalar_type());
    return {grad_mu, grad_logvar, grad_eps};
  }
};

std::tuple<at::Tensor, at::Tensor> forward_autograd(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& eps) {
  auto out = ReparameterizeKL::apply(mu, logvar, eps);
  return {out[0], out[1]};
}

}  // namespace

// The schemas are defined in Python (vaekit/ops/fused.py, torch.library.custom_op); this library
// only adds their CPU kernels and CPU autograd, so the CPU path never goes through Python.
TORCH_LIBRARY_IMPL(vaekit, CPU, m) {
  m.impl("reparameterize_kl", &forward);
  m.impl("reparameterize_kl_backward", &backward);
}

TORCH_LIBRARY_IMPL(vaekit, AutogradCPU, m) {
  m.impl("reparameterize_kl", &forward_autograd);
  m.impl("reparameterize_kl_backward", &backward_autograd);
}
