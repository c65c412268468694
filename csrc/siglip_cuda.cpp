// siglip, CUDA backend (torch side): chunked cuBLAS GEMMs + the fused epilogue of siglip_cuda.cu
// (contract: python/gammacl/ops/siglip.py).
//
// Per chunk of R rows (R from the memory budget GAMMACL_CUDA_CHUNK_MIB, default 256 MiB):
//   S = A_c @ B^T                   cuBLAS, raw dots, fp32 out from 16-bit operands (fp32
//                                   accumulate); fp32 / fp64 in their own type          2RND
//   siglip_chunk(S)                 row loss / wsum / wdot, and w_scale * W -- S read once
//   grad: da_c = W @ B;  db (+)= W^T @ A_c   fp32 (fp64) outputs                        4RND
//         W in the inputs' dtype for bf16 / fp16 (tensor cores; fp16 as W * 2^14, exact, so
//         the negatives' sigmoid ~ 4.5e-5 at bias -10 stays a normal fp16 number), in place
//         over S for fp32 / fp64
// 6MND FLOPs (3 GEMMs), never an M x N buffer beyond the R x N chunk. The fp16 scale is undone
// once at the end (da, db *= 2^-14, exact). No host sync: scale and bias are device scalars, so
// the op can be captured in a CUDA graph. No atomics (deterministic).
#include <algorithm>
#include <tuple>

#include "cuda_binding.h"
#include "kernel_api.h"

namespace gammacl {
namespace {

constexpr double kFp16WScale = 16384.0;  // 2^14

// Bytes per chunk row: S (+ a 16-bit W) + the per-256-column partials of the row statistics.
int64_t siglip_bytes_per_row(int64_t n, int64_t acc_size, int64_t w_size) {
  return n * (acc_size + w_size) + cuda::kSiglipStats * acc_size * ((n + 255) / 256);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_fwd_cuda(
    const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& scale, const at::Tensor& bias,
    int64_t offset, bool grad) {
  const char* op = "gammacl::siglip_fwd (cuda)";
  const Problem pr = check_problem(op, a_in, b_in, scale, kKernelDevice);
  const auto acc = pr.acc;
  const int64_t M = pr.M, N = pr.N, D = pr.D;
  TORCH_CHECK(bias.numel() == 1, op, ": bias must have one element, got shape ", bias.sizes());
  check_on(op, "bias", bias, a_in, acc);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = gemm_operand(a_in), b = gemm_operand(b_in);
  const at::Tensor sc = scale.contiguous(), bi = bias.contiguous();
  const auto opts = a.options().dtype(acc);
  at::Tensor stats = at::empty({cuda::kSiglipStats, M}, opts);  // loss, wsum, wdot rows
  at::Tensor da = at::empty({grad ? M : 0, D}, opts), db = at::empty({grad ? N : 0, D}, opts);
  if (M == 0 || N == 0) {  // empty sums
    stats.zero_();
    da.zero_();
    db.zero_();
    return {stats[0].clone(), stats[1].clone(), stats[2].narrow(0, 0, grad ? M : 0).clone(), da,
            db};
  }
  const auto in = a.scalar_type();
  const bool half_w = grad && (in == at::kBFloat16 || in == at::kHalf);
  const double w_scale = grad && in == at::kHalf ? kFp16WScale : 1.0;
  const int64_t asz = at::elementSize(acc);
  const int64_t R = cuda_chunk_rows(M, siglip_bytes_per_row(N, asz, half_w ? 2 : 0));
  at::Tensor buf = at::empty({R, N}, opts);
  at::Tensor wbuf = half_w ? at::empty({R, N}, a.options()) : buf;
  at::Tensor work =
      at::empty({static_cast<int64_t>(cuda::siglip_workspace_bytes(R, N, acc == at::kDouble))},
                a.options().dtype(at::kByte));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  chunk_gemms(a, b, R, offset, buf, wbuf, grad, da, db, [&](const RowChunk& c) {
    const int err = cuda::siglip_chunk(c.k, sc.const_data_ptr(), bi.const_data_ptr(), w_scale, grad,
                                       stats.data_ptr(), M, work.data_ptr(), stream);
    C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  });
  if (w_scale != 1.0) {  // undo the fp16 weight scaling (exact power of two)
    da.mul_(1.0 / w_scale);
    db.mul_(1.0 / w_scale);
  }
  // outputs never alias; row_wdot (the scale's gradient) with grad only
  return {stats[0].clone(), stats[1].clone(), stats[2].narrow(0, 0, grad ? M : 0).clone(), da, db};
}

}  // namespace

GC_CUDA_IMPL(m) { m.impl("siglip_fwd", &siglip_fwd_cuda); }

}  // namespace gammacl
