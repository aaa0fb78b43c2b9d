// The row-sparse gradient of an embedding table on the CPU, coalesced in one pass: the sorted table rows a
// batch looked up (the padding row left out) and, for each, the sum of the upstream gradient rows of its
// lookups. torch's sparse embedding backward hands over one (index, row) pair per lookup and, with a
// padding index, first copies every non-padding row of the upstream gradient into a new tensor (at BERT's
// 16384 x 768 that copy was most of the table's backward); here each upstream row is read once and each
// looked-up table row written once, already coalesced, so the optimizer's step has no repeats to sum.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu_loops.h"
#include "index_runs.h"

namespace hetrain {
namespace {


// dst row u = the sum, in the order they were looked up, of the src rows of run runs[u].
template <typename scalar_t>
void sum_runs(const scalar_t* src, scalar_t* dst, const std::vector<int64_t>& order, const std::vector<int64_t>& starts,
              const std::vector<int64_t>& runs, int64_t H) {
  using acc_t = acc_type<scalar_t>;
  const int64_t U = static_cast<int64_t>(runs.size());
  at::parallel_for(0, U, std::max<int64_t>(1, 4096 / std::max<int64_t>(H, 1)), [&](int64_t u0, int64_t u1) {
    std::vector<acc_t> sum(H);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t r = runs[u];
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t i = starts[r]; i < starts[r + 1]; ++i) {
        const scalar_t* row = src + order[i] * H;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) sum[j] += acc_t(row[j]);
      }
      scalar_t* out = dst + u * H;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) out[j] = narrow<scalar_t>(sum[j]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> embedding_sparse_grad_cpu(const at::Tensor& grad, const at::Tensor& ids,
                                                             int64_t num_rows, int64_t padding_idx) {
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
              "hetrain.embedding_sparse_grad: ids must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()) && grad.dim() == ids.dim() + 1 &&
                  grad.sizes().slice(0, ids.dim()) == ids.sizes(),
              "hetrain.embedding_sparse_grad: grad must be a floating tensor of shape ids.shape + (H,): ids ",
              ids.sizes(), ", grad ", grad.sizes(), " ", grad.scalar_type());
  const int64_t n = ids.numel(), H = grad.size(-1);
  const at::Tensor idx = ids.reshape({n}).to(at::kLong).contiguous();
  const at::Tensor g = grad.reshape({n, H}).contiguous();
  const int64_t* index = idx.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(index[i] >= 0 && index[i] < num_rows, "hetrain.embedding_sparse_grad: id ", index[i],
                " is outside the table's ", num_rows, " rows");
  std::vector<int64_t> order, starts;
  runs_of_equal_indices(index, n, order, starts);
  std::vector<int64_t> runs;  // the runs that are not the padding row
  runs.reserve(starts.size());
  for (size_t r = 0; r + 1 < starts.size(); ++r)
    if (index[order[starts[r]]] != padding_idx) runs.push_back(static_cast<int64_t>(r));
  const int64_t U = static_cast<int64_t>(runs.size());
  at::Tensor rows = at::empty({1, U}, idx.options());
  at::Tensor values = at::empty({U, H}, g.options());
  int64_t* row_ids = rows.data_ptr<int64_t>();
  for (int64_t u = 0; u < U; ++u) row_ids[u] = index[order[starts[runs[u]]]];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "embedding_sparse_grad_cpu", [&] {
    sum_runs<scalar_t>(g.const_data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), order, starts, runs, H);
  });
  return {rows, values};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hetrain_C, m) {
  m.def("embedding_sparse_grad(Tensor grad, Tensor ids, int num_rows, int padding_idx) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hetrain_C, CPU, m) { m.impl("embedding_sparse_grad", &embedding_sparse_grad_cpu); }

}  // namespace hetrain
