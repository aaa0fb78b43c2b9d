// BatchNorm2d -> ReLU -> MaxPool2d epilogue on a CUDA device, behind plain launch functions: raw
// pointers, sizes and a stream, no torch headers, so nvcc checks this kernel on a machine without a CUDA
// torch. Instantiated for float, double, __half and __nv_bfloat16; per-channel values (mean, invstd,
// weight, bias, running statistics, weight/bias gradients) are acc_type<T>: float, double for double.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace hetrain {
namespace bn_relu_pool {

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// The convolution output (N, C, H, W) in NCHW or channels_last (NHWC) memory, and the pooling window.
// OH and OW must be the pooled sizes: (H + 2 * ph - kh) / sh + 1 and likewise for W. The launch functions
// return cudaErrorInvalidValue for tensors of 2^31 elements or more, a window of more than 256 positions,
// a stride of 2^30 or more (one past the padded input pools the same single window: clamp it to H + 2 * ph)
// and reductions of more than kMaxChannelTiles channel tiles.
struct Geometry {
  int64_t N, C, H, W, OH, OW;
  int kh, kw, sh, sw, ph, pw;
  bool channels_last;
};

// Channel tiles of the per-channel reductions at most (all of a block's threads share a tile's channels): in
// channels_last 32 channels or more a tile (32 lanes of channel packs), in NCHW one channel.
inline int64_t channel_tiles(const Geometry& g) { return g.channels_last ? (g.C + 31) / 32 : g.C; }

// The reductions' channel tiles run along the grid's y, which CUDA bounds: 65535 NCHW channels, about 2M in
// channels_last.
inline constexpr int64_t kMaxChannelTiles = 65535;

// Position blocks the per-channel reductions run: each writes one partial row of C sums. About eight blocks
// per SM in all (a block's threads each walk their positions one load after another, so the GPU must be full
// to keep enough loads in flight), and at least 256 positions per block.
inline int64_t reduce_parts(const Geometry& g, int64_t positions, int sm_count) {
  const int64_t tiles = std::max<int64_t>(1, channel_tiles(g));
  const int64_t by_sms = std::max<int64_t>(1, 8 * static_cast<int64_t>(sm_count) / tiles);
  return std::clamp<int64_t>((positions + 255) / 256, 1, std::min<int64_t>(by_sms, 65535));
}

// Workspace (acc_type<T> values) each launch function needs for `parts` partial rows.
inline int64_t stats_workspace(const Geometry& g, int64_t parts) { return 2 * parts * g.C; }
inline int64_t backward_workspace(const Geometry& g, int64_t parts) { return 2 * parts * g.C + 3 * g.C; }

// Batch mean and invstd = 1 / sqrt(biased var + eps) per channel; when running_mean / running_var are
// non-null they are updated in place with momentum (running var with the unbiased variance, as torch).
// Needs N * H * W != 1; with no element, mean = 0, invstd = 1 / sqrt(eps) and no update.
// parts: reduce_parts(g, N * H * W, sms); workspace: stats_workspace(g, parts) values.
template <typename T>
cudaError_t cuda_stats(const T* x, acc_type<T>* mean, acc_type<T>* invstd, acc_type<T>* running_mean,
                       acc_type<T>* running_var, double momentum, double eps, acc_type<T>* workspace, int64_t parts,
                       const Geometry& g, cudaStream_t stream);

// y = maxpool(relu((x - mean) * invstd * w + b)) and the in-window argmax (row-major index in the
// kh x kw window) of each pooled value, both in x's layout. mean/invstd null: no normalisation (then w
// and b must be null too); w null: 1; b null: 0.
template <typename T>
cudaError_t cuda_forward(const T* x, const acc_type<T>* mean, const acc_type<T>* invstd, const acc_type<T>* w,
                         const acc_type<T>* b, T* y, uint8_t* argmax, const Geometry& g, cudaStream_t stream);

// dx (x's layout) from dy (the pooled gradient, y's layout) and argmax; dw = sum(dz * xhat) and
// db = sum(dz) when non-null. batch_stats: mean/invstd were the batch's (training), so dx has the
// statistics' terms. parts: reduce_parts(g, N * OH * OW, sms); workspace: backward_workspace(g, parts).
template <typename T>
cudaError_t cuda_backward(const T* dy, const uint8_t* argmax, const T* x, const acc_type<T>* mean,
                          const acc_type<T>* invstd, const acc_type<T>* w, const acc_type<T>* b, bool batch_stats,
                          T* dx, acc_type<T>* dw, acc_type<T>* db, acc_type<T>* workspace, int64_t parts,
                          const Geometry& g, cudaStream_t stream);

}  // namespace bn_relu_pool
}  // namespace hetrain
