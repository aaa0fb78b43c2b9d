// Softmax cross-entropy over a chunk of logits on the CPU, one row per step: the loss of every row and,
// when a gradient scale is given, d(loss)/d(logits) written over the logits in place. The GEMMs around
// it (logits = hidden @ W^T, the gradient products) stay with torch's BLAS. Every pass vectorises: the max and
// sum in lanes (cpu_loops.h), exp as a polynomial for float (exp_flushed, so a logit masked with -inf gets
// exactly 0; std::exp kept the loop scalar).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu_loops.h"
#include "linear_cross_entropy_math.h"

namespace hetrain {
namespace {

namespace lce = linear_cross_entropy;

// logits: float32/float64, or bf16/fp16 (the GEMM's output where its dtype is the fast one); the statistics,
// the loss and the gradient's arithmetic are in acc_t either way. 16-bit rows keep their exps in a float32 row
// of the thread's own (in L1), so each gradient element is rounded once, when it is written.
template <typename scalar_t>
void cross_entropy_rows(scalar_t* logits, acc_type<scalar_t>* loss, const int64_t* target,
                        const acc_type<scalar_t>* scale, int64_t scale_stride, int64_t M, int64_t V,
                        int64_t ignore_index, double smoothing) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kInPlace = std::is_same_v<scalar_t, acc_t>;
  const acc_t keep = acc_t(1) - acc_t(smoothing), spread = acc_t(smoothing) / acc_t(V);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> exps(kInPlace || !scale ? 0 : V);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* z = logits + r * V;
      const int64_t t = target[r];
      if (t == ignore_index) {
        loss[r] = acc_t(0);
        if (scale) std::fill(z, z + V, scalar_t(0));
        continue;
      }
      TORCH_CHECK(t >= 0 && t < V, "hetrain.linear_cross_entropy: target ", t, " in row ", r,
                  " is outside [0, ", V, ") and is not ignore_index (", ignore_index, ")");
      acc_t m, z_sum;  // z_sum unused: the loss sums distances below m (row_loss), in the exp pass
      lane_max_sum<acc_t>(V, [&](int64_t j) { return widen(z[j]); }, &m, &z_sum);
      const acc_t m_minus_target = m - widen(z[t]);
      acc_t s = 0, below = 0;
      if (scale) {
        // Keep exp(z - m) (in place for float32/float64): the gradient pass then needs no second exp.
        acc_t* e = kInPlace ? reinterpret_cast<acc_t*>(z) : exps.data();
#pragma omp simd reduction(+ : s, below)
        for (int64_t j = 0; j < V; ++j) {
          const acc_t zj = widen(z[j]);
          e[j] = exp_flushed(zj - m);
          s += e[j];
          below += m - zj;
        }
        const acc_t inv_s = acc_t(1) / s, sc = scale[r * scale_stride];
        const acc_t p_target = e[t] * inv_s;
#pragma omp simd
        for (int64_t j = 0; j < V; ++j)
          z[j] = narrow<scalar_t>(lce::logit_grad<acc_t>(e[j] * inv_s, false, keep, spread, sc));
        z[t] = narrow<scalar_t>(lce::logit_grad<acc_t>(p_target, true, keep, spread, sc));
      } else {
#pragma omp simd reduction(+ : s, below)
        for (int64_t j = 0; j < V; ++j) {
          const acc_t zj = widen(z[j]);
          s += exp_flushed(zj - m);
          below += m - zj;
        }
      }
      loss[r] = lce::row_loss<acc_t>(std::log(s), m_minus_target, below, keep, spread);
    }
  });
}

void cross_entropy_rows_cpu(at::Tensor& logits, at::Tensor& loss, const at::Tensor& target,
                            const std::optional<at::Tensor>& scale, int64_t ignore_index, double label_smoothing) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(),
              "hetrain.linear_cross_entropy: logits must be a contiguous 2-D (rows, vocab) tensor, got shape ",
              logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "hetrain.linear_cross_entropy: logits must be a floating-point tensor, got ", logits.scalar_type());
  const at::ScalarType stats = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t M = logits.size(0), V = logits.size(1);
  TORCH_CHECK(loss.dim() == 1 && loss.size(0) == M && loss.is_contiguous() && loss.scalar_type() == stats,
              "hetrain.linear_cross_entropy: loss must be a contiguous (", M, ",) ", stats, " tensor for ",
              logits.scalar_type(), " logits, got ", loss.sizes(), " ", loss.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == M && target.scalar_type() == at::kLong,
              "hetrain.linear_cross_entropy: target must be (", M, ",) int64, got ", target.sizes(), " ",
              target.scalar_type());
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1,
              "hetrain.linear_cross_entropy: label_smoothing must be in [0, 1], got ", label_smoothing);
  if (scale) {
    TORCH_CHECK(scale->dim() == 1 && scale->size(0) == M && scale->scalar_type() == stats,
                "hetrain.linear_cross_entropy: scale must be (", M, ",) ", stats, ", got ", scale->sizes(), " ",
                scale->scalar_type());
  }
  TORCH_CHECK(loss.device() == logits.device() && target.device() == logits.device() &&
                  (!scale || scale->device() == logits.device()),
              "hetrain.linear_cross_entropy: loss, target and scale must be on the logits' device ", logits.device());
  const at::Tensor tc = target.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_rows_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    cross_entropy_rows<scalar_t>(logits.data_ptr<scalar_t>(), loss.data_ptr<acc_t>(), tc.const_data_ptr<int64_t>(),
                                 scale ? scale->const_data_ptr<acc_t>() : nullptr, scale ? scale->stride(0) : 0, M, V,
                                 ignore_index, label_smoothing);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hetrain_C, m) {
  m.def(
      "cross_entropy_rows_(Tensor(a!) logits, Tensor(b!) loss, Tensor target, Tensor? scale, int ignore_index,"
      " float label_smoothing) -> ()");
}

TORCH_LIBRARY_IMPL(hetrain_C, CPU, m) { m.impl("cross_entropy_rows_", &cross_entropy_rows_cpu); }

}  // namespace hetrain
