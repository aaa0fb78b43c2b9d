// hetrain's CPU allocator for `cpu_malloc: keep` (hetrain/cpu_memory.py): requests of `min_bytes` or more come
// from a HostBlockCache (host_block_cache.h: why), smaller ones from the allocator it replaced, which keeps
// serving them as before. Installed once with c10::SetCPUAllocator, it stays for the process; disabling sends
// every new request to the replaced allocator and gives the kept blocks back. Allocations and frees of kept
// blocks are reported to torch's profiler as the replaced allocator reports its own, so profile_memory (and
// hetrain's churn report) see them.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <pthread.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <vector>

#include "host_block_cache.h"

namespace hetrain {
namespace {

using host::HostBlockCache;

class CachingHostAllocator final : public c10::Allocator {
 public:
  static CachingHostAllocator& instance() {
    static auto* self = new CachingHostAllocator();  // never destroyed: tensors may outlive static destruction
    return *self;
  }

  // Becomes the CPU allocator if it is not already; false if another allocator of higher priority stays.
  bool install(int64_t min_bytes, int64_t max_cached_bytes) {
    std::lock_guard<std::mutex> lock(install_mutex_);
    if (fallback_ == nullptr) {
      c10::Allocator* current = c10::GetCPUAllocator();
      TORCH_CHECK(current->raw_deleter() != nullptr,
                  "hetrain.cpu_memory: the CPU allocator in place frees through its own contexts, so hetrain "
                  "cannot pass small requests on to it; run with cpu_malloc=system");
      fallback_ = current;
      pthread_atfork([] { instance().cache_.before_fork(); }, [] { instance().cache_.after_fork(); },
                     [] { instance().cache_.after_fork(); });
    }
    if (c10::GetCPUAllocator() != this) c10::SetCPUAllocator(this, kPriority);
    min_bytes_.store(static_cast<size_t>(min_bytes));
    max_cached_bytes_.store(static_cast<size_t>(max_cached_bytes));
    cache_.set_max_cached_bytes(static_cast<size_t>(max_cached_bytes));
    enabled_.store(true);
    return c10::GetCPUAllocator() == this;
  }

  // Blocks still held by tensors are unmapped when freed: a cap of zero keeps none.
  void disable() {
    enabled_.store(false);
    cache_.set_max_cached_bytes(0);
  }

  bool enabled() const { return enabled_.load() && c10::GetCPUAllocator() == this; }
  // The settings of the last install(), which a re-install restores (hetrain.cpu_memory.host_memory).
  size_t min_bytes() const { return min_bytes_.load(); }
  size_t max_cached_bytes() const { return max_cached_bytes_.load(); }
  HostBlockCache& cache() { return cache_; }

  c10::DataPtr allocate(size_t bytes) override {
    if (!enabled_.load(std::memory_order_relaxed) || bytes < min_bytes_.load(std::memory_order_relaxed)) {
      void* ptr = fallback_->raw_allocate(bytes);
      return {ptr, ptr, &free_block, c10::Device(c10::DeviceType::CPU)};
    }
    void* ptr = cache_.allocate(bytes);
    if (ptr == nullptr) {
      const host::CacheStats s = cache_.stats();
      c10::reportOutOfMemoryToProfiler(static_cast<int64_t>(bytes), s.live_bytes, s.live_bytes + s.cached_bytes,
                                       c10::Device(c10::DeviceType::CPU));
      TORCH_CHECK_WITH(OutOfMemoryError, false, "hetrain: could not map ", bytes, " bytes of host memory (",
                       s.live_bytes >> 20, " MiB in use by tensors of hetrain's CPU allocator); free tensors, "
                       "lower the batch size, or run with cpu_malloc=system");
    }
    report(ptr, static_cast<int64_t>(bytes));
    return {ptr, ptr, &free_block, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &free_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static constexpr uint8_t kPriority = 1;  // above c10's own CPU allocator (0)

  static void free_block(void* ptr) {
    CachingHostAllocator& self = instance();
    if (const size_t requested = self.cache_.release(ptr)) {
      self.report(ptr, -static_cast<int64_t>(requested));
    } else {
      self.fallback_->raw_deallocate(ptr);
    }
  }

  void report(void* ptr, int64_t bytes) {
    if (!c10::memoryProfilingEnabled()) return;
    const host::CacheStats s = cache_.stats();
    c10::reportMemoryUsageToProfiler(ptr, bytes, s.live_bytes, s.live_bytes + s.cached_bytes,
                                     c10::Device(c10::DeviceType::CPU));
  }

  std::mutex install_mutex_;
  c10::Allocator* fallback_ = nullptr;
  std::atomic<bool> enabled_{false};
  std::atomic<size_t> min_bytes_{0};
  std::atomic<size_t> max_cached_bytes_{0};  // the cap asked for: the cache's own is 0 while disabled
  HostBlockCache cache_{0};
};

bool host_cache_enable(int64_t min_bytes, int64_t max_cached_bytes) {
  TORCH_CHECK(min_bytes > 0 && max_cached_bytes >= 0, "hetrain.cpu_memory: min_bytes must be positive and "
              "max_cached_bytes not negative, got ", min_bytes, " and ", max_cached_bytes);
  return CachingHostAllocator::instance().install(min_bytes, max_cached_bytes);
}

void host_cache_disable() { CachingHostAllocator::instance().disable(); }

void host_cache_empty() { CachingHostAllocator::instance().cache().empty(); }

// [enabled, reused, mapped, unmapped, cached_bytes, live_bytes, peak_mapped_bytes, min_bytes, max_cached_bytes]
std::vector<int64_t> host_cache_stats() {
  CachingHostAllocator& self = CachingHostAllocator::instance();
  const host::CacheStats s = self.cache().stats();
  return {self.enabled(), static_cast<int64_t>(s.reused), static_cast<int64_t>(s.mapped),
          static_cast<int64_t>(s.unmapped), static_cast<int64_t>(s.cached_bytes), static_cast<int64_t>(s.live_bytes),
          static_cast<int64_t>(s.peak_mapped_bytes), static_cast<int64_t>(self.min_bytes()),
          static_cast<int64_t>(self.max_cached_bytes())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hetrain_C, m) {
  m.def("host_cache_enable(int min_bytes, int max_cached_bytes) -> bool", &host_cache_enable);
  m.def("host_cache_disable() -> ()", &host_cache_disable);
  m.def("host_cache_empty() -> ()", &host_cache_empty);
  m.def("host_cache_stats() -> int[]", &host_cache_stats);
}

}  // namespace hetrain
