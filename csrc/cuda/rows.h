// Launch shapes the row-wise CUDA kernels share, host side only (the bindings include this; the
// device helpers are in rows.cuh). One thread block per row; backward kernels write one partial row
// per block for each parameter gradient, summed per column afterwards.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>

namespace hetrain {
namespace cuda {

constexpr int kMaxRowThreads = 1024;

// Threads per row: about four elements each, a whole number of warps, at most kMaxRowThreads.
inline int threads_for(int64_t N) {
  const int64_t warps = ((N + 3) / 4 + 31) / 32;
  return static_cast<int>(std::clamp<int64_t>(warps * 32, 32, kMaxRowThreads));
}

// Blocks for `rows` rows (each block strides over the rows past the grid).
inline unsigned grid_for(int64_t rows) { return static_cast<unsigned>(std::min<int64_t>(rows, INT_MAX)); }

// Row blocks a backward kernel runs for M rows: enough to fill the GPU, so the workspace holds
// backward_parts(M, sms) * N values per gradient.
inline int64_t backward_parts(int64_t M, int sm_count) {
  return std::max<int64_t>(1, std::min<int64_t>(M, 4 * static_cast<int64_t>(sm_count)));
}

}  // namespace cuda
}  // namespace hetrain
