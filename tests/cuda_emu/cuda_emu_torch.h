// CPU stand-ins for what gammacl's CUDA bindings (csrc/*_cuda.cpp, csrc/cuda_binding.h) take from
// the CUDA runtime, cuBLAS and ATen's CUDA context, for tests/test_cuda_emu.py. Included by this
// directory's <gammacl_cuda_torch.h>, which the emulator build puts on csrc/cuda_binding.h's
// include path in place of csrc/platform/'s; tensors then live on the CPU.
//
// cublasGemmEx (emu_runtime.cpp) follows the cuBLAS documentation: column-major operands,
// op(A) m x k, op(B) k x n, C m x n; lda >= max(1, rows of the stored A), likewise ldb, ldc >=
// max(1, m), else CUBLAS_STATUS_INVALID_VALUE; only the type combinations gammacl uses (16BF/16F
// operands with 32F output and compute, 32F, 64F), else CUBLAS_STATUS_NOT_SUPPORTED. It computes
// in fp32 (fp64 for 64F) on up-cast operands, without TF32.
#pragma once

#include <ATen/ATen.h>

#include "cuda_emu.h"

typedef struct cublasContext* cublasHandle_t;
enum cublasStatus_t : int {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum cublasOperation_t : int { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };
enum cublasPointerMode_t : int { CUBLAS_POINTER_MODE_HOST = 0, CUBLAS_POINTER_MODE_DEVICE = 1 };
enum cublasGemmAlgo_t : int { CUBLAS_GEMM_DEFAULT = -1 };
enum cublasComputeType_t : int {
  CUBLAS_COMPUTE_16F = 64,
  CUBLAS_COMPUTE_32F = 68,
  CUBLAS_COMPUTE_64F = 70,
  CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
};
enum cudaDataType_t : int { CUDA_R_32F = 0, CUDA_R_64F = 1, CUDA_R_16F = 2, CUDA_R_16BF = 14 };

cublasStatus_t cublasGetPointerMode(cublasHandle_t handle, cublasPointerMode_t* mode);
cublasStatus_t cublasSetPointerMode(cublasHandle_t handle, cublasPointerMode_t mode);
cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
                            cublasOperation_t transb, int m, int n, int k, const void* alpha,
                            const void* A, cudaDataType_t Atype, int lda, const void* B,
                            cudaDataType_t Btype, int ldb, const void* beta, void* C,
                            cudaDataType_t Ctype, int ldc, cublasComputeType_t computeType,
                            cublasGemmAlgo_t algo);
const char* gammacl_emu_cublas_error();  // why the last failing cublasGemmEx failed

namespace at::cuda {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
inline cublasHandle_t getCurrentCUDABlasHandle() { return nullptr; }
}  // namespace at::cuda

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda

#define C10_CUDA_CHECK(x)                                                            \
  TORCH_CHECK((x) == cudaSuccess, "emulated CUDA error ", static_cast<int>(x), ": ", \
              gammacl_emu::g_reported)
#define TORCH_CUDABLAS_CHECK(x)                                                                  \
  TORCH_CHECK((x) == CUBLAS_STATUS_SUCCESS, "emulated cuBLAS error ", static_cast<int>(x), ": ", \
              gammacl_emu_cublas_error())
