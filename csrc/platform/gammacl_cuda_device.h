// What the CUDA kernels (csrc/*.cu, through cuda_epilogue.cuh) take from the platform: the CUDA
// runtime and 16-bit types, the launch macro and the MUFU exp2. Included as
// <gammacl_cuda_device.h>, so the include path chooses the platform: csrc/platform/ here (nvcc,
// a real GPU); tests/cuda_emu/ holds the CPU emulator's version of this header, which the
// emulator build puts on its include path instead. The kernels carry no #ifdef for it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Kernel launch on `stream`: GC_LAUNCH(grid, block, stream, kernel<...>)(args...).
#define GC_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>

// 2^x by the MUFU unit (ex2.approx.ftz: rel. error ~2^-22, -inf -> 0, NaN -> NaN; results below
// 2^-126 flush to 0).
__device__ __forceinline__ float gc_ex2_approx_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
