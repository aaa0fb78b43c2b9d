// The emulator's stand-in for c10/cuda/CUDAException.h: a failed call raises, with the emulator's message.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

extern "C" const char* hetrain_emu_error_message();
extern "C" void hetrain_emu_clear_error();

// The error is cleared first: an error EXPR returns without a fault (refused arguments) has no message of its own.
#define C10_CUDA_CHECK(EXPR)                                                                        \
  do {                                                                                              \
    hetrain_emu_clear_error();                                                                      \
    const cudaError_t hetrain_emu_err = (EXPR);                                                     \
    TORCH_CHECK(hetrain_emu_err == cudaSuccess, "CUDA error ", static_cast<int>(hetrain_emu_err), \
                " (emulated): ", hetrain_emu_error_message());                                      \
  } while (0)
