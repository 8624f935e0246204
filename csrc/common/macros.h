#pragma once
// Functions marked FASTCTX_HOST_DEVICE are compiled for both the CPU backend and
// the CUDA kernels, so the arithmetic that decides correctness is tested on CPU.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTCTX_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTCTX_HOST_DEVICE inline
#endif
