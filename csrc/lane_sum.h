// Sums over a row in independent partial sums ("lanes"), for the CPU kernels. A single accumulator chains every
// add on the one before (about four cycles each), and without -ffast-math the compiler may not reorder the sum
// itself; with kLanes partial sums it vectorises into several registers whose adds overlap, and rounding error
// grows with N / kLanes rather than N.
#pragma once

#include <cstdint>

namespace hetrain {

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

}  // namespace hetrain
