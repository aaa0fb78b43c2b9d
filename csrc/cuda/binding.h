// What the torch faces of the CUDA kernels (csrc/cuda/*_binding.cpp) share: the kernels' element type
// for each torch scalar type, typed data pointers (null for an undefined tensor), the device checks,
// backward workspaces and the multiprocessor count. Built only against a CUDA build of torch.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../checks.h"
#include "rows.h"

namespace hetrain {
namespace cuda {

// The kernel's element type for each torch scalar type (same bits, CUDA's own half types).
template <typename scalar_t>
struct kernel_type {
  using type = scalar_t;
};
template <>
struct kernel_type<at::Half> {
  using type = __half;
};
template <>
struct kernel_type<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
using kernel_t = typename kernel_type<scalar_t>::type;

template <typename scalar_t>
const kernel_t<scalar_t>* ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const kernel_t<scalar_t>*>(t.const_data_ptr<scalar_t>()) : nullptr;
}

template <typename scalar_t>
kernel_t<scalar_t>* mutable_ptr(at::Tensor& t) {
  return t.defined() ? reinterpret_cast<kernel_t<scalar_t>*>(t.data_ptr<scalar_t>()) : nullptr;
}

// Whether t is where these kernels run: a CUDA device, or the CPU where the emulator (csrc/emu) runs them.
inline bool on_kernel_device(const at::Tensor& t) {
#ifdef HETRAIN_CUDA_EMULATOR
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

// `t` (named `name` in op `op`'s error) must be a CUDA tensor on x's device.
inline void check_on_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(on_kernel_device(t), "hetrain.", op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == x.device(), "hetrain.", op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

// The workspace of a backward kernel's partial rows (one per row block, summed per column afterwards) for a
// gradient: parts x N values in x's stats dtype, or an undefined tensor where the gradient is not wanted.
inline at::Tensor partial_rows(bool wanted, int64_t parts, int64_t N, const at::Tensor& x) {
  return wanted ? at::empty({parts, N}, x.options().dtype(stats_dtype(x.scalar_type()))) : at::Tensor();
}

inline int sm_count(const at::Tensor& x) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  return sms;
}

// A row kernel's parameter gradients for x of (M, N) rows: dw and db of N values where the weight / bias is
// given, else empty (as the CPU kernels return them), with one partial row per row block for each wanted one.
struct ParamGrads {
  at::Tensor dw, db, w_part, b_part;
  int64_t parts;

  ParamGrads(const at::Tensor& x, bool weight, bool bias)
      : parts(backward_parts(x.size(0), x.size(1), static_cast<int>(x.element_size()), sm_count(x))) {
    const int64_t N = x.size(1);
    dw = at::empty({weight ? N : 0}, x.options());
    db = at::empty({bias ? N : 0}, x.options());
    w_part = partial_rows(weight, parts, N, x);
    b_part = partial_rows(bias, parts, N, x);
  }

  // The kernel's arguments: each null where that gradient is not wanted.
  template <typename scalar_t>
  kernel_t<scalar_t>* dw_out() { return w_part.defined() ? mutable_ptr<scalar_t>(dw) : nullptr; }
  template <typename scalar_t>
  kernel_t<scalar_t>* db_out() { return b_part.defined() ? mutable_ptr<scalar_t>(db) : nullptr; }
  template <typename acc_t>
  acc_t* w_workspace() { return w_part.defined() ? w_part.data_ptr<acc_t>() : nullptr; }
  template <typename acc_t>
  acc_t* b_workspace() { return b_part.defined() ? b_part.data_ptr<acc_t>() : nullptr; }
};

}  // namespace cuda
}  // namespace hetrain
