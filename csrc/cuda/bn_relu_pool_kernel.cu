// CUDA BatchNorm2d -> ReLU -> MaxPool2d epilogue. The per-element formulas come from
// bn_relu_pool_math.h, shared with the CPU kernel.
//
// Per-channel reductions (batch statistics; the backward sums over dz and dz * xhat) run on a grid of
// position blocks x channel tiles: each block reduces in shared memory and writes one partial row, and a
// second kernel sums the rows per channel in double. No contended atomics, and a deterministic result.
// In channels_last a block's 256 threads are 32 channel lanes x 8 position rows (reads coalesce across
// channels); in NCHW a block serves one channel and its threads walk the positions.
// Forward is one thread per pooled output; the input gradient one thread per input element, which
// gathers its dz from the (at most ceil(k/s)^2) windows that hold it, so nothing is scattered.
#include "bn_relu_pool_kernel.h"

#include <climits>
#include <cmath>

#include "../bn_relu_pool_math.h"
#include "convert.cuh"

namespace hetrain {
namespace bn_relu_pool {
namespace {

constexpr int kThreads = 256;
constexpr int kLanes = 32;                  // channels per block in channels_last reductions
constexpr int kRows = kThreads / kLanes;    // positions per block step in channels_last reductions
// Four resident blocks per SM: a 64-register budget. With the thread count alone, ptxas (CUDA 13) aims
// at full occupancy, caps these kernels at 32 registers and spills.
constexpr int kMinBlocks = 4;

using cuda::load;
using cuda::store;

// The value as T stores it: ties and the ReLU mask are decided on what torch would see.
template <typename T>
__device__ __forceinline__ acc_type<T> rounded(acc_type<T> v) {
  T t;
  store(&t, v);
  return load(&t);
}

// Sizes as 32-bit ints, so that no kernel divides in 64 bits (a 64-bit division is a called routine,
// and the call spills). The launchers refuse tensors of 2^31 elements or more.
struct Dims {
  int N, C, H, W, OH, OW, kh, kw, sh, sw, ph, pw;
  bool channels_last;
};

bool fits_int(const Geometry& g) {
  const int64_t big = std::max(g.N * g.C * g.H * g.W, g.N * g.C * g.OH * g.OW);
  return big < INT_MAX && g.kh < 256 && g.kw < 256 && g.sh < INT_MAX / 2 && g.sw < INT_MAX / 2;
}

Dims dims(const Geometry& g) {
  return Dims{static_cast<int>(g.N), static_cast<int>(g.C), static_cast<int>(g.H), static_cast<int>(g.W),
              static_cast<int>(g.OH), static_cast<int>(g.OW), g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.channels_last};
}

// Offset of element (n, c, h, w) of a (N, C, rows, cols) tensor in the layout of d.
__device__ __forceinline__ int64_t offset(const Dims& d, int n, int c, int h, int w, int rows, int cols) {
  return d.channels_last ? ((int64_t(n) * rows + h) * cols + w) * d.C + c
                         : ((int64_t(n) * d.C + c) * rows + h) * int64_t(cols) + w;
}

// (n, c, h, w) of the i-th element in memory of a (N, C, rows, cols) tensor in the layout of d.
struct Index {
  int n, c, h, w;
};
__device__ __forceinline__ Index unravel(const Dims& d, unsigned i, unsigned rows, unsigned cols) {
  Index r;
  const unsigned C = d.C;
  if (d.channels_last) {
    r.c = i % C;
    i /= C;
    r.w = i % cols;
    i /= cols;
    r.h = i % rows;
    r.n = i / rows;
  } else {
    r.w = i % cols;
    i /= cols;
    r.h = i % rows;
    i /= rows;
    r.c = i % C;
    r.n = i / C;
  }
  return r;
}

// A thread's channel and its walk over positions in the per-channel reductions.
struct Lane {
  int c, first, step;
  bool active;
};
__device__ __forceinline__ Lane lane(const Dims& d) {
  Lane l;
  if (d.channels_last) {
    l.c = blockIdx.y * kLanes + threadIdx.x % kLanes;
    l.first = blockIdx.x * kRows + threadIdx.x / kLanes;
    l.step = gridDim.x * kRows;
    l.active = l.c < d.C;
  } else {
    l.c = blockIdx.y;
    l.first = blockIdx.x * kThreads + threadIdx.x;
    l.step = gridDim.x * kThreads;
    l.active = true;
  }
  return l;
}

// Sums a and b over the threads that share a channel and writes them to row blockIdx.x of part_a /
// part_b (each gridDim.x rows of C values).
template <typename acc_t>
__device__ __forceinline__ void write_partials(const Dims& d, acc_t a, acc_t b, acc_t* __restrict__ part_a,
                                               acc_t* __restrict__ part_b) {
  __shared__ acc_t sa[kThreads];
  __shared__ acc_t sb[kThreads];
  if (d.channels_last) {
    sa[threadIdx.x] = a;
    sb[threadIdx.x] = b;
    __syncthreads();
    if (threadIdx.x < kLanes) {
      acc_t ta = 0, tb = 0;
      for (int r = 0; r < kRows; ++r) {
        ta += sa[r * kLanes + threadIdx.x];
        tb += sb[r * kLanes + threadIdx.x];
      }
      const int c = blockIdx.y * kLanes + threadIdx.x;
      if (c < d.C) {
        part_a[int64_t(blockIdx.x) * d.C + c] = ta;
        part_b[int64_t(blockIdx.x) * d.C + c] = tb;
      }
    }
    return;
  }
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  if (threadIdx.x % 32 == 0) {
    sa[threadIdx.x / 32] = a;
    sb[threadIdx.x / 32] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t ta = 0, tb = 0;
    for (int wp = 0; wp < kThreads / 32; ++wp) {
      ta += sa[wp];
      tb += sb[wp];
    }
    part_a[int64_t(blockIdx.x) * d.C + blockIdx.y] = ta;
    part_b[int64_t(blockIdx.x) * d.C + blockIdx.y] = tb;
  }
}

// Per-channel normalisation as one fma: scale = invstd * w, shift = b - mean * scale (identity without
// mean/invstd).
template <typename acc_t>
struct Affine {
  acc_t mean, invstd, scale, shift;
};
template <typename acc_t>
__device__ __forceinline__ Affine<acc_t> affine(const acc_t* mean, const acc_t* invstd, const acc_t* w, const acc_t* b,
                                                int c) {
  Affine<acc_t> a;
  a.mean = mean ? mean[c] : acc_t(0);
  a.invstd = invstd ? invstd[c] : acc_t(1);
  a.scale = channel_scale(a.invstd, w ? w[c] : acc_t(1));
  a.shift = channel_shift(a.mean, a.scale, b ? b[c] : acc_t(0));
  return a;
}

// Partial sum(x - pivot) and sum((x - pivot)^2) per channel; pivot = x[0, c, 0, 0].
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    stats_partial_kernel(const T* __restrict__ x, Dims d, acc_type<T>* __restrict__ part) {
  using acc_t = acc_type<T>;
  const Lane l = lane(d);
  const unsigned HW = unsigned(d.H) * unsigned(d.W), P = unsigned(d.N) * HW;
  acc_t s = 0, q = 0;
  if (l.active) {
    const acc_t pivot = load(x + offset(d, 0, l.c, 0, 0, d.H, d.W));
    for (unsigned p = l.first; p < P; p += l.step) {
      const unsigned n = p / HW, hw = p - n * HW;
      const int64_t off = d.channels_last ? int64_t(p) * d.C + l.c : (int64_t(n) * d.C + l.c) * HW + hw;
      const acc_t v = load(x + off) - pivot;
      s += v;
      q += v * v;
    }
  }
  write_partials(d, s, q, part, part + int64_t(gridDim.x) * d.C);
}

// One thread per channel: the partial rows summed in double, then mean, invstd and the running update.
template <typename T>
__global__ void stats_finalize_kernel(const T* __restrict__ x, const acc_type<T>* __restrict__ part, int parts, Dims d,
                                      acc_type<T>* __restrict__ mean, acc_type<T>* __restrict__ invstd,
                                      acc_type<T>* __restrict__ running_mean, acc_type<T>* __restrict__ running_var,
                                      double momentum, double eps) {
  using acc_t = acc_type<T>;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d.C) return;
  const int64_t count = int64_t(d.N) * d.H * d.W;
  if (count == 0) {  // empty batch: nothing to normalise, running statistics left alone (as torch)
    mean[c] = acc_t(0);
    invstd[c] = acc_t(bn_relu_pool::invstd<double>(0.0, eps));
    return;
  }
  double s = 0, q = 0;
  for (int p = 0; p < parts; ++p) {
    s += part[int64_t(p) * d.C + c];
    q += part[int64_t(parts + p) * d.C + c];
  }
  double mu = 0, var = 0;
  moments<double>(s, q, double(load(x + offset(d, 0, c, 0, 0, d.H, d.W))), count, &mu, &var);
  mean[c] = acc_t(mu);
  invstd[c] = acc_t(bn_relu_pool::invstd<double>(var, eps));
  if (running_mean != nullptr) {
    running_mean[c] = acc_t(running_update<double>(double(running_mean[c]), mu, momentum));
    const double unbiased = var * double(count) / double(count - 1);
    running_var[c] = acc_t(running_update<double>(double(running_var[c]), unbiased, momentum));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    forward_kernel(const T* __restrict__ x, const acc_type<T>* __restrict__ mean,
                   const acc_type<T>* __restrict__ invstd, const acc_type<T>* __restrict__ w,
                   const acc_type<T>* __restrict__ b, T* __restrict__ y, uint8_t* __restrict__ argmax, Dims d,
                   unsigned total) {
  using acc_t = acc_type<T>;
  const unsigned stride = gridDim.x * blockDim.x;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const Index o = unravel(d, i, d.OH, d.OW);
    const Affine<acc_t> a = affine(mean, invstd, w, b, o.c);
    const int hs = window_start(o.h, d.sh, d.ph), ws = window_start(o.w, d.sw, d.pw);
    const int h0 = max(hs, 0), h1 = min(hs + d.kh, d.H);
    const int w0 = max(ws, 0), w1 = min(ws + d.kw, d.W);
    acc_t best = acc_t(-INFINITY);
    int idx = (h0 - hs) * d.kw + (w0 - ws);
    for (int h = h0; h < h1; ++h) {
      for (int w = w0; w < w1; ++w) {
        const acc_t z = rounded<T>(pre_relu(load(x + offset(d, o.n, o.c, h, w, d.H, d.W)), a.scale, a.shift));
        if (takes_max(z, best)) {
          best = z;
          idx = (h - hs) * d.kw + (w - ws);
        }
      }
    }
    store(y + i, relu(best));
    argmax[i] = static_cast<uint8_t>(idx);
  }
}

// Partial sum(dz) and sum(dz * xhat) per channel over the pooled outputs, dz = dy at each window's
// argmax where the ReLU let it through.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    grad_partial_kernel(const T* __restrict__ dy, const uint8_t* __restrict__ argmax, const T* __restrict__ x,
                        const acc_type<T>* __restrict__ mean, const acc_type<T>* __restrict__ invstd,
                        const acc_type<T>* __restrict__ w, const acc_type<T>* __restrict__ b, Dims d,
                        acc_type<T>* __restrict__ part) {
  using acc_t = acc_type<T>;
  const Lane l = lane(d);
  const unsigned OHW = unsigned(d.OH) * unsigned(d.OW), P = unsigned(d.N) * OHW;
  acc_t s = 0, sx = 0;
  if (l.active) {
    const Affine<acc_t> a = affine(mean, invstd, w, b, l.c);
    for (unsigned p = l.first; p < P; p += l.step) {
      const unsigned n = p / OHW, ohw = p - n * OHW;
      const unsigned oh = ohw / unsigned(d.OW), ow = ohw - oh * unsigned(d.OW);
      const int64_t o = d.channels_last ? int64_t(p) * d.C + l.c : (int64_t(n) * d.C + l.c) * OHW + ohw;
      const int k = argmax[o];
      const int h = window_start(int(oh), d.sh, d.ph) + k / d.kw;
      const int wi = window_start(int(ow), d.sw, d.pw) + k % d.kw;
      const acc_t xv = load(x + offset(d, n, l.c, h, wi, d.H, d.W));
      const acc_t z = rounded<T>(pre_relu(xv, a.scale, a.shift));
      const acc_t gv = relu_passes(z) ? acc_t(load(dy + o)) : acc_t(0);
      s += gv;
      sx += gv * ((xv - a.mean) * a.invstd);
    }
  }
  write_partials(d, s, sx, part, part + int64_t(gridDim.x) * d.C);
}

// One thread per channel: dw, db and the input-gradient coefficients (k_g, k_0, k_x rows of coef).
template <typename T>
__global__ void grad_finalize_kernel(const acc_type<T>* __restrict__ part, int parts, Dims d,
                                     const acc_type<T>* __restrict__ invstd, const acc_type<T>* __restrict__ w,
                                     bool batch_stats, acc_type<T>* __restrict__ dw, acc_type<T>* __restrict__ db,
                                     acc_type<T>* __restrict__ coef) {
  using acc_t = acc_type<T>;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d.C) return;
  double s = 0, sx = 0;
  for (int p = 0; p < parts; ++p) {
    s += part[int64_t(p) * d.C + c];
    sx += part[int64_t(parts + p) * d.C + c];
  }
  const GradCoefs<acc_t> k = grad_coefs<acc_t>(w ? w[c] : acc_t(1), invstd ? invstd[c] : acc_t(1), acc_t(s),
                                               acc_t(sx), int64_t(d.N) * d.H * d.W, batch_stats);
  coef[c] = k.k_g;
  coef[d.C + c] = k.k_0;
  coef[2 * d.C + c] = k.k_x;
  if (dw) dw[c] = acc_t(sx);
  if (db) db[c] = acc_t(s);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    input_grad_kernel(const T* __restrict__ dy, const uint8_t* __restrict__ argmax, const T* __restrict__ x,
                      const acc_type<T>* __restrict__ mean, const acc_type<T>* __restrict__ invstd,
                      const acc_type<T>* __restrict__ w, const acc_type<T>* __restrict__ b,
                      const acc_type<T>* __restrict__ coef, Dims d, T* __restrict__ dx, unsigned total) {
  using acc_t = acc_type<T>;
  const unsigned stride = gridDim.x * blockDim.x;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const Index e = unravel(d, i, d.H, d.W);
    acc_t gsum = 0;
    const int oh1 = last_window(e.h, d.sh, d.ph, d.OH), ow1 = last_window(e.w, d.sw, d.pw, d.OW);
    const int ow0 = first_window(e.w, d.kw, d.sw, d.pw);
    for (int oh = first_window(e.h, d.kh, d.sh, d.ph); oh <= oh1; ++oh) {
      const int row = (e.h - window_start(oh, d.sh, d.ph)) * d.kw;
      for (int ow = ow0; ow <= ow1; ++ow) {
        const int64_t o = offset(d, e.n, e.c, oh, ow, d.OH, d.OW);
        if (argmax[o] == row + (e.w - window_start(ow, d.sw, d.pw))) gsum += load(dy + o);
      }
    }
    const Affine<acc_t> a = affine(mean, invstd, w, b, e.c);
    const acc_t xv = load(x + i);
    const acc_t z = rounded<T>(pre_relu(xv, a.scale, a.shift));
    const GradCoefs<acc_t> k{coef[e.c], coef[d.C + e.c], coef[2 * d.C + e.c]};
    store(dx + i, input_grad(k, relu_passes(z) ? gsum : acc_t(0), xv - a.mean));
  }
}

unsigned elementwise_blocks(int64_t total) {
  return static_cast<unsigned>(std::clamp<int64_t>((total + kThreads - 1) / kThreads, 1, 1 << 20));
}

bool reduce_grid_ok(const Geometry& g, int64_t parts) {
  return parts >= 1 && parts <= 65535 && channel_tiles(g) <= 65535;
}

constexpr int kFinalizeThreads = 128;

unsigned finalize_blocks(const Geometry& g) {
  return static_cast<unsigned>((g.C + kFinalizeThreads - 1) / kFinalizeThreads);
}

}  // namespace

template <typename T>
cudaError_t cuda_stats(const T* x, acc_type<T>* mean, acc_type<T>* invstd, acc_type<T>* running_mean,
                       acc_type<T>* running_var, double momentum, double eps, acc_type<T>* workspace, int64_t parts,
                       const Geometry& g, cudaStream_t stream) {
  const int64_t count = g.N * g.H * g.W;
  if (count == 1 || (running_mean == nullptr) != (running_var == nullptr) || !fits_int(g)) {
    return cudaErrorInvalidValue;
  }
  if (g.C == 0) return cudaSuccess;
  const Dims d = dims(g);
  if (count > 0) {
    if (!reduce_grid_ok(g, parts) || workspace == nullptr) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned>(parts), static_cast<unsigned>(channel_tiles(g)));
    stats_partial_kernel<T><<<grid, kThreads, 0, stream>>>(x, d, workspace);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  stats_finalize_kernel<T><<<finalize_blocks(g), kFinalizeThreads, 0, stream>>>(
      x, workspace, count > 0 ? static_cast<int>(parts) : 0, d, mean, invstd, running_mean, running_var, momentum,
      eps);
  return cudaGetLastError();
}

template <typename T>
cudaError_t cuda_forward(const T* x, const acc_type<T>* mean, const acc_type<T>* invstd, const acc_type<T>* w,
                         const acc_type<T>* b, T* y, uint8_t* argmax, const Geometry& g, cudaStream_t stream) {
  if ((mean == nullptr) != (invstd == nullptr) || (mean == nullptr && (w != nullptr || b != nullptr)) ||
      !fits_int(g)) {
    return cudaErrorInvalidValue;
  }
  const int64_t total = g.N * g.C * g.OH * g.OW;
  if (total == 0) return cudaSuccess;
  forward_kernel<T><<<elementwise_blocks(total), kThreads, 0, stream>>>(x, mean, invstd, w, b, y, argmax, dims(g),
                                                                        static_cast<unsigned>(total));
  return cudaGetLastError();
}

template <typename T>
cudaError_t cuda_backward(const T* dy, const uint8_t* argmax, const T* x, const acc_type<T>* mean,
                          const acc_type<T>* invstd, const acc_type<T>* w, const acc_type<T>* b, bool batch_stats,
                          T* dx, acc_type<T>* dw, acc_type<T>* db, acc_type<T>* workspace, int64_t parts,
                          const Geometry& g, cudaStream_t stream) {
  if ((mean == nullptr) != (invstd == nullptr) || (batch_stats && mean == nullptr) || workspace == nullptr ||
      !fits_int(g)) {
    return cudaErrorInvalidValue;
  }
  if (g.C == 0) return cudaSuccess;
  const Dims d = dims(g);
  const int64_t positions = g.N * g.OH * g.OW;
  const bool sums = (batch_stats || dw != nullptr || db != nullptr) && positions > 0;
  acc_type<T>* coef = workspace + 2 * parts * g.C;
  if (sums) {
    if (!reduce_grid_ok(g, parts)) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned>(parts), static_cast<unsigned>(channel_tiles(g)));
    grad_partial_kernel<T><<<grid, kThreads, 0, stream>>>(dy, argmax, x, mean, invstd, w, b, d, workspace);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  grad_finalize_kernel<T><<<finalize_blocks(g), kFinalizeThreads, 0, stream>>>(
      workspace, sums ? static_cast<int>(parts) : 0, d, invstd, w, batch_stats, dw, db, coef);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t total = g.N * g.C * g.H * g.W;
  if (total == 0) return cudaSuccess;
  input_grad_kernel<T><<<elementwise_blocks(total), kThreads, 0, stream>>>(dy, argmax, x, mean, invstd, w, b, coef, d,
                                                                           dx, static_cast<unsigned>(total));
  return cudaGetLastError();
}

#define HETRAIN_BN_RELU_POOL_INSTANTIATE(T)                                                                         \
  template cudaError_t cuda_stats<T>(const T*, acc_type<T>*, acc_type<T>*, acc_type<T>*, acc_type<T>*, double,     \
                                     double, acc_type<T>*, int64_t, const Geometry&, cudaStream_t);                 \
  template cudaError_t cuda_forward<T>(const T*, const acc_type<T>*, const acc_type<T>*, const acc_type<T>*,       \
                                       const acc_type<T>*, T*, uint8_t*, const Geometry&, cudaStream_t);            \
  template cudaError_t cuda_backward<T>(const T*, const uint8_t*, const T*, const acc_type<T>*, const acc_type<T>*, \
                                        const acc_type<T>*, const acc_type<T>*, bool, T*, acc_type<T>*,             \
                                        acc_type<T>*, acc_type<T>*, int64_t, const Geometry&, cudaStream_t);

HETRAIN_BN_RELU_POOL_INSTANTIATE(float)
HETRAIN_BN_RELU_POOL_INSTANTIATE(double)
HETRAIN_BN_RELU_POOL_INSTANTIATE(__half)
HETRAIN_BN_RELU_POOL_INSTANTIATE(__nv_bfloat16)

#undef HETRAIN_BN_RELU_POOL_INSTANTIATE

}  // namespace bn_relu_pool
}  // namespace hetrain
