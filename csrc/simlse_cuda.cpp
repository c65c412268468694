// simlse, CUDA backend (torch side): chunked cuBLAS GEMMs + the epilogue kernels of simlse_cuda.cu.
//
// Per chunk of R rows (R from a memory budget, below):
//   forward : S = A_c @ B^T                      cuBLAS, raw dots (no scale), fp32 out from
//                                                bf16/fp16 operands (fp32 accumulate); fp64: fp64
//             simlse_fwd_chunk(S)                row LSE + column partials, S read once
//   backward: S = A_c @ B^T;  W = weights(S)     W in place over S (fp32/fp64), or into a separate
//                                                bf16/fp16 buffer so the two GEMMs below run on
//                                                tensor cores with bf16/fp16 operands
//             da_c = W @ B;  db (+)= W^T @ A_c   fp32 (fp64) outputs, db accumulated by beta = 1
//             (fp16 W carries a power-of-two scale against underflow, removed at the end)
// 2MND + 6MND FLOPs (4 GEMMs per forward + backward). Logits are never stored in bf16: a bf16
// logit carries ~0.4 absolute error at scale 100.
//
// The scale is a 0-d device tensor read by the kernels (the GEMMs compute raw a.b^T), so there is
// no host sync anywhere and a forward + backward can be captured in a CUDA graph. Everything is
// enqueued on at::cuda::getCurrentCUDAStream(); buffers come from the caching allocator.
//
// Chunk size: the largest R with R * N * (bytes of S [+ W] + partials) <= GAMMACL_CUDA_CHUNK_MIB
// (default 256 MiB), rounded down to a multiple of 128 rows. At N = 65536 (fp32 S, bf16 W) that is
// 640 rows in the backward: each GEMM is then 640 x 65536 x D, enough to fill an H100.
//
// GEMMs call cublasGemmEx on torch's cuBLAS handle (which carries torch's stream, workspace and
// TF32 setting for fp32 inputs): ATen has no public op accumulating bf16 x bf16 into an fp32
// output (addmm's out_dtype variant needs an input-dtype bias). Row-major C = op(A) op(B) is
// column-major C^T = op(B)^T op(A)^T, so cuBLAS gets the operands swapped with their flags kept.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "common.h"

namespace gammacl {
namespace {

constexpr double kCudaChunkMiB = 256.0;  // GAMMACL_CUDA_CHUNK_MIB

GcType gc_type(at::ScalarType t) {
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

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Row-major GEMM on the current stream: C[m, n] (row stride ldc) = op(A) op(B) + beta C, with
// op(A) m x k, op(B) k x n; A is stored m x k (ta = false) or k x m (ta = true) with row stride
// lda, likewise B. A and B have dtype `in` (fp32/fp64/fp16/bf16); C is fp32, or fp64 for fp64.
void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* A, int64_t lda,
             const void* B, int64_t ldb, void* C, int64_t ldc, bool accumulate,
             at::ScalarType in) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(m <= kMax && n <= kMax && k <= kMax && lda <= kMax && ldb <= kMax && ldc <= kMax,
              "gammacl simlse (cuda): GEMM dimension over 2^31 (m=", m, ", n=", n, ", k=", k, ")");
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
      TORCH_CHECK(false, "gammacl simlse (cuda): unsupported GEMM dtype ", in);
  }
  const float alpha_f = 1.0f, beta_f = accumulate ? 1.0f : 0.0f;
  const double alpha_d = 1.0, beta_d = accumulate ? 1.0 : 0.0;
  const bool f64 = compute == CUBLAS_COMPUTE_64F;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  cublasPointerMode_t mode;
  TORCH_CUDABLAS_CHECK(cublasGetPointerMode(handle, &mode));
  TORCH_CUDABLAS_CHECK(cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST));
  const cublasStatus_t st = cublasGemmEx(
      handle, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
      static_cast<int>(n), static_cast<int>(m), static_cast<int>(k),
      f64 ? static_cast<const void*>(&alpha_d) : static_cast<const void*>(&alpha_f), B, ab,
      static_cast<int>(ldb), A, ab, static_cast<int>(lda),
      f64 ? static_cast<const void*>(&beta_d) : static_cast<const void*>(&beta_f), C, c,
      static_cast<int>(ldc), compute, CUBLAS_GEMM_DEFAULT);
  cublasSetPointerMode(handle, mode);
  TORCH_CUDABLAS_CHECK(st);
}

// A GEMM operand view: unit column stride and a row stride cuBLAS accepts, else a copy.
at::Tensor gemm_operand(const at::Tensor& t) {
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, t.size(1))) return t;
  return t.contiguous();
}

const char* byte_ptr(const at::Tensor& t) { return static_cast<const char*>(t.const_data_ptr()); }

void check_features(const char* op, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, op, ": a and b must be 2-D [rows, D], got shapes ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.size(1) == b.size(1), op, ": a and b must have the same feature dimension, got ",
              a.size(1), " and ", b.size(1));
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": a and b must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  gc_type(a.scalar_type());
  TORCH_CHECK(a.is_cuda() && b.device() == a.device(), op,
              ": a and b must be on the same CUDA device, got ", a.device(), " and ", b.device());
}

void check_on(const char* op, const char* name, const at::Tensor& t, const at::Tensor& a,
              at::ScalarType acc) {
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must be ", acc, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == a.device(), op, ": ", name, " is on ", t.device(),
              " but the features are on ", a.device());
}

void check_vec(const char* op, const char* name, const at::Tensor& t, int64_t n,
               const at::Tensor& a, at::ScalarType acc) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ",
              t.sizes());
  check_on(op, name, t, a, acc);
}

// Bytes per chunk row: the S buffer (+ W buffer) + forward partials (2 acc values per 256
// columns and per column / 64 rows).
int64_t bytes_per_row(int64_t n, int64_t acc_size, int64_t w_size, bool fwd) {
  int64_t b = n * (acc_size + w_size);
  if (fwd) b += 2 * acc_size * ((n + 255) / 256 + (n + 63) / 64);
  return b;
}

int64_t cuda_chunk_rows(int64_t m, int64_t per_row) {
  return chunk_rows(m, per_row, chunk_budget_bytes("GAMMACL_CUDA_CHUNK_MIB", kCudaChunkMiB), 128);
}

std::tuple<at::Tensor, at::Tensor> simlse_fwd_cuda(const at::Tensor& a_in, const at::Tensor& b_in,
                                                   const at::Tensor& scale, int64_t offset,
                                                   bool exclude_pos, bool cols) {
  const char* op = "gammacl::simlse_fwd (cuda)";
  check_features(op, a_in, b_in);
  const auto acc = acc_type(a_in.scalar_type());
  TORCH_CHECK(scale.numel() == 1, op, ": scale must have one element, got shape ", scale.sizes());
  check_on(op, "scale", scale, a_in, acc);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = gemm_operand(a_in), b = gemm_operand(b_in);
  const at::Tensor sc = scale.contiguous();
  const int64_t M = a.size(0), N = b.size(0), D = a.size(1);
  const auto opts = a.options().dtype(acc);
  at::Tensor row = at::empty({M}, opts);
  at::Tensor col = at::empty({cols ? N : 0}, opts);
  if (M == 0 || N == 0) {  // LSE over an empty set
    row.fill_(-std::numeric_limits<double>::infinity());
    col.fill_(-std::numeric_limits<double>::infinity());
    return {row, col};
  }
  const int64_t asz = at::elementSize(acc);
  const int64_t R = cuda_chunk_rows(M, bytes_per_row(N, asz, 0, true));
  at::Tensor buf = at::empty({R, N}, opts);
  at::Tensor work = at::empty(
      {static_cast<int64_t>(cuda::simlse_fwd_workspace_bytes(R, N, acc == at::kDouble))},
      a.options().dtype(at::kByte));
  at::Tensor col_m = at::empty({cols ? N : 0}, opts), col_l = at::empty({cols ? N : 0}, opts);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const GcType st = gc_type(acc);
  for (int64_t i0 = 0; i0 < M; i0 += R) {
    const int64_t rows = std::min(R, M - i0);
    if (D == 0) {
      buf.zero_();
    } else {  // S[rows, N] = A_c @ B^T
      gemm_rm(false, true, rows, N, D, byte_ptr(a) + i0 * a.stride(0) * a.element_size(),
              a.stride(0), b.const_data_ptr(), b.stride(0), buf.data_ptr(), N, false,
              a.scalar_type());
    }
    const int err = cuda::simlse_fwd_chunk(
        buf.const_data_ptr(), st, rows, N, N, i0, offset, exclude_pos, cols, sc.const_data_ptr(),
        row.data_ptr(), cols ? col_m.data_ptr() : nullptr, cols ? col_l.data_ptr() : nullptr,
        i0 == 0, i0 + rows == M, cols ? col.data_ptr() : nullptr, work.data_ptr(), stream);
    C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  }
  return {row, col};
}

std::tuple<at::Tensor, at::Tensor> simlse_bwd_cuda(
    const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& scale,
    const at::Tensor& row_lse, const at::Tensor& col_lse, const at::Tensor& g_row,
    const at::Tensor& g_col, int64_t offset, bool exclude_pos, bool cols) {
  const char* op = "gammacl::simlse_bwd (cuda)";
  check_features(op, a_in, b_in);
  const auto acc = acc_type(a_in.scalar_type());
  TORCH_CHECK(scale.numel() == 1, op, ": scale must have one element, got shape ", scale.sizes());
  check_on(op, "scale", scale, a_in, acc);
  const int64_t M = a_in.size(0), N = b_in.size(0), D = a_in.size(1);
  check_vec(op, "row_lse", row_lse, M, a_in, acc);
  check_vec(op, "g_row", g_row, M, a_in, acc);
  check_vec(op, "col_lse", col_lse, cols ? N : 0, a_in, acc);
  check_vec(op, "g_col", g_col, cols ? N : 0, a_in, acc);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = gemm_operand(a_in), b = gemm_operand(b_in);
  const at::Tensor sc = scale.contiguous();
  const at::Tensor rl = row_lse.contiguous(), gr = g_row.contiguous();
  const at::Tensor cl = col_lse.contiguous(), gc = g_col.contiguous();
  const auto opts = a.options().dtype(acc);
  at::Tensor da = at::empty({M, D}, opts);
  at::Tensor db = at::empty({N, D}, opts);
  if (M == 0 || N == 0 || D == 0) {
    da.zero_();
    db.zero_();
    return {da, db};
  }
  const auto in = a.scalar_type();
  const bool half = in == at::kHalf || in == at::kBFloat16;  // W in the input dtype
  const int64_t asz = at::elementSize(acc);
  const int64_t R = cuda_chunk_rows(M, bytes_per_row(N, asz, half ? 2 : 0, false));
  at::Tensor buf = at::empty({R, N}, opts);
  at::Tensor wbuf = half ? at::empty({R, N}, a.options()) : buf;
  // fp16 W: |W_ij| <= |g_r_i| + |g_c_j| <= G, but typical entries (g ~ 1/N times a probability
  // ~ 1/N) fall below fp16's normal range (6e-5). Scale W by sigma = 2^floor(log2(2^14 / G))
  // (exact, on the device: no sync) and divide da, db by it at the end.
  at::Tensor sigma, inv_sigma;
  if (in == at::kHalf) {
    at::Tensor gmax = gr.abs().amax();
    if (cols && N > 0) gmax = gmax + gc.abs().amax();
    sigma = at::exp2(at::clamp(at::floor(at::log2(16384.0 / gmax)), -120.0, 120.0));
    inv_sigma = at::reciprocal(sigma);
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t a_row_bytes = a.stride(0) * a.element_size();
  for (int64_t i0 = 0; i0 < M; i0 += R) {
    const int64_t rows = std::min(R, M - i0);
    const char* a_c = byte_ptr(a) + i0 * a_row_bytes;
    gemm_rm(false, true, rows, N, D, a_c, a.stride(0), b.const_data_ptr(), b.stride(0),
            buf.data_ptr(), N, false, in);
    const int err = cuda::simlse_bwd_weights(
        buf.const_data_ptr(), gc_type(acc), wbuf.data_ptr(), gc_type(wbuf.scalar_type()), rows, N,
        N, N, i0, offset, exclude_pos, cols, sc.const_data_ptr(), rl.const_data_ptr(),
        cols ? cl.const_data_ptr() : nullptr, gr.const_data_ptr(),
        cols ? gc.const_data_ptr() : nullptr, sigma.defined() ? sigma.const_data_ptr() : nullptr,
        stream);
    C10_CUDA_CHECK(static_cast<cudaError_t>(err));
    // da[i0:i0+rows] = W @ B
    gemm_rm(false, false, rows, D, N, wbuf.const_data_ptr(), N, b.const_data_ptr(), b.stride(0),
            static_cast<char*>(da.data_ptr()) + i0 * D * asz, D, false, in);
    // db (+)= W^T @ A_c
    gemm_rm(true, false, N, D, rows, wbuf.const_data_ptr(), N, a_c, a.stride(0), db.data_ptr(), D,
            i0 > 0, in);
  }
  if (sigma.defined()) {
    da.mul_(inv_sigma);
    db.mul_(inv_sigma);
  }
  return {da, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(gammacl, CUDA, m) {
  m.impl("simlse_fwd", &simlse_fwd_cuda);
  m.impl("simlse_bwd", &simlse_bwd_cuda);
}

}  // namespace gammacl
