// A linear layer whose input is mostly zeros, as binarized images are (MNIST: ~83-87 % zero pixels):
//
//   forward:  y = x W^T + b,                 x [B, K], W [N, K], b [N] -> y [B, N]
//   backward: grad_W = g^T x,  grad_b = sum_b g,  grad_x = g W      (g = dL/dy [B, N])
//
// computed from x's nonzero values only.  Each output row is a sum of W's columns picked by the row's
// nonzeros, y[b, :] = b + sum_{j: x[b,j] != 0} x[b,j] W[:, j], and each column of grad_W a sum of g's
// rows, grad_W[:, j] = sum_{b: x[b,j] != 0} x[b,j] g[b, :]: both are one kernel (rows_sum_block below)
// over a row-major table (W^T, or g) with the sums' accumulators in registers, so the cost follows the
// number of nonzeros, not B * K.  The threads split the N outputs: each transposes its tiles of W (64
// columns of W^T, 200 KB for K = 784) into a buffer that stays in cache, and its tiles of grad_W^T back
// into grad_W, so W and grad_W cross memory once each, as in a GEMM.
//
// A dense GEMM does 2 B N K flops at near peak speed; this does 2 nnz N at a fraction of it, so it is
// used while the share of nonzeros is at most `max_density` (vaekit/ops/sparse_linear.py measured the
// break-even; a first pass counts them) and otherwise the op is at::linear.  Entries of W whose column
// meets only zeros of x take no part, so an inf or NaN there does not reach y as it would through
// 0 * inf.  grad_x is the dense g W (needed only when x requires a gradient).  Under create_graph the
// backward is built from differentiable ATen operations.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "rows.h"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using at::vec::Vectorized;

constexpr int64_t kL1Bytes = 24 * 1024;  // the share of a 32 KiB L1 data cache a table tile may take

// A sparse matrix as index lists: entry r's pairs are (idx[k], val[k]) for begin[r] <= k < end[r].
struct Lists {
  at::Tensor begin, end;  // int64 [rows]
  at::Tensor idx;         // int32 [capacity]
  at::Tensor val;         // T [capacity]
  int64_t nnz = 0;
};

// the number of nonzeros of each row of x [B, K] into count [B] (NaN counts: it must reach the output); their total
template <typename T>
int64_t count_nonzeros(const T* x, int64_t B, int64_t K, int64_t* count) {
  at::parallel_for(0, B, vaekit::grain_for(K), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* row = x + b * K;
      int64_t c = 0;
      for (int64_t j = 0; j < K; ++j) c += row[j] != T(0);
      count[b] = c;
    }
  });
  int64_t nnz = 0;
  for (int64_t b = 0; b < B; ++b) nnz += count[b];
  return nnz;
}

// x [B, K] with `count` nonzeros per row (count_nonzeros) -> each row's nonzeros, in order; row b's slots
// are [begin, end = begin + count] (one spare slot a row: the branch-free fill writes past its last nonzero)
template <typename T>
Lists row_lists(const T* x, int64_t B, int64_t K, const int64_t* count, int64_t nnz, const at::TensorOptions& opts) {
  Lists L;
  L.begin = at::empty({B}, opts.dtype(at::kLong));
  L.end = at::empty({B}, opts.dtype(at::kLong));
  L.idx = at::empty({nnz + B}, opts.dtype(at::kInt));
  L.val = at::empty({nnz + B}, opts);
  L.nnz = nnz;
  int64_t *begin = L.begin.data_ptr<int64_t>(), *end = L.end.data_ptr<int64_t>();
  int32_t* idx = L.idx.data_ptr<int32_t>();
  T* val = L.val.data_ptr<T>();
  for (int64_t b = 0, start = 0; b < B; ++b) {
    begin[b] = start;
    start += count[b] + 1;
  }
  at::parallel_for(0, B, vaekit::grain_for(K), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* row = x + b * K;
      int64_t n = begin[b];
      for (int64_t j = 0; j < K; ++j) {  // branch-free: write every value, advance on nonzeros
        idx[n] = int32_t(j);
        val[n] = row[j];
        n += row[j] != T(0);
      }
      end[b] = n;
    }
  });
  return L;
}

// the same nonzeros listed per column j < K (in row order): a counting sort of the row lists
template <typename T>
Lists column_lists(const Lists& rows, int64_t B, int64_t K) {
  Lists C;
  const auto opts = rows.val.options();
  C.begin = at::empty({K}, opts.dtype(at::kLong));
  C.end = at::empty({K}, opts.dtype(at::kLong));
  C.idx = at::empty({std::max<int64_t>(rows.nnz, 1)}, opts.dtype(at::kInt));
  C.val = at::empty({std::max<int64_t>(rows.nnz, 1)}, opts);
  C.nnz = rows.nnz;
  const int64_t *rb = rows.begin.data_ptr<int64_t>(), *re = rows.end.data_ptr<int64_t>();
  const int32_t* ri = rows.idx.data_ptr<int32_t>();
  const T* rv = rows.val.data_ptr<T>();
  int64_t *cb = C.begin.data_ptr<int64_t>(), *ce = C.end.data_ptr<int64_t>();
  int32_t* ci = C.idx.data_ptr<int32_t>();
  T* cv = C.val.data_ptr<T>();
  std::vector<int64_t> count(K, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = rb[b]; k < re[b]; ++k) ++count[ri[k]];
  int64_t start = 0;
  for (int64_t j = 0; j < K; ++j) {
    cb[j] = ce[j] = start;
    start += count[j];
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = rb[b]; k < re[b]; ++k) {
      const int64_t at = ce[ri[k]]++;
      ci[at] = int32_t(b);
      cv[at] = rv[k];
    }
  return C;
}

// out[(r - r0) ldo + 0 : R n] = init[0 : R n] (or 0) + sum_k val[k] table[idx[k] ldt + 0 : R n] for rows
// r0 <= r < r1 (k over the lists' entry r), accumulators in R registers.  The table is read in chunks of
// `chunk` rows (a chunk of the tile fits the L1 cache and serves every row before the next chunk), so each
// row's sum resumes per chunk at cur[r - r0] (lists are sorted by idx).
template <typename T, int R>
inline void rows_sum_regs(T* out, int64_t ldo, const T* table, int64_t ldt, const T* init, const int64_t* begin,
                          const int64_t* end, const int32_t* idx, const T* val, int64_t r0, int64_t r1,
                          int64_t table_rows, int64_t chunk, int64_t* cur) {
  using Vec = Vectorized<T>;
  constexpr int64_t n = Vec::size();
  for (int64_t r = r0; r < r1; ++r) cur[r - r0] = begin[r];
  for (int64_t t0 = 0; t0 < table_rows; t0 += chunk) {
    const int64_t t1 = t0 + chunk;
    for (int64_t r = r0; r < r1; ++r) {
      T* o = out + (r - r0) * ldo;
      Vec acc[R];
      if (t0 == 0)
        for (int q = 0; q < R; ++q) acc[q] = init ? Vec::loadu(init + q * n) : Vec(T(0));
      else
        for (int q = 0; q < R; ++q) acc[q] = Vec::loadu(o + q * n);
      int64_t k = cur[r - r0];
      for (const int64_t stop = end[r]; k < stop && idx[k] < t1; ++k) {
        const Vec v(val[k]);
        const T* row = table + int64_t(idx[k]) * ldt;
        for (int q = 0; q < R; ++q) acc[q] = at::vec::fmadd(v, Vec::loadu(row + q * n), acc[q]);
      }
      cur[r - r0] = k;
      for (int q = 0; q < R; ++q) acc[q].store(o + q * n);
    }
  }
}

// rows_sum_regs over w <= kTile<T> columns: 8 registers, then 1, then the last w % n columns one by one
template <typename T>
void rows_sum_block(T* out, int64_t ldo, const T* table, int64_t ldt, const T* init, const Lists& L, int64_t r0,
                    int64_t r1, int64_t w, int64_t table_rows, int64_t* cur) {
  using Vec = Vectorized<T>;
  constexpr int64_t n = Vec::size();
  const int64_t *begin = L.begin.data_ptr<int64_t>(), *end = L.end.data_ptr<int64_t>();
  const int32_t* idx = L.idx.data_ptr<int32_t>();
  const T* val = L.val.data_ptr<T>();
  const int64_t chunk = std::max<int64_t>(8, kL1Bytes / int64_t(8 * n * sizeof(T)));  // table rows of a tile in L1
  int64_t c = 0;
  if (w >= 8 * n) {
    rows_sum_regs<T, 8>(out, ldo, table, ldt, init, begin, end, idx, val, r0, r1, table_rows, chunk, cur);
    c = 8 * n;
  }
  for (; c + n <= w; c += n)
    rows_sum_regs<T, 1>(out + c, ldo, table + c, ldt, init ? init + c : nullptr, begin, end, idx, val, r0, r1,
                        table_rows, chunk * 8, cur);
  for (int64_t r = r0; r < r1 && c < w; ++r)
    for (int64_t cc = c; cc < w; ++cc) {
      T acc = init ? init[cc] : T(0);
      for (int64_t k = begin[r]; k < end[r]; ++k) acc += val[k] * table[int64_t(idx[k]) * ldt + cc];
      out[(r - r0) * ldo + cc] = acc;
    }
}

template <typename T>
constexpr int64_t kTile = 8 * Vectorized<T>::size();  // columns of one register tile

// body(c0, c1, r0, r1) for a split of [0, cols) x [0, rows) over the threads: columns in parts of whole
// vectors (each thread its own columns of the output, so the weight is read once), rows too where there
// are fewer column parts than threads
template <typename T, typename F>
void for_parts(int64_t cols, int64_t rows, const F& body) {
  constexpr int64_t n = Vectorized<T>::size();
  const int64_t units = (cols + n - 1) / n, threads = at::get_num_threads();
  const int64_t parts_c = std::max<int64_t>(1, std::min(threads, units));
  const int64_t parts_r = std::max<int64_t>(1, std::min(rows, threads / parts_c));
  at::parallel_for(0, parts_c * parts_r, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t pc = t / parts_r, pr = t % parts_r;
      const int64_t c0 = units * pc / parts_c * n, c1 = std::min(cols, units * (pc + 1) / parts_c * n);
      const int64_t r0 = rows * pr / parts_r, r1 = rows * (pr + 1) / parts_r;
      if (c0 < c1 && r0 < r1) body(c0, c1, r0, r1);
    }
  });
}

#if defined(__AVX2__)
// dst[c, r] = src[r, c] for an 8 x 8 block (row strides lds, ldd)
inline void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int h = 0; h < 8; h += 4) {  // rows 4h'..: 2 x 2 blocks of pairs
    r[h] = _mm256_shuffle_ps(t[h], t[h + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// out[c ldo + r] = in[r ldi + c] for r < rows, c < cols (8 x 8 registers where the CPU has AVX2); one thread
template <typename T>
void transpose(const T* in, int64_t ldi, int64_t rows, int64_t cols, T* out, int64_t ldo) {
  int64_t r8 = 0, c8 = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    r8 = rows / 8 * 8;
    c8 = cols / 8 * 8;
    for (int64_t r = 0; r < r8; r += 8)
      for (int64_t c = 0; c < c8; c += 8) transpose8x8(in + r * ldi + c, ldi, out + c * ldo + r, ldo);
  }
#endif
  for (int64_t r = 0; r < rows; ++r)  // what the blocks left: the last rows % 8 rows and cols % 8 columns
    for (int64_t c = r < r8 ? c8 : 0; c < cols; ++c) out[c * ldo + r] = in[r * ldi + c];
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "vaekit::sparse_input_linear: x [B, K] and weight [N, K], got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "vaekit::sparse_input_linear: CPU tensors");
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) && weight.scalar_type() == x.scalar_type(),
              "vaekit::sparse_input_linear: float32 or float64 inputs of one dtype, got ", x.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(x.size(1) < INT32_MAX && x.size(0) < INT32_MAX, "vaekit::sparse_input_linear: sizes must fit int32");
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == x.scalar_type(),
                "vaekit::sparse_input_linear: bias [N] of x's dtype, got ", bias->sizes());
}

bool has(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// y [B, N]; `lists` receives x's row lists when the sparse path ran (undefined `begin` otherwise)
at::Tensor forward_impl(const at::Tensor& x_, const at::Tensor& weight_, const c10::optional<at::Tensor>& bias,
                        double max_density, Lists* lists) {
  check_inputs(x_, weight_, bias);
  const at::Tensor x = x_.contiguous(), weight = weight_.contiguous();
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({B, N}, x.options());
  bool sparse = false;
  if (B > 0 && N > 0 && K > 0) AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_input_linear", [&] {
    std::vector<int64_t> count(B);
    const int64_t nnz = count_nonzeros<scalar_t>(x.data_ptr<scalar_t>(), B, K, count.data());
    if (double(nnz) > max_density * double(B) * double(K)) return;
    sparse = true;
    Lists L = row_lists<scalar_t>(x.data_ptr<scalar_t>(), B, K, count.data(), nnz, x.options());
    const at::Tensor b = has(bias) ? bias->contiguous() : at::Tensor();
    const scalar_t *w = weight.data_ptr<scalar_t>(), *bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    for_parts<scalar_t>(N, B, [&](int64_t c0, int64_t c1, int64_t r0, int64_t r1) {
      constexpr int64_t tile = kTile<scalar_t>;
      std::unique_ptr<scalar_t[]> wt(new scalar_t[K * tile]);  // W^T's tile [K, tile], in cache
      std::vector<int64_t> cur(r1 - r0);
      for (int64_t c = c0; c < c1; c += tile) {
        const int64_t wd = std::min(tile, c1 - c);
        transpose<scalar_t>(w + c * K, K, wd, K, wt.get(), wd);  // W[c : c + wd, :]^T
        rows_sum_block<scalar_t>(yp + r0 * N + c, N, wt.get(), wd, bp ? bp + c : nullptr, L, r0, r1, wd, K, cur.data());
      }
    });
    if (lists) *lists = std::move(L);
  });
  if (!sparse) {  // in x's dtype: autocast (if on) is the caller's (vaekit/ops/sparse_linear.py sends it to F.linear)
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    return at::linear(x_, weight_, bias);  // as given: F.linear's own product, bit for bit
  }
  return y;
}

// x [B, K], weight [N, K], bias [N] or None -> x weight^T + bias [B, N]; CPU kernel (no autograd)
at::Tensor sparse_input_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                   double max_density) {
  return forward_impl(x, weight, bias, max_density, nullptr);
}

// grad_W [N, K] = g^T x from the row lists of x
at::Tensor grad_weight_sparse(const at::Tensor& g_, const Lists& rows, int64_t K) {
  const at::Tensor g = g_.contiguous();
  const int64_t B = g.size(0), N = g.size(1);
  at::Tensor gw = at::empty({N, K}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sparse_input_linear_backward", [&] {
    const Lists cols = column_lists<scalar_t>(rows, B, K);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* out = gw.data_ptr<scalar_t>();
    // grad_W^T [K, N]: row j sums the rows of g that column j of x picks; tile by tile of N, transposed into
    // grad_W [N, K] from cache
    for_parts<scalar_t>(N, K, [&](int64_t c0, int64_t c1, int64_t r0, int64_t r1) {
      constexpr int64_t tile = kTile<scalar_t>;
      std::unique_ptr<scalar_t[]> gwt(new scalar_t[(r1 - r0) * tile]);
      std::vector<int64_t> cur(r1 - r0);
      for (int64_t c = c0; c < c1; c += tile) {
        const int64_t wd = std::min(tile, c1 - c);
        rows_sum_block<scalar_t>(gwt.get(), wd, gp + c, N, nullptr, cols, r0, r1, wd, B, cur.data());
        transpose<scalar_t>(gwt.get(), wd, r1 - r0, wd, out + c * K + r0, K);
      }
    });
  });
  return gw;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class SparseInputLinear : public torch::autograd::Function<SparseInputLinear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, double max_density, bool keep_lists) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Lists L;
    at::Tensor y = forward_impl(x, weight, bias, max_density, keep_lists ? &L : nullptr);
    ctx->save_for_backward({x, weight});
    ctx->saved_data["has_bias"] = has(bias);
    if (L.begin.defined()) {  // keep x's nonzeros for grad_W
      ctx->saved_data["nnz"] = L.nnz;
      ctx->saved_data["lists"] = std::vector<at::Tensor>{L.begin, L.end, L.idx, L.val};
    }
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1];
    const at::Tensor g = grads[0];
    at::Tensor grad_x, grad_w, grad_b;
    if (ctx->needs_input_grad(0)) grad_x = at::mm(g, weight);
    if (ctx->needs_input_grad(1)) {
      if (!at::GradMode::is_enabled() && ctx->saved_data.count("lists")) {
        const auto t = ctx->saved_data["lists"].toTensorVector();
        Lists L{t[0], t[1], t[2], t[3], ctx->saved_data["nnz"].toInt()};
        grad_w = grad_weight_sparse(g, L, x.size(1));
      } else {  // dense, and differentiable under create_graph
        grad_w = at::mm(g.t(), x);
      }
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) grad_b = g.sum(0);
    return {grad_x, grad_w, grad_b, at::Tensor(), at::Tensor()};
  }
};

at::Tensor sparse_input_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                        double max_density) {
  const bool keep_lists = at::GradMode::is_enabled() && weight.requires_grad();  // grad_W will be wanted
  return SparseInputLinear::apply(x, weight, bias, max_density, keep_lists);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vaekit, m) {
  m.def("sparse_input_linear(Tensor x, Tensor weight, Tensor? bias, float max_density) -> Tensor");
}

TORCH_LIBRARY_IMPL(vaekit, CPU, m) { m.impl("sparse_input_linear", &sparse_input_linear_cpu); }

TORCH_LIBRARY_IMPL(vaekit, AutogradCPU, m) { m.impl("sparse_input_linear", &sparse_input_linear_autograd); }
