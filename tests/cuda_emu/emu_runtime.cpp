// The emulated cuBLAS entry points of cuda_emu_torch.h (see there for the rules enforced).
#include <string>

#include "cuda_emu_torch.h"

namespace {

cublasPointerMode_t g_mode = CUBLAS_POINTER_MODE_HOST;
std::string g_err;

cublasStatus_t fail(cublasStatus_t st, std::string why) {
  g_err = std::move(why);
  return st;
}

bool torch_type(cudaDataType_t t, at::ScalarType* out) {
  switch (t) {
    case CUDA_R_32F:
      *out = at::kFloat;
      return true;
    case CUDA_R_64F:
      *out = at::kDouble;
      return true;
    case CUDA_R_16F:
      *out = at::kHalf;
      return true;
    case CUDA_R_16BF:
      *out = at::kBFloat16;
      return true;
  }
  return false;
}

// Column-major rows x cols view of p with leading dimension ld.
at::Tensor colmajor(const void* p, int64_t rows, int64_t cols, int64_t ld, at::ScalarType t) {
  return at::from_blob(const_cast<void*>(p), {rows, cols}, {1, ld}, at::TensorOptions().dtype(t));
}

}  // namespace

const char* gammacl_emu_cublas_error() { return g_err.c_str(); }

cublasStatus_t cublasGetPointerMode(cublasHandle_t, cublasPointerMode_t* mode) {
  *mode = g_mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetPointerMode(cublasHandle_t, cublasPointerMode_t mode) {
  g_mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmEx(cublasHandle_t, cublasOperation_t transa, cublasOperation_t transb,
                            int m, int n, int k, const void* alpha, const void* A,
                            cudaDataType_t Atype, int lda, const void* B, cudaDataType_t Btype,
                            int ldb, const void* beta, void* C, cudaDataType_t Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t) {
  if (g_mode != CUBLAS_POINTER_MODE_HOST)
    return fail(CUBLAS_STATUS_NOT_SUPPORTED, "emulator: alpha/beta must be host pointers");
  if (transa == CUBLAS_OP_C || transb == CUBLAS_OP_C)
    return fail(CUBLAS_STATUS_NOT_SUPPORTED, "emulator: CUBLAS_OP_C");
  if (m < 0 || n < 0 || k < 0)
    return fail(CUBLAS_STATUS_INVALID_VALUE, "m, n, k must be >= 0: m=" + std::to_string(m) +
                                                 " n=" + std::to_string(n) +
                                                 " k=" + std::to_string(k));
  const int a_rows = transa == CUBLAS_OP_N ? m : k, b_rows = transb == CUBLAS_OP_N ? k : n;
  if (lda < std::max(1, a_rows) || ldb < std::max(1, b_rows) || ldc < std::max(1, m))
    return fail(CUBLAS_STATUS_INVALID_VALUE,
                "leading dimension too small: lda=" + std::to_string(lda) + " (A has " +
                    std::to_string(a_rows) + " rows) ldb=" + std::to_string(ldb) + " (B has " +
                    std::to_string(b_rows) + " rows) ldc=" + std::to_string(ldc) +
                    " (m=" + std::to_string(m) + ")");
  at::ScalarType ta, tb, tc;
  if (!torch_type(Atype, &ta) || !torch_type(Btype, &tb) || !torch_type(Ctype, &tc) || ta != tb)
    return fail(CUBLAS_STATUS_NOT_SUPPORTED, "emulator: operand types");
  const bool f64 = computeType == CUBLAS_COMPUTE_64F;
  const bool ok =
      f64 ? (ta == at::kDouble && tc == at::kDouble)
          : ((computeType == CUBLAS_COMPUTE_32F || computeType == CUBLAS_COMPUTE_32F_FAST_TF32) &&
             ta != at::kDouble && tc == at::kFloat);
  if (!ok) return fail(CUBLAS_STATUS_NOT_SUPPORTED, "emulator: type / compute combination");
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  const auto acc = f64 ? at::kDouble : at::kFloat;
  // op(A) (m x k): stored m x k (N) or k x m (T), column-major with leading dimension lda
  at::Tensor opa =
      transa == CUBLAS_OP_N ? colmajor(A, m, k, lda, ta) : colmajor(A, k, m, lda, ta).t();
  at::Tensor opb =
      transb == CUBLAS_OP_N ? colmajor(B, k, n, ldb, tb) : colmajor(B, n, k, ldb, tb).t();
  at::Tensor c = colmajor(C, m, n, ldc, tc);
  const double al = f64 ? *static_cast<const double*>(alpha) : *static_cast<const float*>(alpha);
  const double be = f64 ? *static_cast<const double*>(beta) : *static_cast<const float*>(beta);
  at::Tensor r = at::mm(opa.to(acc), opb.to(acc)).mul_(al);
  if (be != 0.0) r.add_(c, be);  // beta = 0: C is not read (it may hold anything)
  c.copy_(r);
  return CUBLAS_STATUS_SUCCESS;
}
