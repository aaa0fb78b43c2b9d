// Stress test of the torch-free host block cache (csrc/host_block_cache.cpp), meant to run under ThreadSanitizer:
//   g++ -std=c++17 -O1 -g -fsanitize=thread -pthread -Icsrc csrc/host_block_cache.cpp tests/cpp/host_block_cache_test.cpp
// Threads allocate blocks of a few sizes, fill and check them, and free about half of them in another thread.
// Exits non-zero with a message on the first failed check; TSan reports races on its own.
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "check.h"
#include "host_block_cache.h"

using hetrain::host::CacheStats;
using hetrain::host::HostBlockCache;


namespace {

constexpr size_t kMiB = size_t(1) << 20;

// Writes a value that names the block's owner and size at its first, middle and last byte; checks them back.
void stamp(void* block, size_t bytes, uint8_t tag) {
  auto* p = static_cast<uint8_t*>(block);
  p[0] = p[bytes / 2] = p[bytes - 1] = tag;
}

void check_stamp(const void* block, size_t bytes, uint8_t tag) {
  const auto* p = static_cast<const uint8_t*>(block);
  CHECK(p[0] == tag && p[bytes / 2] == tag && p[bytes - 1] == tag, "block %p of %zu bytes was overwritten", block,
        bytes);
}

void reuse_and_cap() {
  HostBlockCache cache(5 * kMiB);
  void* a = cache.allocate(3 * kMiB + 1);  // rounded to 4 MiB
  CHECK(a != nullptr && reinterpret_cast<uintptr_t>(a) % 4096 == 0, "not page-aligned: %p", a);
  stamp(a, 3 * kMiB + 1, 7);
  CHECK(cache.release(a) == 3 * kMiB + 1, "release returns the bytes asked for");
  void* b = cache.allocate(4 * kMiB);  // fits the kept 4 MiB block
  CHECK(b == a, "a kept block of the right size is reused: %p then %p", a, b);
  void* c = cache.allocate(kMiB);  // 2 MiB: a kept 4 MiB block would be over a quarter too large
  CHECK(c != a, "a block is never handed out twice");
  CHECK(cache.release(nullptr) == 0 && cache.release(&c) == 0, "foreign pointers are refused");
  cache.release(b);
  cache.release(c);  // 4 + 2 MiB is over the 5 MiB cap: the older 4 MiB block is unmapped
  CacheStats s = cache.stats();
  CHECK(s.reused == 1 && s.mapped == 2 && s.unmapped == 1, "reused %llu mapped %llu unmapped %llu",
        (unsigned long long)s.reused, (unsigned long long)s.mapped, (unsigned long long)s.unmapped);
  CHECK(s.cached_bytes == 2 * kMiB && s.live_bytes == 0 && s.peak_mapped_bytes == 6 * kMiB,
        "cached %zu live %zu peak %zu", s.cached_bytes, s.live_bytes, s.peak_mapped_bytes);
  void* big = cache.allocate(8 * kMiB);  // larger than the cap: unmapped on release, never kept
  cache.release(big);
  CHECK(cache.stats().cached_bytes == 2 * kMiB, "a block over the cap is not kept");
  cache.set_max_cached_bytes(0);
  CHECK(cache.stats().cached_bytes == 0, "lowering the cap unmaps kept blocks");
  CHECK(cache.allocate(0) == nullptr && cache.allocate(SIZE_MAX) == nullptr, "zero and overflowing requests");
}

void threads_share_blocks() {
  HostBlockCache cache(64 * kMiB);
  std::mutex handoff_mutex;
  std::vector<std::pair<void*, size_t>> handoff;  // blocks one thread made and another frees
  std::atomic<int> done{0};
  const size_t sizes[] = {kMiB, 3 * kMiB, 5 * kMiB, 9 * kMiB};
  auto worker = [&](unsigned seed) {
    std::mt19937 rng(seed);
    for (int i = 0; i < 400; ++i) {
      const size_t bytes = sizes[rng() % 4] + rng() % 4096;
      void* block = cache.allocate(bytes);
      CHECK(block != nullptr, "allocation of %zu bytes failed", bytes);
      const auto tag = static_cast<uint8_t>(1 + rng() % 250);
      stamp(block, bytes, tag);
      std::this_thread::yield();
      check_stamp(block, bytes, tag);
      if (rng() % 2) {
        CHECK(cache.release(block) == bytes, "release of a live block");
      } else {
        std::lock_guard<std::mutex> lock(handoff_mutex);
        handoff.emplace_back(block, bytes);
      }
      std::pair<void*, size_t> other{nullptr, 0};
      {
        std::lock_guard<std::mutex> lock(handoff_mutex);
        if (!handoff.empty() && rng() % 2) {
          other = handoff.back();
          handoff.pop_back();
        }
      }
      if (other.first != nullptr) CHECK(cache.release(other.first) == other.second, "release from another thread");
    }
    done.fetch_add(1);
  };
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < 4; ++t) threads.emplace_back(worker, 1234 + t);
  std::thread reader([&] {
    while (done.load() < 4) {
      const CacheStats s = cache.stats();
      CHECK(s.cached_bytes <= 64 * kMiB, "cache over its cap: %zu", s.cached_bytes);
      std::this_thread::yield();
    }
  });
  for (auto& t : threads) t.join();
  reader.join();
  for (const auto& [block, bytes] : handoff) CHECK(cache.release(block) == bytes, "release after the threads");
  const CacheStats s = cache.stats();
  CHECK(s.live_bytes == 0, "every block came back: %zu bytes live", s.live_bytes);
  CHECK(s.reused + s.mapped == 1600, "every request counted once: %llu", (unsigned long long)(s.reused + s.mapped));
  CHECK(s.reused > s.mapped, "blocks were reused: %llu reused, %llu mapped", (unsigned long long)s.reused,
        (unsigned long long)s.mapped);
  cache.empty();
  CHECK(cache.stats().cached_bytes == 0, "empty() unmaps every kept block");
}

}  // namespace

int main() {
  reuse_and_cap();
  threads_share_blocks();
  std::printf("host block cache: ok\n");
  return 0;
}
