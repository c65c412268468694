// The CPU emulator's <gammacl_cuda_torch.h> (the real one: csrc/platform/): CPU stand-ins for
// ATen's CUDA context and cuBLAS (cuda_emu_torch.h); the ops register as CPU kernels of the
// gammacl_cuda_emu:: library (schemas copied from gammacl::, cuda_emu/build.py).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_emu_torch.h"

#define GC_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(gammacl_cuda_emu, CPU, m)

namespace gammacl {
constexpr at::DeviceType kKernelDevice = at::kCPU;
}  // namespace gammacl
