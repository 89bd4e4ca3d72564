#pragma once

// Functions marked SDRPN_HOST_DEVICE are compiled for both the CPU kernels and the
// CUDA kernels, so the CPU tests exercise exactly the arithmetic the GPU runs.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define SDRPN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SDRPN_HOST_DEVICE inline
#endif
