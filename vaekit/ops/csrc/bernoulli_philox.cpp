// Counter-based Bernoulli draws: out_i = 1 if u_i < p_i else 0, with u_i taken from Philox4x32-10
// (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"; test vectors: Random123's
// tests/kat_vectors) keyed by a 64-bit seed.  Element i (the flat index plus `offset`) reads
//
//   block b = 8 * floor(i / 32) + (i mod 8),  counter (b mod 2^32, b >> 32, 0, 0),  word (floor(i / 8) mod 4)
//   u_i = floor(word / 256) * 2^-24                                                  (in [0, 1 - 2^-24])
//
// so each 32 consecutive elements take the 4 words of 8 consecutive blocks: 8 blocks are one AVX2
// register per word, and a draw never depends on how the elements are split across threads or
// calls.  vaekit/ops/philox.py holds the same mapping in torch operations (the reference and the
// implementation for other devices); both must agree bit for bit (tests/test_philox.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;  // Philox4x32 multipliers
constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;  // Weyl key increments
constexpr int kRounds = 10;
constexpr int64_t kGroup = 128;  // elements computed together: 32 blocks (4 registers of 8 blocks)
constexpr float kScale = 5.9604644775390625e-08f;  // 2^-24

// words[q][j]: word q of block first_block + j, j < 32
void philox_scalar(uint64_t first_block, uint32_t key0, uint32_t key1, uint32_t words[4][32]) {
  for (int j = 0; j < 32; ++j) {
    const uint64_t b = first_block + j;
    uint32_t c0 = uint32_t(b), c1 = uint32_t(b >> 32), c2 = 0, c3 = 0, k0 = key0, k1 = key1;
    for (int r = 0; r < kRounds; ++r) {
      const uint64_t p0 = uint64_t(M0) * c0, p1 = uint64_t(M1) * c2;
      const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0, n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
      c0 = n0; c1 = uint32_t(p1); c2 = n2; c3 = uint32_t(p0);
      k0 += W0; k1 += W1;
    }
    words[0][j] = c0; words[1][j] = c1; words[2][j] = c2; words[3][j] = c3;
  }
}

#if defined(__AVX2__)
// high and low 32 bits of a * m for the 8 lanes of a
inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                        // lanes 0, 2, 4, 6 as 64-bit products
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// philox_scalar's result, 4 independent registers of 8 blocks in flight
void philox_avx2(uint64_t first_block, uint32_t key0, uint32_t key1, uint32_t words[4][32]) {
  constexpr int G = 4;
  __m256i c0[G], c1[G], c2[G], c3[G];
  for (int g = 0; g < G; ++g) {
    alignas(32) uint32_t lo[8], hi[8];
    for (int j = 0; j < 8; ++j) {
      const uint64_t b = first_block + 8 * g + j;
      lo[j] = uint32_t(b);
      hi[j] = uint32_t(b >> 32);
    }
    c0[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
    c1[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
    c2[g] = c3[g] = _mm256_setzero_si256();
  }
  const __m256i m0 = _mm256_set1_epi32(int(M0)), m1 = _mm256_set1_epi32(int(M1));
  uint32_t k0 = key0, k1 = key1;
  for (int r = 0; r < kRounds; ++r) {
    const __m256i vk0 = _mm256_set1_epi32(int(k0)), vk1 = _mm256_set1_epi32(int(k1));
    for (int g = 0; g < G; ++g) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c0[g], m0, hi0, lo0);
      mulhilo8(c2[g], m1, hi1, lo1);
      c0[g] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[g]), vk0);
      c1[g] = lo1;
      c2[g] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[g]), vk1);
      c3[g] = lo0;
    }
    k0 += W0; k1 += W1;
  }
  for (int g = 0; g < G; ++g) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[0] + 8 * g), c0[g]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[1] + 8 * g), c1[g]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[2] + 8 * g), c2[g]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[3] + 8 * g), c3[g]);
  }
}
#endif

// the word of element t (0 <= t < 128) of a group: block 8 * (t / 32) + t % 8, word (t / 8) % 4
inline uint32_t word_of(const uint32_t words[4][32], int64_t t) { return words[(t / 8) % 4][8 * (t / 32) + t % 8]; }

template <typename T>
void bernoulli_rows(const T* p, T* out, int64_t n, int64_t offset, uint32_t k0, uint32_t k1) {
  if (n == 0) return;
  const int64_t first = offset / kGroup, last = (offset + n - 1) / kGroup;  // the groups of global indices touched
  at::parallel_for(first, last + 1, std::max<int64_t>(1, at::internal::GRAIN_SIZE / kGroup), [&](int64_t begin, int64_t end) {
    alignas(32) uint32_t words[4][32];
    for (int64_t g = begin; g < end; ++g) {
      const uint64_t block = uint64_t(g) * 32;
#if defined(__AVX2__)
      philox_avx2(block, k0, k1, words);
#else
      philox_scalar(block, k0, k1, words);
#endif
      const int64_t lo = std::max<int64_t>(g * kGroup, offset), hi = std::min<int64_t>((g + 1) * kGroup, offset + n);
#if defined(__AVX2__)
      if constexpr (std::is_same_v<T, float>) {
        if (hi - lo == kGroup) {  // a whole group: 16 registers of 8 elements
          const float* pg = p + (lo - offset);
          float* og = out + (lo - offset);
          const __m256 scale = _mm256_set1_ps(kScale), one = _mm256_set1_ps(1.f);
          for (int h = 0; h < 4; ++h)
            for (int q = 0; q < 4; ++q) {
              const __m256i w = _mm256_srli_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(words[q] + 8 * h)), 8);
              const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(w), scale);
              const __m256 below = _mm256_cmp_ps(u, _mm256_loadu_ps(pg + 32 * h + 8 * q), _CMP_LT_OQ);
              _mm256_storeu_ps(og + 32 * h + 8 * q, _mm256_and_ps(below, one));
            }
          continue;
        }
      }
#endif
      for (int64_t i = lo; i < hi; ++i) {
        const T u = T(word_of(words, i - g * kGroup) >> 8) * T(kScale);
        out[i - offset] = u < p[i - offset] ? T(1) : T(0);
      }
    }
  });
}

}  // namespace

// p [...] float32/float64 on the CPU -> draws [...] in p's dtype; CPU kernel of vaekit::bernoulli_philox.
at::Tensor bernoulli_philox(const at::Tensor& p, int64_t seed, int64_t offset) {
  TORCH_CHECK(offset >= 0 && offset <= INT64_MAX - p.numel(),
              "vaekit::bernoulli_philox: offset must be >= 0 and offset + p.numel() fit int64, got ", offset);
  TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble,
              "vaekit::bernoulli_philox: the C++ kernel takes float32 or float64, got ", p.scalar_type());
  const at::Tensor pc = p.contiguous();
  at::Tensor out = at::empty_like(pc);
  const uint64_t key = uint64_t(seed);
  AT_DISPATCH_FLOATING_TYPES(pc.scalar_type(), "bernoulli_philox", [&] {
    bernoulli_rows<scalar_t>(pc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), pc.numel(), offset, uint32_t(key),
                             uint32_t(key >> 32));
  });
  return out;
}

namespace {

// The CPU autograd kernel: the draws are constants (no gradient flows to p), so it goes straight to the
// kernel below autograd, not through the Python custom op's autograd wrapper (tens of µs a call).
at::Tensor bernoulli_philox_autograd(const at::Tensor& p, int64_t seed, int64_t offset) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("vaekit::bernoulli_philox", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t, int64_t)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(p, seed, offset);
}

}  // namespace

TORCH_LIBRARY_IMPL(vaekit, CPU, m) { m.impl("bernoulli_philox", &bernoulli_philox); }

TORCH_LIBRARY_IMPL(vaekit, AutogradCPU, m) { m.impl("bernoulli_philox", &bernoulli_philox_autograd); }
