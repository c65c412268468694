// gamma_onepass, CUDA epilogue kernels for the chunked backend (gamma_onepass_cuda.cpp does the
// GEMMs; contract: python/gammacl/ops/gamma_onepass.py).
//
// Per row chunk the torch side computes S = A_c @ B^T (raw dots; fp32, or fp64) with cuBLAS. One
// kernel reads S once and produces everything the one-pass op needs from it. With l = mul_rn(scale,
// S) (natural units throughout, every e^d one ex2(d log2 e): cuda_epilogue.cuh), entry
// (i, i + offset) excluded (l = -inf):
//
//   row_lse_i  = LSE_j l_ij                col_lse_j  = LSE_i l_ij        (online partials)
//   er_ij = e^min(l_ij + alpha_row_i, clamp),   row_term_i = sum_j er_ij
//   ec_ij = e^min(l_ij + alpha_col_j, clamp),   col_term_j = sum_i ec_ij
//   W_ij  = w_row er_ij + w_col ec_ij                                       (0 on excluded entries)
//
// gamma_onepass_tile_kernel: a block owns a 64-row x 256-column tile (cuda_epilogue.cuh): warp w
// takes rows w, w+8, ...; each lane holds 8 columns. Per row: row LSE partial (warp max, warp sum),
// row-term partial (warp sum), column LSE partial (online, one exp2) and column-term partial (per
// lane, registers), and W stored at once (in place over S for fp32/fp64, or to a bf16 buffer for
// the tensor-core GEMMs). At the tile's end the 8 warps' column partials meet in shared memory:
// one (m, s, t) triple per (row tile, column). gamma_onepass_row_merge_kernel (a warp per row) and
// gamma_onepass_col_merge_kernel (a thread per column, folding in the running statistics of
// earlier chunks) finish. No atomics: every output element has one writer, in a fixed order.
//
// Cost per entry: S read once (4 B), W written once (2 B bf16, or 4 B in place), 4 exp2 (row LSE,
// column LSE, two weights) on the MUFU unit; partials ~5% of S. The weights' exp2 cannot reuse the
// LSE's: the cap applies to l + alpha, and the column LSE's online exp2 is relative to a moving
// max. ex2.approx.ftz flushes results below 2^-126 to 0: a weight under ~1e-38 counts as 0.
//
// All math is fp32 (fp64 for fp64 buffers); indexing is int64. No torch headers: nvcc
// compile-checks this file alone (tests/test_cuda_compile.py).
#include <cstdint>

#include "cuda_epilogue.cuh"
#include "kernel_api.h"

namespace gammacl::cuda {
namespace {

// min(x, c) keeping a NaN x NaN (fminf returns c for a NaN x).
template <typename A>
__device__ __forceinline__ A cap(A x, A c) {
  return c < x ? c : x;
}

// grid = (n_col_tiles, min(n_row_tiles, 65535)), block = kThreads. s: rows x n (ld_s), w: rows x n
// (ld_w; may alias s when TW == T: every element is read and then written by the same thread; null
// when !grad). row_p*: [rows, n_ct] partials (LSE max, LSE sum, term); col_p*: [n_rt, n].
template <typename T, typename TW, int VEC>
__global__ void __launch_bounds__(kThreads)
    gamma_onepass_tile_kernel(const T* s, TW* w, int64_t rows, int64_t n, int64_t ld_s,
                              int64_t ld_w, int64_t row0, int64_t offset,
                              const Acc<T>* __restrict__ scale,
                              const Acc<T>* __restrict__ alpha_row,
                              const Acc<T>* __restrict__ alpha_col, Acc<T> w_row, Acc<T> w_col,
                              Acc<T> cl, bool grad, Acc<T>* __restrict__ row_pm,
                              Acc<T>* __restrict__ row_ps, Acc<T>* __restrict__ row_pt,
                              Acc<T>* __restrict__ col_pm, Acc<T>* __restrict__ col_ps,
                              Acc<T>* __restrict__ col_pt, int64_t n_ct, int64_t n_rt) {
  using A = Acc<T>;
  constexpr int U = kPerLane / VEC;
  __shared__ ColSmem<A> sm;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t ct = blockIdx.x;
  const int64_t col0 = ct * kTileCols;
  const A sl = scale[0];
  const A ninf = neg_inf<A>();

  A ac[kPerLane];  // alpha_col of the lane's columns (unused where padded)
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t j = col0 + tile_col<VEC>(k, lane);
    ac[k] = j < n ? alpha_col[j] : A(0);
  }

  for (int64_t rt = blockIdx.y; rt < n_rt; rt += gridDim.y) {
    A cm[kPerLane], cs[kPerLane], ctm[kPerLane];
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      cm[k] = ninf;
      cs[k] = A(0);
      ctm[k] = A(0);
    }
    for (int rr = warp; rr < kTileRows; rr += kWarps) {
      const int64_t r = rt * kTileRows + rr;
      if (r >= rows) break;  // warp-uniform
      const int64_t i = row0 + r;
      A l[kPerLane];
      load_row_logits<VEC>(s + r * ld_s, col0, lane, n, i + offset, sl, l);
      A m, sum;
      warp_row_partial(l, m, sum);
      const A ar = alpha_row[i];
      A wv[kPerLane];
      A term = A(0);
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const bool live = l[k] != ninf;  // excluded and padded entries weigh 0
        const A er = live ? ex(cap(l[k] + ar, cl)) : A(0);
        const A ec = live ? ex(cap(l[k] + ac[k], cl)) : A(0);
        term += er;
        ctm[k] += ec;
        online_push(cm[k], cs[k], l[k]);
        wv[k] = w_row * er + w_col * ec;
      }
      term = warp_sum(term);
      if (lane == 0) {
        row_pm[r * n_ct + ct] = m;
        row_ps[r * n_ct + ct] = sum;
        row_pt[r * n_ct + ct] = term;
      }
      if (grad) {  // kernel-uniform
        TW* wrow = w + r * ld_w;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t j0 = col0 + int64_t(u * 32 + lane) * VEC;
          if (j0 < n) {
            Pack<TW, VEC> q;
#pragma unroll
            for (int v = 0; v < VEC; ++v) q.v[v] = from_acc<TW>(wv[u * VEC + v]);
            *reinterpret_cast<Pack<TW, VEC>*>(wrow + j0) = q;
          }
        }
      }
    }
    A m, sum;
    block_col_merge<VEC>(cm, cs, sm, m, sum);
    const A t = block_col_sum<VEC>(ctm, sm.m);
    const int64_t j = col0 + threadIdx.x;  // kThreads == kTileCols
    if (j < n) {
      col_pm[rt * n + j] = m;
      col_ps[rt * n + j] = sum;
      col_pt[rt * n + j] = t;
    }
  }
}

// A warp per row: the row's n_ct column-tile partials -> row_lse[row0 + r], row_term[row0 + r].
template <typename A>
__global__ void __launch_bounds__(kThreads)
    gamma_onepass_row_merge_kernel(const A* __restrict__ pm, const A* __restrict__ ps,
                                   const A* __restrict__ pt, int64_t rows, int64_t n_ct,
                                   int64_t row0, A* __restrict__ row_lse,
                                   A* __restrict__ row_term) {
  const int lane = threadIdx.x & 31;
  const int64_t warps_total = int64_t(gridDim.x) * kWarps;
  for (int64_t r = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); r < rows; r += warps_total) {
    A m = neg_inf<A>(), s = A(0), t = A(0);
    for (int64_t p = lane; p < n_ct; p += 32) {
      merge(m, s, pm[r * n_ct + p], ps[r * n_ct + p]);
      t += pt[r * n_ct + p];
    }
    warp_merge(m, s);
    t = warp_sum(t);
    if (lane == 0) {
      row_lse[row0 + r] = finalize_lse(m, s);
      row_term[row0 + r] = t;
    }
  }
}

// A thread per column: the running (gm, gs, gt) of earlier chunks (ignored when `first`) merged
// with this chunk's n_rt row-tile partials; stored back, or finalised into col_lse / col_term when
// `last`.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    gamma_onepass_col_merge_kernel(const A* __restrict__ pm, const A* __restrict__ ps,
                                   const A* __restrict__ pt, int64_t n_rt, int64_t n,
                                   A* __restrict__ gm, A* __restrict__ gs, A* __restrict__ gt,
                                   bool first, bool last, A* __restrict__ col_lse,
                                   A* __restrict__ col_term) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    A m = first ? neg_inf<A>() : gm[j];
    A s = first ? A(0) : gs[j];
    A t = first ? A(0) : gt[j];
    for (int64_t q = 0; q < n_rt; ++q) {
      merge(m, s, pm[q * n + j], ps[q * n + j]);
      t += pt[q * n + j];
    }
    if (last) {
      col_lse[j] = finalize_lse(m, s);
      col_term[j] = t;
    } else {
      gm[j] = m;
      gs[j] = s;
      gt[j] = t;
    }
  }
}

struct Work {
  int64_t n_ct, n_rt;
  size_t row_bytes, col_bytes;  // per partial array, 256-byte aligned
};

inline Work work_layout(int64_t rows, int64_t n, size_t acc_size) {
  Work f;
  f.n_ct = cdiv(n, kTileCols);
  f.n_rt = cdiv(rows, kTileRows);
  f.row_bytes = round_up(static_cast<size_t>(rows * f.n_ct) * acc_size, 256);
  f.col_bytes = round_up(static_cast<size_t>(f.n_rt * n) * acc_size, 256);
  return f;
}

template <typename T, typename TW>
int launch(const ChunkView& c, const void* scale, const void* alpha_row, const void* alpha_col,
           double w_row, double w_col, double clamp, bool grad, void* row_lse, void* row_term,
           void* col_m, void* col_s, void* col_t, bool first, bool last, void* col_lse,
           void* col_term, void* work, cudaStream_t stream) {
  using A = Acc<T>;
  const int64_t rows = c.rows, n = c.n;
  const Work f = work_layout(rows, n, sizeof(A));
  // Workspace: row_pm | row_ps | row_pt | col_pm | col_ps | col_pt.
  char* base = static_cast<char*>(work);
  A* row_p[3];
  A* col_p[3];
  for (int q = 0; q < 3; ++q) {
    row_p[q] = reinterpret_cast<A*>(base + q * f.row_bytes);
    col_p[q] = reinterpret_cast<A*>(base + 3 * f.row_bytes + q * f.col_bytes);
  }
  const dim3 grid(static_cast<unsigned>(f.n_ct), grid_cap(f.n_rt));
  constexpr int VEC = 16 / sizeof(T);  // 16-byte loads of S; W stores VEC * sizeof(TW) bytes
  auto kernel = packed(c, VEC, grad ? sizeof(TW) : 0) ? gamma_onepass_tile_kernel<T, TW, VEC>
                                                      : gamma_onepass_tile_kernel<T, TW, 1>;
  GC_LAUNCH(grid, kThreads, stream, kernel)(
      typed<T>(c.s), typed<TW>(c.w), rows, n, c.ld_s, c.ld_w, c.row0, c.offset, typed<A>(scale),
      typed<A>(alpha_row), typed<A>(alpha_col), static_cast<A>(w_row), static_cast<A>(w_col),
      static_cast<A>(clamp), grad, row_p[0], row_p[1], row_p[2], col_p[0], col_p[1], col_p[2],
      f.n_ct, f.n_rt);
  GC_LAUNCH(grid_cap(cdiv(rows, kWarps)), kThreads, stream, gamma_onepass_row_merge_kernel<A>)(
      row_p[0], row_p[1], row_p[2], rows, f.n_ct, c.row0, typed<A>(row_lse), typed<A>(row_term));
  GC_LAUNCH(grid_cap(cdiv(n, kThreads)), kThreads, stream, gamma_onepass_col_merge_kernel<A>)(
      col_p[0], col_p[1], col_p[2], f.n_rt, n, typed<A>(col_m), typed<A>(col_s), typed<A>(col_t),
      first, last, typed<A>(col_lse), typed<A>(col_term));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

size_t gamma_onepass_workspace_bytes(int64_t rows, int64_t n, bool f64) {
  const Work f = work_layout(rows, n, f64 ? sizeof(double) : sizeof(float));
  return 3 * f.row_bytes + 3 * f.col_bytes;
}

int gamma_onepass_chunk(const ChunkView& c, const void* scale, const void* alpha_row,
                        const void* alpha_col, double w_row, double w_col, double clamp, bool grad,
                        void* row_lse, void* row_term, void* col_m, void* col_s, void* col_t,
                        bool first, bool last, void* col_lse, void* col_term, void* work,
                        CUstream_st* stream) {
  using gammacl::GcType;
  if (c.rows <= 0 || c.n <= 0) return static_cast<int>(cudaSuccess);
#define GC_DISPATCH(TS, TWT)                                                                    \
  launch<TS, TWT>(c, scale, alpha_row, alpha_col, w_row, w_col, clamp, grad, row_lse, row_term, \
                  col_m, col_s, col_t, first, last, col_lse, col_term, work, stream)
  const GcType s_type = c.s_type, w_type = c.w_type;
  if (s_type == GcType::F32 && (!grad || w_type == GcType::F32)) return GC_DISPATCH(float, float);
  if (s_type == GcType::F32 && w_type == GcType::BF16) return GC_DISPATCH(float, __nv_bfloat16);
  if (s_type == GcType::F64 && (!grad || w_type == GcType::F64)) return GC_DISPATCH(double, double);
#undef GC_DISPATCH
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace gammacl::cuda
