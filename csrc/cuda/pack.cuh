// Packs: a few consecutive elements moved by one load or store instruction (16 bytes at most, the widest a
// thread can issue). A warp reading 2-byte elements one at a time issues eight times the instructions a
// packed read does for the same bytes; memory-bound kernels read and write through these where the row
// length and the pointers allow it (pack_width), and one element at a time elsewhere.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "convert.cuh"

namespace hetrain {
namespace cuda {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Elements of T in 16 bytes.
template <typename T>
constexpr int kPackWidth = static_cast<int>(16 / sizeof(T));

// Pack i of p (elements i * VEC ... i * VEC + VEC - 1).
template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p, int64_t i) {
  return reinterpret_cast<const Pack<T, VEC>*>(p)[i];
}

template <int VEC, typename T>
__device__ __forceinline__ void store_pack(T* p, int64_t i, const Pack<T, VEC>& v) {
  reinterpret_cast<Pack<T, VEC>*>(p)[i] = v;
}

// Host side: kPackWidth<T> when rows of N elements split into whole packs and every pointer given (null
// ones skipped) is aligned to a pack, else 1 (one element at a time).
template <typename T>
inline int pack_width(int64_t N, std::initializer_list<const void*> pointers) {
  constexpr int width = kPackWidth<T>;
  if (N % width != 0) return 1;
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % (width * sizeof(T)) != 0) return 1;
  }
  return width;
}

// Calls f(std::integral_constant<int, width>) for a pack width pack_width<T> chose: kPackWidth<T> or 1.
template <typename T, typename F>
void with_pack_width(int width, F&& f) {
  if (width == kPackWidth<T>) {
    f(std::integral_constant<int, kPackWidth<T>>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

}  // namespace cuda
}  // namespace hetrain
