// CUDA dropout + residual add + LayerNorm: one thread block per row (rows strided over the grid). The
// pre-norm sum s = x * m + residual is recomputed in every pass rather than stored (the hash of each
// element is a few integer multiplies); the formulas come from dropout_math.h and layer_norm_math.h,
// shared with the CPU kernel. Backward writes one partial dW/dB row per block, summed per column by a
// second kernel.
#include "dropout_add_layer_norm_kernel.h"

#include "../dropout_math.h"
#include "../layer_norm_math.h"
#include "rows.cuh"

namespace hetrain {
namespace dropout_add_layer_norm {
namespace {

using namespace cuda;  // rows.cuh: block_sum, grid_for, threads_for, kMaxRowThreads; convert.cuh: load, store

constexpr int kMaxThreads = kMaxRowThreads;

// A thread's dropout multipliers along its elements of row r (the k-th is element threadIdx.x + k *
// blockDim.x): drawn in a kernel's first pass over the row, the decisions for the first 32 kept as bits
// for the later passes, which would otherwise hash every element again. p = 0 (threshold 0) keeps every
// element with scale 1, without hashing.
template <typename acc_t>
class RowMask {
 public:
  __device__ RowMask(const dropout::Call& d, int64_t r, int64_t N)
      : keys_(dropout::run_keys(d.seed, d.offset + static_cast<uint64_t>(r) * static_cast<uint64_t>(N))),
        threshold_(d.threshold),
        scale_(acc_t(d.scale)) {}

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

  dropout::RunKeys keys_;
  uint32_t threshold_;
  acc_t scale_;
  uint32_t bits_ = 0;
};

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    forward_kernel(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w,
                   const T* __restrict__ b, T* __restrict__ y, acc_type<T>* __restrict__ mean,
                   acc_type<T>* __restrict__ rstd, dropout::Call d, int64_t M, int64_t N, acc_type<T> eps) {
  using acc_t = acc_type<T>;
  __shared__ acc_t scratch[kMaxThreads / 32];
  for (int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const T* xr = x + r * N;
    const T* rr = res + r * N;
    T* yr = y + r * N;
    RowMask<acc_t> mask(d, r, N);
    auto pre_norm = [&](int64_t j, acc_t m) { return acc_t(load(xr + j)) * m + acc_t(load(rr + j)); };
    acc_t sum = 0;
    int k = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x, ++k) sum += pre_norm(j, mask.draw(j, k));
    const acc_t mu = block_sum(sum, scratch) / acc_t(N);
    acc_t sq = 0;
    k = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x, ++k) {
      const acc_t c = pre_norm(j, mask.again(j, k)) - mu;
      sq += c * c;
    }
    const acc_t rs = layer_norm::rstd<acc_t>(block_sum(sq, scratch) / acc_t(N), eps);
    k = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x, ++k) {
      const acc_t wj = w ? acc_t(load(w + j)) : acc_t(1);
      const acc_t bj = b ? acc_t(load(b + j)) : acc_t(0);
      store(yr + j, layer_norm::forward<acc_t>(pre_norm(j, mask.again(j, k)), mu, rs, wj, bj));
    }
    if (threadIdx.x == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
  }
}

// dres and dx per row; block p adds dy * xhat and dy of its rows into row p of w_part / b_part.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ res,
                    const T* __restrict__ w, const acc_type<T>* __restrict__ mean,
                    const acc_type<T>* __restrict__ rstd, dropout::Call d, T* __restrict__ dx, T* __restrict__ dres,
                    acc_type<T>* __restrict__ w_part, acc_type<T>* __restrict__ b_part, int64_t M, int64_t N) {
  using acc_t = acc_type<T>;
  __shared__ acc_t scratch[kMaxThreads / 32];
  acc_t* pw = w_part ? w_part + blockIdx.x * N : nullptr;
  acc_t* pb = b_part ? b_part + blockIdx.x * N : nullptr;
  for (int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const T* xr = x + r * N;
    const T* rr = res + r * N;
    const T* dyr = dy + r * N;
    RowMask<acc_t> mask(d, r, N);
    const acc_t mu = mean[r], rs = rstd[r];
    const bool first = r == blockIdx.x;  // the block's first row initialises its partial rows
    acc_t sum_g = 0, sum_gx = 0;
    int k = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x, ++k) {
      const acc_t m = mask.draw(j, k);
      const acc_t xhat = (acc_t(load(xr + j)) * m + acc_t(load(rr + j)) - mu) * rs;
      const acc_t dj = load(dyr + j);
      const acc_t g = w ? dj * acc_t(load(w + j)) : dj;
      sum_g += g;
      sum_gx += g * xhat;
    }
    const acc_t mg = block_sum(sum_g, scratch) / acc_t(N);
    const acc_t mgx = block_sum(sum_gx, scratch) / acc_t(N);
    k = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x, ++k) {
      const acc_t m = mask.again(j, k);
      const acc_t xhat = (acc_t(load(xr + j)) * m + acc_t(load(rr + j)) - mu) * rs;
      const acc_t dj = load(dyr + j);
      const acc_t g = w ? dj * acc_t(load(w + j)) : dj;
      const acc_t ds = layer_norm::input_grad<acc_t>(g, xhat, rs, mg, mgx);
      store(dres + r * N + j, ds);
      store(dx + r * N + j, ds * m);
      if (pw) pw[j] = first ? dj * xhat : pw[j] + dj * xhat;
      if (pb) pb[j] = first ? dj : pb[j] + dj;
    }
  }
}

}  // namespace

template <typename T>
cudaError_t cuda_forward(const T* x, const T* residual, const T* w, const T* b, T* y, acc_type<T>* mean,
                         acc_type<T>* rstd, dropout::Call d, int64_t M, int64_t N, double eps, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  forward_kernel<T><<<grid_for(M), threads_for(N), 0, stream>>>(x, residual, w, b, y, mean, rstd, d, M, N,
                                                                 acc_type<T>(eps));
  return cudaGetLastError();
}

template <typename T>
cudaError_t cuda_backward(const T* dy, const T* x, const T* residual, const T* w, const acc_type<T>* mean,
                          const acc_type<T>* rstd, dropout::Call d, T* dx, T* dres, T* dw, T* db, acc_type<T>* w_part,
                          acc_type<T>* b_part, int64_t parts, int64_t M, int64_t N, cudaStream_t stream) {
  if (parts < 1 || parts > std::max<int64_t>(M, 1) || parts > INT_MAX || (dw && !w_part) || (db && !b_part)) {
    return cudaErrorInvalidValue;
  }
  if (N == 0) return cudaSuccess;
  if (M == 0) {  // no rows: the gradients of w and b are zero
    const cudaError_t err = cuda::zero(dw, N, stream);
    return err != cudaSuccess ? err : cuda::zero(db, N, stream);
  }
  backward_kernel<T><<<static_cast<unsigned>(parts), threads_for(N), 0, stream>>>(
      dy, x, residual, w, mean, rstd, d, dx, dres, dw ? w_part : nullptr, db ? b_part : nullptr, M, N);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || (!dw && !db)) return err;
  return cuda::column_sums(w_part, b_part, dw, db, parts, N, stream);
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
