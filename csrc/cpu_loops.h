// Loops of the CPU kernels that vectorise in every dtype.
//
// lane_sum: a sum over a row in independent partial sums ("lanes"). A single accumulator chains every add on the
// one before (about four cycles each), and without -ffast-math the compiler may not reorder the sum itself; with
// kLanes partial sums it vectorises into several registers whose adds overlap, and rounding error grows with
// N / kLanes rather than N.
//
// lane_max_sum: a row's largest element and its sum in the same lanes. GCC 12 vectorises `#pragma omp simd
// reduction(max : m)` over std::max into a loop that ran at a fifth of this one's speed (softmax's first pass
// over 2048 x 8192 float32 logits: 22.6 ms against 5.3 for the max and the sum together, one thread).
//
// widen / narrow: one element to its accumulation type and back. An `#pragma omp simd` loop that stores
// `scalar_t(v)` for c10::BFloat16 does not vectorise at all under GCC 12 (c10's rounding has a NaN branch, and each
// lane's temporary gets an array slot of its own: "more than one data ref in stmt"); these round on the bits, so
// the same loop vectorises in bfloat16 as in float (a bfloat16 LayerNorm forward ran 3.5x faster for it).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace hetrain {

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(c10::Half v) { return float(v); }
inline float widen(c10::BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T>
inline T narrow(acc_type<T> v) {
  return T(v);
}
template <>
inline c10::BFloat16 narrow<c10::BFloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7fc0u : rounded), c10::BFloat16::from_bits());
}

// Four 256-bit registers of float (two of double): enough independent adds to hide their latency on AVX2 and
// AVX-512 machines alike.
template <typename acc_t>
constexpr int kSumLanes = 128 / sizeof(acc_t);

// The sum of term(j) over 0 <= j < N.
template <typename acc_t, typename Term>
inline acc_t lane_sum(int64_t N, Term term) {
  constexpr int kLanes = kSumLanes<acc_t>;
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= N; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) lanes[l] += term(j + l);
  }
  acc_t sum = 0;
  for (; j < N; ++j) sum += term(j);
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// Both sums of a pair of terms in one pass: term(j, &a, &b) adds into a and b.
template <typename acc_t, typename Terms>
inline void lane_sum2(int64_t N, Terms terms, acc_t* first, acc_t* second) {
  constexpr int kLanes = kSumLanes<acc_t> / 2;
  acc_t a[kLanes] = {}, b[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= N; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) terms(j + l, a[l], b[l]);
  }
  acc_t sa = 0, sb = 0;
  for (; j < N; ++j) terms(j, sa, sb);
  for (int l = 0; l < kLanes; ++l) {
    sa += a[l];
    sb += b[l];
  }
  *first = sa;
  *second = sb;
}

// The largest of term(0..N) (-inf for N = 0) and their sum. A NaN may be skipped by the max; the sum keeps it.
template <typename acc_t, typename Term>
inline void lane_max_sum(int64_t N, Term term, acc_t* max, acc_t* sum) {
  constexpr int kLanes = kSumLanes<acc_t> / 2;
  acc_t hi[kLanes], total[kLanes] = {};
  for (int l = 0; l < kLanes; ++l) hi[l] = -std::numeric_limits<acc_t>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= N; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const acc_t v = term(j + l);
      hi[l] = hi[l] > v ? hi[l] : v;
      total[l] += v;
    }
  }
  acc_t m = -std::numeric_limits<acc_t>::infinity(), s = 0;
  for (; j < N; ++j) {
    const acc_t v = term(j);
    m = m > v ? m : v;
    s += v;
  }
  for (int l = 0; l < kLanes; ++l) {
    m = m > hi[l] ? m : hi[l];
    s += total[l];
  }
  *max = m;
  *sum = s;
}

}  // namespace hetrain
