// gamma_onepass, CPU: value and gradient of the decomposable (gamma / SogCLR) negative term in one
// sweep (contract: python/gammacl/ops/gamma_onepass.py).
//
//   l_ij = scale * <a_i, b_j>, entries (i, i + offset) excluded
//   row_lse_i  = LSE_j l_ij                          col_lse_j  = LSE_i l_ij
//   row_term_i = sum_j e^{min(l_ij + alpha_row_i, clamp)}   col_term_j = sum_i e^{min(l_ij +
//   alpha_col_j, clamp)} W_ij = w_row e^{min(l_ij + alpha_row_i, clamp)} + w_col e^{min(l_ij +
//   alpha_col_j, clamp)} da_raw = W @ b,  db_raw = W^T @ a                       (only when grad)
//
// Per row chunk (rows chosen so one chunk x N buffer stays under GAMMACL_CPU_CHUNK_MIB, default
// 32):
//   S = a_chunk @ b^T (ATen GEMM, 2RND FLOPs) into the buffer;
//   column epilogue (parallel over column ranges; each task owns its columns): chunk column
//   max, q = e^{l - max} (column LSE, merged across chunks) and e^{l + alpha_col} = q e^{max +
//   alpha_col} into a second buffer as w_col e^{...}; col_term;
//   row epilogue (parallel over rows): p = e^{l - rowmax} for the row LSE and e^{l + alpha_row}
//   = p e^{rowmax + alpha_row}; row_term; W written over S in place.
//   Two exps per entry (one per direction) while no exponent reaches the cap; else four.
//   da_chunk = W @ b, db += W^T @ a_chunk (2 x 2RND FLOPs).
// 6MND FLOPs in all (3 GEMM-equivalents); memory O(chunk * N + (M + N) * D). Inputs are
// up-cast once to the accumulation dtype (fp32, or fp64 for fp64 inputs).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <vector>

#include "checks.h"
#include "kernel_api.h"

namespace {

constexpr double kCpuChunkMiB = 32.0;  // default chunk x N buffer budget; GAMMACL_CPU_CHUNK_MIB

// Rows per chunk under the cpp backend's shared budget (GAMMACL_CPU_CHUNK_MIB, as simlse.cpp).
int64_t cpu_chunk_rows(int64_t m, int64_t n, int64_t itemsize) {
  return gammacl::chunk_rows(m, n * itemsize,
                             gammacl::chunk_budget_bytes("GAMMACL_CPU_CHUNK_MIB", kCpuChunkMiB), 8);
}

// log(sum) + shift with an empty sum -> -inf and a NaN sum kept NaN.
template <typename T>
T finish_lse(T shift, T sum) {
  if (sum > T(0)) return shift + std::log(sum);
  if (std::isnan(sum)) return sum;
  return -std::numeric_limits<T>::infinity();
}

// min(x, c) that keeps a NaN x NaN (std::min(x, c) returns x when x is NaN; spelled out).
template <typename T>
inline T cap(T x, T c) {
  return c < x ? c : x;
}

// e^{min(l + alpha, clamp)} for the entries of one row (or column) whose max logit is `mx`:
// when every exponent of the line is below the cap (mx + alpha <= clamp) and e^{mx + alpha} is a
// normal number, e^{l + alpha} = e^{l - mx} * e^{mx + alpha} reuses the LSE's exponential, one
// multiply instead of one exp; otherwise (cap possibly active, or extreme ranges) exp directly.
template <typename T>
struct Weight {
  T factor;
  bool reuse;
  Weight(T mx, T alpha, T clamp) {
    const T lo = sizeof(T) == 4 ? T(-80) : T(-700);  // e^lo stays a normal number
    const T top = mx + alpha;
    reuse = top <= clamp && top >= lo;
    factor = reuse ? std::exp(top) : T(0);
  }
  T operator()(T p, T l, T alpha, T clamp) const {
    return reuse ? p * factor : std::exp(cap(l + alpha, clamp));
  }
};

template <typename T>
void onepass_impl(const at::Tensor& af, const at::Tensor& bf, T sc, const T* alpha_r,
                  const T* alpha_c, T w_row, T w_col, T clamp, int64_t offset, bool grad,
                  at::Tensor& row_lse, at::Tensor& col_lse, at::Tensor& row_term,
                  at::Tensor& col_term, at::Tensor& da, at::Tensor& db) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t m = af.size(0), n = bf.size(0);
  std::vector<T> cmax(n, ninf), csum(n, T(0));  // running column LSE = cmax + log csum
  std::vector<T> chunk_max(n), chunk_sum(n);
  T* ct = col_term.data_ptr<T>();
  T* rl = row_lse.data_ptr<T>();
  T* rt = row_term.data_ptr<T>();
  // two chunk x N buffers with grad (S, then W over it; the column weights w_col e^{...})
  const int64_t step = cpu_chunk_rows(m, n, (grad ? 2 : 1) * sizeof(T));
  at::Tensor buf = at::empty({step, n}, af.options());
  at::Tensor wbuf = at::empty({grad ? step : 0, n}, af.options());
  const at::Tensor bt = bf.t();
  for (int64_t i0 = 0; i0 < m; i0 += step) {
    const int64_t rows = std::min(step, m - i0);
    at::Tensor s = buf.narrow(0, 0, rows);
    at::mm_out(s, af.narrow(0, i0, rows), bt);
    s.mul_(sc);  // l = scale * S
    T* S = s.data_ptr<T>();
    T* WC = grad ? wbuf.data_ptr<T>() : nullptr;
    // columns (each task owns a column range): chunk max, then e^{l - max} once per entry for
    // both the column LSE and the column weight; merged into the running (cmax, csum)
    at::parallel_for(0, n, 256, [&](int64_t j0, int64_t j1) {
      std::fill(chunk_max.begin() + j0, chunk_max.begin() + j1, ninf);
      std::fill(chunk_sum.begin() + j0, chunk_sum.begin() + j1, T(0));
      for (int64_t i = 0; i < rows; ++i) {
        const T* srow = S + i * n;
        const int64_t ex = i0 + i + offset;  // excluded column of this row
        for (int64_t j = j0; j < j1; ++j) {
          if (j != ex && srow[j] > chunk_max[j]) chunk_max[j] = srow[j];
        }
      }
      std::vector<Weight<T>> wc;
      wc.reserve(j1 - j0);
      for (int64_t j = j0; j < j1; ++j) {
        if (chunk_max[j] == ninf) chunk_max[j] = T(0);  // nothing valid (yet): shift 0
        wc.emplace_back(chunk_max[j], alpha_c[j], clamp);
      }
      for (int64_t i = 0; i < rows; ++i) {
        const T* srow = S + i * n;
        T* wrow = grad ? WC + i * n : nullptr;
        const int64_t ex = i0 + i + offset;
        for (int64_t j = j0; j < j1; ++j) {
          if (j == ex) {
            if (grad) wrow[j] = T(0);
            continue;
          }
          const T l = srow[j];
          const T q = std::exp(l - chunk_max[j]);  // NaN l stays NaN
          chunk_sum[j] += q;
          const T ec = wc[j - j0](q, l, alpha_c[j], clamp);
          ct[j] += ec;
          if (grad) wrow[j] = w_col * ec;
        }
      }
      for (int64_t j = j0; j < j1; ++j) {  // (c, s) + (c', s') = (M, s e^{c - M} + s' e^{c' - M})
        const T c2 = chunk_max[j], s2 = chunk_sum[j];
        if (!(s2 > T(0)) && !std::isnan(s2)) continue;  // no valid entry in this chunk
        if (cmax[j] == ninf) {
          cmax[j] = c2;
          csum[j] = s2;
        } else {
          const T mx = c2 > cmax[j] ? c2 : cmax[j];
          csum[j] = csum[j] * std::exp(cmax[j] - mx) + s2 * std::exp(c2 - mx);
          cmax[j] = mx;
        }
      }
    });
    // rows: LSE, row_term, and W = w_row e^{...} + w_col e^{...} written over S
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        T* srow = S + i * n;
        const T* wrow = grad ? WC + i * n : nullptr;
        const int64_t ex = i0 + i + offset;
        const T ar = alpha_r[i0 + i];
        T mx = ninf;
        for (int64_t j = 0; j < n; ++j) {
          if (j != ex && srow[j] > mx) mx = srow[j];
        }
        const T shift = mx == ninf ? T(0) : mx;
        const Weight<T> wr(shift, ar, clamp);
        T sum = T(0), term = T(0);
        for (int64_t j = 0; j < n; ++j) {
          if (j == ex) {
            srow[j] = T(0);
            continue;
          }
          const T l = srow[j];
          const T p = std::exp(l - shift);
          sum += p;
          const T er = wr(p, l, ar, clamp);
          term += er;
          if (grad) srow[j] = w_row * er + wrow[j];
        }
        rl[i0 + i] = finish_lse(shift, sum);
        rt[i0 + i] = term;
      }
    });
    if (grad) {
      at::Tensor da_c = da.narrow(0, i0, rows);
      at::mm_out(da_c, s, bf);
      db.addmm_(s.t(), af.narrow(0, i0, rows));
    }
  }
  T* cl = col_lse.data_ptr<T>();
  for (int64_t j = 0; j < n; ++j) cl[j] = finish_lse(cmax[j] == ninf ? T(0) : cmax[j], csum[j]);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gamma_onepass_fwd_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                      const at::Tensor& alpha_row, const at::Tensor& alpha_col, double w_row,
                      double w_col, double clamp, int64_t offset, bool grad) {
  const char* op = "gammacl::gamma_onepass_fwd (cpu)";
  const gammacl::Problem pr = gammacl::check_problem(op, a, b, scale, at::kCPU);
  const auto acc = pr.acc;
  const int64_t m = pr.M, n = pr.N, d = pr.D;
  gammacl::check_vec(op, "alpha_row", alpha_row, m, a, acc);
  gammacl::check_vec(op, "alpha_col", alpha_col, n, a, acc);
  const auto opts = a.options().dtype(acc);
  at::Tensor af = a.to(acc).contiguous(), bf = b.to(acc).contiguous();
  at::Tensor ar = alpha_row.contiguous(), ac = alpha_col.contiguous();
  at::Tensor row_lse = at::empty({m}, opts), row_term = at::empty({m}, opts);
  at::Tensor col_lse = at::full({n}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor col_term = at::zeros({n}, opts);
  at::Tensor da = at::empty({grad ? m : 0, d}, opts), db = at::zeros({grad ? n : 0, d}, opts);
  if (m == 0 || n == 0) {
    row_lse.fill_(-std::numeric_limits<double>::infinity());
    row_term.zero_();
    da.zero_();
    return {row_lse, col_lse, row_term, col_term, da, db};
  }
  if (acc == at::kDouble) {
    onepass_impl<double>(af, bf, scale.item<double>(), ar.data_ptr<double>(), ac.data_ptr<double>(),
                         w_row, w_col, clamp, offset, grad, row_lse, col_lse, row_term, col_term,
                         da, db);
  } else {
    onepass_impl<float>(af, bf, scale.item<float>(), ar.data_ptr<float>(), ac.data_ptr<float>(),
                        static_cast<float>(w_row), static_cast<float>(w_col),
                        static_cast<float>(clamp), offset, grad, row_lse, col_lse, row_term,
                        col_term, da, db);
  }
  return {row_lse, col_lse, row_term, col_term, da, db};
}

TORCH_LIBRARY_FRAGMENT(gammacl, m) {
  m.def(
      "gamma_onepass_fwd(Tensor a, Tensor b, Tensor scale, Tensor alpha_row, Tensor alpha_col, "
      "float w_row, float w_col, float clamp, int offset, bool grad) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gammacl, CPU, m) { m.impl("gamma_onepass_fwd", &gamma_onepass_fwd_cpu); }
