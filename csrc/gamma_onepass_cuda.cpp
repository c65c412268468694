// gamma_onepass, CUDA backend (torch side): chunked cuBLAS GEMMs + the fused epilogue of
// gamma_onepass_cuda.cu (contract: python/gammacl/ops/gamma_onepass.py).
//
// Per chunk of R rows (R from the memory budget GAMMACL_CUDA_CHUNK_MIB, default 512 MiB):
//   S = A_c @ B^T                        cuBLAS, raw dots, fp32 out from bf16 operands (fp32
//                                        accumulate); fp32 / fp64 in their own type
//   gamma_onepass_chunk(S)               row LSE, row_term, column partials (LSE and term, merged
//                                        across chunks), and W -- S read once
//   grad: da_c = W @ B;  db (+)= W^T @ A_c   fp32 (fp64) outputs; W in bf16 for bf16 inputs (tensor
//                                        cores), in place over S for fp32 / fp64
// 2MND + 4MND = 6MND FLOPs (3 GEMMs), against 8MND for an LSE pass plus a gradient pass.
//
// fp16 inputs are up-cast once to fp32 (O((M + N) D) extra memory) and take the fp32 path: the
// weights span e^{-inf..clamp} (clamp = 30 by default), beyond fp16's range, and one power-of-two
// scale per chunk would need max |W| before W is written. The fp16 products are exact in TF32, so
// with TF32 on the GEMMs match fp16 tensor-core GEMMs in precision.
//
// No host sync (the scale and alphas are device tensors, w_row / w_col / clamp are host doubles);
// everything is enqueued on the current stream, so the op can be captured in a CUDA graph.
#include <algorithm>
#include <limits>
#include <tuple>

#include "cuda_binding.h"
#include "kernel_api.h"

namespace gammacl {
namespace {

// Bytes per chunk row: S (+ a bf16 W) + the forward partials (3 acc values per 256 columns, and
// per column / 64 rows).
int64_t onepass_bytes_per_row(int64_t n, int64_t acc_size, int64_t w_size) {
  return n * (acc_size + w_size) + 3 * acc_size * ((n + 255) / 256 + (n + 63) / 64);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gamma_onepass_fwd_cuda(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& scale,
                       const at::Tensor& alpha_row, const at::Tensor& alpha_col, double w_row,
                       double w_col, double clamp, int64_t offset, bool grad) {
  const char* op = "gammacl::gamma_onepass_fwd (cuda)";
  const Problem pr = check_problem(op, a_in, b_in, scale, kKernelDevice);
  const auto acc = pr.acc;
  const int64_t M = pr.M, N = pr.N, D = pr.D;
  check_vec(op, "alpha_row", alpha_row, M, a_in, acc);
  check_vec(op, "alpha_col", alpha_col, N, a_in, acc);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const bool up = a_in.scalar_type() == at::kHalf;  // fp16 -> the fp32 path (header)
  const at::Tensor a = gemm_operand(up ? a_in.to(at::kFloat) : a_in);
  const at::Tensor b = gemm_operand(up ? b_in.to(at::kFloat) : b_in);
  const at::Tensor sc = scale.contiguous();
  const at::Tensor ar = alpha_row.contiguous(), ac = alpha_col.contiguous();
  const auto opts = a.options().dtype(acc);
  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor row_lse = at::empty({M}, opts), row_term = at::empty({M}, opts);
  at::Tensor col_lse = at::empty({N}, opts), col_term = at::empty({N}, opts);
  at::Tensor da = at::empty({grad ? M : 0, D}, opts), db = at::empty({grad ? N : 0, D}, opts);
  if (M == 0 || N == 0) {  // empty sums: LSE -inf, terms and gradients 0
    row_lse.fill_(-inf);
    col_lse.fill_(-inf);
    row_term.zero_();
    col_term.zero_();
    da.zero_();
    db.zero_();
    return {row_lse, col_lse, row_term, col_term, da, db};
  }
  const auto in = a.scalar_type();
  const bool half_w = grad && in == at::kBFloat16;  // W in bf16 for the tensor-core GEMMs
  const int64_t asz = at::elementSize(acc);
  const int64_t R = cuda_chunk_rows(M, onepass_bytes_per_row(N, asz, half_w ? 2 : 0));
  at::Tensor buf = at::empty({R, N}, opts);
  at::Tensor wbuf = half_w ? at::empty({R, N}, a.options()) : buf;
  at::Tensor work = at::empty(
      {static_cast<int64_t>(cuda::gamma_onepass_workspace_bytes(R, N, acc == at::kDouble))},
      a.options().dtype(at::kByte));
  at::Tensor col_m = at::empty({N}, opts), col_s = at::empty({N}, opts);
  at::Tensor col_t = at::empty({N}, opts);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  chunk_gemms(a, b, R, offset, buf, wbuf, grad, da, db, [&](const RowChunk& c) {
    const int err = cuda::gamma_onepass_chunk(
        c.k, sc.const_data_ptr(), ar.const_data_ptr(), ac.const_data_ptr(), w_row, w_col, clamp,
        grad, row_lse.data_ptr(), row_term.data_ptr(), col_m.data_ptr(), col_s.data_ptr(),
        col_t.data_ptr(), c.k.row0 == 0, c.k.row0 + c.k.rows == M, col_lse.data_ptr(),
        col_term.data_ptr(), work.data_ptr(), stream);
    C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  });
  return {row_lse, col_lse, row_term, col_term, da, db};
}

}  // namespace

GC_CUDA_IMPL(m) { m.impl("gamma_onepass_fwd", &gamma_onepass_fwd_cuda); }

}  // namespace gammacl
