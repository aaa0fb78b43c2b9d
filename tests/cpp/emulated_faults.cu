// Kernels with the faults the CUDA emulator (csrc/emu) must report, and a race its thread shuffling must
// expose, for tests/test_cuda_emulator.py. Each entry point returns the cudaError_t of its launch.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

// Threads past `live` return before the barrier the others wait at.
__global__ void early_return_kernel(float* out, unsigned live) {
  if (threadIdx.x >= live) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Even lanes wait at __syncthreads, odd lanes at a shuffle: a deadlock on a GPU.
__global__ void divergent_kernel(float* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  }
}

__global__ void shuffle_kernel(float* out) { out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 3); }

// Thread 0 publishes its block's number, which every thread reads. Without the barrier a reader may run
// before thread 0 and read the shared value unwritten: right in index order, wrong in others.
template <bool kSynced>
__global__ void publish_kernel(float* out) {
  __shared__ float value;
  if (threadIdx.x == 0) value = 1.0f + blockIdx.x;
  if (kSynced) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = value;
}

__global__ void index_kernel(int* out) {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  out[b * blockDim.x * blockDim.y * blockDim.z + t] = static_cast<int>(b * 10000 + t);
}

// base + threadIdx.x in int: a signed overflow (undefined behaviour) for base near INT_MAX.
__global__ void overflow_kernel(int* out, int base) { out[threadIdx.x] = base + static_cast<int>(threadIdx.x); }

// Block b writes the first blockDim.x >> b values of a shared array, and every thread reads its own: the
// values a block did not write must read as unwritten (NaN), not as an earlier block's or launch's.
__global__ void unwritten_shared_kernel(float* out) {
  __shared__ float values[64];
  if (threadIdx.x < (blockDim.x >> blockIdx.x)) values[threadIdx.x] = 1.0f + threadIdx.x;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = values[threadIdx.x];
}

// Each block adds its value to out[0] without an atomic: the sum depends on the order of the blocks.
__global__ void block_sum_kernel(const float* x, float* out) { out[0] += x[blockIdx.x]; }

// Even and odd threads wait at two different __syncthreads calls: one barrier each, on a GPU undefined.
__global__ void two_barriers_kernel(float* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
    out[threadIdx.x] = 1.0f;
  } else {
    __syncthreads();
    out[threadIdx.x] = 2.0f;
  }
}

// One __syncthreads call on every pass of a loop: one barrier.
__global__ void looped_barrier_kernel(float* out, int passes) {
  for (int k = 0; k < passes; ++k) {
    out[threadIdx.x] += 1.0f;
    __syncthreads();
  }
}

// The two half-warps shuffle at different calls.
__global__ void two_shuffles_kernel(float* out) {
  float v;
  if (threadIdx.x % 32 < 16)
    v = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 16);
  else
    v = __shfl_xor_sync(0xffffffffu, float(threadIdx.x) + 1000.0f, 16);
  out[threadIdx.x] = v;
}

// Declared for blocks of at most 128 threads.
__global__ void __launch_bounds__(128) bounded_kernel(float* out) { out[threadIdx.x] = 1.0f; }

}  // namespace

extern "C" {

int hetrain_emu_test_overflow(int* out, int64_t base) {
  overflow_kernel<<<1, 32>>>(out, static_cast<int>(base));
  return cudaGetLastError();
}

// The same overflow in host code, outside any kernel.
int hetrain_emu_test_host_overflow(int* out, int64_t base) {
  *out = static_cast<int>(base) + 10;
  return cudaSuccess;
}

// An entry point that refuses its arguments without launching anything.
int hetrain_emu_test_refused() { return cudaErrorInvalidValue; }

int hetrain_emu_test_unwritten_shared(float* out, int64_t blocks, int64_t threads) {
  unwritten_shared_kernel<<<static_cast<unsigned>(blocks), static_cast<unsigned>(threads)>>>(out);
  return cudaGetLastError();
}

int hetrain_emu_test_block_sum(const float* x, float* out, int64_t blocks) {
  block_sum_kernel<<<static_cast<unsigned>(blocks), 1>>>(x, out);
  return cudaGetLastError();
}

int hetrain_emu_test_early_return(float* out, int64_t threads, int64_t live) {
  early_return_kernel<<<1, static_cast<unsigned>(threads)>>>(out, static_cast<unsigned>(live));
  return cudaGetLastError();
}

int hetrain_emu_test_divergent(float* out, int64_t threads) {
  divergent_kernel<<<1, static_cast<unsigned>(threads)>>>(out);
  return cudaGetLastError();
}

int hetrain_emu_test_shuffle(float* out, int64_t threads) {
  shuffle_kernel<<<1, static_cast<unsigned>(threads)>>>(out);
  return cudaGetLastError();
}

int hetrain_emu_test_publish(float* out, int64_t blocks, int64_t threads, int64_t synced) {
  if (synced) {
    publish_kernel<true><<<static_cast<unsigned>(blocks), static_cast<unsigned>(threads)>>>(out);
  } else {
    publish_kernel<false><<<static_cast<unsigned>(blocks), static_cast<unsigned>(threads)>>>(out);
  }
  return cudaGetLastError();
}

int hetrain_emu_test_index(int* out, int64_t gx, int64_t gy, int64_t gz, int64_t bx, int64_t by, int64_t bz) {
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(gz));
  const dim3 block(static_cast<unsigned>(bx), static_cast<unsigned>(by), static_cast<unsigned>(bz));
  index_kernel<<<grid, block, 0, nullptr>>>(out);
  return cudaGetLastError();
}

int hetrain_emu_test_two_barriers(float* out) {
  two_barriers_kernel<<<1, 64>>>(out);
  return cudaGetLastError();
}
int hetrain_emu_test_looped_barrier(float* out, int passes) {
  looped_barrier_kernel<<<1, 64>>>(out, passes);
  return cudaGetLastError();
}
int hetrain_emu_test_two_shuffles(float* out) {
  two_shuffles_kernel<<<1, 32>>>(out);
  return cudaGetLastError();
}
int hetrain_emu_test_bounded(float* out, int64_t threads) {
  bounded_kernel<<<1, static_cast<unsigned>(threads)>>>(out);
  return cudaGetLastError();
}
}
