// Grouping the rows of a row-sparse gradient by the table row they belong to: the positions of `index`
// sorted by index (stable, so each row's repeats keep the order they were looked up in) and the start of
// each run of equal indices. Shared by the sparse embedding gradient and the lazy AdamW step.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace hetrain {

inline void runs_of_equal_indices(const int64_t* index, int64_t n, std::vector<int64_t>& order,
                                  std::vector<int64_t>& starts) {
  order.resize(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return index[a] < index[b]; });
  starts.clear();
  for (int64_t i = 0; i < n; ++i)
    if (i == 0 || index[order[i]] != index[order[i - 1]]) starts.push_back(i);
  starts.push_back(n);
}

}  // namespace hetrain
