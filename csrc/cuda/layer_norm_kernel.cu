// CUDA LayerNorm: one thread block per row (rows strided over the grid), rows held in registers where they
// fit (norm_rows.cuh, shared with RMSNorm and dropout+add+LayerNorm) and re-read per pass where they do not
// (layer_norm_rows.cuh); per-element formulas from layer_norm_math.h, shared with the CPU kernel. Backward
// writes one partial dW/dB row per block and sums them in a second kernel: no contended atomics, and a
// deterministic result.
#include "layer_norm_kernel.h"

#include "layer_norm_rows.cuh"
#include "norm_rows.cuh"

namespace hetrain {
namespace layer_norm {
namespace {

using namespace cuda;  // rows.h: launch shapes; rows.cuh: launch_rows, row_backward; norm_rows.cuh: InputRows

template <typename T, int VEC>
__global__ void __launch_bounds__(kRegisterRowThreads, 1)
    forward_held_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b, T* __restrict__ y,
                        acc_type<T>* __restrict__ mean, acc_type<T>* __restrict__ rstd, int64_t M, int64_t N,
                        acc_type<T> eps) {
  norm_forward_held<true, VEC>(InputRows<T, acc_type<T>>{x, nullptr, N}, w, b, y, mean, rstd, M, N, eps);
}

template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads)
    forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b, T* __restrict__ y,
                   acc_type<T>* __restrict__ mean, acc_type<T>* __restrict__ rstd, int64_t M, int64_t N,
                   acc_type<T> eps) {
  layer_norm_forward_rows<T>(InputRows<T, acc_type<T>>{x, nullptr, N}, w, b, y, mean, rstd, M, N, eps);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kRegisterRowThreads, 1)
    backward_held_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                         const acc_type<T>* __restrict__ mean, const acc_type<T>* __restrict__ rstd,
                         T* __restrict__ dx, acc_type<T>* __restrict__ w_part, acc_type<T>* __restrict__ b_part,
                         int64_t M, int64_t N) {
  norm_backward_held<true, VEC>(InputRows<T, acc_type<T>>{x, dx, N}, dy, w, mean, rstd, w_part, b_part, M, N);
}

template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads)
    backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                    const acc_type<T>* __restrict__ mean, const acc_type<T>* __restrict__ rstd, T* __restrict__ dx,
                    acc_type<T>* __restrict__ w_part, acc_type<T>* __restrict__ b_part, int64_t M, int64_t N) {
  layer_norm_backward_rows<T>(InputRows<T, acc_type<T>>{x, dx, N}, dy, w, mean, rstd, w_part, b_part, M, N);
}

}  // namespace

template <typename T>
cudaError_t cuda_forward(const T* x, const T* w, const T* b, T* y, acc_type<T>* mean, acc_type<T>* rstd, int64_t M,
                         int64_t N, double eps, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  const unsigned blocks = grid_for(M), threads = row_threads(N, sizeof(T));
  launch_rows<T>(
      N, {x, w, b, y},
      [&](auto width) {
        constexpr int VEC = decltype(width)::value;
        forward_held_kernel<T, VEC><<<blocks, threads, 0, stream>>>(x, w, b, y, mean, rstd, M, N, acc_type<T>(eps));
      },
      [&] { forward_kernel<T><<<blocks, threads, 0, stream>>>(x, w, b, y, mean, rstd, M, N, acc_type<T>(eps)); });
  return cudaGetLastError();
}

template <typename T>
cudaError_t cuda_backward(const T* dy, const T* x, const T* w, const acc_type<T>* mean, const acc_type<T>* rstd,
                          T* dx, T* dw, T* db, acc_type<T>* w_part, acc_type<T>* b_part, int64_t parts, int64_t M,
                          int64_t N, cudaStream_t stream) {
  return row_backward(dw, db, w_part, b_part, parts, M, N, stream, [&](acc_type<T>* wp, acc_type<T>* bp) {
    const unsigned blocks = static_cast<unsigned>(parts), threads = row_threads(N, sizeof(T));
    launch_rows<T>(
        N, {dy, x, w, dx},
        [&](auto width) {
          constexpr int VEC = decltype(width)::value;
          backward_held_kernel<T, VEC><<<blocks, threads, 0, stream>>>(dy, x, w, mean, rstd, dx, wp, bp, M, N);
        },
        [&] { backward_kernel<T><<<blocks, threads, 0, stream>>>(dy, x, w, mean, rstd, dx, wp, bp, M, N); });
  });
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
