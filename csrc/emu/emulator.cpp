// The emulator's scheduler (emulator.h): one coroutine per CUDA thread of the running block, barriers that
// open when all of their threads have arrived, and the runtime calls the kernels make.
#include "emulator.h"

#include <dlfcn.h>
#include <execinfo.h>
#include <sanitizer/common_interface_defs.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <source_location>
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
  std::source_location site;  // the barrier it waits at (AtBlockBarrier, AtWarpBarrier)
};

// A shared array (a function static, emulator.h) and the block that last filled it with 0xFF bytes.
struct SharedArray {
  void* data;
  std::size_t bytes;
  uint64_t block;
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
  uint64_t blocks = 0;     // blocks started since the library was loaded
  bool in_thread = false;  // an emulated thread is running (not the scheduler or the host code)
  std::vector<SharedArray> shared;
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

// Where in this library's code (file:line) the sanitizer stopped: the first frame of this library below
// the sanitizer's own; empty where it cannot be told.
std::string ub_location() {
  void* frames[32];
  const int n = backtrace(frames, 32);
  Dl_info self{}, frame{};
  if (dladdr(reinterpret_cast<void*>(&ub_location), &self) == 0) return "";
  bool in_sanitizer = false;
  for (int k = 1; k < n; ++k) {
    if (dladdr(frames[k], &frame) == 0) continue;
    if (frame.dli_fbase != self.dli_fbase) {
      in_sanitizer = true;
    } else if (in_sanitizer) {
      char buf[512] = "";
      __sanitizer_symbolize_pc(static_cast<char*>(frames[k]) - 1, "%s:%l", buf, sizeof buf);  // the call
      return buf;
    }
  }
  return "";
}

// The kernels stop at undefined behaviour (-fno-sanitize-recover): the sanitizer prints its report on stderr,
// then calls this before it ends the process. In an emulated thread, the launch fails instead (the thread is
// left, as any faulted thread is), so its caller gets an error naming the kernel's line and the process goes
// on. Elsewhere (host code) the process aborts, so that Python's faulthandler names the call.
void on_undefined_behaviour() {
  if (!sched.in_thread) std::abort();
  const std::string at = ub_location();
  fault("undefined behaviour" + (at.empty() ? std::string() : " at " + at) +
        ", reported by UndefinedBehaviorSanitizer on stderr");
}

// Installed when the library is loaded, and again by each launch: the sanitizer's runtime is one per process
// and holds one callback, which another emulator library may have replaced since.
[[maybe_unused]] const bool ub_callback_installed = (__sanitizer_set_death_callback(on_undefined_behaviour), true);

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

std::string file_line_column(const std::source_location& at) {
  return std::string(at.file_name()) + ":" + std::to_string(at.line()) + ":" + std::to_string(at.column());
}

// Whether threads [first, last) all wait at one barrier's call site; else records the fault naming two sites.
// A GPU leaves threads at different __syncthreads (or shuffles) undefined, even where their counts match.
bool at_one_site(unsigned first, unsigned last, const char* barrier) {
  const std::source_location& a = sched.threads[first].site;
  for (unsigned k = first + 1; k < last; ++k) {
    const std::source_location& b = sched.threads[k].site;
    if (b.line() == a.line() && b.column() == a.column() && std::strcmp(b.file_name(), a.file_name()) == 0) continue;
    char buf[96];
    std::snprintf(buf, sizeof buf, " (block %u,%u,%u)", block_index.x, block_index.y, block_index.z);
    record(cudaErrorLaunchFailure, std::string("threads of one block wait at different barriers: ") + barrier +
                                       " at " + file_line_column(a) + " (thread " + std::to_string(first) +
                                       ") and at " + file_line_column(b) + " (thread " + std::to_string(k) + ")" + buf);
    return false;
  }
  return true;
}

// Runs one block to completion; false on a fault. A barrier opens as soon as its last thread arrives, and
// the next thread to run is the lowest-numbered runnable one (so a warp runs ahead of the others as far as
// the block's barriers let it: warp-level races show) or, with a shuffle seed, a random runnable one.
bool run_block(unsigned n) {
  ++sched.blocks;  // its shared arrays are filled with 0xFF as its first thread declares them (declare_shared)
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
    sched.in_thread = true;
    swapcontext(&sched.main, &sched.threads[i].context);
    sched.in_thread = false;
    switch (sched.threads[i].state) {
      case State::Faulted:
        return false;
      case State::Done:
        ++done;
        break;
      case State::AtBlockBarrier:
        if (++at_block == n) {
          if (!at_one_site(0, n, "__syncthreads")) return false;
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
          if (!at_one_site(first, first + kWarp, "warp shuffle")) return false;
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
  if (g.x == 0 || g.x > 2147483647u || g.y == 0 || g.z == 0 || g.y > 65535 || g.z > 65535 || n == 0 ||
      n > kMaxBlockThreads || b.z > 64) {
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
  // Blocks run in index order or, with a shuffle seed, in a random order: a result that depends on the
  // order of blocks (a sum of blocks' values written without atomics) then differs between the two runs.
  const uint64_t blocks = uint64_t(g.x) * g.y * g.z;
  std::vector<uint64_t> order;
  if (sched.shuffle_seed) {
    order.resize(blocks);
    std::iota(order.begin(), order.end(), uint64_t{0});
    for (uint64_t k = blocks; k > 1; --k) std::swap(order[k - 1], order[next_random() % k]);
  }
  __sanitizer_set_death_callback(on_undefined_behaviour);
  for (uint64_t k = 0; k < blocks; ++k) {
    const uint64_t linear = order.empty() ? k : order[k];
    block_index = dim3(static_cast<unsigned>(linear % g.x), static_cast<unsigned>(linear / g.x % g.y),
                       static_cast<unsigned>(linear / (uint64_t(g.x) * g.y)));
    if (!run_block(static_cast<unsigned>(n))) return;
  }
}

void declare_shared(void* data, std::size_t bytes) {
  auto it =
      std::find_if(sched.shared.begin(), sched.shared.end(), [&](const SharedArray& a) { return a.data == data; });
  if (it == sched.shared.end()) it = sched.shared.insert(sched.shared.end(), {data, bytes, 0});
  if (it->block != sched.blocks) {
    std::memset(data, 0xFF, bytes);
    it->block = sched.blocks;
  }
}

void sync_block(const std::source_location& site) {
  sched.threads[sched.current].site = site;
  yield(State::AtBlockBarrier);
}

void sync_warp_then_exchange(unsigned mask, const void* mine, void* theirs, std::size_t bytes, unsigned source_lane,
                             const std::source_location& site) {
  sched.threads[sched.current].site = site;
  if (mask != 0xffffffffu) fault("warp shuffle with a partial mask: the emulated kernels use full-warp shuffles");
  if (bytes > kMaxShuffleBytes) fault("warp shuffle of a value over 16 bytes");
  const unsigned self = sched.current, warp_first = self - self % kWarp;
  std::memcpy(sched.exchange[self], mine, bytes);
  yield(State::AtWarpBarrier);  // every lane has offered its value
  std::memcpy(theirs, sched.exchange[warp_first + (source_lane % kWarp)], bytes);
  yield(State::AtWarpBarrier);  // every lane has read before any offers its next value
}

void check_launch_bounds(unsigned max_threads, unsigned, unsigned) {
  const uint64_t n = uint64_t(block_dim.x) * block_dim.y * block_dim.z;
  if (n <= max_threads) return;
  record(cudaErrorLaunchOutOfResources, "too many resources requested for launch: a block of " + std::to_string(n) +
                                            " threads, over the kernel's __launch_bounds__(" +
                                            std::to_string(max_threads) + ")");
  yield(State::Faulted);
  std::abort();  // a faulted thread is never resumed
}

cudaError_t take_error() {
  const cudaError_t e = sched.error;
  sched.error = cudaSuccess;
  return e;
}

void clear_error() {
  sched.error = cudaSuccess;
  sched.message.clear();
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

// The message of the first fault since hetrain_emu_clear_error (empty when none). cudaGetLastError leaves it:
// an entry point takes its launches' errors before its caller reads the message.
const char* hetrain_emu_error_message() { return hetrain_emu::sched.message.c_str(); }

// Forgets the error and its message, before a call: an error the call returns without a fault (its arguments
// refused) has no message, not an earlier call's.
void hetrain_emu_clear_error() { hetrain_emu::clear_error(); }

// 0: the lowest-numbered runnable thread runs next (a warp runs ahead as far as the barriers let it);
// otherwise a random runnable one, drawn from this seed (the same draws for each launch).
void hetrain_emu_set_shuffle_seed(uint64_t seed) { hetrain_emu::sched.shuffle_seed = seed; }

// Kernel launches since the library was loaded.
uint64_t hetrain_emu_launches() { return hetrain_emu::sched.launches; }
}
