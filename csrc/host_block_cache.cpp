// See host_block_cache.h. System calls (mmap, munmap) run outside the lock.
#include "host_block_cache.h"

#include <sys/mman.h>

namespace hetrain {
namespace host {
namespace {

void* map_block(size_t size) {
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
#ifdef MADV_HUGEPAGE
  madvise(p, size, MADV_HUGEPAGE);  // advice only: 512 times fewer first-touch faults where the kernel agrees
#endif
  return p;
}

}  // namespace

HostBlockCache::HostBlockCache(size_t max_cached_bytes) : max_cached_bytes_(max_cached_bytes) {}

HostBlockCache::~HostBlockCache() { empty(); }

size_t HostBlockCache::rounded(size_t bytes) {
  const size_t granules = bytes / kGranule + (bytes % kGranule != 0);
  return granules * kGranule;
}

void* HostBlockCache::take_cached(size_t size, size_t requested) {
  auto it = cached_.lower_bound(size);
  if (it == cached_.end() || it->first > size + size / 4) return nullptr;
  void* ptr = it->second.ptr;
  by_age_.erase(it->second.freed_at);
  stats_.cached_bytes -= it->first;
  live_.emplace(ptr, Live{it->first, requested});
  stats_.live_bytes += it->first;
  cached_.erase(it);
  ++stats_.reused;
  return ptr;
}

void HostBlockCache::evict_for(size_t room, Blocks* out) {
  while (!by_age_.empty() && stats_.cached_bytes + room > max_cached_bytes_) {
    auto oldest = by_age_.begin();
    const BySize::iterator block = oldest->second;
    out->emplace_back(block->second.ptr, block->first);
    stats_.cached_bytes -= block->first;
    ++stats_.unmapped;
    cached_.erase(block);
    by_age_.erase(oldest);
  }
}

void* HostBlockCache::allocate(size_t bytes) {
  const size_t size = rounded(bytes);
  if (bytes == 0 || size < bytes) return nullptr;  // nothing asked, or the rounding overflowed
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (void* ptr = take_cached(size, bytes)) return ptr;
  }
  void* ptr = map_block(size);
  if (ptr == nullptr) {  // out of memory or address space: give the kept blocks back and try once more
    empty();
    ptr = map_block(size);
    if (ptr == nullptr) return nullptr;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  live_.emplace(ptr, Live{size, bytes});
  stats_.live_bytes += size;
  ++stats_.mapped;
  if (stats_.live_bytes + stats_.cached_bytes > stats_.peak_mapped_bytes)
    stats_.peak_mapped_bytes = stats_.live_bytes + stats_.cached_bytes;
  return ptr;
}

size_t HostBlockCache::release(void* ptr) {
  Blocks unmap;
  size_t requested = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = live_.find(ptr);
    if (it == live_.end()) return 0;
    const size_t size = it->second.size;
    requested = it->second.requested;
    live_.erase(it);
    stats_.live_bytes -= size;
    if (size > max_cached_bytes_) {
      unmap.emplace_back(ptr, size);
      ++stats_.unmapped;
    } else {
      evict_for(size, &unmap);
      const uint64_t freed_at = frees_++;
      by_age_.emplace(freed_at, cached_.emplace(size, Cached{ptr, freed_at}));
      stats_.cached_bytes += size;
    }
  }
  for (const auto& [p, size] : unmap) munmap(p, size);
  return requested;
}

void HostBlockCache::set_max_cached_bytes(size_t bytes) {
  Blocks unmap;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    max_cached_bytes_ = bytes;
    evict_for(0, &unmap);
  }
  for (const auto& [p, size] : unmap) munmap(p, size);
}

void HostBlockCache::empty() {
  Blocks unmap;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& [size, block] : cached_) unmap.emplace_back(block.ptr, size);
    stats_.unmapped += cached_.size();
    stats_.cached_bytes = 0;
    cached_.clear();
    by_age_.clear();
  }
  for (const auto& [p, size] : unmap) munmap(p, size);
}

CacheStats HostBlockCache::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

}  // namespace host
}  // namespace hetrain
