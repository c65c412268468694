// simlse, CUDA epilogue kernels for the chunked backend (simlse_cuda.cpp does the GEMMs).
//
// Per row chunk the torch side computes S = A_c @ B^T (raw dots, fp32 from bf16/fp16 operands, or
// fp64) with cuBLAS; these kernels turn S into statistics (forward) or gradient weights (backward)
// reading it exactly once. With l = mul_rn(scale, S) (rounded once; cuda_epilogue.cuh says why):
//
//   forward  row  r_i = m_i + ln sum_j e^(l_ij - m_i),   m_i = max_j l_ij
//            col  (m_j, s_j) over the chunk's rows, merged across chunks online:
//                 (m, s) + (m', s') = (M, s e^(m-M) + s' e^(m'-M)),  M = max(m, m')
//   backward W_ij = g_r_i e^(l_ij - r_i) + g_c_j e^(l_ij - c_j)   (0 on excluded entries)
//            dscale partial: sum_ij W_ij S_ij from the fp32 W (before any 16-bit rounding; the
//            caller's <A, W16 B> would cancel against the positive / smoothing terms)
//   (every e^d is one ex2(d log2 e) on the MUFU unit)
//
// Forward, one pass over S (simlse_fwd_tile_kernel): a block owns a 64-row x 256-column tile;
// warp w takes rows w, w+8, ...; each lane holds 8 columns (two 16-byte loads for fp32).
//   row partial : warp max, then warp sum of e^(l - max) (exact two-step, from registers), one
//                 (m, s) pair per (row, column tile) -> row_part
//   col partial : per lane, online over the warp's rows with one exp per entry:
//                   d = l - m;  e = e^-|d|;  d > 0 ? (s = s e + 1, m = l) : s += e
//                 then the 8 warps merge through shared memory -> one pair per (row tile, column)
// simlse_row_merge_kernel (a warp per row) and simlse_col_merge_kernel (a thread per column, also
// folding in the running statistics of earlier chunks) finish. No atomics: every output element
// has exactly one writer. Traffic per chunk: S read once (4 B/entry) + partials (~3% of S).
// Vector scales (scale [M] row scales, col_scale [N] column scales, ops/simlse.py): the forward's
// row logits read rs_i and its column partials cs_j; the backward's simlse_bwd_weight_vec_kernel
// writes W = g_r rs p + g_c cs p' and per-warp / per-block-row partials of the scale gradients.
// Backward (simlse_bwd_weight_kernel): elementwise, 16-byte vector loads/stores, two exp2 per
// entry; writes W in place (fp32/fp64) or to a bf16/fp16 buffer for the tensor-core GEMMs, and
// one dscale partial per block (per-thread sums of W_ij S_ij, one block reduction at the end).
//
// All math is fp32 (fp64 for fp64 buffers) on fp32/fp64/bf16/fp16 S buffers; indexing is int64.
// No torch headers: nvcc compile-checks this file alone (tests/test_cuda_compile.py).
#include <cmath>
#include <cstdint>

#include "cuda_epilogue.cuh"
#include "kernel_api.h"

namespace gammacl::cuda {
namespace {

// ---- forward ----

// grid = (n_col_tiles, min(n_row_tiles, 65535)), block = kThreads.
// row_pm/row_ps: [rows, n_ct] partials; col_pm/col_ps: [n_rt, n] partials (acc type).
// Vector scales (SV): the row logits of row i read scale[row0 + i], the column logits of column j
// col_scale[j] (l'_ij = cs_j S_ij, taken from the same S entries).
template <typename T, int VEC, bool SV>
__global__ void __launch_bounds__(kThreads)
    simlse_fwd_tile_kernel(const T* __restrict__ s, int64_t rows, int64_t n, int64_t ld,
                           int64_t row0, int64_t offset, bool exclude, bool cols,
                           const Acc<T>* __restrict__ scale, const Acc<T>* __restrict__ col_scale,
                           Acc<T>* __restrict__ row_pm, Acc<T>* __restrict__ row_ps,
                           Acc<T>* __restrict__ col_pm, Acc<T>* __restrict__ col_ps, int64_t n_ct,
                           int64_t n_rt) {
  using A = Acc<T>;
  __shared__ ColSmem<A> sm;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t ct = blockIdx.x;
  const int64_t col0 = ct * kTileCols;
  const A sl = SV ? A(0) : scale[0];

  for (int64_t rt = blockIdx.y; rt < n_rt; rt += gridDim.y) {
    A cm[kPerLane], cs[kPerLane];
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      cm[k] = neg_inf<A>();
      cs[k] = A(0);
    }
    for (int rr = warp; rr < kTileRows; rr += kWarps) {
      const int64_t r = rt * kTileRows + rr;
      if (r >= rows) break;  // warp-uniform
      const int64_t excl = exclude ? row0 + r + offset : int64_t(-1);
      A l[kPerLane];
      load_row_logits<VEC>(s + r * ld, col0, lane, n, excl, SV ? scale[row0 + r] : sl, l);
      A m, sum;  // row partial over this tile's kTileCols columns
      warp_row_partial(l, m, sum);
      if (lane == 0) {
        row_pm[r * n_ct + ct] = m;
        row_ps[r * n_ct + ct] = sum;
      }
      if (cols) {
        if (SV) load_row_logits<VEC>(s + r * ld, col0, lane, n, excl, col_scale, l);
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) online_push(cm[k], cs[k], l[k]);
      }
    }
    if (cols) {  // block-uniform
      A m, sum;
      block_col_merge<VEC>(cm, cs, sm, m, sum);
      const int64_t j = col0 + threadIdx.x;
      if (j < n) {
        col_pm[rt * n + j] = m;
        col_ps[rt * n + j] = sum;
      }
    }
  }
}

// A warp per row: merges the row's n_ct column-tile partials into row_lse[row0 + r].
template <typename A>
__global__ void __launch_bounds__(kThreads)
    simlse_row_merge_kernel(const A* __restrict__ pm, const A* __restrict__ ps, int64_t rows,
                            int64_t n_ct, int64_t row0, A* __restrict__ row_lse) {
  const int lane = threadIdx.x & 31;
  const int64_t warps_total = int64_t(gridDim.x) * kWarps;
  for (int64_t r = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); r < rows; r += warps_total) {
    A m = neg_inf<A>(), s = A(0);
    for (int64_t p = lane; p < n_ct; p += 32) merge(m, s, pm[r * n_ct + p], ps[r * n_ct + p]);
    warp_merge(m, s);
    if (lane == 0) row_lse[row0 + r] = finalize_lse(m, s);
  }
}

// A thread per column: running (gm, gs) of earlier chunks (ignored when `first`) merged with this
// chunk's n_rt row-tile partials; stored back, or finalised into col_lse when `last`.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    simlse_col_merge_kernel(const A* __restrict__ pm, const A* __restrict__ ps, int64_t n_rt,
                            int64_t n, A* __restrict__ gm, A* __restrict__ gs, bool first,
                            bool last, A* __restrict__ col_lse) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    A m = first ? neg_inf<A>() : gm[j];
    A s = first ? A(0) : gs[j];
    for (int64_t t = 0; t < n_rt; ++t) merge(m, s, pm[t * n + j], ps[t * n + j]);
    if (last) {
      col_lse[j] = finalize_lse(m, s);
    } else {
      gm[j] = m;
      gs[j] = s;
    }
  }
}

// ---- backward ----

// grid = (ceil(n / (kThreads * VEC)), min(rows, 65535)), block = kThreads. w may alias s (same
// element type): every element is read and then written by the same thread. ds_part[gridDim.y *
// gridDim.x]: block (x, y) writes sum over its entries of W_ij S_ij (unscaled fp32 W).
template <typename T, typename TW, int VEC>
__global__ void __launch_bounds__(kThreads)
    simlse_bwd_weight_kernel(const T* s, TW* w, int64_t rows, int64_t n, int64_t ld_s, int64_t ld_w,
                             int64_t row0, int64_t offset, bool exclude, bool cols,
                             const Acc<T>* __restrict__ scale, const Acc<T>* __restrict__ row_lse,
                             const Acc<T>* __restrict__ col_lse, const Acc<T>* __restrict__ g_row,
                             const Acc<T>* __restrict__ g_col, const Acc<T>* __restrict__ w_scale,
                             Acc<T>* __restrict__ ds_part) {
  using A = Acc<T>;
  __shared__ A sm_ds[kWarps];
  const A sl = scale[0];
  const int64_t jstride = int64_t(gridDim.x) * kThreads * VEC;
  A ds = A(0);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t i = row0 + r;
    const A gr = g_row[i];
    const A ws = w_scale ? w_scale[i] : A(1);  // fp16: the row's power of two (binding)
    const A ri = row_lse[i];
    // Every entry is formed, g = 0 rows and columns too (0 * exp(NaN) stays NaN, as on the torch
    // backend); excluded entries are then set to 0 (an all-excluded row: -inf - -inf -> 0).
    const int64_t excl = exclude ? i + offset : int64_t(-1);
    const T* srow = s + r * ld_s;
    TW* wrow = w + r * ld_w;
    for (int64_t j0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * VEC; j0 < n; j0 += jstride) {
      const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(srow + j0);
      Pack<TW, VEC> q;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const int64_t j = j0 + v;
        const A sv = to_acc(p.v[v]);
        const A l = mul_rn(sv, sl);  // as the forward's load_row_logits
        A wv = gr * ex(l - ri);
        if (cols) wv += g_col[j] * ex(l - col_lse[j]);
        wv = j == excl ? A(0) : wv;
        ds += wv * sv;
        q.v[v] = from_acc<TW>(wv * ws);
      }
      *reinterpret_cast<Pack<TW, VEC>*>(wrow + j0) = q;
    }
  }
  ds = warp_sum(ds);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sm_ds[warp] = ds;
  __syncthreads();
  if (threadIdx.x == 0) {
    A t = A(0);
#pragma unroll
    for (int w8 = 0; w8 < kWarps; ++w8) t += sm_ds[w8];
    ds_part[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = t;
  }
}

// Vector scales: W_ij = g_r_i rs_i p_ij + g_c_j cs_j p'_ij, p_ij = e^(rs_i S_ij - r_i),
// p'_ij = e^(cs_j S_ij - c_j) (0 if excluded; formed for g = 0 rows and columns too, so a NaN S
// reaches W as on the torch backend), written as the scalar kernel does; the scale
// gradients' sums from the acc-typed p: drs_part[r * gridDim.x * kWarps + blockIdx.x * kWarps +
// warp] = the warp's share of sum_j p_ij S_ij, dcs_part[blockIdx.y * n + j] = the block row's
// share of sum_i p'_ij S_ij (no atomics: one writer each). grid.x = cdiv(n, kThreads * VEC)
// exactly, so a thread owns the VEC columns j0.. for all its rows (column terms held in
// registers).
template <typename T, typename TW, int VEC>
__global__ void __launch_bounds__(kThreads)
    simlse_bwd_weight_vec_kernel(const T* s, TW* w, int64_t rows, int64_t n, int64_t ld_s,
                                 int64_t ld_w, int64_t row0, int64_t offset, bool exclude,
                                 bool cols, const Acc<T>* __restrict__ rscale,
                                 const Acc<T>* __restrict__ cscale,
                                 const Acc<T>* __restrict__ row_lse,
                                 const Acc<T>* __restrict__ col_lse,
                                 const Acc<T>* __restrict__ g_row, const Acc<T>* __restrict__ g_col,
                                 const Acc<T>* __restrict__ w_scale, Acc<T>* __restrict__ drs_part,
                                 Acc<T>* __restrict__ dcs_part) {
  using A = Acc<T>;
  const bool scaled = w_scale != nullptr;  // fp16: row i times w_scale[i] (binding)
  const A ninf = neg_inf<A>();
  const int64_t j0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  const bool active = j0 < n;  // VEC > 1 only when n % VEC == 0: a pack is in or out whole
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool in = cols && active;
  A csv[VEC], gcs[VEC], cl[VEC], dc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const int64_t j = j0 + v;
    csv[v] = in ? cscale[j] : A(0);
    gcs[v] = in ? g_col[j] * csv[v] : A(0);
    cl[v] = in ? col_lse[j] : ninf;
    dc[v] = A(0);
  }
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t i = row0 + r;
    const A gr = g_row[i], ri = row_lse[i], rs = rscale[i];
    const A grs = gr * rs, ws = scaled ? w_scale[i] : A(1);
    const int64_t excl = exclude ? i + offset : int64_t(-1);
    A pr_sum = A(0);
    if (active) {
      const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(s + r * ld_s + j0);
      Pack<TW, VEC> q;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const A sv = to_acc(p.v[v]);
        const bool off = j0 + v == excl;
        const A pr = off ? A(0) : ex(mul_rn(sv, rs) - ri);
        const A pc = (in && !off) ? ex(mul_rn(sv, csv[v]) - cl[v]) : A(0);
        pr_sum += pr * sv;
        dc[v] += pc * sv;
        q.v[v] = from_acc<TW>((grs * pr + gcs[v] * pc) * ws);
      }
      *reinterpret_cast<Pack<TW, VEC>*>(w + r * ld_w + j0) = q;
    }
    pr_sum = warp_sum(pr_sum);  // block-uniform loop: every lane takes part
    if (lane == 0)
      drs_part[r * (int64_t(gridDim.x) * kWarps) + blockIdx.x * kWarps + warp] = pr_sum;
  }
  if (cols && active) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) dcs_part[int64_t(blockIdx.y) * n + j0 + v] = dc[v];
  }
}

// ---- launchers ----

struct FwdWork {
  int64_t n_ct, n_rt;
  size_t row_elems, col_elems;  // per array (m or s)
};

inline FwdWork fwd_work(int64_t rows, int64_t n) {
  FwdWork f;
  f.n_ct = cdiv(n, kTileCols);
  f.n_rt = cdiv(rows, kTileRows);
  f.row_elems = static_cast<size_t>(rows * f.n_ct);
  f.col_elems = static_cast<size_t>(f.n_rt * n);
  return f;
}

template <typename T>
int launch_fwd(const ChunkView& c, bool exclude, bool cols, const void* scale, bool vec_scale,
               const void* col_scale, void* row_lse, void* col_m, void* col_s, bool first,
               bool last, void* col_lse, void* work, cudaStream_t stream) {
  using A = Acc<T>;
  const int64_t rows = c.rows, n = c.n;
  const FwdWork f = fwd_work(rows, n);
  // Workspace layout: row_pm | row_ps | col_pm | col_ps, each 256-byte aligned.
  char* base = static_cast<char*>(work);
  const size_t rb = round_up(f.row_elems * sizeof(A), 256);
  const size_t cb = round_up(f.col_elems * sizeof(A), 256);
  A* row_pm = reinterpret_cast<A*>(base);
  A* row_ps = reinterpret_cast<A*>(base + rb);
  A* col_pm = reinterpret_cast<A*>(base + 2 * rb);
  A* col_ps = reinterpret_cast<A*>(base + 2 * rb + cb);

  constexpr int VEC = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>(f.n_ct), grid_cap(f.n_rt));
  const bool vec_ok = packed(c, VEC, 0);
  auto kernel =
      vec_scale
          ? (vec_ok ? simlse_fwd_tile_kernel<T, VEC, true> : simlse_fwd_tile_kernel<T, 1, true>)
          : (vec_ok ? simlse_fwd_tile_kernel<T, VEC, false> : simlse_fwd_tile_kernel<T, 1, false>);
  GC_LAUNCH(grid, kThreads, stream, kernel)(typed<T>(c.s), rows, n, c.ld_s, c.row0, c.offset,
                                            exclude, cols, typed<A>(scale), typed<A>(col_scale),
                                            row_pm, row_ps, col_pm, col_ps, f.n_ct, f.n_rt);
  GC_LAUNCH(grid_cap(cdiv(rows, kWarps)), kThreads, stream, simlse_row_merge_kernel<A>)(
      row_pm, row_ps, rows, f.n_ct, c.row0, typed<A>(row_lse));
  if (cols) {
    GC_LAUNCH(grid_cap(cdiv(n, kThreads)), kThreads, stream, simlse_col_merge_kernel<A>)(
        col_pm, col_ps, f.n_rt, n, typed<A>(col_m), typed<A>(col_s), first, last,
        typed<A>(col_lse));
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename Kernel>
struct Launch {
  dim3 grid;
  Kernel kernel;
};

// A backward kernel's launch: VEC columns per thread (kernel_vec) when S and W take VEC-wide
// packs, else one (kernel_1); rows over grid.y.
template <int VEC, typename TW, typename Kernel>
Launch<Kernel> bwd_launch(const ChunkView& c, Kernel kernel_vec, Kernel kernel_1) {
  const bool vec_ok = packed(c, VEC, sizeof(TW));
  const int64_t per = vec_ok ? int64_t(kThreads) * VEC : int64_t(kThreads);
  return {dim3(static_cast<unsigned>(cdiv(c.n, per)), grid_cap(c.rows)),
          vec_ok ? kernel_vec : kernel_1};
}

template <typename T, typename TW>
int launch_bwd(const ChunkView& c, bool exclude, bool cols, const void* scale, const void* row_lse,
               const void* col_lse, const void* g_row, const void* g_col, const void* w_scale,
               void* ds_part, int64_t* ds_count, cudaStream_t stream) {
  using A = Acc<T>;
  constexpr int VEC = 16 / sizeof(T);  // 16-byte loads of S; W stores are VEC * sizeof(TW)
  const auto [grid, kernel] = bwd_launch<VEC, TW>(c, simlse_bwd_weight_kernel<T, TW, VEC>,
                                                  simlse_bwd_weight_kernel<T, TW, 1>);
  *ds_count = int64_t(grid.x) * grid.y;
  GC_LAUNCH(grid, kThreads, stream, kernel)(
      typed<T>(c.s), typed<TW>(c.w), c.rows, c.n, c.ld_s, c.ld_w, c.row0, c.offset, exclude, cols,
      typed<A>(scale), typed<A>(row_lse), typed<A>(col_lse), typed<A>(g_row), typed<A>(g_col),
      typed<A>(w_scale), typed<A>(ds_part));
  return static_cast<int>(cudaGetLastError());
}

template <typename T, typename TW>
int launch_bwd_vec(const ChunkView& c, bool exclude, bool cols, const void* row_scale,
                   const void* col_scale, const void* row_lse, const void* col_lse,
                   const void* g_row, const void* g_col, const void* w_scale, void* drs_part,
                   int64_t* drs_stride, void* dcs_part, int64_t* dcs_rows, cudaStream_t stream) {
  using A = Acc<T>;
  constexpr int VEC = 16 / sizeof(T);
  const auto [grid, kernel] = bwd_launch<VEC, TW>(c, simlse_bwd_weight_vec_kernel<T, TW, VEC>,
                                                  simlse_bwd_weight_vec_kernel<T, TW, 1>);
  *drs_stride = int64_t(grid.x) * kWarps;
  *dcs_rows = grid.y;
  GC_LAUNCH(grid, kThreads, stream, kernel)(
      typed<T>(c.s), typed<TW>(c.w), c.rows, c.n, c.ld_s, c.ld_w, c.row0, c.offset, exclude, cols,
      typed<A>(row_scale), typed<A>(col_scale), typed<A>(row_lse), typed<A>(col_lse),
      typed<A>(g_row), typed<A>(g_col), typed<A>(w_scale), typed<A>(drs_part), typed<A>(dcs_part));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

size_t simlse_bwd_vec_row_partials(int64_t n) {
  return static_cast<size_t>(cdiv(n, kThreads)) * kWarps;
}
size_t simlse_bwd_vec_col_partials(int64_t rows) { return grid_cap(rows); }

size_t simlse_bwd_ds_partials(int64_t rows, int64_t n) {
  return static_cast<size_t>(cdiv(n, kThreads)) * grid_cap(rows);
}

size_t simlse_fwd_workspace_bytes(int64_t rows, int64_t n, bool f64) {
  const FwdWork f = fwd_work(rows, n);
  const size_t a = f64 ? sizeof(double) : sizeof(float);
  return 2 * round_up(f.row_elems * a, 256) + 2 * round_up(f.col_elems * a, 256);
}

int simlse_fwd_chunk(const ChunkView& c, bool exclude, bool cols, const void* scale, void* row_lse,
                     void* col_m, void* col_l, bool first, bool last, void* col_lse, void* work,
                     CUstream_st* stream, bool vec_scale, const void* col_scale) {
  if (c.rows <= 0 || c.n <= 0) return static_cast<int>(cudaSuccess);
#define GC_FWD(TS)                                                                            \
  launch_fwd<TS>(c, exclude, cols, scale, vec_scale, col_scale, row_lse, col_m, col_l, first, \
                 last, col_lse, work, stream)
  switch (c.s_type) {
    case gammacl::GcType::F32:
      return GC_FWD(float);
    case gammacl::GcType::F64:
      return GC_FWD(double);
    case gammacl::GcType::F16:
      return GC_FWD(__half);
    case gammacl::GcType::BF16:
      return GC_FWD(__nv_bfloat16);
  }
#undef GC_FWD
  return static_cast<int>(cudaErrorInvalidValue);
}

int simlse_bwd_weights(const ChunkView& c, bool exclude, bool cols, const void* scale,
                       const void* row_lse, const void* col_lse, const void* g_row,
                       const void* g_col, const void* w_scale, void* ds_part, int64_t* ds_count,
                       CUstream_st* stream) {
  using gammacl::GcType;
  *ds_count = 0;
  if (c.rows <= 0 || c.n <= 0) return static_cast<int>(cudaSuccess);
  const GcType s_type = c.s_type, w_type = c.w_type;
#define GC_BWD(TS, TWT)                                                                          \
  launch_bwd<TS, TWT>(c, exclude, cols, scale, row_lse, col_lse, g_row, g_col, w_scale, ds_part, \
                      ds_count, stream)
  if (s_type == GcType::F64) {
    return w_type == GcType::F64 ? GC_BWD(double, double) : static_cast<int>(cudaErrorInvalidValue);
  }
  if (w_type == GcType::F64) return static_cast<int>(cudaErrorInvalidValue);
  switch (s_type) {
    case GcType::F32:
      if (w_type == GcType::F32) return GC_BWD(float, float);
      if (w_type == GcType::F16) return GC_BWD(float, __half);
      return GC_BWD(float, __nv_bfloat16);
    case GcType::F16:
      if (w_type == GcType::F32) return GC_BWD(__half, float);
      if (w_type == GcType::F16) return GC_BWD(__half, __half);
      return GC_BWD(__half, __nv_bfloat16);
    case GcType::BF16:
      if (w_type == GcType::F32) return GC_BWD(__nv_bfloat16, float);
      if (w_type == GcType::F16) return GC_BWD(__nv_bfloat16, __half);
      return GC_BWD(__nv_bfloat16, __nv_bfloat16);
    default:
      break;
  }
#undef GC_BWD
  return static_cast<int>(cudaErrorInvalidValue);
}

int simlse_bwd_weights_vec(const ChunkView& c, bool exclude, bool cols, const void* row_scale,
                           const void* col_scale, const void* row_lse, const void* col_lse,
                           const void* g_row, const void* g_col, const void* w_scale,
                           void* drs_part, int64_t* drs_stride, void* dcs_part, int64_t* dcs_rows,
                           CUstream_st* stream) {
  using gammacl::GcType;
  *drs_stride = 0;
  *dcs_rows = 0;
  if (c.rows <= 0 || c.n <= 0) return static_cast<int>(cudaSuccess);
  const GcType s_type = c.s_type, w_type = c.w_type;
#define GC_BWD(TS, TWT)                                                                           \
  launch_bwd_vec<TS, TWT>(c, exclude, cols, row_scale, col_scale, row_lse, col_lse, g_row, g_col, \
                          w_scale, drs_part, drs_stride, dcs_part, dcs_rows, stream)
  if (s_type == GcType::F64) {
    return w_type == GcType::F64 ? GC_BWD(double, double) : static_cast<int>(cudaErrorInvalidValue);
  }
  if (s_type != GcType::F32) return static_cast<int>(cudaErrorInvalidValue);  // S is fp32 here
  if (w_type == GcType::F32) return GC_BWD(float, float);
  if (w_type == GcType::F16) return GC_BWD(float, __half);
  if (w_type == GcType::BF16) return GC_BWD(float, __nv_bfloat16);
#undef GC_BWD
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace gammacl::cuda
