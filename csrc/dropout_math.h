// Counter-based dropout randomness, shared by the CPU kernel (dropout_add_layer_norm.cpp) and any
// CUDA kernel: element i of a stream named by `seed` depends on (seed, i) alone, so backward
// regenerates forward's mask instead of storing it, in any order and on any thread. No torch headers.
//
// A keyed two-round avalanche hash (MurmurHash3's 32-bit finaliser) rather than Philox-4x32-10:
// it is a handful of 32-bit multiplies and shifts, which vectorise on AVX2/AVX-512, and the
// torch reference backend reproduces it bit for bit with integer tensor ops.
#pragma once

#include <cstdint>

#include "common.h"

namespace hetrain {
namespace dropout {

// MurmurHash3's 32-bit finaliser: a bijection in which every input bit flips each output bit
// with probability close to 1/2.
HETRAIN_HD uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// The per-stream key of the low 32 bits of the element index.
HETRAIN_HD uint32_t key_lo(uint64_t seed) { return mix32(static_cast<uint32_t>(seed) ^ 0x9e3779b9u); }

// The key of the high 32 bits of the index (0 for tensors under 2^32 elements).
HETRAIN_HD uint32_t key_hi(uint64_t seed, uint32_t index_hi) {
  return mix32((static_cast<uint32_t>(seed >> 32) + 0x7f4a7c15u) ^ mix32(index_hi + 0x632be5abu));
}

// 24 random bits for element `index`: an integer uniform on [0, 2^24).
HETRAIN_HD uint32_t bits24(uint32_t klo, uint32_t khi, uint32_t index_lo) {
  return mix32(mix32(index_lo ^ klo) ^ khi) >> 8;
}

// The keys of a run of fewer than 2^32 consecutive stream elements from `first`: the run's high index word
// is that of `first` or, past the point where the low word wraps, one more. Keying each element of a run
// then costs two mixes instead of four (a GPU kernel that hashes per element is bound by that arithmetic).
struct RunKeys {
  uint32_t klo;       // key_lo of the stream
  uint32_t first_lo;  // low word of `first`
  uint32_t khi;       // key_hi of first's high word
  uint32_t khi_next;  // key_hi of the next high word
};

HETRAIN_HD RunKeys run_keys(uint64_t seed, uint64_t first) {
  const uint32_t hi = static_cast<uint32_t>(first >> 32);
  return {key_lo(seed), static_cast<uint32_t>(first), key_hi(seed, hi), key_hi(seed, hi + 1u)};
}

// bits24 of element first + lane of the run (lane < 2^32), the same value bits24 gives it alone.
HETRAIN_HD uint32_t bits24_in_run(const RunKeys& k, uint32_t lane) {
  const uint32_t lo = k.first_lo + lane;  // wraps where the high word steps
  return bits24(k.klo, lo < k.first_lo ? k.khi_next : k.khi, lo);
}

// Elements whose 24 bits fall below this are dropped: ceil(p * 2^24), so P(drop) = p to 2^-24,
// and p = 1 drops everything. Comparing integers keeps every backend's decision identical.
inline uint32_t drop_threshold(double p) {
  const double t = p * 16777216.0;
  const uint32_t c = static_cast<uint32_t>(t);
  return static_cast<double>(c) < t ? c + 1 : c;
}

// One call's dropout, as every kernel takes it: the stream's seed, the stream index of the tensor's first
// element, the threshold below which an element's 24 bits drop it, and the scale of the kept ones. p = 0
// gives threshold 0 and scale 1: every element kept as it is.
struct Call {
  uint64_t seed;
  uint64_t offset;
  uint32_t threshold;
  double scale;
  // For a call captured in a CUDA graph: its int64 (seed, offset) in device memory, which the graph's own draw
  // rewrites on every replay, read by the kernel (resolved); seed and offset above are then unused.
  const int64_t* stream = nullptr;
};

// x times its dropout multiplier m (the scale, or 0 where dropped), a select rather than a product: a dropped
// element is exactly 0 even where x is inf or NaN, as the op's reference (torch.where) and Triton kernels give.
template <typename acc_t>
HETRAIN_HD acc_t apply(acc_t x, acc_t m) {
  return m != acc_t(0) ? x * m : acc_t(0);
}

// The call a kernel runs: seed and offset read from `stream` where the call keeps them in memory.
HETRAIN_HD Call resolved(Call call) {
  if (call.stream != nullptr) {
    call.seed = static_cast<uint64_t>(call.stream[0]);
    call.offset = static_cast<uint64_t>(call.stream[1]);
    call.stream = nullptr;
  }
  return call;
}

}  // namespace dropout
}  // namespace hetrain
