// CUDA BatchNorm2d -> ReLU -> MaxPool2d epilogue. The per-element formulas come from
// bn_relu_pool_math.h, shared with the CPU kernel.
//
// In channels_last a thread takes a pack of consecutive channels at one position (16 bytes where the
// channel count and the pointers allow, else one channel): one load per window element instead of one per
// channel, and the position's index arithmetic and window bounds once per pack. NCHW takes one element a
// thread.
// Per-channel reductions (batch statistics; the backward sums over dz and dz * xhat) run on a grid of
// position blocks x channel tiles: each block reduces in shared memory and writes one partial row, and a
// second kernel sums the rows per channel in double (32 channels a block, 32 lanes over the rows). No
// contended atomics, and a deterministic result. In channels_last a block's 256 threads are `lanes` channel
// packs x 256 / lanes position rows (reads coalesce across channels); in NCHW a block serves one channel
// and its threads walk the positions.
// Forward is one thread per pooled output pack; the input gradient one thread per input pack, which
// gathers its dz from the (at most ceil(k/s)^2) windows that hold it, so nothing is scattered.
#include "bn_relu_pool_kernel.h"

#include <climits>
#include <cmath>

#include "../bn_relu_pool_math.h"
#include "pack.cuh"

namespace hetrain {
namespace bn_relu_pool {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxLanes = 32;  // channel packs per block in channels_last reductions, at most
// Four resident blocks per SM: a 64-register budget. With the thread count alone, ptxas (CUDA 13) aims
// at full occupancy, caps these kernels at 32 registers and spills.
constexpr int kMinBlocks = 4;
constexpr int kSumLanes = 32;  // channels per block of the finalising kernels
constexpr int kSumRows = 16;   // their lanes over the partial rows: 512 threads, room for the double math

using cuda::load;
using cuda::load_pack;
using cuda::narrow;
using cuda::Pack;
using cuda::store;
using cuda::store_pack;
using cuda::widen;

// The value as T stores it: ties and the ReLU mask are decided on what torch would see.
template <typename T>
__device__ __forceinline__ acc_type<T> rounded(acc_type<T> v) {
  return widen(narrow<T>(v));
}

// Sizes as 32-bit ints, so that no kernel divides in 64 bits (a 64-bit division is a called routine,
// and the call spills). The launchers refuse what would not fit (geometry_ok).
struct Dims {
  int N, C, H, W, OH, OW, kh, kw, sh, sw, ph, pw;
  bool channels_last;
  int lanes;  // channels_last reductions: channel packs per block (a power of two up to kMaxLanes)
};

// Tensors under 2^31 elements and strides under 2^30 (window indices in int do not wrap), and a window of 256
// positions at most: its argmax, 0 to 255, is a uint8.
bool geometry_ok(const Geometry& g) {
  const int64_t big = std::max(g.N * g.C * g.H * g.W, g.N * g.C * g.OH * g.OW);
  const bool window_ok = g.kh >= 1 && g.kw >= 1 && g.kh <= 256 && g.kw <= 256 && g.kh * g.kw <= 256;
  return big < INT_MAX && window_ok && g.sh < INT_MAX / 2 && g.sw < INT_MAX / 2;
}

// Channels per pack: the 16-byte pack width of T in channels_last where the channel count and every pointer
// allow it (argmax, one byte a channel, aligned to the pack's channel count), else 1.
template <typename T>
int channel_pack(const Geometry& g, std::initializer_list<const void*> pointers, const uint8_t* argmax) {
  if (!g.channels_last) return 1;
  const int width = cuda::pack_width<T>(g.C, pointers);
  return reinterpret_cast<uintptr_t>(argmax) % width == 0 ? width : 1;
}

Dims dims(const Geometry& g, int vec) {
  const int64_t packs = (g.C + vec - 1) / vec;
  int lanes = 1;
  while (lanes < kMaxLanes && lanes < packs) lanes *= 2;
  return Dims{static_cast<int>(g.N), static_cast<int>(g.C), static_cast<int>(g.H), static_cast<int>(g.W),
              static_cast<int>(g.OH), static_cast<int>(g.OW), g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.channels_last,
              lanes};
}

// Channel tiles of a reduction launch: blocks along the grid's y.
unsigned tiles(const Dims& d, int vec) {
  return d.channels_last ? static_cast<unsigned>((d.C + d.lanes * vec - 1) / (d.lanes * vec))
                         : static_cast<unsigned>(d.C);
}

// Offset of element (n, c, h, w) of a (N, C, rows, cols) tensor in the layout of d.
__device__ __forceinline__ int64_t offset(const Dims& d, int n, int c, int h, int w, int rows, int cols) {
  return d.channels_last ? ((int64_t(n) * rows + h) * cols + w) * d.C + c
                         : ((int64_t(n) * d.C + c) * rows + h) * int64_t(cols) + w;
}

// (n, c, h, w) of the i-th pack (of VEC channels; VEC = 1 in NCHW) in memory of a (N, C, rows, cols) tensor in
// the layout of d; c is the pack's first channel.
struct Index {
  int n, c, h, w;
};
template <int VEC>
__device__ __forceinline__ Index unravel(const Dims& d, unsigned i, unsigned rows, unsigned cols) {
  Index r;
  if (VEC > 1 || d.channels_last) {
    const unsigned packs = unsigned(d.C) / VEC;
    r.c = (i % packs) * VEC;
    i /= packs;
    r.w = i % cols;
    i /= cols;
    r.h = i % rows;
    r.n = i / rows;
  } else {
    const unsigned C = d.C;
    r.w = i % cols;
    i /= cols;
    r.h = i % rows;
    i /= rows;
    r.c = i % C;
    r.n = i / C;
  }
  return r;
}

// A thread's channel (the first of its pack) and its walk over positions in the per-channel reductions.
struct Lane {
  int c, first, step;
  bool active;
};
template <int VEC>
__device__ __forceinline__ Lane lane(const Dims& d) {
  Lane l;
  if (d.channels_last) {
    const int rows = kThreads / d.lanes;
    l.c = (blockIdx.y * d.lanes + threadIdx.x % d.lanes) * VEC;
    l.first = blockIdx.x * rows + threadIdx.x / d.lanes;
    l.step = gridDim.x * rows;
    l.active = l.c < d.C;
  } else {
    l.c = blockIdx.y;
    l.first = blockIdx.x * kThreads + threadIdx.x;
    l.step = gridDim.x * kThreads;
    l.active = true;
  }
  return l;
}

// Offset of a reduction's position p (over N x rows x cols) for the lane's channel.
__device__ __forceinline__ int64_t position_offset(const Dims& d, const Lane& l, unsigned p, unsigned plane) {
  if (d.channels_last) return int64_t(p) * d.C + l.c;
  const unsigned n = p / plane;
  return (int64_t(n) * d.C + l.c) * plane + (p - n * plane);
}

// Sums a[e] and b[e] over the threads that share channel l.c + e and writes them to row blockIdx.x of
// part_a / part_b (each gridDim.x rows of C values).
template <int VEC, typename acc_t>
__device__ __forceinline__ void write_partials(const Dims& d, const Lane& l, const acc_t (&a)[VEC],
                                               const acc_t (&b)[VEC], acc_t* __restrict__ part_a,
                                               acc_t* __restrict__ part_b) {
  __shared__ acc_t sa[kThreads * VEC];
  __shared__ acc_t sb[kThreads * VEC];
  if (d.channels_last) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      sa[threadIdx.x * VEC + e] = a[e];
      sb[threadIdx.x * VEC + e] = b[e];
    }
    __syncthreads();
    if (threadIdx.x < d.lanes && l.active) {
      const int rows = kThreads / d.lanes;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        acc_t ta = 0, tb = 0;
        for (int r = 0; r < rows; ++r) {
          ta += sa[(r * d.lanes + threadIdx.x) * VEC + e];
          tb += sb[(r * d.lanes + threadIdx.x) * VEC + e];
        }
        part_a[int64_t(blockIdx.x) * d.C + l.c + e] = ta;
        part_b[int64_t(blockIdx.x) * d.C + l.c + e] = tb;
      }
    }
    return;
  }
  acc_t ta = a[0], tb = b[0];
  for (int o = 16; o > 0; o >>= 1) {
    ta += __shfl_xor_sync(0xffffffffu, ta, o);
    tb += __shfl_xor_sync(0xffffffffu, tb, o);
  }
  if (threadIdx.x % 32 == 0) {
    sa[threadIdx.x / 32] = ta;
    sb[threadIdx.x / 32] = tb;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    ta = 0;
    tb = 0;
    for (int wp = 0; wp < kThreads / 32; ++wp) {
      ta += sa[wp];
      tb += sb[wp];
    }
    part_a[int64_t(blockIdx.x) * d.C + blockIdx.y] = ta;
    part_b[int64_t(blockIdx.x) * d.C + blockIdx.y] = tb;
  }
}

// The sums over `parts` partial rows (first part_a's, then part_b's parts rows of C) for channel
// blockIdx.x * kSumLanes + threadIdx.x % kSumLanes, in double: each of the block's kSumRows warps sums every
// kSumRows-th row, then the row sums are added in a fixed order. True on the thread that holds a channel's
// totals (in *c, *s, *q).
template <typename acc_t>
__device__ __forceinline__ bool channel_sums(const acc_t* __restrict__ part, int parts, int C, int* c, double* s,
                                             double* q) {
  __shared__ double ss[kSumRows][kSumLanes + 1];
  __shared__ double sq[kSumRows][kSumLanes + 1];
  const int col = threadIdx.x % kSumLanes, row = threadIdx.x / kSumLanes;
  *c = blockIdx.x * kSumLanes + col;
  double ts = 0, tq = 0;
  if (*c < C) {
    for (int p = row; p < parts; p += kSumRows) {
      ts += part[int64_t(p) * C + *c];
      tq += part[int64_t(parts + p) * C + *c];
    }
  }
  ss[row][col] = ts;
  sq[row][col] = tq;
  __syncthreads();
  if (row != 0 || *c >= C) return false;
  for (int r = 1; r < kSumRows; ++r) {
    ts += ss[r][col];
    tq += sq[r][col];
  }
  *s = ts;
  *q = tq;
  return true;
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
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    stats_partial_kernel(const T* __restrict__ x, Dims d, acc_type<T>* __restrict__ part) {
  using acc_t = acc_type<T>;
  const Lane l = lane<VEC>(d);
  const unsigned HW = unsigned(d.H) * unsigned(d.W), P = unsigned(d.N) * HW;
  acc_t s[VEC], q[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) s[e] = q[e] = acc_t(0);
  if (l.active) {
    const Pack<T, VEC> pivot = load_pack<VEC>(x + offset(d, 0, l.c, 0, 0, d.H, d.W), 0);
    for (unsigned p = l.first; p < P; p += l.step) {
      const Pack<T, VEC> v = load_pack<VEC>(x + position_offset(d, l, p, HW), 0);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const acc_t c = acc_t(widen(v.v[e])) - widen(pivot.v[e]);
        s[e] += c;
        q[e] += c * c;
      }
    }
  }
  write_partials<VEC>(d, l, s, q, part, part + int64_t(gridDim.x) * d.C);
}

// kSumLanes channels a block: the partial rows summed in double, then mean, invstd and the running update.
template <typename T>
__global__ void __launch_bounds__(kSumLanes * kSumRows)
    stats_finalize_kernel(const T* __restrict__ x, const acc_type<T>* __restrict__ part, int parts, Dims d,
                          acc_type<T>* __restrict__ mean, acc_type<T>* __restrict__ invstd,
                          acc_type<T>* __restrict__ running_mean, acc_type<T>* __restrict__ running_var,
                          double momentum, double eps) {
  using acc_t = acc_type<T>;
  int c;
  double s, q;
  if (!channel_sums(part, parts, d.C, &c, &s, &q)) return;
  const int64_t count = int64_t(d.N) * d.H * d.W;
  if (count == 0) {  // empty batch: nothing to normalise, running statistics left alone (as torch)
    mean[c] = acc_t(0);
    invstd[c] = acc_t(bn_relu_pool::invstd<double>(0.0, eps));
    return;
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

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    forward_kernel(const T* __restrict__ x, const acc_type<T>* __restrict__ mean,
                   const acc_type<T>* __restrict__ invstd, const acc_type<T>* __restrict__ w,
                   const acc_type<T>* __restrict__ b, T* __restrict__ y, uint8_t* __restrict__ argmax, Dims d,
                   unsigned total) {
  using acc_t = acc_type<T>;
  const unsigned stride = gridDim.x * blockDim.x;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const Index o = unravel<VEC>(d, i, d.OH, d.OW);
    acc_t scale[VEC], shift[VEC], best[VEC];
    const int hs = window_start(o.h, d.sh, d.ph), ws = window_start(o.w, d.sw, d.pw);
    const int h0 = max(hs, 0), h1 = min(hs + d.kh, d.H);
    const int w0 = max(ws, 0), w1 = min(ws + d.kw, d.W);
    Pack<uint8_t, VEC> idx;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const Affine<acc_t> a = affine(mean, invstd, w, b, o.c + e);
      scale[e] = a.scale;
      shift[e] = a.shift;
      best[e] = acc_t(-INFINITY);
      idx.v[e] = static_cast<uint8_t>((h0 - hs) * d.kw + (w0 - ws));
    }
    for (int h = h0; h < h1; ++h) {
      for (int wi = w0; wi < w1; ++wi) {
        const Pack<T, VEC> v = load_pack<VEC>(x + offset(d, o.n, o.c, h, wi, d.H, d.W), 0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const acc_t z = rounded<T>(pre_relu(acc_t(widen(v.v[e])), scale[e], shift[e]));
          if (takes_max(z, best[e])) {
            best[e] = z;
            idx.v[e] = static_cast<uint8_t>((h - hs) * d.kw + (wi - ws));
          }
        }
      }
    }
    Pack<T, VEC> out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) out.v[e] = narrow<T>(relu(best[e]));
    store_pack<VEC>(y, i, out);
    store_pack<VEC>(argmax, i, idx);
  }
}

// Partial sum(dz) and sum(dz * xhat) per channel over the pooled outputs, dz = dy at each window's
// argmax where the ReLU let it through. Three blocks per SM: an 85-register budget for a pack's sums.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks - 1)
    grad_partial_kernel(const T* __restrict__ dy, const uint8_t* __restrict__ argmax, const T* __restrict__ x,
                        const acc_type<T>* __restrict__ mean, const acc_type<T>* __restrict__ invstd,
                        const acc_type<T>* __restrict__ w, const acc_type<T>* __restrict__ b, Dims d,
                        acc_type<T>* __restrict__ part) {
  using acc_t = acc_type<T>;
  const Lane l = lane<VEC>(d);
  const unsigned OHW = unsigned(d.OH) * unsigned(d.OW), P = unsigned(d.N) * OHW;
  acc_t s[VEC], sx[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) s[e] = sx[e] = acc_t(0);
  if (l.active) {
    for (unsigned p = l.first; p < P; p += l.step) {
      const unsigned n = p / OHW, ohw = p - n * OHW;
      const unsigned oh = ohw / unsigned(d.OW), ow = ohw - oh * unsigned(d.OW);
      const int64_t o = position_offset(d, l, p, OHW);
      const Pack<uint8_t, VEC> am = load_pack<VEC>(argmax + o, 0);
      const Pack<T, VEC> g = load_pack<VEC>(dy + o, 0);
      const int hs = window_start(int(oh), d.sh, d.ph), ws = window_start(int(ow), d.sw, d.pw);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const Affine<acc_t> a = affine(mean, invstd, w, b, l.c + e);
        const int k = am.v[e], ih = hs + k / d.kw, iw = ws + k % d.kw;
        // Not an argmax the forward wrote (checking one on the host would wait for the device): skipped, so
        // no read leaves the input; the CPU kernel refuses it.
        if (k >= d.kh * d.kw || ih < 0 || ih >= d.H || iw < 0 || iw >= d.W) continue;
        const acc_t xv = load(x + offset(d, n, l.c + e, ih, iw, d.H, d.W));
        const acc_t z = rounded<T>(pre_relu(xv, a.scale, a.shift));
        const acc_t gv = relu_passes(z) ? acc_t(widen(g.v[e])) : acc_t(0);
        s[e] += gv;
        sx[e] += gv * ((xv - a.mean) * a.invstd);
      }
    }
  }
  write_partials<VEC>(d, l, s, sx, part, part + int64_t(gridDim.x) * d.C);
}

// kSumLanes channels a block: dw, db and the input-gradient coefficients (k_g, k_0, k_x rows of coef).
template <typename T>
__global__ void __launch_bounds__(kSumLanes * kSumRows)
    grad_finalize_kernel(const acc_type<T>* __restrict__ part, int parts, Dims d,
                         const acc_type<T>* __restrict__ invstd, const acc_type<T>* __restrict__ w, bool batch_stats,
                         acc_type<T>* __restrict__ dw, acc_type<T>* __restrict__ db, acc_type<T>* __restrict__ coef) {
  using acc_t = acc_type<T>;
  int c;
  double s, sx;
  if (!channel_sums(part, parts, d.C, &c, &s, &sx)) return;
  const GradCoefs<acc_t> k = grad_coefs<acc_t>(w ? w[c] : acc_t(1), invstd ? invstd[c] : acc_t(1), acc_t(s),
                                               acc_t(sx), int64_t(d.N) * d.H * d.W, batch_stats);
  coef[c] = k.k_g;
  coef[d.C + c] = k.k_0;
  coef[2 * d.C + c] = k.k_x;
  if (dw) dw[c] = acc_t(sx);
  if (db) db[c] = acc_t(s);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    input_grad_kernel(const T* __restrict__ dy, const uint8_t* __restrict__ argmax, const T* __restrict__ x,
                      const acc_type<T>* __restrict__ mean, const acc_type<T>* __restrict__ invstd,
                      const acc_type<T>* __restrict__ w, const acc_type<T>* __restrict__ b,
                      const acc_type<T>* __restrict__ coef, Dims d, T* __restrict__ dx, unsigned total) {
  using acc_t = acc_type<T>;
  const unsigned stride = gridDim.x * blockDim.x;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const Index p = unravel<VEC>(d, i, d.H, d.W);
    acc_t gsum[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) gsum[e] = acc_t(0);
    const int oh1 = last_window(p.h, d.sh, d.ph, d.OH), ow1 = last_window(p.w, d.sw, d.pw, d.OW);
    const int ow0 = first_window(p.w, d.kw, d.sw, d.pw);
    for (int oh = first_window(p.h, d.kh, d.sh, d.ph); oh <= oh1; ++oh) {
      const int row = (p.h - window_start(oh, d.sh, d.ph)) * d.kw;
      for (int ow = ow0; ow <= ow1; ++ow) {
        const int64_t o = offset(d, p.n, p.c, oh, ow, d.OH, d.OW);
        const int in_window = row + (p.w - window_start(ow, d.sw, d.pw));
        const Pack<uint8_t, VEC> am = load_pack<VEC>(argmax + o, 0);
        const Pack<T, VEC> g = load_pack<VEC>(dy + o, 0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (am.v[e] == in_window) gsum[e] += widen(g.v[e]);
        }
      }
    }
    const Pack<T, VEC> xv = load_pack<VEC>(x, i);
    Pack<T, VEC> out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int c = p.c + e;
      const Affine<acc_t> a = affine(mean, invstd, w, b, c);
      const acc_t xe = widen(xv.v[e]);
      const acc_t z = rounded<T>(pre_relu(xe, a.scale, a.shift));
      const GradCoefs<acc_t> k{coef[c], coef[d.C + c], coef[2 * d.C + c]};
      out.v[e] = narrow<T>(input_grad(k, relu_passes(z) ? gsum[e] : acc_t(0), xe - a.mean));
    }
    store_pack<VEC>(dx, i, out);
  }
}

unsigned elementwise_blocks(int64_t total) {
  return static_cast<unsigned>(std::clamp<int64_t>((total + kThreads - 1) / kThreads, 1, 1 << 20));
}

bool reduce_grid_ok(const Geometry& g, int64_t parts) {
  return parts >= 1 && parts <= 65535 && channel_tiles(g) <= kMaxChannelTiles;
}

unsigned finalize_blocks(const Geometry& g) { return static_cast<unsigned>((g.C + kSumLanes - 1) / kSumLanes); }

}  // namespace

template <typename T>
cudaError_t cuda_stats(const T* x, acc_type<T>* mean, acc_type<T>* invstd, acc_type<T>* running_mean,
                       acc_type<T>* running_var, double momentum, double eps, acc_type<T>* workspace, int64_t parts,
                       const Geometry& g, cudaStream_t stream) {
  const int64_t count = g.N * g.H * g.W;
  if (count == 1 || (running_mean == nullptr) != (running_var == nullptr) || !geometry_ok(g)) {
    return cudaErrorInvalidValue;
  }
  if (g.C == 0) return cudaSuccess;
  if (count > 0) {
    if (!reduce_grid_ok(g, parts) || workspace == nullptr) return cudaErrorInvalidValue;
    // argmax plays no part: x's alignment and the channel count decide.
    cuda::with_pack_width<T>(channel_pack<T>(g, {x}, nullptr), [&](auto width) {
      constexpr int VEC = decltype(width)::value;
      const Dims d = dims(g, VEC);
      const dim3 grid(static_cast<unsigned>(parts), tiles(d, VEC));
      stats_partial_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(x, d, workspace);
    });
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  stats_finalize_kernel<T><<<finalize_blocks(g), kSumLanes * kSumRows, 0, stream>>>(
      x, workspace, count > 0 ? static_cast<int>(parts) : 0, dims(g, 1), mean, invstd, running_mean, running_var,
      momentum, eps);
  return cudaGetLastError();
}

template <typename T>
cudaError_t cuda_forward(const T* x, const acc_type<T>* mean, const acc_type<T>* invstd, const acc_type<T>* w,
                         const acc_type<T>* b, T* y, uint8_t* argmax, const Geometry& g, cudaStream_t stream) {
  if ((mean == nullptr) != (invstd == nullptr) || (mean == nullptr && (w != nullptr || b != nullptr)) ||
      !geometry_ok(g)) {
    return cudaErrorInvalidValue;
  }
  const int64_t total = g.N * g.C * g.OH * g.OW;
  if (total == 0) return cudaSuccess;
  cuda::with_pack_width<T>(channel_pack<T>(g, {x, y}, argmax), [&](auto width) {
    constexpr int VEC = decltype(width)::value;
    forward_kernel<T, VEC><<<elementwise_blocks(total / VEC), kThreads, 0, stream>>>(
        x, mean, invstd, w, b, y, argmax, dims(g, VEC), static_cast<unsigned>(total / VEC));
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t cuda_backward(const T* dy, const uint8_t* argmax, const T* x, const acc_type<T>* mean,
                          const acc_type<T>* invstd, const acc_type<T>* w, const acc_type<T>* b, bool batch_stats,
                          T* dx, acc_type<T>* dw, acc_type<T>* db, acc_type<T>* workspace, int64_t parts,
                          const Geometry& g, cudaStream_t stream) {
  if (!geometry_ok(g)) return cudaErrorInvalidValue;
  // Nothing to do; and the per-channel arrays and the workspace, being empty, may have no address.
  if (g.C == 0) return cudaSuccess;
  if ((mean == nullptr) != (invstd == nullptr) || (batch_stats && mean == nullptr) || workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t positions = g.N * g.OH * g.OW;
  const bool sums = (batch_stats || dw != nullptr || db != nullptr) && positions > 0;
  acc_type<T>* coef = workspace + 2 * parts * g.C;
  const int width = channel_pack<T>(g, {dy, x, dx}, argmax);
  if (sums) {
    if (!reduce_grid_ok(g, parts)) return cudaErrorInvalidValue;
    cuda::with_pack_width<T>(width, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const Dims d = dims(g, VEC);
      const dim3 grid(static_cast<unsigned>(parts), tiles(d, VEC));
      grad_partial_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(dy, argmax, x, mean, invstd, w, b, d, workspace);
    });
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  grad_finalize_kernel<T><<<finalize_blocks(g), kSumLanes * kSumRows, 0, stream>>>(
      workspace, sums ? static_cast<int>(parts) : 0, dims(g, 1), invstd, w, batch_stats, dw, db, coef);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t total = g.N * g.C * g.H * g.W;
  if (total == 0) return cudaSuccess;
  cuda::with_pack_width<T>(width, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    input_grad_kernel<T, VEC><<<elementwise_blocks(total / VEC), kThreads, 0, stream>>>(
        dy, argmax, x, mean, invstd, w, b, coef, dims(g, VEC), dx, static_cast<unsigned>(total / VEC));
  });
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
