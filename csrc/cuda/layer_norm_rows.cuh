// LayerNorm over rows that a kernel computes as it reads them, shared by the LayerNorm kernels (the row is x)
// and the dropout+add+LayerNorm ones (the row is x * mask + residual). One thread block per row, rows
// strided over the grid; per-element formulas from layer_norm_math.h, shared with the CPU kernels.
//
// A Rows type gives, for row r, `rows.row(r)`: an object whose `first(j, k)` is the row's element j in a
// kernel's first pass over it and `again(j, k)` the same element in later passes (k: the thread's step along
// the row, j = threadIdx.x + k * blockDim.x), and whose `store_grad(j, k, ds)` takes the gradient of
// element j in backward.
#pragma once

#include <cstdint>

#include "../layer_norm_math.h"
#include "rows.cuh"

namespace hetrain {
namespace cuda {

// y = (row - mean) * rstd * w + b for rows [0, M) of N; writes mean and rstd per row. w and b may be null.
template <typename T, typename acc_t, typename Rows>
__device__ __forceinline__ void layer_norm_forward_rows(const Rows& rows, const T* __restrict__ w,
                                                        const T* __restrict__ b, T* __restrict__ y,
                                                        acc_t* __restrict__ mean, acc_t* __restrict__ rstd, int64_t M,
                                                        int64_t N, acc_t eps) {
  __shared__ acc_t scratch[kMaxRowThreads / 32];
  for (int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    auto row = rows.row(r);
    acc_t sum = 0;
    int k = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x, ++k) sum += row.first(j, k);
    const acc_t mu = block_sum(sum, scratch) / acc_t(N);
    acc_t sq = 0;
    k = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x, ++k) {
      const acc_t c = row.again(j, k) - mu;
      sq += c * c;
    }
    const acc_t rs = layer_norm::rstd<acc_t>(block_sum(sq, scratch) / acc_t(N), eps);
    T* yr = y + r * N;
    k = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x, ++k) {
      const acc_t wj = w ? acc_t(load(w + j)) : acc_t(1);
      const acc_t bj = b ? acc_t(load(b + j)) : acc_t(0);
      store(yr + j, layer_norm::forward<acc_t>(row.again(j, k), mu, rs, wj, bj));
    }
    if (threadIdx.x == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
  }
}

// The gradient of each row element (to row.store_grad); block p adds dy * xhat and dy of its rows into row p
// of w_part / b_part (either may be null: that gradient is not wanted).
template <typename T, typename acc_t, typename Rows>
__device__ __forceinline__ void layer_norm_backward_rows(const Rows& rows, const T* __restrict__ dy,
                                                         const T* __restrict__ w, const acc_t* __restrict__ mean,
                                                         const acc_t* __restrict__ rstd, acc_t* __restrict__ w_part,
                                                         acc_t* __restrict__ b_part, int64_t M, int64_t N) {
  __shared__ acc_t scratch[kMaxRowThreads / 32];
  acc_t* pw = w_part ? w_part + blockIdx.x * N : nullptr;
  acc_t* pb = b_part ? b_part + blockIdx.x * N : nullptr;
  for (int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    auto row = rows.row(r);
    const T* dyr = dy + r * N;
    const acc_t mu = mean[r], rs = rstd[r];
    const bool first = r == blockIdx.x;  // the block's first row initialises its partial rows
    acc_t sum_g = 0, sum_gx = 0;
    int k = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x, ++k) {
      const acc_t xhat = (row.first(j, k) - mu) * rs;
      const acc_t d = load(dyr + j);
      const acc_t g = w ? d * acc_t(load(w + j)) : d;
      sum_g += g;
      sum_gx += g * xhat;
    }
    const acc_t mg = block_sum(sum_g, scratch) / acc_t(N);
    const acc_t mgx = block_sum(sum_gx, scratch) / acc_t(N);
    k = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x, ++k) {
      const acc_t xhat = (row.again(j, k) - mu) * rs;
      const acc_t d = load(dyr + j);
      const acc_t g = w ? d * acc_t(load(w + j)) : d;
      row.store_grad(j, k, layer_norm::input_grad<acc_t>(g, xhat, rs, mg, mgx));
      if (pw) pw[j] = first ? d * xhat : pw[j] + d * xhat;
      if (pb) pb[j] = first ? d : pb[j] + d;
    }
  }
}

}  // namespace cuda
}  // namespace hetrain
