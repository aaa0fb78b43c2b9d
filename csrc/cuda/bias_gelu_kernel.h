// gelu(x + bias) over rows on a CUDA device, exact-erf or tanh form, behind plain launch functions (raw
// pointers, sizes, a stream; no torch headers, so nvcc checks it without a CUDA torch). Instantiated for
// float, double, __half and __nv_bfloat16, computed in float (double for double).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace hetrain {
namespace bias_gelu {

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int kThreads = 128;  // column packs per block (a pack: up to 16 bytes of a row)

// Column tiles of an (M, N) input of elem_bytes elements: kThreads packs of 16 bytes each.
inline int64_t column_tiles(int64_t N, int elem_bytes) {
  const int64_t per_tile = int64_t(kThreads) * (16 / elem_bytes);
  return std::max<int64_t>(1, (N + per_tile - 1) / per_tile);
}

// Row groups the backward kernel runs for an (M, N) input, each writing one partial bias-gradient row:
// with the column tiles, about 16 blocks per SM (as many as fit), so that each thread's walk over its rows,
// one load latency a row, stays short. The workspace holds parts * N values.
inline int64_t backward_parts(int64_t M, int64_t N, int elem_bytes, int sm_count) {
  const int64_t tiles = column_tiles(N, elem_bytes);
  const int64_t wanted = (16 * static_cast<int64_t>(sm_count) + tiles - 1) / tiles;
  return std::max<int64_t>(1, std::min<int64_t>({M, wanted, 65535}));
}

// y = gelu(x + b) for x of (M, N) and b of (N,).
template <typename T>
cudaError_t cuda_forward(const T* x, const T* b, T* y, bool tanh, int64_t M, int64_t N, cudaStream_t stream);

// dx = dy * gelu'(x + b); db = dx summed over rows, through the workspace b_part of parts * N values.
// parts must lie in [1, max(M, 1)] and at most 65535; backward_parts gives the usual choice.
template <typename T>
cudaError_t cuda_backward(const T* dy, const T* x, const T* b, T* dx, T* db, acc_type<T>* b_part, bool tanh,
                          int64_t parts, int64_t M, int64_t N, cudaStream_t stream);

}  // namespace bias_gelu
}  // namespace hetrain
