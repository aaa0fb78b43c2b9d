// Loads and stores between a tensor's element type and the accumulator type. torch builds .cu files
// with the implicit half/bfloat16 conversions disabled, so every kernel converts explicitly, here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace hetrain {
namespace cuda {

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// A value (a register, not memory) in the accumulator type, and back (rounded to nearest even).
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename acc_t>
__device__ __forceinline__ T narrow(acc_t v) {
  T t;
  store(&t, v);
  return t;
}

}  // namespace cuda
}  // namespace hetrain
