// Self-test kernels of the CUDA emulator (tests/test_cuda_emu.py::test_emulator_*): each shows
// that a check the CUDA-backend tests rely on can fail. Exposed as gammacl_emu_selftest::run(name)
// on CPU: returns the kernel's output (int64), or raises with the emulated launch error.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "cuda_emu.h"

namespace {

constexpr int kN = 64;  // two warps

// sm[t] = t + 1 + 1000 salt, then (with or without a barrier) out[t] = sm[(t + 1) % kN]. Without
// the barrier a thread may read its neighbour's value before it is written (what `__shared__`
// held before: uninitialised on a GPU, the previous launch's here).
__global__ void neighbour_kernel(int64_t* out, bool barrier, int64_t salt) {
  __shared__ int64_t sm[kN];
  const int t = threadIdx.x;
  sm[t] = t + 1 + 1000 * salt;
  if (barrier) __syncthreads();
  out[t] = sm[(t + 1) % kN];
}

// A barrier only the first warp reaches.
__global__ void divergent_kernel(int64_t* out) {
  if (threadIdx.x < 32) __syncthreads();
  out[threadIdx.x] = 1;
}

// Warp butterfly sum of the lane ids: every lane must get 0 + 1 + ... + 31 = 496.
__global__ void shuffle_kernel(int64_t* out) {
  int64_t v = threadIdx.x % 32;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v;
}

at::Tensor run(const std::string& name, int64_t salt) {
  at::Tensor out = at::zeros({kN}, at::kLong);
  int64_t* p = out.data_ptr<int64_t>();
  if (name == "race") {
    GC_LAUNCH(1, kN, nullptr, neighbour_kernel)(p, false, salt);
  } else if (name == "no_race") {
    GC_LAUNCH(1, kN, nullptr, neighbour_kernel)(p, true, salt);
  } else if (name == "divergent") {
    GC_LAUNCH(1, kN, nullptr, divergent_kernel)(p);
  } else if (name == "shuffle") {
    GC_LAUNCH(1, kN, nullptr, shuffle_kernel)(p);
  } else if (name == "grid_y_too_large") {
    GC_LAUNCH(dim3(1, 65536), kN, nullptr, shuffle_kernel)(p);
  } else {
    TORCH_CHECK(false, "unknown self-test ", name);
  }
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "emulated CUDA error: ", gammacl_emu::g_reported);
  return out;
}

}  // namespace

TORCH_LIBRARY(gammacl_emu_selftest, m) { m.def("run(str name, int salt=0) -> Tensor", &run); }
