// Runs the CUDA kernels of csrc/cuda on the CPU, so a machine without a GPU checks their indexing, block
// reductions, barriers and partial rows, not only their per-element math (which the CPU kernels share).
//
// Each thread of a block is a coroutine (ucontext) on the calling OS thread: it runs until it reaches a
// barrier (__syncthreads, a warp shuffle) or returns, and a barrier opens when every thread it names has
// reached it. Blocks run one after another, so a kernel's `__shared__` arrays (function statics here) are
// one block's shared memory; each block finds them filled with 0xFF bytes (NaN), not the previous block's
// values. What the GPU leaves undefined is an error here: a __syncthreads some threads never reach, a
// shuffle in a partial warp, threads waiting at different barriers (different __syncthreads or shuffle calls
// in the source, even where every thread reaches one), undefined behaviour in a kernel (under
// UndefinedBehaviorSanitizer). A launch of more threads per block than the kernel's __launch_bounds__ fails,
// as on a GPU. The order in which threads run between barriers, and the order of the blocks,
// can be shuffled (a seed), so a kernel whose result depends on it has a race.
//
// What it cannot show: threads switch only at barriers, so two threads' unsynchronised read-modify-writes of
// one location (a race no barrier separates) never interleave; and blocks never overlap, so a race between
// blocks shows only where the result depends on their order.
//
// The launch syntax `kernel<<<grid, block, shared, stream>>>(args)` is rewritten to
// `hetrain_emu::launch(hetrain_emu::Config(grid, block, shared, stream), kernel, args)` before compiling
// (hetrain/checks/cuda_emulator.py).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace hetrain_emu {

struct Config {
  dim3 grid, block;
  Config(dim3 grid_, dim3 block_, std::size_t shared_bytes = 0, cudaStream_t stream = nullptr)
      : grid(grid_), block(block_) {
    (void)shared_bytes;  // dynamic shared memory: no kernel here uses it
    (void)stream;        // one stream: launches run in order, as on any single stream
  }
};

// Runs `body` as every thread of every block of `config`; a fault sets the error cudaGetLastError returns.
void run_grid(const Config& config, const std::function<void()>& body);

// A launch: the arguments are converted to the kernel's parameter types and copied, as CUDA does.
template <typename... Params, typename... Args>
void launch(const Config& config, void (*kernel)(Params...), Args&&... args) {
  const std::tuple<std::remove_cv_t<Params>...> params(std::forward<Args>(args)...);
  run_grid(config, [&] { std::apply(kernel, params); });
}

}  // namespace hetrain_emu
