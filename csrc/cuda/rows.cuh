// Device helpers the row-wise CUDA kernels share (LayerNorm, RMSNorm, dropout+add+LayerNorm, bias+GELU):
// a block-wide sum, and the per-column sum of the partial rows that backward kernels write for their
// weight and bias gradients (one row per block: no contended atomics, and a deterministic result).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>

#include "convert.cuh"
#include "pack.cuh"
#include "rows.h"

namespace hetrain {
namespace cuda {

// Sum of v over the block, returned to every thread. blockDim.x must be a multiple of 32; scratch
// holds one value per warp and may be reused by the next call.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (blockDim.x == 32) return v;  // the warp's shuffles were the whole sum
  __syncthreads();  // every thread has finished reading scratch from the previous call
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  acc_t total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += scratch[w];
  return total;
}

// Sums of two values over the block, returned to every thread: one pair of barriers for both. scratch holds
// two values per warp and may be reused by the next call.
template <typename acc_t>
struct Sums {
  acc_t a, b;
};
template <typename acc_t>
__device__ __forceinline__ Sums<acc_t> block_sum2(acc_t a, acc_t b, acc_t* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, offset);
    b += __shfl_xor_sync(0xffffffffu, b, offset);
  }
  const int warps = static_cast<int>(blockDim.x >> 5);
  if (warps == 1) return {a, b};  // the warp's shuffles were the whole sum
  __syncthreads();  // every thread has finished reading scratch from the previous call
  if ((threadIdx.x & 31) == 0) {
    scratch[threadIdx.x >> 5] = a;
    scratch[warps + (threadIdx.x >> 5)] = b;
  }
  __syncthreads();
  Sums<acc_t> total{0, 0};
  for (int w = 0; w < warps; ++w) {
    total.a += scratch[w];
    total.b += scratch[warps + w];
  }
  return total;
}

constexpr int kColumnLanes = 32;  // columns per block of the partial-row sums, and at most as many row lanes

// a[j] = sum over p of a_part[p][j] (likewise b), either output may be null. A block takes 32 columns; each of
// its warps (one per lane, up to 32) sums every lanes-th partial row of them (a warp reads 32 consecutive
// values of a row), then each column's lane sums are added in a fixed order: many loads in flight, and a
// deterministic result.
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kColumnLanes * kColumnLanes)
    column_sum_kernel(const acc_t* __restrict__ a_part, const acc_t* __restrict__ b_part, T* __restrict__ a,
                      T* __restrict__ b, int64_t parts, int64_t N) {
  __shared__ acc_t sa[kColumnLanes][kColumnLanes + 1];
  __shared__ acc_t sb[kColumnLanes][kColumnLanes + 1];
  const int lanes = static_cast<int>(blockDim.x) / kColumnLanes;
  const int col = threadIdx.x % kColumnLanes, lane = threadIdx.x / kColumnLanes;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColumnLanes + col;
  acc_t ta = 0, tb = 0;
  if (j < N) {
    for (int64_t p = lane; p < parts; p += lanes) {
      if (a) ta += a_part[p * N + j];
      if (b) tb += b_part[p * N + j];
    }
  }
  sa[lane][col] = ta;
  sb[lane][col] = tb;
  __syncthreads();
  if (lane == 0 && j < N) {
    for (int l = 1; l < lanes; ++l) {
      ta += sa[l][col];
      tb += sb[l][col];
    }
    if (a) store(a + j, ta);
    if (b) store(b + j, tb);
  }
}

// Launches column_sum_kernel over N columns of `parts` partial rows: one lane per partial row, up to 32.
template <typename T, typename acc_t>
cudaError_t column_sums(const acc_t* a_part, const acc_t* b_part, T* a, T* b, int64_t parts, int64_t N,
                        cudaStream_t stream) {
  const int64_t blocks = (N + kColumnLanes - 1) / kColumnLanes;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  const int lanes = static_cast<int>(std::clamp<int64_t>(parts, 1, kColumnLanes));
  column_sum_kernel<T, acc_t><<<static_cast<unsigned>(blocks), lanes * kColumnLanes, 0, stream>>>(a_part, b_part, a,
                                                                                                   b, parts, N);
  return cudaGetLastError();
}

// Zeroes n values of T (an empty reduction's result: all-zero bits in every supported type).
template <typename T>
cudaError_t zero(T* p, int64_t n, cudaStream_t stream) {
  return p ? cudaMemsetAsync(p, 0, n * sizeof(T), stream) : cudaSuccess;
}

// Launches a row kernel for rows of N elements of T: `held(width)` (width a std::integral_constant pack width,
// kPackWidth<T> where N and every pointer allow it, else 1) where a row fits in registers, else `reread()`.
template <typename T, typename Held, typename Reread>
void launch_rows(int64_t N, std::initializer_list<const void*> pointers, Held&& held, Reread&& reread) {
  if (row_in_registers(N, sizeof(T))) {
    with_pack_width<T>(pack_width<T>(N, pointers), held);
  } else {
    reread();
  }
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
