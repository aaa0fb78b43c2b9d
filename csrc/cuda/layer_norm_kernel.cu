// CUDA LayerNorm: one thread block per row (rows strided over the grid). The per-element formulas
// come from layer_norm_math.h, shared with the CPU kernel. Backward writes one partial dW/dB row per
// block and sums them in a second kernel: no contended atomics, and a deterministic result.
#include "layer_norm_kernel.h"

#include <climits>

#include "../layer_norm_math.h"
#include "convert.cuh"

namespace hetrain {
namespace layer_norm {
namespace {

constexpr int kMaxThreads = 1024;

using cuda::load;
using cuda::store;

// Threads per row: about four elements each, a whole number of warps, at most kMaxThreads.
int threads_for(int64_t N) {
  const int64_t warps = ((N + 3) / 4 + 31) / 32;
  return static_cast<int>(std::clamp<int64_t>(warps * 32, 32, kMaxThreads));
}

unsigned grid_for(int64_t rows) { return static_cast<unsigned>(std::min<int64_t>(rows, INT_MAX)); }

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

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b, T* __restrict__ y,
                   acc_type<T>* __restrict__ mean, acc_type<T>* __restrict__ rstd, int64_t M, int64_t N,
                   acc_type<T> eps) {
  using acc_t = acc_type<T>;
  __shared__ acc_t scratch[kMaxThreads / 32];
  for (int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const T* xr = x + r * N;
    T* yr = y + r * N;
    acc_t sum = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) sum += load(xr + j);
    const acc_t mu = block_sum(sum, scratch) / acc_t(N);
    acc_t sq = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const acc_t d = load(xr + j) - mu;
      sq += d * d;
    }
    const acc_t rs = layer_norm::rstd<acc_t>(block_sum(sq, scratch) / acc_t(N), eps);
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const acc_t wj = w ? acc_t(load(w + j)) : acc_t(1);
      const acc_t bj = b ? acc_t(load(b + j)) : acc_t(0);
      store(yr + j, layer_norm::forward<acc_t>(load(xr + j), mu, rs, wj, bj));
    }
    if (threadIdx.x == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
  }
}

// dx per row; block p adds dy * xhat and dy of its rows into row p of w_part / b_part.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                    const acc_type<T>* __restrict__ mean, const acc_type<T>* __restrict__ rstd, T* __restrict__ dx,
                    acc_type<T>* __restrict__ w_part, acc_type<T>* __restrict__ b_part, int64_t M, int64_t N) {
  using acc_t = acc_type<T>;
  __shared__ acc_t scratch[kMaxThreads / 32];
  acc_t* pw = w_part ? w_part + blockIdx.x * N : nullptr;
  acc_t* pb = b_part ? b_part + blockIdx.x * N : nullptr;
  for (int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const T* xr = x + r * N;
    const T* dyr = dy + r * N;
    T* dxr = dx + r * N;
    const acc_t mu = mean[r], rs = rstd[r];
    const bool first = r == blockIdx.x;  // the block's first row initialises its partial rows
    acc_t sum_g = 0, sum_gx = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const acc_t d = load(dyr + j);
      const acc_t g = w ? d * acc_t(load(w + j)) : d;
      sum_g += g;
      sum_gx += g * ((load(xr + j) - mu) * rs);
    }
    const acc_t mg = block_sum(sum_g, scratch) / acc_t(N);
    const acc_t mgx = block_sum(sum_gx, scratch) / acc_t(N);
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const acc_t d = load(dyr + j);
      const acc_t xhat = (load(xr + j) - mu) * rs;
      const acc_t g = w ? d * acc_t(load(w + j)) : d;
      store(dxr + j, layer_norm::input_grad<acc_t>(g, xhat, rs, mg, mgx));
      if (pw) pw[j] = first ? d * xhat : pw[j] + d * xhat;
      if (pb) pb[j] = first ? d : pb[j] + d;
    }
  }
}

// dw[j] = sum over p of w_part[p][j] (likewise db); one thread per column, coalesced across columns.
template <typename T>
__global__ void column_sum_kernel(const acc_type<T>* __restrict__ w_part, const acc_type<T>* __restrict__ b_part,
                                  T* __restrict__ dw, T* __restrict__ db, int64_t parts, int64_t N) {
  using acc_t = acc_type<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < N; j += stride) {
    acc_t sw = 0, sb = 0;
    for (int64_t p = 0; p < parts; ++p) {
      if (dw) sw += w_part[p * N + j];
      if (db) sb += b_part[p * N + j];
    }
    if (dw) store(dw + j, sw);
    if (db) store(db + j, sb);
  }
}

}  // namespace

template <typename T>
cudaError_t cuda_forward(const T* x, const T* w, const T* b, T* y, acc_type<T>* mean, acc_type<T>* rstd, int64_t M,
                         int64_t N, double eps, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  forward_kernel<T><<<grid_for(M), threads_for(N), 0, stream>>>(x, w, b, y, mean, rstd, M, N, acc_type<T>(eps));
  return cudaGetLastError();
}

template <typename T>
cudaError_t cuda_backward(const T* dy, const T* x, const T* w, const acc_type<T>* mean, const acc_type<T>* rstd,
                          T* dx, T* dw, T* db, acc_type<T>* w_part, acc_type<T>* b_part, int64_t parts, int64_t M,
                          int64_t N, cudaStream_t stream) {
  if (parts < 1 || parts > std::max<int64_t>(M, 1) || parts > INT_MAX || (dw && !w_part) || (db && !b_part)) {
    return cudaErrorInvalidValue;
  }
  if (N == 0) return cudaSuccess;
  if (M == 0) {  // no rows: the gradients of w and b are zero (all-zero bits in every supported type)
    if (dw) {
      const cudaError_t err = cudaMemsetAsync(dw, 0, N * sizeof(T), stream);
      if (err != cudaSuccess) return err;
    }
    return db ? cudaMemsetAsync(db, 0, N * sizeof(T), stream) : cudaSuccess;
  }
  backward_kernel<T><<<static_cast<unsigned>(parts), threads_for(N), 0, stream>>>(
      dy, x, w, mean, rstd, dx, dw ? w_part : nullptr, db ? b_part : nullptr, M, N);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || (!dw && !db)) return err;
  constexpr int threads = 256;
  column_sum_kernel<T><<<grid_for((N + threads - 1) / threads), threads, 0, stream>>>(w_part, b_part, dw, db, parts, N);
  return cudaGetLastError();
}

#define HETRAIN_LAYER_NORM_INSTANTIATE(T)                                                                          \
  template cudaError_t cuda_forward<T>(const T*, const T*, const T*, T*, acc_type<T>*, acc_type<T>*, int64_t,      \
                                       int64_t, double, cudaStream_t);                                           \
  template cudaError_t cuda_backward<T>(const T*, const T*, const T*, const acc_type<T>*, const acc_type<T>*, T*, \
                                        T*, T*, acc_type<T>*, acc_type<T>*, int64_t, int64_t, int64_t, cudaStream_t);

HETRAIN_LAYER_NORM_INSTANTIATE(float)
HETRAIN_LAYER_NORM_INSTANTIATE(double)
HETRAIN_LAYER_NORM_INSTANTIATE(__half)
HETRAIN_LAYER_NORM_INSTANTIATE(__nv_bfloat16)

#undef HETRAIN_LAYER_NORM_INSTANTIATE

}  // namespace layer_norm
}  // namespace hetrain
