// CUDA bias + GELU: a thread per column of a 256-column tile, walking a group of rows, so every row's
// loads coalesce and the bias is read once per thread. The formulas come from bias_gelu_math.h, shared
// with the CPU kernel. Backward keeps each thread's bias-gradient sum in a register and writes one
// partial row per row group, summed per column by a second kernel (no atomics; deterministic).
#include "bias_gelu_kernel.h"

#include "../bias_gelu_math.h"
#include "rows.cuh"

namespace hetrain {
namespace bias_gelu {
namespace {

using cuda::load;
using cuda::store;

template <typename acc_t, bool TANH>
__device__ __forceinline__ acc_t gelu(acc_t z) {
  return TANH ? gelu_tanh<acc_t>(z) : gelu_erf<acc_t>(z);
}

template <typename acc_t, bool TANH>
__device__ __forceinline__ acc_t gelu_grad(acc_t z) {
  return TANH ? gelu_tanh_grad<acc_t>(z) : gelu_erf_grad<acc_t>(z);
}

// Rows blockIdx.y, blockIdx.y + gridDim.y, ... of column blockIdx.x * kThreads + threadIdx.x.
template <typename T, bool TANH>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ y, int64_t M, int64_t N) {
  using acc_t = acc_type<T>;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= N) return;
  const acc_t bj = load(b + j);
  for (int64_t r = blockIdx.y; r < M; r += gridDim.y) {
    store(y + r * N + j, gelu<acc_t, TANH>(acc_t(load(x + r * N + j)) + bj));
  }
}

// Row group p = blockIdx.y covers rows p, p + parts, ...; its column sums of dx go to row p of b_part.
template <typename T, bool TANH>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ dx,
                    acc_type<T>* __restrict__ b_part, int64_t M, int64_t N) {
  using acc_t = acc_type<T>;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= N) return;
  const acc_t bj = load(b + j);
  acc_t sum = 0;
  for (int64_t r = blockIdx.y; r < M; r += gridDim.y) {
    const int64_t i = r * N + j;
    const acc_t g = acc_t(load(dy + i)) * gelu_grad<acc_t, TANH>(acc_t(load(x + i)) + bj);
    store(dx + i, g);
    sum += g;
  }
  b_part[static_cast<int64_t>(blockIdx.y) * N + j] = sum;
}

dim3 grid(int64_t N, int64_t rows) {
  return dim3(static_cast<unsigned>((N + kThreads - 1) / kThreads), static_cast<unsigned>(rows));
}

}  // namespace

template <typename T>
cudaError_t cuda_forward(const T* x, const T* b, T* y, bool tanh, int64_t M, int64_t N, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if ((N + kThreads - 1) / kThreads > INT_MAX) return cudaErrorInvalidValue;
  const dim3 blocks = grid(N, std::min<int64_t>(M, 65535));
  if (tanh) {
    forward_kernel<T, true><<<blocks, kThreads, 0, stream>>>(x, b, y, M, N);
  } else {
    forward_kernel<T, false><<<blocks, kThreads, 0, stream>>>(x, b, y, M, N);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t cuda_backward(const T* dy, const T* x, const T* b, T* dx, T* db, acc_type<T>* b_part, bool tanh,
                          int64_t parts, int64_t M, int64_t N, cudaStream_t stream) {
  if (parts < 1 || parts > std::max<int64_t>(M, 1) || parts > 65535 || !b_part ||
      (N + kThreads - 1) / kThreads > INT_MAX) {
    return cudaErrorInvalidValue;
  }
  if (N == 0) return cudaSuccess;
  if (M == 0) return cuda::zero(db, N, stream);  // no rows: the bias gradient is zero
  const dim3 blocks = grid(N, parts);
  if (tanh) {
    backward_kernel<T, true><<<blocks, kThreads, 0, stream>>>(dy, x, b, dx, b_part, M, N);
  } else {
    backward_kernel<T, false><<<blocks, kThreads, 0, stream>>>(dy, x, b, dx, b_part, M, N);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return cuda::column_sums<T, acc_type<T>>(b_part, nullptr, db, nullptr, parts, N, stream);
}

#define HETRAIN_BIAS_GELU_INSTANTIATE(T)                                                                    \
  template cudaError_t cuda_forward<T>(const T*, const T*, T*, bool, int64_t, int64_t, cudaStream_t);     \
  template cudaError_t cuda_backward<T>(const T*, const T*, const T*, T*, T*, acc_type<T>*, bool, int64_t, \
                                        int64_t, int64_t, cudaStream_t);

HETRAIN_BIAS_GELU_INSTANTIATE(float)
HETRAIN_BIAS_GELU_INSTANTIATE(double)
HETRAIN_BIAS_GELU_INSTANTIATE(__half)
HETRAIN_BIAS_GELU_INSTANTIATE(__nv_bfloat16)

#undef HETRAIN_BIAS_GELU_INSTANTIATE

}  // namespace bias_gelu
}  // namespace hetrain
