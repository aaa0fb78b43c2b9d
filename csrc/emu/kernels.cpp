// C entry points to the emulated CUDA kernels, for ctypes (hetrain/checks/cuda_emulator.py): each takes
// raw pointers (tensor data), sizes and a dtype code (0 float, 1 double, 2 half, 3 bfloat16) and returns
// the cudaError_t of the launch function, or the first fault the emulator met in its kernels.
#include <cstdint>

#include "../cuda/bias_gelu_kernel.h"
#include "../cuda/bn_relu_pool_kernel.h"
#include "../cuda/dropout_add_layer_norm_kernel.h"
#include "../cuda/dropout_kernel.h"
#include "../cuda/layer_norm_kernel.h"
#include "../cuda/rms_norm_kernel.h"
#include "emulator.h"

namespace {

using namespace hetrain;

// Calls f with a value of the element type `dtype` names; the launch error, else the first kernel fault.
template <typename F>
int with_type(int dtype, F&& f) {
  cudaError_t err = cudaErrorInvalidValue;
  switch (dtype) {
    case 0: err = f(float{}); break;
    case 1: err = f(double{}); break;
    case 2: err = f(__half{}); break;
    case 3: err = f(__nv_bfloat16{}); break;
    default: return err;
  }
  const cudaError_t pending = cudaGetLastError();
  return err != cudaSuccess ? err : pending;
}

template <typename T>
T* as(void* p) {
  return static_cast<T*>(p);
}

template <typename T>
const T* as(const void* p) {
  return static_cast<const T*>(p);
}

// stream: null, or the emulated device memory holding (seed, offset), as a call captured in a CUDA graph has it.
dropout::Call call(uint64_t seed, uint64_t offset, uint32_t threshold, double scale, const void* stream) {
  return {seed, offset, threshold, scale, static_cast<const int64_t*>(stream)};
}

bn_relu_pool::Geometry geometry(const int64_t* d) {
  return {d[0], d[1], d[2], d[3], d[4], d[5],
          int(d[6]), int(d[7]), int(d[8]), int(d[9]), int(d[10]), int(d[11]), d[12] != 0};
}

}  // namespace

extern "C" {

int hetrain_emu_layer_norm_forward(int dtype, const void* x, const void* w, const void* b, void* y, void* mean,
                                   void* rstd, int64_t M, int64_t N, double eps) {
  return with_type(dtype, [&](auto t) {
    using T = decltype(t);
    using A = layer_norm::acc_type<T>;
    return layer_norm::cuda_forward<T>(as<T>(x), as<T>(w), as<T>(b), as<T>(y), as<A>(mean), as<A>(rstd), M, N, eps,
                                       nullptr);
  });
}

int hetrain_emu_layer_norm_backward(int dtype, const void* dy, const void* x, const void* w, const void* mean,
                                    const void* rstd, void* dx, void* dw, void* db, void* w_part, void* b_part,
                                    int64_t parts, int64_t M, int64_t N) {
  return with_type(dtype, [&](auto t) {
    using T = decltype(t);
    using A = layer_norm::acc_type<T>;
    return layer_norm::cuda_backward<T>(as<T>(dy), as<T>(x), as<T>(w), as<A>(mean), as<A>(rstd), as<T>(dx), as<T>(dw),
                                        as<T>(db), as<A>(w_part), as<A>(b_part), parts, M, N, nullptr);
  });
}

int hetrain_emu_rms_norm_forward(int dtype, const void* x, const void* w, void* y, void* rstd, int64_t M, int64_t N,
                                 double eps) {
  return with_type(dtype, [&](auto t) {
    using T = decltype(t);
    return rms_norm::cuda_forward<T>(as<T>(x), as<T>(w), as<T>(y), as<rms_norm::acc_type<T>>(rstd), M, N, eps,
                                     nullptr);
  });
}

int hetrain_emu_rms_norm_backward(int dtype, const void* dy, const void* x, const void* w, const void* rstd, void* dx,
                                  void* dw, void* w_part, int64_t parts, int64_t M, int64_t N) {
  return with_type(dtype, [&](auto t) {
    using T = decltype(t);
    using A = rms_norm::acc_type<T>;
    return rms_norm::cuda_backward<T>(as<T>(dy), as<T>(x), as<T>(w), as<A>(rstd), as<T>(dx), as<T>(dw), as<A>(w_part),
                                      parts, M, N, nullptr);
  });
}

int hetrain_emu_bias_gelu_forward(int dtype, const void* x, const void* b, void* y, int tanh, int64_t M, int64_t N) {
  return with_type(dtype, [&](auto t) {
    using T = decltype(t);
    return bias_gelu::cuda_forward<T>(as<T>(x), as<T>(b), as<T>(y), tanh != 0, M, N, nullptr);
  });
}

int hetrain_emu_bias_gelu_backward(int dtype, const void* dy, const void* x, const void* b, void* dx, void* db,
                                   void* b_part, int tanh, int64_t parts, int64_t M, int64_t N) {
  return with_type(dtype, [&](auto t) {
    using T = decltype(t);
    return bias_gelu::cuda_backward<T>(as<T>(dy), as<T>(x), as<T>(b), as<T>(dx), as<T>(db),
                                       as<bias_gelu::acc_type<T>>(b_part), tanh != 0, parts, M, N, nullptr);
  });
}

int hetrain_emu_dropout(int dtype, const void* x, void* y, int64_t numel, uint64_t seed, uint64_t offset,
                        uint32_t threshold, double scale, const void* stream) {
  return with_type(dtype, [&](auto t) {
    using T = decltype(t);
    return dropout::cuda_dropout<T>(as<T>(x), as<T>(y), numel, call(seed, offset, threshold, scale, stream),
                                    nullptr);
  });
}

int hetrain_emu_dropout_add_layer_norm_forward(int dtype, const void* x, const void* residual, const void* w,
                                               const void* b, void* y, void* mean, void* rstd, uint64_t seed,
                                               uint64_t offset, uint32_t threshold, double scale, const void* stream,
                                               int64_t M, int64_t N, double eps) {
  return with_type(dtype, [&](auto t) {
    using T = decltype(t);
    using A = dropout_add_layer_norm::acc_type<T>;
    return dropout_add_layer_norm::cuda_forward<T>(as<T>(x), as<T>(residual), as<T>(w), as<T>(b), as<T>(y),
                                                   as<A>(mean), as<A>(rstd),
                                                   call(seed, offset, threshold, scale, stream), M, N, eps, nullptr);
  });
}

int hetrain_emu_dropout_add_layer_norm_backward(int dtype, const void* dy, const void* x, const void* residual,
                                                const void* w, const void* mean, const void* rstd, uint64_t seed,
                                                uint64_t offset, uint32_t threshold, double scale, const void* stream,
                                                void* dx,
                                                void* dres, void* dw, void* db, void* w_part, void* b_part,
                                                int64_t parts, int64_t M, int64_t N) {
  return with_type(dtype, [&](auto t) {
    using T = decltype(t);
    using A = dropout_add_layer_norm::acc_type<T>;
    return dropout_add_layer_norm::cuda_backward<T>(
        as<T>(dy), as<T>(x), as<T>(residual), as<T>(w), as<A>(mean), as<A>(rstd),
        call(seed, offset, threshold, scale, stream), as<T>(dx), as<T>(dres), as<T>(dw), as<T>(db), as<A>(w_part),
        as<A>(b_part), parts, M, N, nullptr);
  });
}

// geometry: N, C, H, W, OH, OW, kh, kw, sh, sw, ph, pw, channels_last.
int hetrain_emu_bn_relu_pool_stats(int dtype, const void* x, void* mean, void* invstd, void* running_mean,
                                   void* running_var, double momentum, double eps, void* workspace, int64_t parts,
                                   const int64_t* geometry_) {
  return with_type(dtype, [&](auto t) {
    using T = decltype(t);
    using A = bn_relu_pool::acc_type<T>;
    return bn_relu_pool::cuda_stats<T>(as<T>(x), as<A>(mean), as<A>(invstd), as<A>(running_mean), as<A>(running_var),
                                       momentum, eps, as<A>(workspace), parts, geometry(geometry_), nullptr);
  });
}

int hetrain_emu_bn_relu_pool_forward(int dtype, const void* x, const void* mean, const void* invstd, const void* w,
                                     const void* b, void* y, void* argmax, const int64_t* geometry_) {
  return with_type(dtype, [&](auto t) {
    using T = decltype(t);
    using A = bn_relu_pool::acc_type<T>;
    return bn_relu_pool::cuda_forward<T>(as<T>(x), as<A>(mean), as<A>(invstd), as<A>(w), as<A>(b), as<T>(y),
                                         as<uint8_t>(argmax), geometry(geometry_), nullptr);
  });
}

int hetrain_emu_bn_relu_pool_backward(int dtype, const void* dy, const void* argmax, const void* x, const void* mean,
                                      const void* invstd, const void* w, const void* b, int batch_stats, void* dx,
                                      void* dw, void* db, void* workspace, int64_t parts, const int64_t* geometry_) {
  return with_type(dtype, [&](auto t) {
    using T = decltype(t);
    using A = bn_relu_pool::acc_type<T>;
    return bn_relu_pool::cuda_backward<T>(as<T>(dy), as<uint8_t>(argmax), as<T>(x), as<A>(mean), as<A>(invstd),
                                          as<A>(w), as<A>(b), batch_stats != 0, as<T>(dx), as<A>(dw), as<A>(db),
                                          as<A>(workspace), parts, geometry(geometry_), nullptr);
  });
}
}
