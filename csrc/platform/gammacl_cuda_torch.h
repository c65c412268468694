// What the CUDA bindings (csrc/*_cuda.cpp, through cuda_binding.h) take from the platform:
// ATen's CUDA context, cuBLAS, the op registration macro and the device type of the kernels'
// tensors. Included as <gammacl_cuda_torch.h>: the include path chooses the platform (this file
// for a real GPU; tests/cuda_emu/ holds the CPU emulator's version).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

// Registers the CUDA kernels of gammacl's ops: GC_CUDA_IMPL(m) { m.impl(...); }
#define GC_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(gammacl, CUDA, m)

namespace gammacl {
// The device type of the tensors the CUDA kernels take.
constexpr at::DeviceType kKernelDevice = at::kCUDA;
}  // namespace gammacl
