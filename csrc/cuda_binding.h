// Torch-side helpers shared by the CUDA bindings (simlse_cuda.cpp, gamma_onepass_cuda.cpp):
// cuBLAS GEMMs on torch's handle and stream, the chunk budget, the kernels' device type and op
// registration (argument checks: checks.h). Inline only, so every *_cuda.cpp can include it.
//
// GEMMs call cublasGemmEx on torch's cuBLAS handle (which carries torch's stream, workspace and
// TF32 setting for fp32 inputs): ATen has no public op accumulating bf16 x bf16 into an fp32
// output (addmm's out_dtype variant needs an input-dtype bias). Row-major C = op(A) op(B) is
// column-major C^T = op(B)^T op(A)^T, so cuBLAS gets the operands swapped with their flags kept.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

// The platform (ATen's CUDA context, cuBLAS, GC_CUDA_IMPL, kKernelDevice), chosen by the include
// path: csrc/platform/ for a GPU build, tests/cuda_emu/ for the CPU emulator.
#include <gammacl_cuda_torch.h>

#include <algorithm>
#include <limits>

#include "checks.h"
#include "kernel_api.h"

namespace gammacl {

// GAMMACL_CUDA_CHUNK_MIB default (its status: bench/NOTES.md, "Large-D paths"). Per
// chunk of R rows the dB GEMM (beta = 1 on an fp32 N x D output) does 2R FLOPs per 8 B of output
// read + write, R/4 FLOP/B; it is compute-bound above the ridge: R > ~1180 on an H100 (295
// FLOP/B), > ~825 on an H200 (206). At N = 65536 (fp32 S + bf16 W, 6 B per entry) 256 MiB gives
// R = 640 (bandwidth-bound), 512 MiB gives R = 1280 (compute-bound on both) while the chunk stays
// well under the 1.2 GB extra-memory target; 1 GiB (R = 2688) would leave ~0.2 GB for the rest.
constexpr double kCudaChunkMiB = 512.0;

inline GcType gc_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return GcType::F32;
    case at::kDouble:
      return GcType::F64;
    case at::kHalf:
      return GcType::F16;
    case at::kBFloat16:
      return GcType::BF16;
    default:
      TORCH_CHECK(false, "gammacl: unsupported dtype ", t);
  }
}

// Row-major GEMM on the current stream: C[m, n] (row stride ldc) = op(A) op(B) + beta C, with
// op(A) m x k, op(B) k x n; A is stored m x k (ta = false) or k x m (ta = true) with row stride
// lda, likewise B. A and B have dtype `in` (fp32/fp64/fp16/bf16); C is fp32, or fp64 for fp64.
inline void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* A, int64_t lda,
                    const void* B, int64_t ldb, void* C, int64_t ldc, bool accumulate,
                    at::ScalarType in) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(m <= kMax && n <= kMax && k <= kMax && lda <= kMax && ldb <= kMax && ldc <= kMax,
              "gammacl (cuda): GEMM dimension over 2^31 (m=", m, ", n=", n, ", k=", k, ")");
  cudaDataType_t ab, c;
  cublasComputeType_t compute;
  switch (in) {
    case at::kFloat:  // TF32 or not follows torch's setting, which the handle's math mode carries
      ab = CUDA_R_32F, c = CUDA_R_32F, compute = CUBLAS_COMPUTE_32F;
      break;
    case at::kDouble:
      ab = CUDA_R_64F, c = CUDA_R_64F, compute = CUBLAS_COMPUTE_64F;
      break;
    case at::kHalf:
      ab = CUDA_R_16F, c = CUDA_R_32F, compute = CUBLAS_COMPUTE_32F;
      break;
    case at::kBFloat16:
      ab = CUDA_R_16BF, c = CUDA_R_32F, compute = CUBLAS_COMPUTE_32F;
      break;
    default:
      TORCH_CHECK(false, "gammacl (cuda): unsupported GEMM dtype ", in);
  }
  const float alpha_f = 1.0f, beta_f = accumulate ? 1.0f : 0.0f;
  const double alpha_d = 1.0, beta_d = accumulate ? 1.0 : 0.0;
  const bool f64 = compute == CUBLAS_COMPUTE_64F;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  cublasPointerMode_t mode;
  TORCH_CUDABLAS_CHECK(cublasGetPointerMode(handle, &mode));
  TORCH_CUDABLAS_CHECK(cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST));
  const cublasStatus_t st =
      cublasGemmEx(handle, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                   static_cast<int>(n), static_cast<int>(m), static_cast<int>(k),
                   f64 ? static_cast<const void*>(&alpha_d) : static_cast<const void*>(&alpha_f), B,
                   ab, static_cast<int>(ldb), A, ab, static_cast<int>(lda),
                   f64 ? static_cast<const void*>(&beta_d) : static_cast<const void*>(&beta_f), C,
                   c, static_cast<int>(ldc), compute, CUBLAS_GEMM_DEFAULT);
  cublasSetPointerMode(handle, mode);
  TORCH_CUDABLAS_CHECK(st);
}

// A GEMM operand view: unit column stride and a row stride cuBLAS accepts, else a copy.
inline at::Tensor gemm_operand(const at::Tensor& t) {
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, t.size(1))) return t;
  return t.contiguous();
}

inline const char* byte_ptr(const at::Tensor& t) {
  return static_cast<const char*>(t.const_data_ptr());
}

inline int64_t cuda_chunk_rows(int64_t m, int64_t per_row) {
  return chunk_rows(m, per_row, chunk_budget_bytes("GAMMACL_CUDA_CHUNK_MIB", kCudaChunkMiB), 128);
}

// One row chunk of chunk_gemms: the kernels' view k of it (S = buf, W = wbuf or null without
// grad, global rows k.row0..k.row0+k.rows-1). a_db / ld_db: the A-side operand of db (+)= W^T A_c,
// A_c unless the epilogue puts a rescaled copy there.
struct RowChunk {
  cuda::ChunkView k;
  const char* a_db;
  int64_t ld_db;
};

// The GEMMs around an epilogue kernel, per chunk of R rows of a [M, D] against b [N, D] (GEMM
// operands: gemm_operand; `offset` goes to the kernels):
//   S[rows, N] = A_c @ B^T   into buf (acc dtype; zeros when D = 0)
//   epilogue(chunk)          reads S; writes W into wbuf (buf itself, or a 16-bit [R, N] buffer)
//   grad: da[i0:i0+rows] = W @ B,  db (+)= W^T @ A_c   (da, db: acc dtype, contiguous; an
//         undefined db skips its GEMM)
template <typename Epilogue>
void chunk_gemms(const at::Tensor& a, const at::Tensor& b, int64_t R, int64_t offset,
                 const at::Tensor& buf, const at::Tensor& wbuf, bool grad, const at::Tensor& da,
                 const at::Tensor& db, Epilogue&& epilogue) {
  const int64_t M = a.size(0), N = b.size(0), D = a.size(1);
  const auto in = a.scalar_type();
  const int64_t a_row_bytes = a.stride(0) * a.element_size();
  for (int64_t i0 = 0; i0 < M; i0 += R) {
    const int64_t rows = std::min(R, M - i0);
    const char* a_c = byte_ptr(a) + i0 * a_row_bytes;
    RowChunk c{{buf.const_data_ptr(), gc_type(buf.scalar_type()), grad ? wbuf.data_ptr() : nullptr,
                gc_type(wbuf.scalar_type()), rows, N, N, N, i0, offset},
               a_c,
               a.stride(0)};
    if (D == 0) {
      buf.zero_();
    } else {
      gemm_rm(false, true, rows, N, D, a_c, a.stride(0), b.const_data_ptr(), b.stride(0),
              buf.data_ptr(), N, false, in);
    }
    epilogue(c);
    if (!grad || D == 0) continue;
    gemm_rm(false, false, rows, D, N, wbuf.const_data_ptr(), N, b.const_data_ptr(), b.stride(0),
            static_cast<char*>(da.data_ptr()) + i0 * D * da.element_size(), D, false, in);
    if (!db.defined()) continue;
    gemm_rm(true, false, N, D, rows, wbuf.const_data_ptr(), N, c.a_db, c.ld_db, db.data_ptr(), D,
            i0 > 0, in);
  }
}

}  // namespace gammacl
