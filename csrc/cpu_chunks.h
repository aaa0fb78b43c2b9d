// How the CPU kernels that reduce through partial sums split their work: one partial row per chunk of items,
// summed afterwards column by column.
//
// One chunk per thread regardless of size made a tiny problem (8 x 64 rows) wait for every thread to be scheduled:
// on a loaded 2-core host the RMSNorm backward's median went from tens of microseconds to 16 ms. Bounding the
// chunk count by the work, as the forward kernels' row grain does, runs such a problem inline.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace hetrain {

// Elements per chunk below which another chunk costs more to schedule than it saves.
constexpr int64_t kChunkGrain = 16384;

// Chunks for `items` items of `per_item` elements each: at most one per thread and one per item, and few enough
// that each holds about kChunkGrain elements. A function of (items, per_item, threads) only, so the order of the
// partial sums is the same from call to call.
inline int64_t chunk_count(int64_t items, int64_t per_item) {
  const int64_t work = items * std::max<int64_t>(per_item, 1);
  const int64_t by_work = (work + kChunkGrain - 1) / kChunkGrain;
  return std::max<int64_t>(1, std::min<int64_t>({by_work, int64_t(at::get_num_threads()), items}));
}

// Columns per task when summing `chunks` partial rows: each task adds about kChunkGrain elements.
inline int64_t column_grain(int64_t chunks) {
  return std::max<int64_t>(256, kChunkGrain / std::max<int64_t>(chunks, 1));
}

}  // namespace hetrain
