// CUDA LayerNorm: one thread block per row (rows strided over the grid). The per-element formulas
// come from layer_norm_math.h, shared with the CPU kernel. Backward writes one partial dW/dB row per
// block and sums them in a second kernel: no contended atomics, and a deterministic result.
#include "layer_norm_kernel.h"

#include "../layer_norm_math.h"
#include "rows.cuh"

namespace hetrain {
namespace layer_norm {
namespace {

constexpr int kMaxThreads = cuda::kMaxRowThreads;

using cuda::block_sum;
using cuda::grid_for;
using cuda::load;
using cuda::store;
using cuda::threads_for;

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
  if (M == 0) {  // no rows: the gradients of w and b are zero
    const cudaError_t err = cuda::zero(dw, N, stream);
    return err != cudaSuccess ? err : cuda::zero(db, N, stream);
  }
  backward_kernel<T><<<static_cast<unsigned>(parts), threads_for(N), 0, stream>>>(
      dy, x, w, mean, rstd, dx, dw ? w_part : nullptr, db ? b_part : nullptr, M, N);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || (!dw && !db)) return err;
  return cuda::column_sums(w_part, b_part, dw, db, parts, N, stream);
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
