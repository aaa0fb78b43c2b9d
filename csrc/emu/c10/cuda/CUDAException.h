// The emulator's stand-in for c10/cuda/CUDAException.h: a failed call raises, with the emulator's message.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

extern "C" const char* hetrain_emu_error_message();

#define C10_CUDA_CHECK(EXPR)                                                                        \
  do {                                                                                              \
    const cudaError_t hetrain_emu_err = (EXPR);                                                     \
    TORCH_CHECK(hetrain_emu_err == cudaSuccess, "CUDA error ", static_cast<int>(hetrain_emu_err), \
                " (emulated): ", hetrain_emu_error_message());                                      \
  } while (0)
