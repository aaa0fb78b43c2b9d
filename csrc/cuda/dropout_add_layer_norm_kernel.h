// layer_norm(dropout(x, p) + residual) over rows on a CUDA device, behind plain launch functions (raw
// pointers, sizes, a stream; no torch headers, so nvcc checks it without a CUDA torch). The dropout
// mask is never stored: element i of the flattened (rows, features) input is kept when the counter hash
// of dropout_math.h clears the threshold, the decision the CPU and Triton kernels make. Instantiated for
// float, double, __half and __nv_bfloat16; mean and rstd are float (double for double).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../dropout_math.h"

namespace hetrain {
namespace dropout_add_layer_norm {

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// y = layer_norm(x * m + residual) per row of N, m = scale or 0 (1 where p = 0); writes mean and
// rstd per row. w and b may be null.
template <typename T>
cudaError_t cuda_forward(const T* x, const T* residual, const T* w, const T* b, T* y, acc_type<T>* mean,
                         acc_type<T>* rstd, dropout::Call d, int64_t M, int64_t N, double eps, cudaStream_t stream);

// dres = the gradient of the pre-norm sum, dx = dres * m; dw and db (each may be null) summed over rows
// through the workspaces w_part / b_part of parts * N values. parts must lie in [1, max(M, 1)].
template <typename T>
cudaError_t cuda_backward(const T* dy, const T* x, const T* residual, const T* w, const acc_type<T>* mean,
                          const acc_type<T>* rstd, dropout::Call d, T* dx, T* dres, T* dw, T* db, acc_type<T>* w_part,
                          acc_type<T>* b_part, int64_t parts, int64_t M, int64_t N, cudaStream_t stream);

}  // namespace dropout_add_layer_norm
}  // namespace hetrain
