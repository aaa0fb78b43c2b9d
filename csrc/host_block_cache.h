// A cache of large host memory blocks: freed blocks are kept, mapped and already faulted in, for the next
// request of about their size, where glibc unmaps every block of 32 MiB or more on free and maps fresh,
// untouched pages for the next one (a page fault and a zeroed page per 4 KiB, every step, for every large
// activation of a CPU stage). torch's CUDA allocator caches GPU memory this way; host memory has no such cache.
//
// Blocks live in their own mappings, apart from malloc's heap: keeping large blocks on the heap instead (glibc's
// mmap threshold raised) let small long-lived allocations land between them, and the holes they left never fit
// the next request: a lookup loop grew to 12 GiB resident. Here a block is reused for a request of up to a
// quarter less than its size; past `max_cached_bytes` the blocks freed longest ago are unmapped first; a failed
// mapping releases the cache and retries once. No torch here: csrc/host_allocator.cpp gives it its torch face and
// tests/cpp/host_block_cache_test.cpp runs it under ThreadSanitizer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace hetrain {
namespace host {

struct CacheStats {
  uint64_t reused = 0;        // requests served from a kept block
  uint64_t mapped = 0;        // requests that mapped a new block
  uint64_t unmapped = 0;      // blocks given back to the system (cache full, emptied, or a failed mapping)
  size_t cached_bytes = 0;    // freed blocks kept now
  size_t live_bytes = 0;      // blocks handed out and not yet freed
  size_t peak_mapped_bytes = 0;  // most bytes mapped at once (live plus cached)
};

class HostBlockCache {
 public:
  // Blocks are whole multiples of kGranule (huge-page sized, so a kernel with transparent huge pages can back them).
  static constexpr size_t kGranule = size_t(2) << 20;

  explicit HostBlockCache(size_t max_cached_bytes);
  ~HostBlockCache();
  HostBlockCache(const HostBlockCache&) = delete;
  HostBlockCache& operator=(const HostBlockCache&) = delete;

  // At least `bytes` (> 0) of page-aligned memory, or nullptr when the system has none even after the cache is
  // released.
  void* allocate(size_t bytes);
  // Takes back a block from allocate() and returns the bytes it was asked for; 0 (and nothing done) for a
  // pointer this cache did not hand out.
  size_t release(void* ptr);
  // Unmaps every kept block; blocks in use stay valid.
  void empty();
  // Lowers or raises the cap, unmapping the oldest kept blocks above a lower one.
  void set_max_cached_bytes(size_t bytes);
  CacheStats stats() const;

  // pthread_atfork's three hooks: a child forked while another thread held the lock would wait on it forever.
  void before_fork() { mutex_.lock(); }
  void after_fork() { mutex_.unlock(); }

 private:
  struct Live {
    size_t size;
    size_t requested;
  };
  struct Cached {
    void* ptr;
    uint64_t freed_at;  // position in freed order: the lowest is evicted first
  };
  using BySize = std::multimap<size_t, Cached>;
  using Blocks = std::vector<std::pair<void*, size_t>>;

  static size_t rounded(size_t bytes);
  // With mutex_ held: a kept block of `size` to `size` + a quarter, taken out of the cache, or nullptr.
  void* take_cached(size_t size, size_t requested);
  // With mutex_ held: moves the oldest kept blocks into `out` until `room` more bytes fit under the cap.
  void evict_for(size_t room, Blocks* out);

  mutable std::mutex mutex_;
  size_t max_cached_bytes_;
  uint64_t frees_ = 0;
  BySize cached_;                                   // kept blocks by size
  std::map<uint64_t, BySize::iterator> by_age_;    // the same blocks by freed_at
  std::unordered_map<void*, Live> live_;            // handed-out blocks
  CacheStats stats_;
};

}  // namespace host
}  // namespace hetrain
