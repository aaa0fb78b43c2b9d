// The part of the CUDA runtime the hetrain kernels use, for running them on the CPU in the emulator
// (emulator.h): qualifiers, dim3 and the built-in indices, errors, streams, memset. The real header
// is never mixed with this one: the emulator's build puts this directory first on the include path.
#pragma once

#include <cstddef>
#include <cstdint>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time, so a function-local static is exactly one block's shared memory.
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

using cudaStream_t = struct CUstream_st*;

namespace hetrain_emu {

// The running thread's indices and the launch's shape, set by the scheduler before it resumes a thread.
extern dim3 thread_index, block_index, block_dim, grid_dim;

void sync_block();
// Waits for every lane of the warp, then copies the value lane `source_lane` offered into `theirs`.
void sync_warp_then_exchange(unsigned mask, const void* mine, void* theirs, std::size_t bytes, unsigned source_lane);

// The launch error since the last call, cleared (cudaGetLastError).
cudaError_t take_error();

}  // namespace hetrain_emu

#define threadIdx (::hetrain_emu::thread_index)
#define blockIdx (::hetrain_emu::block_index)
#define blockDim (::hetrain_emu::block_dim)
#define gridDim (::hetrain_emu::grid_dim)

inline void __syncthreads() { ::hetrain_emu::sync_block(); }

// Every lane of the warp must take part (a full mask): the kernels here only use full-warp shuffles.
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  T out;
  ::hetrain_emu::sync_warp_then_exchange(mask, &v, &out, sizeof(T), (threadIdx.x & 31u) ^ static_cast<unsigned>(lane_mask));
  return out;
}

inline cudaError_t cudaGetLastError() { return ::hetrain_emu::take_error(); }

cudaError_t cudaMemsetAsync(void* p, int value, std::size_t bytes, cudaStream_t stream);

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

// The emulated device's attributes: two multiprocessors (so the bindings pick a few partial rows).
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);

// CUDA's global min/max overloads for device code.
#define HETRAIN_EMU_MIN_MAX(T)                  \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
HETRAIN_EMU_MIN_MAX(int)
HETRAIN_EMU_MIN_MAX(unsigned)
HETRAIN_EMU_MIN_MAX(long)
HETRAIN_EMU_MIN_MAX(unsigned long)
HETRAIN_EMU_MIN_MAX(long long)
HETRAIN_EMU_MIN_MAX(unsigned long long)
HETRAIN_EMU_MIN_MAX(float)
HETRAIN_EMU_MIN_MAX(double)
#undef HETRAIN_EMU_MIN_MAX
