// CUDA dropout: a grid-stride loop over the elements, each thread drawing its elements' bits from the
// counter hash of dropout_math.h (shared with the CPU kernel), computing in float (double for double).
// A dropped element is written as +0 whatever x holds (also infinite or NaN), as on the CPU.
#include "dropout_kernel.h"

#include <algorithm>
#include <climits>
#include <type_traits>

#include "../dropout_math.h"
#include "convert.cuh"

namespace hetrain {
namespace dropout {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 8;  // elements each thread strides over: its stream key is made once for them

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__global__ void __launch_bounds__(kThreads) dropout_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t numel,
                                                           Call m) {
  using acc_t = acc_type<T>;
  const uint32_t klo = key_lo(m.seed);
  const acc_t scale = acc_t(m.scale);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  // A thread's stream indices rise through the loop and their high word rarely changes: its key is kept
  // and remade only when it does (the per-element hash is this kernel's arithmetic bound).
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  uint32_t hi = static_cast<uint32_t>((m.offset + static_cast<uint64_t>(first)) >> 32);
  uint32_t khi = key_hi(m.seed, hi);
  for (int64_t i = first; i < numel; i += stride) {
    const uint64_t index = m.offset + static_cast<uint64_t>(i);
    if (static_cast<uint32_t>(index >> 32) != hi) {
      hi = static_cast<uint32_t>(index >> 32);
      khi = key_hi(m.seed, hi);
    }
    const bool keep = bits24(klo, khi, static_cast<uint32_t>(index)) >= m.threshold;
    cuda::store(y + i, keep ? acc_t(cuda::load(x + i)) * scale : acc_t(0));
  }
}

}  // namespace

template <typename T>
cudaError_t cuda_dropout(const T* x, T* y, int64_t numel, Call mask, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const int64_t per_block = int64_t(kThreads) * kPerThread;
  const int64_t blocks = std::min<int64_t>((numel + per_block - 1) / per_block, INT_MAX);
  dropout_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, y, numel, mask);
  return cudaGetLastError();
}

template cudaError_t cuda_dropout<float>(const float*, float*, int64_t, Call, cudaStream_t);
template cudaError_t cuda_dropout<double>(const double*, double*, int64_t, Call, cudaStream_t);
template cudaError_t cuda_dropout<__half>(const __half*, __half*, int64_t, Call, cudaStream_t);
template cudaError_t cuda_dropout<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, int64_t, Call, cudaStream_t);

}  // namespace dropout
}  // namespace hetrain
