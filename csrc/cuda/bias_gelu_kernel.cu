// CUDA bias + GELU: a thread per column pack (16 bytes of a row where the width and pointers allow, one
// element elsewhere) of a kThreads-pack tile, walking a group of rows, so every row's loads coalesce and the
// bias is read once per thread. The formulas come from bias_gelu_math.h, shared with the CPU kernel.
// Backward keeps each thread's bias-gradient sums in registers and writes one partial row per row group,
// summed per column by a second kernel (no atomics; deterministic).
#include "bias_gelu_kernel.h"

#include "../bias_gelu_math.h"
#include "rows.cuh"

namespace hetrain {
namespace bias_gelu {
namespace {

using cuda::load_pack;
using cuda::narrow;
using cuda::Pack;
using cuda::store_pack;
using cuda::widen;

constexpr int64_t kRowsPerThread = 4;  // forward: rows a thread walks (fewer, larger blocks)

template <typename acc_t, bool TANH>
__device__ __forceinline__ acc_t gelu(acc_t z) {
  return TANH ? gelu_tanh<acc_t>(z) : gelu_erf<acc_t>(z);
}

template <typename acc_t, bool TANH>
__device__ __forceinline__ acc_t gelu_grad(acc_t z) {
  return TANH ? gelu_tanh_grad<acc_t>(z) : gelu_erf_grad<acc_t>(z);
}

// Rows blockIdx.y, blockIdx.y + gridDim.y, ... of column pack blockIdx.x * kThreads + threadIdx.x.
template <typename T, int VEC, bool TANH>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ y, int64_t M, int64_t N) {
  using acc_t = acc_type<T>;
  const int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x, packs = N / VEC;
  if (v >= packs) return;
  const Pack<T, VEC> bv = load_pack<VEC>(b, v);
  for (int64_t r = blockIdx.y; r < M; r += gridDim.y) {
    const Pack<T, VEC> xv = load_pack<VEC>(x + r * N, v);
    Pack<T, VEC> out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) out.v[e] = narrow<T>(gelu<acc_t, TANH>(acc_t(widen(xv.v[e])) + widen(bv.v[e])));
    store_pack<VEC>(y + r * N, v, out);
  }
}

// Row group p = blockIdx.y covers rows p, p + parts, ...; its column sums of dx go to row p of b_part.
template <typename T, int VEC, bool TANH>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ dx,
                    acc_type<T>* __restrict__ b_part, int64_t M, int64_t N) {
  using acc_t = acc_type<T>;
  const int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x, packs = N / VEC;
  if (v >= packs) return;
  const Pack<T, VEC> bv = load_pack<VEC>(b, v);
  acc_t sum[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) sum[e] = acc_t(0);
  for (int64_t r = blockIdx.y; r < M; r += gridDim.y) {
    const Pack<T, VEC> xv = load_pack<VEC>(x + r * N, v), dv = load_pack<VEC>(dy + r * N, v);
    Pack<T, VEC> out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const acc_t g = acc_t(widen(dv.v[e])) * gelu_grad<acc_t, TANH>(acc_t(widen(xv.v[e])) + widen(bv.v[e]));
      out.v[e] = narrow<T>(g);
      sum[e] += g;
    }
    store_pack<VEC>(dx + r * N, v, out);
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) b_part[static_cast<int64_t>(blockIdx.y) * N + v * VEC + e] = sum[e];
}

dim3 grid(int64_t N, int width, int64_t rows) {
  return dim3(static_cast<unsigned>((N / width + kThreads - 1) / kThreads), static_cast<unsigned>(rows));
}

}  // namespace

template <typename T>
cudaError_t cuda_forward(const T* x, const T* b, T* y, bool tanh, int64_t M, int64_t N, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if ((N + kThreads - 1) / kThreads > INT_MAX) return cudaErrorInvalidValue;
  const int64_t rows = std::min<int64_t>((M + kRowsPerThread - 1) / kRowsPerThread, 65535);
  cuda::with_pack_width<T>(cuda::pack_width<T>(N, {x, b, y}), [&](auto width) {
    constexpr int VEC = decltype(width)::value;
    const dim3 blocks = grid(N, VEC, rows);
    if (tanh) {
      forward_kernel<T, VEC, true><<<blocks, kThreads, 0, stream>>>(x, b, y, M, N);
    } else {
      forward_kernel<T, VEC, false><<<blocks, kThreads, 0, stream>>>(x, b, y, M, N);
    }
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t cuda_backward(const T* dy, const T* x, const T* b, T* dx, T* db, acc_type<T>* b_part, bool tanh,
                          int64_t parts, int64_t M, int64_t N, cudaStream_t stream) {
  // No features: empty tensors, whose data pointers torch leaves null, and nothing to compute.
  if (parts < 1 || parts > std::max<int64_t>(M, 1) || parts > 65535 || (N > 0 && !b_part) ||
      (N + kThreads - 1) / kThreads > INT_MAX) {
    return cudaErrorInvalidValue;
  }
  if (N == 0) return cudaSuccess;
  if (M == 0) return cuda::zero(db, N, stream);  // no rows: the bias gradient is zero
  cuda::with_pack_width<T>(cuda::pack_width<T>(N, {dy, x, b, dx}), [&](auto width) {
    constexpr int VEC = decltype(width)::value;
    const dim3 blocks = grid(N, VEC, parts);
    if (tanh) {
      backward_kernel<T, VEC, true><<<blocks, kThreads, 0, stream>>>(dy, x, b, dx, b_part, M, N);
    } else {
      backward_kernel<T, VEC, false><<<blocks, kThreads, 0, stream>>>(dy, x, b, dx, b_part, M, N);
    }
  });
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
