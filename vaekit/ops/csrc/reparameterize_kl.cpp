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

// The schemas are defined in Python (vaekit/ops/fused.py, torch.library.custom_op); this library
// only adds their CPU kernels, so the CPU path never goes through Python.
TORCH_LIBRARY_IMPL(vaekit, CPU, m) {
  m.impl("reparameterize_kl", &forward);
  m.impl("reparameterize_kl_backward", &backward);
}
