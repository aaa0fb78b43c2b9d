// The part of the CUDA runtime the hetrain kernels use, for running them on the CPU in the emulator
// (emulator.h): qualifiers, dim3 and the built-in indices, errors, streams, memset. The real header
// is never mixed with this one: the emulator's build puts this directory first on the include path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <source_location>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// The emulator's build rewrites each kernel's `__launch_bounds__(n, ...)` into a check_launch_bounds(n, ...) call
// its body starts with; one it did not rewrite would not be checked.
#define __launch_bounds__(...) \
  _Pragma("GCC error \"__launch_bounds__ outside the kernel sources the emulator's build rewrites\"")
// The emulator's build rewrites each `__shared__ T a[n];` of the kernels into a function-local static (one block
// runs at a time, so it is exactly one block's shared memory) that it fills with 0xFF bytes for each block
// (declare_shared); one it did not rewrite would be neither.
#define __shared__ _Pragma("GCC error \"__shared__ outside the kernel sources the emulator's build rewrites\"")

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};

using cudaStream_t = struct CUstream_st*;

namespace hetrain_emu {

// The running thread's indices and the launch's shape, set by the scheduler before it resumes a thread.
extern dim3 thread_index, block_index, block_dim, grid_dim;

// `site`: the kernel's line that waits (the call of __syncthreads or of the shuffle); all the threads a barrier
// opens for must wait at the same one.
void sync_block(const std::source_location& site);
// Waits for every lane of the warp, then copies the value lane `source_lane` offered into `theirs`.
void sync_warp_then_exchange(unsigned mask, const void* mine, void* theirs, std::size_t bytes, unsigned source_lane,
                             const std::source_location& site);

// Called by each thread first thing in a kernel that declares `__launch_bounds__(max_threads, ...)` (the build
// adds the call): a block of more threads fails the launch, as a GPU refuses it.
void check_launch_bounds(unsigned max_threads, unsigned min_blocks = 0, unsigned max_blocks_per_cluster = 0);

// The launch error since the last call, cleared (cudaGetLastError).
cudaError_t take_error();
// Forgets the launch error and its message.
void clear_error();

// Called by each thread where a kernel declares a shared array (the build adds the call after each `__shared__`
// declaration): the first thread of a block to get there fills the array with 0xFF bytes, NaN in every
// floating-point type, so a read of a value the block has not written shows.
void declare_shared(void* data, std::size_t bytes);

}  // namespace hetrain_emu

#define threadIdx (::hetrain_emu::thread_index)
#define blockIdx (::hetrain_emu::block_index)
#define blockDim (::hetrain_emu::block_dim)
#define gridDim (::hetrain_emu::grid_dim)

// The default `site` argument is the caller's line: the barrier a thread waits at.
inline void __syncthreads(std::source_location site = std::source_location::current()) {
  ::hetrain_emu::sync_block(site);
}

// Every lane of the warp must take part (a full mask): the kernels here only use full-warp shuffles.
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, std::source_location site = std::source_location::current()) {
  T out;
  const unsigned source_lane = (threadIdx.x & 31u) ^ static_cast<unsigned>(lane_mask);
  ::hetrain_emu::sync_warp_then_exchange(mask, &v, &out, sizeof(T), source_lane, site);
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
