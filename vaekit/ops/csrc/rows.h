// Shared by vaekit's CPU kernels (built together by vaekit/ops/cpu_kernel.py, which hashes this header too).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace vaekit {

// rows of d values per at::parallel_for task: about at::internal::GRAIN_SIZE (32768) elements, as ATen's
// own elementwise kernels use
inline int64_t grain_for(int64_t d) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(d, 1)); }

}  // namespace vaekit
