// The emulator's scheduler (emulator.h): one coroutine per CUDA thread of the running block, barriers that
// open when all of their threads have arrived, and the runtime calls the kernels make.
#include "emulator.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

namespace hetrain_emu {

dim3 thread_index, block_index, block_dim, grid_dim;

namespace {

constexpr unsigned kWarp = 32;
constexpr unsigned kMaxBlockThreads = 1024;
constexpr std::size_t kStackBytes = 128 * 1024;
constexpr std::size_t kMaxShuffleBytes = 16;

enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Done, Faulted };

struct Thread {
  ucontext_t context;
  State state;
};

struct Scheduler {
  ucontext_t main;
  std::vector<Thread> threads;
  unsigned current = 0;
  const std::function<void()>* body = nullptr;
  char* stacks = nullptr;
  std::size_t stack_threads = 0;
  unsigned char exchange[kMaxBlockThreads][kMaxShuffleBytes];
  cudaError_t error = cudaSuccess;
  std::string message;
  uint64_t shuffle_seed = 0;  // 0: the lowest-numbered runnable thread runs next; else a random one
  uint64_t rng = 0;
  uint64_t launches = 0;
};

Scheduler sched;

void record(cudaError_t error, const std::string& message) {
  if (sched.error != cudaSuccess) return;  // the first fault explains the rest
  sched.error = error;
  sched.message = message;
}

std::string where() {
  char buf[160];
  std::snprintf(buf, sizeof buf, " (block %u,%u,%u, thread %u,%u,%u)", block_index.x, block_index.y,
                block_index.z, thread_index.x, thread_index.y, thread_index.z);
  return buf;
}

void yield(State state) {
  Thread& t = sched.threads[sched.current];
  t.state = state;
  swapcontext(&t.context, &sched.main);
}

[[noreturn]] void fault(const std::string& message) {
  record(cudaErrorLaunchFailure, message + where());
  yield(State::Faulted);
  std::abort();  // a faulted thread is never resumed
}

void thread_main() {
  (*sched.body)();
  sched.threads[sched.current].state = State::Done;  // uc_link returns to the scheduler
}

uint64_t next_random() {
  uint64_t z = (sched.rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void set_thread_index(unsigned linear) {
  thread_index = dim3(linear % block_dim.x, (linear / block_dim.x) % block_dim.y, linear / (block_dim.x * block_dim.y));
}

bool ensure_stacks(std::size_t threads) {
  if (threads <= sched.stack_threads) return true;
  if (sched.stacks) munmap(sched.stacks, sched.stack_threads * kStackBytes);
  void* p = mmap(nullptr, threads * kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  sched.stacks = p == MAP_FAILED ? nullptr : static_cast<char*>(p);
  sched.stack_threads = sched.stacks ? threads : 0;
  return sched.stacks != nullptr;
}

// Why no thread of the block can run although some have not returned: recorded as the launch's fault.
void report_deadlock(unsigned n, unsigned at_block, unsigned done) {
  std::string msg = at_block && done ? "__syncthreads reached by " + std::to_string(at_block) + " of " +
                                           std::to_string(n) + " threads; the others returned"
                                     : "threads of one block wait at different barriers (divergent "
                                       "__syncthreads or warp shuffle)";
  char buf[96];
  std::snprintf(buf, sizeof buf, " (block %u,%u,%u)", block_index.x, block_index.y, block_index.z);
  record(cudaErrorLaunchFailure, msg + buf);
}

// Runs one block to completion; false on a fault. A barrier opens as soon as its last thread arrives, and
// the next thread to run is the lowest-numbered runnable one (so a warp runs ahead of the others as far as
// the block's barriers let it: warp-level races show) or, with a shuffle seed, a random runnable one.
bool run_block(unsigned n) {
  std::vector<unsigned> runnable(n), at_warp((n + kWarp - 1) / kWarp, 0);
  std::iota(runnable.begin(), runnable.end(), 0u);
  unsigned at_block = 0, done = 0;
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = sched.threads[i];
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = sched.stacks + i * kStackBytes;
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = &sched.main;
    makecontext(&t.context, thread_main, 0);
    t.state = State::Runnable;
  }
  while (done < n) {
    if (runnable.empty()) {
      report_deadlock(n, at_block, done);
      return false;
    }
    std::size_t pick = 0;
    if (sched.shuffle_seed) {
      pick = next_random() % runnable.size();
    } else {
      for (std::size_t k = 1; k < runnable.size(); ++k) pick = runnable[k] < runnable[pick] ? k : pick;
    }
    const unsigned i = runnable[pick];
    runnable[pick] = runnable.back();
    runnable.pop_back();
    sched.current = i;
    set_thread_index(i);
    swapcontext(&sched.main, &sched.threads[i].context);
    switch (sched.threads[i].state) {
      case State::Faulted:
        return false;
      case State::Done:
        ++done;
        break;
      case State::AtBlockBarrier:
        if (++at_block == n) {
          at_block = 0;
          for (unsigned k = 0; k < n; ++k) sched.threads[k].state = State::Runnable;
          runnable.resize(n);
          std::iota(runnable.begin(), runnable.end(), 0u);
        }
        break;
      case State::AtWarpBarrier: {
        const unsigned w = i / kWarp, first = w * kWarp;
        if (first + kWarp > n) {
          record(cudaErrorLaunchFailure, "warp shuffle in a partial warp: the block has " + std::to_string(n) +
                                             " threads, not a multiple of 32");
          return false;
        }
        if (++at_warp[w] == kWarp) {
          at_warp[w] = 0;
          for (unsigned k = first; k < first + kWarp; ++k) {
            sched.threads[k].state = State::Runnable;
            runnable.push_back(k);
          }
        }
        break;
      }
      case State::Runnable:
        break;
    }
  }
  return true;
}

}  // namespace

void run_grid(const Config& config, const std::function<void()>& body) {
  ++sched.launches;
  const dim3 g = config.grid, b = config.block;
  const uint64_t n = uint64_t(b.x) * b.y * b.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.y > 65535 || g.z > 65535 || n == 0 || n > kMaxBlockThreads ||
      b.z > 64) {
    record(cudaErrorInvalidConfiguration, "invalid launch configuration: grid (" + std::to_string(g.x) + "," +
                                              std::to_string(g.y) + "," + std::to_string(g.z) + "), block (" +
                                              std::to_string(b.x) + "," + std::to_string(b.y) + "," +
                                              std::to_string(b.z) + ")");
    return;
  }
  if (!ensure_stacks(n)) {
    record(cudaErrorLaunchFailure, "could not map the emulated threads' stacks");
    return;
  }
  sched.threads.resize(n);
  sched.body = &body;
  sched.rng = sched.shuffle_seed;
  grid_dim = g;
  block_dim = b;
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) {
        block_index = dim3(x, y, z);
        if (!run_block(static_cast<unsigned>(n))) return;
      }
}

void sync_block() { yield(State::AtBlockBarrier); }

void sync_warp_then_exchange(unsigned mask, const void* mine, void* theirs, std::size_t bytes, unsigned source_lane) {
  if (mask != 0xffffffffu) fault("warp shuffle with a partial mask: the emulated kernels use full-warp shuffles");
  if (bytes > kMaxShuffleBytes) fault("warp shuffle of a value over 16 bytes");
  const unsigned self = sched.current, warp_first = self - self % kWarp;
  std::memcpy(sched.exchange[self], mine, bytes);
  yield(State::AtWarpBarrier);  // every lane has offered its value
  std::memcpy(theirs, sched.exchange[warp_first + (source_lane % kWarp)], bytes);
  yield(State::AtWarpBarrier);  // every lane has read before any offers its next value
}

cudaError_t take_error() {
  const cudaError_t e = sched.error;
  sched.error = cudaSuccess;
  return e;
}

}  // namespace hetrain_emu

cudaError_t cudaMemsetAsync(void* p, int value, std::size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = 2;
  return cudaSuccess;
}

extern "C" {

// The message of the last fault (empty when none), kept until the next fault.
const char* hetrain_emu_error_message() { return hetrain_emu::sched.message.c_str(); }

// 0: the lowest-numbered runnable thread runs next (a warp runs ahead as far as the barriers let it);
// otherwise a random runnable one, drawn from this seed (the same draws for each launch).
void hetrain_emu_set_shuffle_seed(uint64_t seed) { hetrain_emu::sched.shuffle_seed = seed; }

// Kernel launches since the library was loaded.
uint64_t hetrain_emu_launches() { return hetrain_emu::sched.launches; }
}
