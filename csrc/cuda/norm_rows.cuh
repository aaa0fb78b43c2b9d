// LayerNorm and RMSNorm over rows held in registers (rows of up to kRegisterRowThreads * row_elems elements;
// see rows.h), shared by the LayerNorm, RMSNorm and dropout+add+LayerNorm kernels. One thread block per row,
// rows strided over the grid; each thread reads its packs of a row once and keeps them for every pass; the
// per-element formulas come from layer_norm_math.h and rms_norm_math.h, shared with the CPU kernels.
// kCentered: LayerNorm (mean and rstd); else RMSNorm (rstd alone, no bias).
//
// A Rows type gives, for row r, `rows.template held<VEC, K>(r)`: an object holding up to K packs of VEC
// elements of the row, where `load(k, v)` reads pack v of the row into slot k, `value(k, e)` is element e of
// slot k as the norm sees it, and `store_grad(k, v, ds)` takes the gradient of pack v's elements (backward).
// A thread's slot k holds pack threadIdx.x + k * blockDim.x.
#pragma once

#include <cstdint>

#include "../layer_norm_math.h"
#include "../rms_norm_math.h"
#include "rows.cuh"

namespace hetrain {
namespace cuda {

// Packs of VEC elements a thread holds of a row: row_elems elements.
template <typename T, int VEC>
constexpr int kHeldPacks = row_elems(sizeof(T)) / VEC;

// y = the normalised row times w (plus b) for rows [0, M) of N; writes rstd (and mean) per row. w and b may
// be null.
template <bool kCentered, int VEC, typename T, typename acc_t, typename Rows>
__device__ __forceinline__ void norm_forward_held(const Rows& rows, const T* __restrict__ w, const T* __restrict__ b,
                                                  T* __restrict__ y, acc_t* __restrict__ mean,
                                                  acc_t* __restrict__ rstd, int64_t M, int64_t N, acc_t eps) {
  constexpr int K = kHeldPacks<T, VEC>;
  __shared__ acc_t scratch[kRegisterRowThreads / 32];
  const int64_t packs = N / VEC;
  for (int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    auto row = rows.template held<VEC, K>(r);
    acc_t sum = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t v = threadIdx.x + int64_t(k) * blockDim.x;
      if (v < packs) {
        row.load(k, v);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const acc_t s = row.value(k, e);
          sum += kCentered ? s : s * s;
        }
      }
    }
    acc_t mu = 0, rs;
    if constexpr (kCentered) {
      mu = block_sum(sum, scratch) / acc_t(N);
      acc_t sq = 0;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (threadIdx.x + int64_t(k) * blockDim.x < packs) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const acc_t c = row.value(k, e) - mu;
            sq += c * c;
          }
        }
      }
      rs = layer_norm::rstd<acc_t>(block_sum(sq, scratch) / acc_t(N), eps);
    } else {
      rs = rms_norm::rstd<acc_t>(block_sum(sum, scratch) / acc_t(N), eps);
    }
    T* yr = y + r * N;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t v = threadIdx.x + int64_t(k) * blockDim.x;
      if (v < packs) {
        Pack<T, VEC> wv, bv, out;
        if (w) wv = load_pack<VEC>(w, v);
        if (b) bv = load_pack<VEC>(b, v);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const acc_t we = w ? widen(wv.v[e]) : acc_t(1);
          const acc_t s = row.value(k, e);
          if constexpr (kCentered) {
            out.v[e] = narrow<T>(layer_norm::forward<acc_t>(s, mu, rs, we, b ? acc_t(widen(bv.v[e])) : acc_t(0)));
          } else {
            out.v[e] = narrow<T>(rms_norm::forward<acc_t>(s, rs, we));
          }
        }
        store_pack<VEC>(yr, v, out);
      }
    }
    if (threadIdx.x == 0) {
      if constexpr (kCentered) mean[r] = mu;
      rstd[r] = rs;
    }
  }
}

// The gradient of each row element (to row.store_grad); block p writes the sums over its rows of dy * xhat
// and (kCentered) dy into row p of w_part / b_part (either may be null: that gradient is not wanted). The
// block keeps the weight and those sums in registers across its rows and writes its partial rows once.
template <bool kCentered, int VEC, typename T, typename acc_t, typename Rows>
__device__ __forceinline__ void norm_backward_held(const Rows& rows, const T* __restrict__ dy, const T* __restrict__ w,
                                                   const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                                   acc_t* __restrict__ w_part, acc_t* __restrict__ b_part, int64_t M,
                                                   int64_t N) {
  constexpr int K = kHeldPacks<T, VEC>;
  __shared__ acc_t scratch[2 * kRegisterRowThreads / 32];
  const int64_t packs = N / VEC;
  Pack<T, VEC> wk[K];
  acc_t dw[K][VEC], db[K][VEC];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t v = threadIdx.x + int64_t(k) * blockDim.x;
    if (w && v < packs) wk[k] = load_pack<VEC>(w, v);
#pragma unroll
    for (int e = 0; e < VEC; ++e) dw[k][e] = db[k][e] = acc_t(0);
  }
  for (int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    auto row = rows.template held<VEC, K>(r);
    const T* dyr = dy + r * N;
    const acc_t mu = kCentered ? mean[r] : acc_t(0), rs = rstd[r];
    Pack<T, VEC> dk[K];
    acc_t sum_g = 0, sum_gx = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t v = threadIdx.x + int64_t(k) * blockDim.x;
      if (v < packs) {
        row.load(k, v);
        dk[k] = load_pack<VEC>(dyr, v);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const acc_t d = widen(dk[k].v[e]);
          const acc_t g = w ? d * acc_t(widen(wk[k].v[e])) : d;
          sum_g += g;
          sum_gx += g * ((row.value(k, e) - mu) * rs);
        }
      }
    }
    acc_t mg = 0, mgx;
    if constexpr (kCentered) {
      const Sums<acc_t> s = block_sum2(sum_g, sum_gx, scratch);
      mg = s.a / acc_t(N);
      mgx = s.b / acc_t(N);
    } else {
      mgx = block_sum(sum_gx, scratch) / acc_t(N);
      if (rs == acc_t(0)) {  // the same for the whole block: every thread takes this or none
        // The row's mean square overflowed. Summing g * (x * rstd) gave 0 where the CPU kernel's sum(g * x) * rstd
        // (and torch) give NaN when that sum overflows: this rare row is summed again in that order, read from
        // memory, since holding the sum of g * x beside the other one spills registers.
        const auto again = rows.row(r);
        acc_t s = 0;
        for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
          const acc_t d = load(dyr + j);
          s += (w ? d * acc_t(load(w + j)) : d) * again.again(j, 0);
        }
        mgx = block_sum(s, scratch) * rs / acc_t(N);
      }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t v = threadIdx.x + int64_t(k) * blockDim.x;
      if (v < packs) {
        acc_t ds[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const acc_t d = widen(dk[k].v[e]);
          const acc_t g = w ? d * acc_t(widen(wk[k].v[e])) : d;
          const acc_t xhat = (row.value(k, e) - mu) * rs;
          if constexpr (kCentered) {
            ds[e] = layer_norm::input_grad<acc_t>(g, xhat, rs, mg, mgx);
            db[k][e] += d;
          } else {
            ds[e] = rms_norm::input_grad<acc_t>(g, xhat, rs, mgx);
          }
          dw[k][e] += d * xhat;
        }
        row.store_grad(k, v, ds);
      }
    }
  }
  acc_t* pw = w_part ? w_part + blockIdx.x * N : nullptr;
  acc_t* pb = b_part ? b_part + blockIdx.x * N : nullptr;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t v = threadIdx.x + int64_t(k) * blockDim.x;
    if (v < packs) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (pw) pw[v * VEC + e] = dw[k][e];
        if (kCentered && pb) pb[v * VEC + e] = db[k][e];
      }
    }
  }
}

// The rows are x itself; backward stores their gradient in dx. Serves both the held rows above and the
// re-reading ones of layer_norm_rows.cuh (`row(r)`).
template <typename T, typename acc_t>
struct InputRows {
  const T* x;
  T* dx;
  int64_t N;

  template <int VEC, int K>
  struct Held {
    const T* xr;
    T* dxr;
    Pack<T, VEC> xs[K];
    __device__ void load(int k, int64_t v) { xs[k] = load_pack<VEC>(xr, v); }
    __device__ acc_t value(int k, int e) const { return widen(xs[k].v[e]); }
    __device__ void store_grad(int k, int64_t v, const acc_t (&ds)[VEC]) const {
      Pack<T, VEC> out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) out.v[e] = narrow<T>(ds[e]);
      store_pack<VEC>(dxr, v, out);
    }
  };

  template <int VEC, int K>
  __device__ Held<VEC, K> held(int64_t r) const {
    return {x + r * N, dx ? dx + r * N : nullptr, {}};
  }

  struct Row {
    const InputRows& rows;
    int64_t at;  // the row's first element
    __device__ acc_t first(int64_t j, int) const { return load(rows.x + at + j); }
    __device__ acc_t again(int64_t j, int) const { return load(rows.x + at + j); }
    __device__ void store_grad(int64_t j, int, acc_t ds) const { store(rows.dx + at + j, ds); }
  };

  __device__ Row row(int64_t r) const { return {*this, r * N}; }
};

}  // namespace cuda
}  // namespace hetrain
