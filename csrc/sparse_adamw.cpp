// A lazy AdamW step for a row-sparse gradient (an embedding table's): the rows a batch looked up
// are updated, the others keep their values and moments. The gradient arrives as torch builds it
// for nn.Embedding(sparse=True): one (index, row of values) pair per looked-up token, unsorted and
// with repeats. Sorting the indices and summing each row's repeats here, then stepping that row,
// touches each row of the parameter and its two moments once, where torch's SparseAdam coalesces
// the gradient and then builds sparse tensors of the moments.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "adamw_math.h"
#include "cpu_loops.h"
#include "index_runs.h"

namespace hetrain {
namespace {


template <typename scalar_t>
void step_rows(scalar_t* p, scalar_t* m, scalar_t* v, const int64_t* index, const scalar_t* values, int64_t n,
               int64_t H, const adamw::Coefficients& c) {
  using acc_t = acc_type<scalar_t>;
  std::vector<int64_t> order, starts;
  runs_of_equal_indices(index, n, order, starts);
  const int64_t rows = static_cast<int64_t>(starts.size()) - 1;
  const acc_t decay = acc_t(c.decay), one_minus_b1 = acc_t(c.one_minus_beta1), b2 = acc_t(c.beta2),
              one_minus_b2 = acc_t(c.one_minus_beta2), step_size = acc_t(c.step_size), bc2_sqrt = acc_t(c.bc2_sqrt),
              eps = acc_t(c.eps);
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(H, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> g(H);
    for (int64_t r = r0; r < r1; ++r) {
      // The row's gradient: its repeats summed in the order they were looked up.
      std::fill(g.begin(), g.end(), acc_t(0));
      for (int64_t i = starts[r]; i < starts[r + 1]; ++i) {
        const scalar_t* row = values + order[i] * H;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) g[j] += acc_t(row[j]);
      }
      const int64_t offset = index[order[starts[r]]] * H;
      scalar_t* pr = p + offset;
      scalar_t* mr = m + offset;
      scalar_t* vr = v + offset;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        acc_t pj = acc_t(pr[j]), mj = acc_t(mr[j]), vj = acc_t(vr[j]);
        adamw::update<acc_t>(pj, mj, vj, g[j], decay, one_minus_b1, b2, one_minus_b2, step_size, bc2_sqrt, eps);
        pr[j] = narrow<scalar_t>(pj);
        mr[j] = narrow<scalar_t>(mj);
        vr[j] = narrow<scalar_t>(vj);
      }
    }
  });
}

void check_state(const char* name, const at::Tensor& t, const at::Tensor& param) {
  TORCH_CHECK(t.sizes() == param.sizes() && t.scalar_type() == param.scalar_type() && t.device() == param.device(),
              "hetrain.sparse_adamw: ", name, " must match the parameter (", param.sizes(), " ",
              param.scalar_type(), " on ", param.device(), "), got ", t.sizes(), " ", t.scalar_type(), " on ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), "hetrain.sparse_adamw: ", name, " must be contiguous (it is updated in place)");
}

void sparse_adamw_cpu(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                      const at::Tensor& indices, const at::Tensor& values, int64_t step, double lr, double beta1,
                      double beta2, double eps, double weight_decay) {
  TORCH_CHECK(param.dim() == 2 && (param.scalar_type() == at::kFloat || param.scalar_type() == at::kDouble),
              "hetrain.sparse_adamw: the parameter must be a 2-D float32 or float64 table, got shape ",
              param.sizes(), " ", param.scalar_type());
  check_state("param", param, param);
  check_state("exp_avg", exp_avg, param);
  check_state("exp_avg_sq", exp_avg_sq, param);
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong,
              "hetrain.sparse_adamw: indices must be 1-D int64, got ", indices.sizes(), " ", indices.scalar_type());
  TORCH_CHECK(values.dim() == 2 && values.size(0) == indices.size(0) && values.size(1) == param.size(1) &&
                  values.scalar_type() == param.scalar_type(),
              "hetrain.sparse_adamw: values must be (", indices.size(0), ", ", param.size(1), ") ",
              param.scalar_type(), ", one row per index, got ", values.sizes(), " ", values.scalar_type());
  TORCH_CHECK(step >= 1, "hetrain.sparse_adamw: step counts from 1, got ", step);
  TORCH_CHECK(lr >= 0 && eps >= 0 && weight_decay >= 0 && beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1,
              "hetrain.sparse_adamw: need lr, eps, weight_decay >= 0 and betas in [0, 1), got lr=", lr, " betas=(",
              beta1, ", ", beta2, ") eps=", eps, " weight_decay=", weight_decay);
  const at::Tensor idx = indices.contiguous();
  const int64_t* index = idx.const_data_ptr<int64_t>();
  const int64_t rows = param.size(0);
  for (int64_t i = 0; i < idx.numel(); ++i)
    TORCH_CHECK(index[i] >= 0 && index[i] < rows, "hetrain.sparse_adamw: index ", index[i],
                " is outside the table's ", rows, " rows");
  const at::Tensor vals = values.contiguous();
  const adamw::Coefficients c = adamw::coefficients(step, lr, beta1, beta2, eps, weight_decay);
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "sparse_adamw_cpu", [&] {
    step_rows<scalar_t>(param.data_ptr<scalar_t>(), exp_avg.data_ptr<scalar_t>(), exp_avg_sq.data_ptr<scalar_t>(),
                        index, vals.const_data_ptr<scalar_t>(), idx.numel(), param.size(1), c);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hetrain_C, m) {
  m.def(
      "sparse_adamw_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor indices, Tensor values,"
      " int step, float lr, float beta1, float beta2, float eps, float weight_decay) -> ()");
}

TORCH_LIBRARY_IMPL(hetrain_C, CPU, m) { m.impl("sparse_adamw_", &sparse_adamw_cpu); }

}  // namespace hetrain
