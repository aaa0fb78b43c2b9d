// Device helpers the row-wise CUDA kernels share (LayerNorm, RMSNorm, dropout+add+LayerNorm, bias+GELU):
// a block-wide sum, and the per-column sum of the partial rows that backward kernels write for their
// weight and bias gradients (one row per block: no contended atomics, and a deterministic result).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "convert.cuh"
#include "rows.h"

namespace hetrain {
namespace cuda {

// Sum of v over the block, returned to every thread. blockDim.x must be a multiple of 32; scratch
// holds one value per warp and may be reused by the next call.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  __syncthreads();  // every thread has finished reading scratch from the previous call
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  acc_t total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += scratch[w];
  return total;
}

// a[j] = sum over p of a_part[p][j] (likewise b); one thread per column, coalesced across columns.
// Either output may be null.
template <typename T, typename acc_t>
__global__ void column_sum_kernel(const acc_t* __restrict__ a_part, const acc_t* __restrict__ b_part,
                                  T* __restrict__ a, T* __restrict__ b, int64_t parts, int64_t N) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < N; j += stride) {
    acc_t sa = 0, sb = 0;
    for (int64_t p = 0; p < parts; ++p) {
      if (a) sa += a_part[p * N + j];
      if (b) sb += b_part[p * N + j];
    }
    if (a) store(a + j, sa);
    if (b) store(b + j, sb);
  }
}

// Launches column_sum_kernel over N columns.
template <typename T, typename acc_t>
cudaError_t column_sums(const acc_t* a_part, const acc_t* b_part, T* a, T* b, int64_t parts, int64_t N,
                        cudaStream_t stream) {
  constexpr int threads = 256;
  column_sum_kernel<T, acc_t><<<grid_for((N + threads - 1) / threads), threads, 0, stream>>>(a_part, b_part, a, b,
                                                                                              parts, N);
  return cudaGetLastError();
}

// Zeroes n values of T (an empty reduction's result: all-zero bits in every supported type).
template <typename T>
cudaError_t zero(T* p, int64_t n, cudaStream_t stream) {
  return p ? cudaMemsetAsync(p, 0, n * sizeof(T), stream) : cudaSuccess;
}

// The host side of a row kernel's backward over `parts` row blocks (LayerNorm, RMSNorm, dropout+add+LayerNorm):
// checks parts and workspaces, gives zero parameter gradients for no rows, runs `launch(w_part, b_part)` (each
// null where that gradient is not wanted), then sums the partial rows into dw / db (either may be null).
template <typename T, typename acc_t, typename Launch>
cudaError_t row_backward(T* dw, T* db, acc_t* w_part, acc_t* b_part, int64_t parts, int64_t M, int64_t N,
                         cudaStream_t stream, Launch&& launch) {
  if (parts < 1 || parts > std::max<int64_t>(M, 1) || parts > INT_MAX || (dw && !w_part) || (db && !b_part)) {
    return cudaErrorInvalidValue;
  }
  if (N == 0) return cudaSuccess;
  if (M == 0) {  // no rows: the parameter gradients are zero
    const cudaError_t err = zero(dw, N, stream);
    return err != cudaSuccess ? err : zero(db, N, stream);
  }
  launch(dw ? w_part : nullptr, db ? b_part : nullptr);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || (!dw && !db)) return err;
  return column_sums(w_part, b_part, dw, db, parts, N, stream);
}

}  // namespace cuda
}  // namespace hetrain
