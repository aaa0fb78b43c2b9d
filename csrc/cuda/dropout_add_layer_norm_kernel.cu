// CUDA dropout + residual add + LayerNorm: LayerNorm's row kernels (one thread block per row) over the
// pre-norm sum s = x * m + residual: x and the residual held in registers where the row fits
// (norm_rows.cuh), else re-read and s recomputed in every pass (layer_norm_rows.cuh); a thread's dropout
// decisions are drawn once per row and kept as bits. The formulas come from dropout_math.h and
// layer_norm_math.h, shared with the CPU kernel. Backward writes one partial dW/dB row per block, summed per
// column by a second kernel.
#include "dropout_add_layer_norm_kernel.h"

#include "../dropout_math.h"
#include "layer_norm_rows.cuh"
#include "norm_rows.cuh"

namespace hetrain {
namespace dropout_add_layer_norm {
namespace {

using namespace cuda;  // rows.h: launch shapes; rows.cuh: launch_rows; pack.cuh; convert.cuh: load, store

constexpr int kMaxThreads = kMaxRowThreads;

// A thread's dropout multipliers along its elements of row r (the k-th is element threadIdx.x + k *
// blockDim.x): drawn in a kernel's first pass over the row, the decisions for the first 32 kept as bits
// for the later passes, which would otherwise hash every element again. p = 0 (threshold 0) keeps every
// element with scale 1, without hashing.
template <typename acc_t>
class RowMask {
 public:
  // A call captured in a CUDA graph keeps its seed and offset in memory: read here, row by row, rather than
  // once per kernel, where they would hold four registers for its whole life (the held-row backward kernels
  // are at their register limit).
  __device__ RowMask(const dropout::Call& d, int64_t r, int64_t N)
      : keys_(row_keys(dropout::resolved(d), r, N)), threshold_(d.threshold), scale_(acc_t(d.scale)) {}

  // The multiplier of element j, the thread's k-th, in the first pass.
  __device__ acc_t draw(int64_t j, int k) {
    if (threshold_ == 0) return acc_t(1);
    const bool keep = hash_keeps(j);
    if (k < 32) bits_ |= static_cast<uint32_t>(keep) << k;
    return keep ? scale_ : acc_t(0);
  }

  // The same multiplier in a later pass.
  __device__ acc_t again(int64_t j, int k) const {
    if (threshold_ == 0) return acc_t(1);
    return (k < 32 ? (bits_ >> k) & 1u : hash_keeps(j)) ? scale_ : acc_t(0);
  }

 private:
  __device__ bool hash_keeps(int64_t j) const {
    return dropout::bits24_in_run(keys_, static_cast<uint32_t>(j)) >= threshold_;
  }

  static __device__ dropout::RunKeys row_keys(const dropout::Call& d, int64_t r, int64_t N) {
    return dropout::run_keys(d.seed, d.offset + static_cast<uint64_t>(r) * static_cast<uint64_t>(N));
  }

  dropout::RunKeys keys_;
  uint32_t threshold_;
  acc_t scale_;
  uint32_t bits_ = 0;
};

// The rows are x * mask + residual; backward stores their gradient in dres and, times the mask, in dx.
template <typename T, typename acc_t>
struct DropoutAddRows {
  const T* x;
  const T* res;
  dropout::Call d;
  T* dx;
  T* dres;
  int64_t N;

  struct Row {
    const T* xr;
    const T* rr;
    T* dxr;
    T* dresr;
    RowMask<acc_t> mask;
    __device__ acc_t first(int64_t j, int k) { return dropout::apply(acc_t(load(xr + j)), mask.draw(j, k)) + acc_t(load(rr + j)); }
    __device__ acc_t again(int64_t j, int k) const {
      return dropout::apply(acc_t(load(xr + j)), mask.again(j, k)) + acc_t(load(rr + j));
    }
    __device__ void store_grad(int64_t j, int k, acc_t ds) const {
      store(dresr + j, ds);
      store(dxr + j, dropout::apply(ds, mask.again(j, k)));
    }
  };

  // Slot k of a thread holds packs of x and the residual; the multiplier of its element e is the thread's
  // (k * VEC + e)-th decision of the row (at most row_elems of them, kept as bits).
  template <int VEC, int K>
  struct Held {
    static_assert(K * VEC <= 32, "a thread's decisions of a held row must fit RowMask's 32 bits");
    const T* xr;
    const T* rr;
    T* dxr;
    T* dresr;
    RowMask<acc_t> mask;
    Pack<T, VEC> xs[K], rs[K];
    __device__ void load(int k, int64_t v) {
      xs[k] = load_pack<VEC>(xr, v);
      rs[k] = load_pack<VEC>(rr, v);
#pragma unroll
      for (int e = 0; e < VEC; ++e) mask.draw(v * VEC + e, k * VEC + e);
    }
    __device__ acc_t value(int k, int e) const {
      return dropout::apply(acc_t(widen(xs[k].v[e])), mask.again(0, k * VEC + e)) + acc_t(widen(rs[k].v[e]));
    }
    __device__ void store_grad(int k, int64_t v, const acc_t (&ds)[VEC]) const {
      Pack<T, VEC> dres, dx;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        dres.v[e] = narrow<T>(ds[e]);
        dx.v[e] = narrow<T>(dropout::apply(ds[e], mask.again(0, k * VEC + e)));
      }
      store_pack<VEC>(dresr, v, dres);
      store_pack<VEC>(dxr, v, dx);
    }
  };

  template <int VEC, int K>
  __device__ Held<VEC, K> held(int64_t r) const {
    const int64_t at = r * N;
    return {x + at, res + at, dx ? dx + at : nullptr, dres ? dres + at : nullptr, RowMask<acc_t>(d, r, N), {}, {}};
  }

  __device__ Row row(int64_t r) const {
    const int64_t at = r * N;
    return {x + at, res + at, dx ? dx + at : nullptr, dres ? dres + at : nullptr, RowMask<acc_t>(d, r, N)};
  }
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kRegisterRowThreads, 1)
    forward_held_kernel(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w,
                        const T* __restrict__ b, T* __restrict__ y, acc_type<T>* __restrict__ mean,
                        acc_type<T>* __restrict__ rstd, dropout::Call d, int64_t M, int64_t N, acc_type<T> eps) {
  const DropoutAddRows<T, acc_type<T>> rows{x, res, d, nullptr, nullptr, N};
  norm_forward_held<true, VEC>(rows, w, b, y, mean, rstd, M, N, eps);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kRegisterRowThreads, 1)
    backward_held_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ res,
                         const T* __restrict__ w, const acc_type<T>* __restrict__ mean,
                         const acc_type<T>* __restrict__ rstd, dropout::Call d, T* __restrict__ dx,
                         T* __restrict__ dres, acc_type<T>* __restrict__ w_part, acc_type<T>* __restrict__ b_part,
                         int64_t M, int64_t N) {
  const DropoutAddRows<T, acc_type<T>> rows{x, res, d, dx, dres, N};
  norm_backward_held<true, VEC>(rows, dy, w, mean, rstd, w_part, b_part, M, N);
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    forward_kernel(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w,
                   const T* __restrict__ b, T* __restrict__ y, acc_type<T>* __restrict__ mean,
                   acc_type<T>* __restrict__ rstd, dropout::Call d, int64_t M, int64_t N, acc_type<T> eps) {
  const DropoutAddRows<T, acc_type<T>> rows{x, res, d, nullptr, nullptr, N};
  cuda::layer_norm_forward_rows<T>(rows, w, b, y, mean, rstd, M, N, eps);
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ res,
                    const T* __restrict__ w, const acc_type<T>* __restrict__ mean,
                    const acc_type<T>* __restrict__ rstd, dropout::Call d, T* __restrict__ dx, T* __restrict__ dres,
                    acc_type<T>* __restrict__ w_part, acc_type<T>* __restrict__ b_part, int64_t M, int64_t N) {
  const DropoutAddRows<T, acc_type<T>> rows{x, res, d, dx, dres, N};
  cuda::layer_norm_backward_rows<T>(rows, dy, w, mean, rstd, w_part, b_part, M, N);
}

}  // namespace

template <typename T>
cudaError_t cuda_forward(const T* x, const T* residual, const T* w, const T* b, T* y, acc_type<T>* mean,
                         acc_type<T>* rstd, dropout::Call d, int64_t M, int64_t N, double eps, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  const unsigned blocks = grid_for(M), threads = row_threads(N, sizeof(T));
  const acc_type<T> e = acc_type<T>(eps);
  launch_rows<T>(
      N, {x, residual, w, b, y},
      [&](auto width) {
        constexpr int VEC = decltype(width)::value;
        forward_held_kernel<T, VEC><<<blocks, threads, 0, stream>>>(x, residual, w, b, y, mean, rstd, d, M, N, e);
      },
      [&] { forward_kernel<T><<<blocks, threads, 0, stream>>>(x, residual, w, b, y, mean, rstd, d, M, N, e); });
  return cudaGetLastError();
}

template <typename T>
cudaError_t cuda_backward(const T* dy, const T* x, const T* residual, const T* w, const acc_type<T>* mean,
                          const acc_type<T>* rstd, dropout::Call d, T* dx, T* dres, T* dw, T* db, acc_type<T>* w_part,
                          acc_type<T>* b_part, int64_t parts, int64_t M, int64_t N, cudaStream_t stream) {
  return cuda::row_backward(dw, db, w_part, b_part, parts, M, N, stream, [&](acc_type<T>* wp, acc_type<T>* bp) {
    const unsigned blocks = static_cast<unsigned>(parts), threads = row_threads(N, sizeof(T));
    launch_rows<T>(
        N, {dy, x, residual, w, dx, dres},
        [&](auto width) {
          constexpr int VEC = decltype(width)::value;
          backward_held_kernel<T, VEC><<<blocks, threads, 0, stream>>>(dy, x, residual, w, mean, rstd, d, dx, dres,
                                                                        wp, bp, M, N);
        },
        [&] {
          backward_kernel<T><<<blocks, threads, 0, stream>>>(dy, x, residual, w, mean, rstd, d, dx, dres, wp, bp, M, N);
        });
  });
}

#define HETRAIN_DROPOUT_ADD_LAYER_NORM_INSTANTIATE(T)                                                           \
  template cudaError_t cuda_forward<T>(const T*, const T*, const T*, const T*, T*, acc_type<T>*, acc_type<T>*, \
                                       dropout::Call, int64_t, int64_t, double, cudaStream_t);                \
  template cudaError_t cuda_backward<T>(const T*, const T*, const T*, const T*, const acc_type<T>*,            \
                                        const acc_type<T>*, dropout::Call, T*, T*, T*, T*, acc_type<T>*,       \
                                        acc_type<T>*, int64_t, int64_t, int64_t, cudaStream_t);

HETRAIN_DROPOUT_ADD_LAYER_NORM_INSTANTIATE(float)
HETRAIN_DROPOUT_ADD_LAYER_NORM_INSTANTIATE(double)
HETRAIN_DROPOUT_ADD_LAYER_NORM_INSTANTIATE(__half)
HETRAIN_DROPOUT_ADD_LAYER_NORM_INSTANTIATE(__nv_bfloat16)

#undef HETRAIN_DROPOUT_ADD_LAYER_NORM_INSTANTIATE

}  // namespace dropout_add_layer_norm
}  // namespace hetrain
