// Dropout on a CUDA device for a contiguous tensor of any shape, behind a plain launch function (raw
// pointers, sizes, a stream; no torch headers, so nvcc checks it without a CUDA torch): y = x * scale
// where kept, 0 where dropped. Element i is kept when the counter hash of (seed, offset + i) in
// dropout_math.h clears the threshold, the decision of the CPU and Triton kernels; backward is the same
// map applied to the upstream gradient. Instantiated for float, double, __half and __nv_bfloat16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../dropout_math.h"

namespace hetrain {
namespace dropout {

template <typename T>
cudaError_t cuda_dropout(const T* x, T* y, int64_t numel, Call mask, cudaStream_t stream);

}  // namespace dropout
}  // namespace hetrain
