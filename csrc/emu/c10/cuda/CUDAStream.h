// The emulator's stand-in for c10/cuda/CUDAStream.h: one stream, the null one (launches run in order).
#pragma once

#include <cuda_runtime.h>

namespace c10 {
namespace cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream() { return {}; }

}  // namespace cuda
}  // namespace c10
