// Shared by every hetrain kernel: the host/device qualifier for math used on both sides.
#pragma once

#if defined(__CUDACC__)
#define HETRAIN_HD __host__ __device__ __forceinline__
#else
#define HETRAIN_HD inline
#endif
