// CUDA RMSNorm: one thread block per row (rows strided over the grid), rows held in registers where they fit
// (norm_rows.cuh, shared with LayerNorm) and re-read per pass where they do not; the per-element formulas
// from rms_norm_math.h, shared with the CPU kernel. Backward writes one partial dW row per block, summed per
// column by a second kernel.
#include "rms_norm_kernel.h"

#include "../rms_norm_math.h"
#include "norm_rows.cuh"

namespace hetrain {
namespace rms_norm {
namespace {

using namespace cuda;  // rows.h: launch shapes; rows.cuh: block_sum, launch_rows; norm_rows.cuh; convert.cuh

constexpr int kMaxThreads = kMaxRowThreads;

template <typename T, int VEC>
__global__ void __launch_bounds__(kRegisterRowThreads, 1)
    forward_held_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                        acc_type<T>* __restrict__ rstd, int64_t M, int64_t N, acc_type<T> eps) {
  norm_forward_held<false, VEC>(InputRows<T, acc_type<T>>{x, nullptr, N}, w, static_cast<const T*>(nullptr), y,
                                static_cast<acc_type<T>*>(nullptr), rstd, M, N, eps);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kRegisterRowThreads, 1)
    backward_held_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                         const acc_type<T>* __restrict__ rstd, T* __restrict__ dx, acc_type<T>* __restrict__ w_part,
                         int64_t M, int64_t N) {
  norm_backward_held<false, VEC>(InputRows<T, acc_type<T>>{x, dx, N}, dy, w, static_cast<const acc_type<T>*>(nullptr),
                                 rstd, w_part, static_cast<acc_type<T>*>(nullptr), M, N);
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    forward_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                   acc_type<T>* __restrict__ rstd, int64_t M, int64_t N, acc_type<T> eps) {
  using acc_t = acc_type<T>;
  __shared__ acc_t scratch[kMaxThreads / 32];
  for (int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const T* xr = x + r * N;
    T* yr = y + r * N;
    acc_t sq = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const acc_t v = load(xr + j);
      sq += v * v;
    }
    const acc_t rs = rms_norm::rstd<acc_t>(block_sum(sq, scratch) / acc_t(N), eps);
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      store(yr + j, rms_norm::forward<acc_t>(load(xr + j), rs, w ? acc_t(load(w + j)) : acc_t(1)));
    }
    if (threadIdx.x == 0) rstd[r] = rs;
  }
}

// dx per row; block p adds dy * xhat of its rows into row p of w_part.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                    const acc_type<T>* __restrict__ rstd, T* __restrict__ dx, acc_type<T>* __restrict__ w_part,
                    int64_t M, int64_t N) {
  using acc_t = acc_type<T>;
  __shared__ acc_t scratch[kMaxThreads / 32];
  acc_t* pw = w_part ? w_part + blockIdx.x * N : nullptr;
  for (int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const T* xr = x + r * N;
    const T* dyr = dy + r * N;
    T* dxr = dx + r * N;
    const acc_t rs = rstd[r];
    const bool first = r == blockIdx.x;  // the block's first row initialises its partial row
    acc_t sum_gx = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const acc_t d = load(dyr + j);
      const acc_t g = w ? d * acc_t(load(w + j)) : d;
      sum_gx += g * acc_t(load(xr + j));
    }
    // sum(g * x) * rstd, the CPU kernel's order: where the row's mean square overflowed (rstd 0) an overflowing
    // sum gives NaN, as torch does, not a silent 0.
    const acc_t mgx = block_sum(sum_gx, scratch) * rs / acc_t(N);
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const acc_t d = load(dyr + j);
      const acc_t xhat = acc_t(load(xr + j)) * rs;
      const acc_t g = w ? d * acc_t(load(w + j)) : d;
      store(dxr + j, rms_norm::input_grad<acc_t>(g, xhat, rs, mgx));
      if (pw) pw[j] = first ? d * xhat : pw[j] + d * xhat;
    }
  }
}

}  // namespace

template <typename T>
cudaError_t cuda_forward(const T* x, const T* w, T* y, acc_type<T>* rstd, int64_t M, int64_t N, double eps,
                         cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  const unsigned blocks = grid_for(M), threads = row_threads(N, sizeof(T));
  launch_rows<T>(
      N, {x, w, y},
      [&](auto width) {
        constexpr int VEC = decltype(width)::value;
        forward_held_kernel<T, VEC><<<blocks, threads, 0, stream>>>(x, w, y, rstd, M, N, acc_type<T>(eps));
      },
      [&] { forward_kernel<T><<<blocks, threads, 0, stream>>>(x, w, y, rstd, M, N, acc_type<T>(eps)); });
  return cudaGetLastError();
}

template <typename T>
cudaError_t cuda_backward(const T* dy, const T* x, const T* w, const acc_type<T>* rstd, T* dx, T* dw,
                          acc_type<T>* w_part, int64_t parts, int64_t M, int64_t N, cudaStream_t stream) {
  return cuda::row_backward<T, acc_type<T>>(dw, nullptr, w_part, nullptr, parts, M, N, stream,
                                            [&](acc_type<T>* wp, acc_type<T>*) {
    const unsigned blocks = static_cast<unsigned>(parts), threads = row_threads(N, sizeof(T));
    launch_rows<T>(
        N, {dy, x, w, dx},
        [&](auto width) {
          constexpr int VEC = decltype(width)::value;
          backward_held_kernel<T, VEC><<<blocks, threads, 0, stream>>>(dy, x, w, rstd, dx, wp, M, N);
        },
        [&] { backward_kernel<T><<<blocks, threads, 0, stream>>>(dy, x, w, rstd, dx, wp, M, N); });
  });
}

#define HETRAIN_RMS_NORM_INSTANTIATE(T)                                                                         \
  template cudaError_t cuda_forward<T>(const T*, const T*, T*, acc_type<T>*, int64_t, int64_t, double,        \
                                       cudaStream_t);                                                       \
  template cudaError_t cuda_backward<T>(const T*, const T*, const T*, const acc_type<T>*, T*, T*, acc_type<T>*, \
                                        int64_t, int64_t, int64_t, cudaStream_t);

HETRAIN_RMS_NORM_INSTANTIATE(float)
HETRAIN_RMS_NORM_INSTANTIATE(double)
HETRAIN_RMS_NORM_INSTANTIATE(__half)
HETRAIN_RMS_NORM_INSTANTIATE(__nv_bfloat16)

#undef HETRAIN_RMS_NORM_INSTANTIATE

}  // namespace rms_norm
}  // namespace hetrain
