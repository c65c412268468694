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
//             ds (+)= sum_ij W_ij S_ij           from the kernel's per-block partials of the
//                                                acc-typed W (not <A, da>: 16-bit W cancels)
//             (fp16 W carries a power-of-two scale against underflow, removed at the end)
// 2MND + 6MND FLOPs (4 GEMMs per forward + backward). Logits are never stored in bf16: a bf16
// logit carries ~0.4 absolute error at scale 100.
//
// The scale is a 0-d device tensor read by the kernels (the GEMMs compute raw a.b^T), so there is
// no host sync anywhere and a forward + backward can be captured in a CUDA graph. Everything is
// enqueued on at::cuda::getCurrentCUDAStream(); buffers come from the caching allocator.
//
// Chunk size: the largest R with R * N * (bytes of S [+ W] + partials) <= GAMMACL_CUDA_CHUNK_MIB
// (default 512 MiB, cuda_binding.h says why), rounded down to a multiple of 128 rows. At N = 65536
// (fp32 S, bf16 W) that is 1280 rows in the backward: each GEMM is then 1280 x 65536 x D.
//
// GEMMs and the chunk budget: cuda_binding.h; the checks and empty problems: simlse_*_entry in
// checks.h.
#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

#include "cuda_binding.h"
#include "kernel_api.h"

namespace gammacl {
namespace {

// Bytes per chunk row: the S buffer (+ W buffer) + forward partials (2 acc values per 256
// columns and per column / 64 rows).
int64_t bytes_per_row(int64_t n, int64_t acc_size, int64_t w_size, bool fwd) {
  int64_t b = n * (acc_size + w_size);
  if (fwd) b += 2 * acc_size * ((n + 255) / 256 + (n + 63) / 64);
  return b;
}

// fp16 W: |W_ij| <= u_i (the caller's row bound), but typical entries (g ~ 1/N times a
// probability ~ 1/N) fall below fp16's normal range (6e-5), and one scale for all rows loses
// the rows whose g is 2^-24 below the largest. Row i is scaled by sigma_i = 2^(14 - ceil
// log2 u_i) (1 where u_i is 0 or not finite; exact, on the device: no sync); da rows are
// divided by sigma_i, and db = W^T A = (1 / sigma_min) W'^T A_s with A_s_i = A_i sigma_min /
// sigma_i (a factor <= 1; an [R, D] fp16 copy per chunk), as kernels/simlse_tiled.py.
struct Fp16Rows {
  at::Tensor sigma, sigma_min, a_s;

  Fp16Rows(const at::Tensor& u, int64_t R, int64_t D, const at::TensorOptions& half) {
    const at::Tensor ok = at::isfinite(u).logical_and_(u > 0);
    const at::Tensor e =
        at::clamp(at::ceil(at::log2(at::where(ok, u, at::ones_like(u)))), -100.0, 100.0);
    sigma = at::where(ok, at::exp2(14.0 - e), at::ones_like(u));
    sigma_min = sigma.amin();
    a_s = at::empty({R, D}, half);
  }

  // db's operand for the chunk: A_c rows times sigma_min / sigma_i.
  void db_operand(const at::Tensor& a, RowChunk& c) const {
    const int64_t i0 = c.k.row0, rows = c.k.rows;
    at::Tensor as_c = a_s.narrow(0, 0, rows);
    as_c.copy_(a.narrow(0, i0, rows).to(sigma.scalar_type()) *
               (sigma_min / sigma.narrow(0, i0, rows)).unsqueeze(1));
    c.a_db = static_cast<const char*>(as_c.const_data_ptr());
    c.ld_db = a.size(1);
  }

  // da rows carry sigma_i, db (when defined) carries sigma_min.
  void undo(at::Tensor& da, at::Tensor& db) const {
    da.div_(sigma.unsqueeze(1));
    if (db.defined()) db.div_(sigma_min);
  }
};

// Non-empty problems (simlse_fwd_entry in checks.h does the checks and the empty ones).
std::tuple<at::Tensor, at::Tensor> simlse_fwd_cuda(const SimlseProblem& pr, const at::Tensor& a_in,
                                                   const at::Tensor& b_in, const at::Tensor& scale,
                                                   int64_t offset, bool exclude_pos, bool cols,
                                                   const std::optional<at::Tensor>& col_scale) {
  const auto acc = pr.acc;
  const int64_t M = pr.M, N = pr.N;
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = gemm_operand(a_in), b = gemm_operand(b_in);
  const at::Tensor sc = scale.contiguous();
  const at::Tensor csc = pr.vec && cols ? col_scale->contiguous() : at::Tensor();
  const auto opts = a.options().dtype(acc);
  at::Tensor row = at::empty({M}, opts), col = at::empty({cols ? N : 0}, opts);
  const int64_t asz = at::elementSize(acc);
  const int64_t R = cuda_chunk_rows(M, bytes_per_row(N, asz, 0, true));
  at::Tensor buf = at::empty({R, N}, opts);
  at::Tensor work =
      at::empty({static_cast<int64_t>(cuda::simlse_fwd_workspace_bytes(R, N, acc == at::kDouble))},
                a.options().dtype(at::kByte));
  at::Tensor col_m = at::empty({cols ? N : 0}, opts), col_l = at::empty({cols ? N : 0}, opts);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  chunk_gemms(a, b, R, offset, buf, buf, false, at::Tensor(), at::Tensor(), [&](const RowChunk& c) {
    const int err = cuda::simlse_fwd_chunk(
        c.k, exclude_pos, cols, sc.const_data_ptr(), row.data_ptr(),
        cols ? col_m.data_ptr() : nullptr, cols ? col_l.data_ptr() : nullptr, c.k.row0 == 0,
        c.k.row0 + c.k.rows == M, cols ? col.data_ptr() : nullptr, work.data_ptr(), stream, pr.vec,
        csc.defined() ? csc.const_data_ptr() : nullptr);
    C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  });
  return {row, col};
}

// Vector scales (scale [M], col_scale [N] when cols; ops/simlse.py): per chunk S = A_c B^T, the
// vector weight kernel writes W = g_r rs p + g_c cs p' (scales inside W) and partial sums of
// p S (per warp per row) and p' S (per block row per column); then the two GEMMs. Returns
// (dA, dB, cat(drs, dcs)). fp16 W: Fp16Rows with the bound |g_r_i rs_i| + max_j |g_c_j cs_j|.
std::tuple<at::Tensor, at::Tensor, at::Tensor> simlse_bwd_cuda_vec(
    const SimlseProblem& pr, const at::Tensor& a_in, const at::Tensor& b_in,
    const at::Tensor& scale, const std::optional<at::Tensor>& col_scale, const at::Tensor& row_lse,
    const at::Tensor& col_lse, const at::Tensor& g_row, const at::Tensor& g_col, int64_t offset,
    bool exclude_pos, bool cols, bool need_db) {
  const auto acc = pr.acc;
  const int64_t M = pr.M, N = pr.N, D = pr.D;
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = gemm_operand(a_in), b = gemm_operand(b_in);
  const at::Tensor rs = scale.contiguous();
  const at::Tensor cs = cols ? col_scale->contiguous() : at::Tensor();
  const at::Tensor rl = row_lse.contiguous(), gr = g_row.contiguous();
  const at::Tensor cl = col_lse.contiguous(), gc = g_col.contiguous();
  const auto opts = a.options().dtype(acc);
  at::Tensor da = at::empty({M, D}, opts);
  at::Tensor db = need_db ? at::empty({N, D}, opts) : at::Tensor();  // undefined: no dB GEMM
  at::Tensor ds = at::zeros({M + (cols ? N : 0)}, opts);
  const auto in = a.scalar_type();
  const bool half = in == at::kHalf || in == at::kBFloat16;
  const int64_t asz = at::elementSize(acc);
  const int64_t R = cuda_chunk_rows(M, bytes_per_row(N, asz, half ? 2 : 0, false));
  at::Tensor buf = at::empty({R, N}, opts);
  at::Tensor wbuf = half ? at::empty({R, N}, a.options()) : buf;
  std::optional<Fp16Rows> f16;  // W carries g * scale: u_i = |g_r_i rs_i| + max_j |g_c_j cs_j|
  if (in == at::kHalf) {
    at::Tensor u = (gr * rs).abs();
    if (cols && N > 0) u = u + (gc * cs).abs().amax();
    f16.emplace(u, R, D, a.options());
  }
  at::Tensor drs_part =
      at::empty({R, static_cast<int64_t>(cuda::simlse_bwd_vec_row_partials(N))}, opts);
  at::Tensor dcs_part =
      at::empty({cols ? static_cast<int64_t>(cuda::simlse_bwd_vec_col_partials(R)) : 0, N}, opts);
  at::Tensor drs = ds.narrow(0, 0, M), dcs = ds.narrow(0, M, cols ? N : 0);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  chunk_gemms(a, b, R, offset, buf, wbuf, true, da, db, [&](RowChunk& c) {
    int64_t stride = 0, crow = 0;
    const int err = cuda::simlse_bwd_weights_vec(
        c.k, exclude_pos, cols, rs.const_data_ptr(), cols ? cs.const_data_ptr() : nullptr,
        rl.const_data_ptr(), cols ? cl.const_data_ptr() : nullptr, gr.const_data_ptr(),
        cols ? gc.const_data_ptr() : nullptr, f16 ? f16->sigma.const_data_ptr() : nullptr,
        drs_part.data_ptr(), &stride, cols ? dcs_part.data_ptr() : nullptr, &crow, stream);
    C10_CUDA_CHECK(static_cast<cudaError_t>(err));
    // drs_i = g_r_i sum_j p_ij S_ij;  dcs accumulates sum_i p'_ij S_ij (times g_c at the end)
    const int64_t i0 = c.k.row0, rows = c.k.rows;
    at::Tensor parts = drs_part.view({-1}).narrow(0, 0, rows * stride).view({rows, stride});
    drs.narrow(0, i0, rows).copy_(gr.narrow(0, i0, rows) * parts.sum(1));
    if (cols) dcs.add_(dcs_part.narrow(0, 0, crow).sum(0));
    if (f16 && need_db) f16->db_operand(a, c);
  });
  if (cols) dcs.mul_(gc);
  if (f16) f16->undo(da, db);
  return {da, need_db ? db : at::zeros({0, D}, opts), ds};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> simlse_bwd_cuda(
    const SimlseProblem& pr, const at::Tensor& a_in, const at::Tensor& b_in,
    const at::Tensor& scale, const at::Tensor& row_lse, const at::Tensor& col_lse,
    const at::Tensor& g_row, const at::Tensor& g_col, int64_t offset, bool exclude_pos, bool cols,
    const std::optional<at::Tensor>& col_scale, bool need_db) {
  if (pr.vec)
    return simlse_bwd_cuda_vec(pr, a_in, b_in, scale, col_scale, row_lse, col_lse, g_row, g_col,
                               offset, exclude_pos, cols, need_db);
  const auto acc = pr.acc;
  const int64_t M = pr.M, N = pr.N, D = pr.D;
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = gemm_operand(a_in), b = gemm_operand(b_in);
  const at::Tensor sc = scale.contiguous();
  const at::Tensor rl = row_lse.contiguous(), gr = g_row.contiguous();
  const at::Tensor cl = col_lse.contiguous(), gc = g_col.contiguous();
  const auto opts = a.options().dtype(acc);
  at::Tensor da = at::empty({M, D}, opts);
  at::Tensor db = need_db ? at::empty({N, D}, opts) : at::Tensor();  // undefined: no dB GEMM
  at::Tensor ds = at::zeros({}, opts);
  const auto in = a.scalar_type();
  const bool half = in == at::kHalf || in == at::kBFloat16;  // W in the input dtype
  const int64_t asz = at::elementSize(acc);
  const int64_t R = cuda_chunk_rows(M, bytes_per_row(N, asz, half ? 2 : 0, false));
  at::Tensor buf = at::empty({R, N}, opts);
  at::Tensor wbuf = half ? at::empty({R, N}, a.options()) : buf;
  std::optional<Fp16Rows> f16;  // u_i = |g_r_i| + max_j |g_c_j| >= max_j |W_ij|
  if (in == at::kHalf) {
    at::Tensor u = gr.abs();
    if (cols && N > 0) u = u + gc.abs().amax();
    f16.emplace(u, R, D, a.options());
  }
  at::Tensor ds_part = at::empty({static_cast<int64_t>(cuda::simlse_bwd_ds_partials(R, N))}, opts);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  chunk_gemms(a, b, R, offset, buf, wbuf, true, da, db, [&](RowChunk& c) {
    int64_t n_part = 0;
    const int err = cuda::simlse_bwd_weights(
        c.k, exclude_pos, cols, sc.const_data_ptr(), rl.const_data_ptr(),
        cols ? cl.const_data_ptr() : nullptr, gr.const_data_ptr(),
        cols ? gc.const_data_ptr() : nullptr, f16 ? f16->sigma.const_data_ptr() : nullptr,
        ds_part.data_ptr(), &n_part, stream);
    C10_CUDA_CHECK(static_cast<cudaError_t>(err));
    ds.add_(ds_part.narrow(0, 0, n_part).sum());
    if (f16 && need_db) f16->db_operand(a, c);
  });
  if (f16) f16->undo(da, db);
  return {da, need_db ? db : at::zeros({0, D}, opts), ds};
}

constexpr char kFwdOp[] = "gammacl::simlse_fwd (cuda)";
constexpr char kBwdOp[] = "gammacl::simlse_bwd (cuda)";

}  // namespace

GC_CUDA_IMPL(m) {
  m.impl("simlse_fwd", &simlse_fwd_entry<kFwdOp, kKernelDevice, simlse_fwd_cuda>);
  m.impl("simlse_bwd", &simlse_bwd_entry<kBwdOp, kKernelDevice, simlse_bwd_cuda>);
}

}  // namespace gammacl
