// siglip, CPU: value and gradient of the pairwise sigmoid (SigLIP) loss in one sweep (contract:
// python/gammacl/ops/siglip.py).
//
//   l_ij = scale * <a_i, b_j> + bias,  z_ij = +1 at (i, i + offset), -1 elsewhere,  y = -z l
//   row_loss_i = sum_j softplus(y_ij)       W_ij = -z_ij sigmoid(y_ij)      row_wsum_i = sum_j W_ij
//   row_wdot_i = sum_j W_ij <a_i, b_j>      da_raw = W @ b,  db_raw = W^T @ a  (only when grad)
//
// Per row chunk (rows chosen so one chunk x N buffer stays under GAMMACL_CPU_CHUNK_MIB, default
// 32): S = a_chunk @ b^T (ATen GEMM, 2RND FLOPs) into the buffer; epilogue parallel over rows
// (OpenMP via at::parallel_for; each task owns its rows): one exp per entry,
// e = e^{-|y|}, softplus(y) = max(y, 0) + log1p(e), sigmoid(y) = (y >= 0 ? 1 : e) / (1 + e),
// W written over S in place; then da_chunk = W @ b, db += W^T @ a_chunk (2 x 2RND FLOPs).
// 6MND FLOPs in all (3 GEMM-equivalents); memory O(chunk * N + (M + N) * D). Inputs are up-cast
// once to the accumulation dtype (fp32, or fp64 for fp64 inputs). No column statistic exists,
// so every sum has a fixed order whatever the thread count (deterministic).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "checks.h"
#include "kernel_api.h"

namespace {

constexpr double kCpuChunkMiB = 32.0;  // GAMMACL_CPU_CHUNK_MIB, shared with the other CPU ops

template <typename T>
void siglip_impl(const at::Tensor& af, const at::Tensor& bf, T sc, T bias, int64_t offset,
                 bool grad, at::Tensor& row_loss, at::Tensor& row_wsum, at::Tensor& row_wdot,
                 at::Tensor& da, at::Tensor& db) {
  const int64_t m = af.size(0), n = bf.size(0);
  const int64_t step =
      gammacl::chunk_rows(m, n * static_cast<int64_t>(sizeof(T)),
                          gammacl::chunk_budget_bytes("GAMMACL_CPU_CHUNK_MIB", kCpuChunkMiB), 8);
  at::Tensor buf = at::empty({step, n}, af.options());
  const at::Tensor bt = bf.t();
  T* rl = row_loss.data_ptr<T>();
  T* rw = row_wsum.data_ptr<T>();
  T* rd = grad ? row_wdot.data_ptr<T>() : nullptr;
  for (int64_t i0 = 0; i0 < m; i0 += step) {
    const int64_t rows = std::min(step, m - i0);
    at::Tensor s = buf.narrow(0, 0, rows);
    at::mm_out(s, af.narrow(0, i0, rows), bt);
    T* S = s.data_ptr<T>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        T* srow = S + i * n;
        const int64_t pos = i0 + i + offset;  // the positive column of this row (may be outside)
        T loss = T(0), wsum = T(0), wdot = T(0);
        for (int64_t j = 0; j < n; ++j) {
          const T sv = srow[j];
          const T l = sc * sv + bias;
          const bool p = j == pos;
          const T y = p ? -l : l;              // y = -z l
          const T e = std::exp(-std::abs(y));  // in (0, 1]; NaN stays NaN
          loss += (y > T(0) ? y : T(0)) + std::log1p(e);
          const T sig = (y >= T(0) ? T(1) : e) / (T(1) + e);
          const T w = p ? -sig : sig;  // W = -z sigmoid(y)
          wsum += w;
          wdot += w * sv;
          srow[j] = w;
        }
        rl[i0 + i] = loss;
        rw[i0 + i] = wsum;
        if (rd) rd[i0 + i] = wdot;
      }
    });
    if (grad) {
      at::Tensor da_c = da.narrow(0, i0, rows);
      at::mm_out(da_c, s, bf);
      db.addmm_(s.t(), af.narrow(0, i0, rows));
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_fwd_cpu(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& bias,
    int64_t offset, bool grad) {
  const char* op = "gammacl::siglip_fwd (cpu)";
  const gammacl::Problem pr = gammacl::check_problem(op, a, b, scale, at::kCPU);
  const auto acc = pr.acc;
  const int64_t m = pr.M, n = pr.N, d = pr.D;
  TORCH_CHECK(bias.numel() == 1, op, ": bias must have one element, got shape ", bias.sizes());
  gammacl::check_on(op, "bias", bias, a, acc);
  const auto opts = a.options().dtype(acc);
  at::Tensor af = a.to(acc).contiguous(), bf = b.to(acc).contiguous();
  at::Tensor row_loss = at::zeros({m}, opts), row_wsum = at::zeros({m}, opts);
  at::Tensor row_wdot = at::zeros({grad ? m : 0}, opts);  // the scale's gradient: grad only
  at::Tensor da = at::zeros({grad ? m : 0, d}, opts), db = at::zeros({grad ? n : 0, d}, opts);
  if (m == 0 || n == 0) return {row_loss, row_wsum, row_wdot, da, db};
  if (acc == at::kDouble) {
    siglip_impl<double>(af, bf, scale.item<double>(), bias.item<double>(), offset, grad, row_loss,
                        row_wsum, row_wdot, da, db);
  } else {
    siglip_impl<float>(af, bf, scale.item<float>(), bias.item<float>(), offset, grad, row_loss,
                       row_wsum, row_wdot, da, db);
  }
  return {row_loss, row_wsum, row_wdot, da, db};
}

TORCH_LIBRARY_FRAGMENT(gammacl, m) {
  m.def(
      "siglip_fwd(Tensor a, Tensor b, Tensor scale, Tensor bias, int offset, bool grad) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gammacl, CPU, m) { m.impl("siglip_fwd", &siglip_fwd_cpu); }
