// CUDA dropout: a grid-stride loop over packs of the elements (16 bytes where the pointers allow, one
// element elsewhere), each thread drawing its elements' bits from the counter hash of dropout_math.h (shared
// with the CPU kernel), computing in float (double for double). A dropped element is written as +0 whatever
// x holds (also infinite or NaN), as on the CPU.
#include "dropout_kernel.h"

#include <algorithm>
#include <climits>
#include <type_traits>

#include "../dropout_math.h"
#include "rows.cuh"

namespace hetrain {
namespace dropout {
namespace {

using cuda::load_pack;
using cuda::narrow;
using cuda::Pack;
using cuda::store_pack;
using cuda::widen;

constexpr int kThreads = 256;
constexpr int kPerThread = 8;  // elements a thread takes per grid stride at least: its stream key is made once

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// A thread's view of the stream: its indices rise through its loop and their high word rarely changes, so
// the high word's key is kept and remade only when it does (the per-element hash is this kernel's
// arithmetic bound).
class Stream {
 public:
  __device__ Stream(const Call& m, uint64_t first)
      : seed_(m.seed), klo_(key_lo(m.seed)), hi_(static_cast<uint32_t>(first >> 32)), khi_(key_hi(m.seed, hi_)),
        threshold_(m.threshold) {}

  __device__ bool keeps(uint64_t index) {
    if (static_cast<uint32_t>(index >> 32) != hi_) {
      hi_ = static_cast<uint32_t>(index >> 32);
      khi_ = key_hi(seed_, hi_);
    }
    return bits24(klo_, khi_, static_cast<uint32_t>(index)) >= threshold_;
  }

 private:
  uint64_t seed_;
  uint32_t klo_, hi_, khi_, threshold_;
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) dropout_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t numel,
                                                           Call call) {
  const Call m = resolved(call);
  using acc_t = acc_type<T>;
  const acc_t scale = acc_t(m.scale);
  const int64_t packs = numel / VEC, stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  Stream stream(m, m.offset + static_cast<uint64_t>(first) * VEC);
  for (int64_t i = first; i < packs; i += stride) {
    const Pack<T, VEC> xv = load_pack<VEC>(x, i);
    Pack<T, VEC> out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const bool keep = stream.keeps(m.offset + static_cast<uint64_t>(i * VEC + e));
      out.v[e] = narrow<T>(keep ? acc_t(widen(xv.v[e])) * scale : acc_t(0));
    }
    store_pack<VEC>(y, i, out);
  }
  // The last numel % VEC elements, one a thread.
  const int64_t tail = packs * VEC + first;
  if (VEC > 1 && tail < numel) {
    const bool keep = stream.keeps(m.offset + static_cast<uint64_t>(tail));
    y[tail] = narrow<T>(keep ? acc_t(widen(x[tail])) * scale : acc_t(0));
  }
}

}  // namespace

template <typename T>
cudaError_t cuda_dropout(const T* x, T* y, int64_t numel, Call mask, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const int64_t per_block = int64_t(kThreads) * kPerThread;
  const int64_t blocks = std::min<int64_t>((numel + per_block - 1) / per_block, INT_MAX);
  // Only the pointers decide the pack width: a partial last pack is the tail above.
  cuda::with_pack_width<T>(cuda::pack_width<T>(0, {x, y}), [&](auto width) {
    constexpr int VEC = decltype(width)::value;
    dropout_kernel<T, VEC><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, y, numel, mask);
  });
  return cudaGetLastError();
}

template cudaError_t cuda_dropout<float>(const float*, float*, int64_t, Call, cudaStream_t);
template cudaError_t cuda_dropout<double>(const double*, double*, int64_t, Call, cudaStream_t);
template cudaError_t cuda_dropout<__half>(const __half*, __half*, int64_t, Call, cudaStream_t);
template cudaError_t cuda_dropout<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, int64_t, Call, cudaStream_t);

}  // namespace dropout
}  // namespace hetrain
