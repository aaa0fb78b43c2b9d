// Launch shapes the row-wise CUDA kernels share, host side only (the bindings include this; the
// device helpers are in rows.cuh). One thread block per row; backward kernels write one partial row
// per block for each parameter gradient, summed per column afterwards.
//
// Rows of up to kRegisterRowThreads * row_elems elements are held in registers: each thread reads its
// share of a row once (in packs where it can) and keeps it for every pass the kernel makes over the row,
// and a backward block keeps its parameter-gradient sums in registers across its rows, writing its partial
// rows once. Longer rows are re-read per pass, four elements a thread up to kMaxRowThreads threads.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>

namespace hetrain {
namespace cuda {

constexpr int kMaxRowThreads = 1024;
// At most 512 threads, so a register-row kernel may use up to 128 registers a thread without spilling.
constexpr int kRegisterRowThreads = 512;

// Elements a thread holds of a row in registers: 16 (4 for 8-byte types), up to 64 bytes of each row a
// backward kernel holds (x, dy, the weight; the residual in dropout+add+LayerNorm), beside its gradient sums.
constexpr int row_elems(int elem_bytes) { return elem_bytes == 8 ? 4 : 16; }

inline bool row_in_registers(int64_t N, int elem_bytes) {
  return N <= int64_t(kRegisterRowThreads) * row_elems(elem_bytes);
}

// Threads per row of a row kernel that re-reads its rows: about four elements each, a whole number of
// warps, at most kMaxRowThreads.
inline int threads_for(int64_t N) {
  const int64_t warps = ((N + 3) / 4 + 31) / 32;
  return static_cast<int>(std::clamp<int64_t>(warps * 32, 32, kMaxRowThreads));
}

// Threads per row of the row kernels (LayerNorm, RMSNorm, dropout+add+LayerNorm) for rows of N elements
// of elem_bytes each: row_elems a thread in registers, or threads_for(N) re-reading.
inline int row_threads(int64_t N, int elem_bytes) {
  if (!row_in_registers(N, elem_bytes)) return threads_for(N);
  const int64_t per_thread = row_elems(elem_bytes);
  const int64_t warps = ((N + per_thread - 1) / per_thread + 31) / 32;
  return static_cast<int>(std::clamp<int64_t>(warps * 32, 32, kRegisterRowThreads));
}

// Blocks for `rows` rows (each block strides over the rows past the grid).
inline unsigned grid_for(int64_t rows) { return static_cast<unsigned>(std::min<int64_t>(rows, INT_MAX)); }

// Row blocks a row kernel's backward runs for M rows of N: about 16 warps resident per SM, enough loads in
// flight to cover the memory's latency while each block works through its rows one after another, and
// few enough partial rows that summing them stays small beside the rows themselves. The workspace holds
// backward_parts(...) * N values per gradient.
inline int64_t backward_parts(int64_t M, int64_t N, int elem_bytes, int sm_count) {
  const int64_t warps = row_threads(N, elem_bytes) / 32;
  const int64_t per_sm = std::max<int64_t>(1, 16 / warps);
  return std::max<int64_t>(1, std::min<int64_t>(M, per_sm * static_cast<int64_t>(sm_count)));
}

}  // namespace cuda
}  // namespace hetrain
