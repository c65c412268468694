// Host-side argument checks of the torch bindings (CPU: simlse.cpp, gamma_onepass.cpp; CUDA:
// *_cuda.cpp via cuda_binding.h), and simlse's entry points, shared by its backends. Every message
// names the op, the argument and the values. Torch headers only; inline, so every translation unit
// can include it.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <optional>
#include <tuple>

namespace gammacl {

// fp32 statistics for fp16 / bf16 / fp32 inputs, fp64 for fp64.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// a [M, D], b [N, D]: 2-D, one feature dimension, one floating dtype, both on one device of
// type `dev` (the kernel's).
inline void check_features(const char* op, const at::Tensor& a, const at::Tensor& b,
                           at::DeviceType dev) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, op, ": a and b must be 2-D [rows, D], got shapes ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.size(1) == b.size(1), op, ": a and b must have the same feature dimension, got ",
              a.size(1), " and ", b.size(1));
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": a and b must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  const auto t = a.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": a and b must be float16, bfloat16, float32 or float64, got ", t);
  TORCH_CHECK(a.device().type() == dev && b.device() == a.device(), op, ": a and b must be on one ",
              dev, " device, got ", a.device(), " and ", b.device());
}

// t: dtype acc, on the features' device.
inline void check_on(const char* op, const char* name, const at::Tensor& t, const at::Tensor& a,
                     at::ScalarType acc) {
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must be ", acc,
              " (the accumulation dtype), got ", t.scalar_type());
  TORCH_CHECK(t.device() == a.device(), op, ": ", name, " is on ", t.device(),
              " but the features are on ", a.device());
}

// t: [n], dtype acc, on the features' device.
inline void check_vec(const char* op, const char* name, const at::Tensor& t, int64_t n,
                      const at::Tensor& a, at::ScalarType acc) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ",
              t.sizes());
  check_on(op, name, t, a, acc);
}

struct Problem {
  at::ScalarType acc;
  int64_t M, N, D;
};

// The checks every op starts with: the feature pair, and a one-element scale in the accumulation
// dtype on their device. Returns the accumulation dtype and M, N, D.
inline Problem check_problem(const char* op, const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& scale, at::DeviceType dev) {
  check_features(op, a, b, dev);
  const auto acc = acc_type(a.scalar_type());
  TORCH_CHECK(scale.numel() == 1, op, ": scale must have one element, got shape ", scale.sizes());
  check_on(op, "scale", scale, a, acc);
  return {acc, a.size(0), b.size(0), a.size(1)};
}

// simlse's scales: a one-element `scale` (one t for every logit), or vector mode (scale.dim() ==
// 1): `scale` [M] row scales and, when cols, `col_scale` [N] column scales (ops/simlse.py). Returns
// whether the call is in vector mode.
inline bool check_simlse_scales(const char* op, const Problem& pr, const at::Tensor& a,
                                const at::Tensor& scale, const std::optional<at::Tensor>& col_scale,
                                bool cols) {
  if (scale.dim() != 1) {
    TORCH_CHECK(!col_scale.has_value(), op,
                ": col_scale needs a vector scale of shape [M] (per-row scales), got scale of "
                "shape ",
                scale.sizes());
    return false;
  }
  check_vec(op, "scale", scale, pr.M, a, pr.acc);
  if (cols) {
    TORCH_CHECK(col_scale.has_value(), op,
                ": a vector scale with cols=True needs col_scale of "
                "shape [",
                pr.N, "]");
    check_vec(op, "col_scale", *col_scale, pr.N, a, pr.acc);
  }
  return true;
}

struct SimlseProblem : Problem {
  bool vec;  // vector scales (check_simlse_scales)
};

// Problem checks of simlse (the features, then the scales as above).
inline SimlseProblem check_simlse_problem(const char* op, const at::Tensor& a, const at::Tensor& b,
                                          const at::Tensor& scale,
                                          const std::optional<at::Tensor>& col_scale, bool cols,
                                          at::DeviceType dev) {
  check_features(op, a, b, dev);
  const auto acc = acc_type(a.scalar_type());
  const Problem pr{acc, a.size(0), b.size(0), a.size(1)};
  if (scale.dim() == 1) return {pr, check_simlse_scales(op, pr, a, scale, col_scale, cols)};
  check_simlse_scales(op, pr, a, scale, col_scale, cols);
  return {check_problem(op, a, b, scale, dev), false};
}

// simlse_bwd's statistics and upstream gradients: row_lse, g_row [M]; col_lse, g_col [N] (or [0]
// without column statistics).
inline void check_simlse_bwd_stats(const char* op, const Problem& pr, const at::Tensor& a,
                                   const at::Tensor& row_lse, const at::Tensor& col_lse,
                                   const at::Tensor& g_row, const at::Tensor& g_col, bool cols) {
  check_vec(op, "row_lse", row_lse, pr.M, a, pr.acc);
  check_vec(op, "g_row", g_row, pr.M, a, pr.acc);
  check_vec(op, "col_lse", col_lse, cols ? pr.N : 0, a, pr.acc);
  check_vec(op, "g_col", g_col, cols ? pr.N : 0, a, pr.acc);
}

// simlse_fwd and simlse_bwd as every backend registers them (schemas: simlse.cpp): the checks
// above under the op's name `Op` on the backend's device `Dev`; then an empty problem's outputs
// (forward M or N = 0: row [M], col [N or 0] LSEs of no terms, -inf; backward M, N or D = 0: zero
// da [M, D], db [N, D] ([0, D] without need_db) and ds, [M + N or M] for vector scales, []
// otherwise), else the backend's Fwd / Bwd with the checked problem first and the schema's
// arguments after it.
template <const char* Op, at::DeviceType Dev, auto Fwd>
std::tuple<at::Tensor, at::Tensor> simlse_fwd_entry(const at::Tensor& a, const at::Tensor& b,
                                                    const at::Tensor& scale, int64_t offset,
                                                    bool exclude_pos, bool cols,
                                                    const std::optional<at::Tensor>& col_scale) {
  const SimlseProblem pr = check_simlse_problem(Op, a, b, scale, col_scale, cols, Dev);
  if (pr.M > 0 && pr.N > 0) return Fwd(pr, a, b, scale, offset, exclude_pos, cols, col_scale);
  const auto opts = a.options().dtype(pr.acc);
  const double inf = std::numeric_limits<double>::infinity();
  return {at::full({pr.M}, -inf, opts), at::full({cols ? pr.N : 0}, -inf, opts)};
}

template <const char* Op, at::DeviceType Dev, auto Bwd>
std::tuple<at::Tensor, at::Tensor, at::Tensor> simlse_bwd_entry(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& row_lse,
    const at::Tensor& col_lse, const at::Tensor& g_row, const at::Tensor& g_col, int64_t offset,
    bool exclude_pos, bool cols, const std::optional<at::Tensor>& col_scale, bool need_db) {
  const SimlseProblem pr = check_simlse_problem(Op, a, b, scale, col_scale, cols, Dev);
  check_simlse_bwd_stats(Op, pr, a, row_lse, col_lse, g_row, g_col, cols);
  if (pr.M > 0 && pr.N > 0 && pr.D > 0) {
    return Bwd(pr, a, b, scale, row_lse, col_lse, g_row, g_col, offset, exclude_pos, cols,
               col_scale, need_db);
  }
  const auto opts = a.options().dtype(pr.acc);
  const at::Tensor ds = pr.vec ? at::zeros({pr.M + (cols ? pr.N : 0)}, opts) : at::zeros({}, opts);
  return {at::zeros({pr.M, pr.D}, opts), at::zeros({need_db ? pr.N : 0, pr.D}, opts), ds};
}

}  // namespace gammacl
