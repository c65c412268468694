// simlse, CUDA epilogue kernels for the chunked backend (simlse_cuda.cpp does the GEMMs).
//
// Per row chunk the torch side computes S = A_c @ B^T (raw dots, fp32 from bf16/fp16 operands, or
// fp64) with cuBLAS; these kernels turn S into statistics (forward) or gradient weights (backward)
// reading it exactly once. With l = scale * S, base-2 units l2 = l * log2(e):
//
//   forward  row  r_i = ln2 * (m_i + log2 sum_j 2^(l2_ij - m_i)),   m_i = max_j l2_ij
//            col  (m_j, s_j) over the chunk's rows, merged across chunks online:
//                 (m, s) + (m', s') = (M, s 2^(m-M) + s' 2^(m'-M)),  M = max(m, m')
//   backward W_ij = g_r_i 2^(l2_ij - r2_i) + g_c_j 2^(l2_ij - c2_j)   (0 on excluded entries)
//
// Forward, one pass over S (simlse_fwd_tile_kernel): a block owns a 64-row x 256-column tile;
// warp w takes rows w, w+8, ...; each lane holds 8 columns (two 16-byte loads for fp32).
//   row partial : warp max, then warp sum of 2^(l2 - max) (exact two-step, from registers), one
//                 (m, s) pair per (row, column tile) -> row_part
//   col partial : per lane, online over the warp's rows with one exp2 per entry:
//                   d = l2 - m;  e = 2^-|d|;  d > 0 ? (s = s e + 1, m = l2) : s += e
//                 then the 8 warps merge through shared memory -> one pair per (row tile, column)
// simlse_row_merge_kernel (a warp per row) and simlse_col_merge_kernel (a thread per column, also
// folding in the running statistics of earlier chunks) finish. No atomics: every output element
// has exactly one writer. Traffic per chunk: S read once (4 B/entry) + partials (~3% of S).
// Backward (simlse_bwd_weight_kernel): elementwise, 16-byte vector loads/stores, two exp2 per
// entry; writes W in place (fp32/fp64) or to a bf16/fp16 buffer for the tensor-core GEMMs.
//
// All math is fp32 (fp64 for fp64 buffers) on fp32/fp64/bf16/fp16 S buffers; indexing is int64.
// No torch headers: nvcc compile-checks this file alone (tests/test_cuda_compile.py).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common.h"

namespace gammacl::cuda {
namespace {

constexpr int kThreads = 256;               // 8 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int kPerLane = 8;                 // columns per lane per row
constexpr int kTileCols = 32 * kPerLane;    // 256
constexpr int kTileRows = 64;               // rows per forward tile (8 per warp)
constexpr unsigned kFull = 0xffffffffu;
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// ---- type helpers ----

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <typename T>
__device__ __forceinline__ T from_acc(double x);
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }

// 2^x by the MUFU unit (ex2.approx.ftz: rel. error ~2^-22, -inf -> 0, NaN -> NaN; results
// below 2^-126 flush to 0, irrelevant next to the running max's term 1).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ double ex2(double x) { return exp2(x); }
__device__ __forceinline__ float lg2(float x) { return log2f(x); }
__device__ __forceinline__ double lg2(double x) { return log2(x); }
__device__ __forceinline__ float abs_(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_(double x) { return fabs(x); }
// max that propagates NaN (fmaxf / fmax return the other operand): a NaN logit must give a NaN
// LSE, not one computed from the remaining entries.
template <typename A>
__device__ __forceinline__ A max_nan(A a, A b) {
  return (a != a || a > b) ? a : b;
}

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return static_cast<A>(-INFINITY);
}

// VEC contiguous elements, aligned to their full size so one load/store instruction moves them.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// (m, s) <- (m, s) + (om, os) in base 2; empty partials have m = -inf (and s = 0). A NaN max or
// sum anywhere makes the result NaN (a partial may hold m = -inf with s = NaN: a NaN logit in a
// column whose other entries are all excluded).
template <typename A>
__device__ __forceinline__ void merge(A& m, A& s, A om, A os) {
  const A mx = max_nan(m, om);
  if (mx == neg_inf<A>()) {  // both empty (s + os = 0), or a NaN sum that must survive
    s = s + os;
    return;
  }
  const A a = (m == neg_inf<A>()) ? (s != s ? s : A(0)) : s * ex2(m - mx);
  const A b = (om == neg_inf<A>()) ? (os != os ? os : A(0)) : os * ex2(om - mx);
  m = mx;
  s = a + b;
}

template <typename A>
__device__ __forceinline__ A finalize_lse(A m, A s) {
  return s != s ? s : (m == neg_inf<A>() ? m : (m + lg2(s)) * A(kLn2));
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max_nan(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// ---- forward ----

// grid = (n_col_tiles, min(n_row_tiles, 65535)), block = kThreads.
// row_pm/row_ps: [rows, n_ct] partials; col_pm/col_ps: [n_rt, n] partials (acc type).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    simlse_fwd_tile_kernel(const T* __restrict__ s, int64_t rows, int64_t n, int64_t ld,
                           int64_t row0, int64_t offset, bool exclude, bool cols,
                           const typename AccOf<T>::type* __restrict__ scale,
                           typename AccOf<T>::type* __restrict__ row_pm,
                           typename AccOf<T>::type* __restrict__ row_ps,
                           typename AccOf<T>::type* __restrict__ col_pm,
                           typename AccOf<T>::type* __restrict__ col_ps, int64_t n_ct,
                           int64_t n_rt) {
  using A = typename AccOf<T>::type;
  constexpr int U = kPerLane / VEC;  // vector loads per lane per row
  __shared__ A sm_m[kWarps][kTileCols];
  __shared__ A sm_s[kWarps][kTileCols];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t ct = blockIdx.x;
  const int64_t col0 = ct * kTileCols;
  const A sl2 = scale[0] * A(kLog2e);
  const A ninf = neg_inf<A>();

  for (int64_t rt = blockIdx.y; rt < n_rt; rt += gridDim.y) {
    A cm[kPerLane], cs[kPerLane];
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      cm[k] = ninf;
      cs[k] = A(0);
    }
    for (int rr = warp; rr < kTileRows; rr += kWarps) {
      const int64_t r = rt * kTileRows + rr;
      if (r >= rows) break;  // warp-uniform
      const T* srow = s + r * ld;
      const int64_t excl = exclude ? row0 + r + offset : int64_t(-1);
      A l[kPerLane];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t j0 = col0 + int64_t(u * 32 + lane) * VEC;
        // VEC > 1 only when n % VEC == 0, so a vector is either fully inside or fully outside.
        if (j0 < n) {
          const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(srow + j0);
#pragma unroll
          for (int v = 0; v < VEC; ++v)
            l[u * VEC + v] = (j0 + v == excl) ? ninf : to_acc(p.v[v]) * sl2;
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) l[u * VEC + v] = ninf;
        }
      }
      // Row partial over this tile's 256 columns.
      A m = ninf;
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) m = max_nan(m, l[k]);
      m = warp_max(m);
      A sum = A(0);
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) sum += (l[k] == ninf) ? A(0) : ex2(l[k] - m);
      sum = warp_sum(sum);
      if (lane == 0) {
        row_pm[r * n_ct + ct] = m;
        row_ps[r * n_ct + ct] = sum;
      }
      if (cols) {
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) {
          // d = +inf on an empty column (e = 0, s = 1); excluded / padded entries (l = -inf)
          // leave (m, s) unchanged.
          const A d = l[k] - cm[k];
          const A e = ex2(-abs_(d));
          const bool up = d > A(0);
          const bool live = l[k] != ninf;
          cs[k] = live ? (up ? cs[k] * e + A(1) : cs[k] + e) : cs[k];
          cm[k] = (live && up) ? l[k] : cm[k];
        }
      }
    }
    if (cols) {  // block-uniform
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const int c = (u * 32 + lane) * VEC + v;
          sm_m[warp][c] = cm[u * VEC + v];
          sm_s[warp][c] = cs[u * VEC + v];
        }
      __syncthreads();
      const int c = threadIdx.x;  // kThreads == kTileCols
      A m = ninf, sum = A(0);
#pragma unroll
      for (int w = 0; w < kWarps; ++w) merge(m, sum, sm_m[w][c], sm_s[w][c]);
      const int64_t j = col0 + c;
      if (j < n) {
        col_pm[rt * n + j] = m;
        col_ps[rt * n + j] = sum;
      }
      __syncthreads();  // shared memory is reused by the next row tile
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
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const A om = __shfl_xor_sync(kFull, m, o);
      const A os = __shfl_xor_sync(kFull, s, o);
      merge(m, s, om, os);
    }
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
// element type): every element is read and then written by the same thread.
template <typename T, typename TW, int VEC>
__global__ void __launch_bounds__(kThreads)
    simlse_bwd_weight_kernel(const T* s, TW* w, int64_t rows, int64_t n, int64_t ld_s,
                             int64_t ld_w, int64_t row0, int64_t offset, bool exclude, bool cols,
                             const typename AccOf<T>::type* __restrict__ scale,
                             const typename AccOf<T>::type* __restrict__ row_lse,
                             const typename AccOf<T>::type* __restrict__ col_lse,
                             const typename AccOf<T>::type* __restrict__ g_row,
                             const typename AccOf<T>::type* __restrict__ g_col,
                             const typename AccOf<T>::type* __restrict__ w_scale) {
  using A = typename AccOf<T>::type;
  const A sl2 = scale[0] * A(kLog2e);
  const A ws = w_scale ? w_scale[0] : A(1);
  const A ninf = neg_inf<A>();
  const int64_t jstride = int64_t(gridDim.x) * kThreads * VEC;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t i = row0 + r;
    const A gr = g_row[i];
    const A r2 = row_lse[i] * A(kLog2e);
    // A row with LSE -inf has every entry excluded; g = 0 rows contribute nothing.
    const bool row_on = gr != A(0) && r2 != ninf;
    const int64_t excl = exclude ? i + offset : int64_t(-1);
    const T* srow = s + r * ld_s;
    TW* wrow = w + r * ld_w;
    for (int64_t j0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * VEC; j0 < n;
         j0 += jstride) {
      const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(srow + j0);
      Pack<TW, VEC> q;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const int64_t j = j0 + v;
        const A l2 = to_acc(p.v[v]) * sl2;
        A wv = row_on ? gr * ex2(l2 - r2) : A(0);
        if (cols) {
          const A gc = g_col[j];
          const A c2 = col_lse[j] * A(kLog2e);
          if (gc != A(0) && c2 != ninf) wv += gc * ex2(l2 - c2);
        }
        q.v[v] = from_acc<TW>(j == excl ? A(0) : wv * ws);
      }
      *reinterpret_cast<Pack<TW, VEC>*>(wrow + j0) = q;
    }
  }
}

// ---- launch helpers ----

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
// Grid dimension for x work items, clamped to [1, 65535] (kernels loop over the rest).
inline unsigned grid_cap(int64_t x) {
  return static_cast<unsigned>(x < 65535 ? (x > 0 ? x : 1) : 65535);
}

inline bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

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

inline size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

template <typename T>
int launch_fwd(const T* s, int64_t rows, int64_t n, int64_t ld, int64_t row0, int64_t offset,
               bool exclude, bool cols, const void* scale, void* row_lse, void* col_m,
               void* col_s, bool first, bool last, void* col_lse, void* work,
               cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const FwdWork f = fwd_work(rows, n);
  // Workspace layout: row_pm | row_ps | col_pm | col_ps, each 256-byte aligned.
  char* base = static_cast<char*>(work);
  const size_t rb = round_up(f.row_elems * sizeof(A), 256);
  const size_t cb = round_up(f.col_elems * sizeof(A), 256);
  A* row_pm = reinterpret_cast<A*>(base);
  A* row_ps = reinterpret_cast<A*>(base + rb);
  A* col_pm = reinterpret_cast<A*>(base + 2 * rb);
  A* col_ps = reinterpret_cast<A*>(base + 2 * rb + cb);
  const A* sc = static_cast<const A*>(scale);

  constexpr int VEC = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>(f.n_ct), grid_cap(f.n_rt));
  if (n % VEC == 0 && ld % VEC == 0 && aligned(s, 16)) {
    simlse_fwd_tile_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(
        s, rows, n, ld, row0, offset, exclude, cols, sc, row_pm, row_ps, col_pm, col_ps, f.n_ct,
        f.n_rt);
  } else {
    simlse_fwd_tile_kernel<T, 1><<<grid, kThreads, 0, stream>>>(
        s, rows, n, ld, row0, offset, exclude, cols, sc, row_pm, row_ps, col_pm, col_ps, f.n_ct,
        f.n_rt);
  }
  simlse_row_merge_kernel<A><<<grid_cap(cdiv(rows, kWarps)), kThreads, 0, stream>>>(
      row_pm, row_ps, rows, f.n_ct, row0, static_cast<A*>(row_lse));
  if (cols) {
    simlse_col_merge_kernel<A><<<grid_cap(cdiv(n, kThreads)), kThreads, 0, stream>>>(
        col_pm, col_ps, f.n_rt, n, static_cast<A*>(col_m), static_cast<A*>(col_s), first, last,
        static_cast<A*>(col_lse));
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T, typename TW>
int launch_bwd(const T* s, TW* w, int64_t rows, int64_t n, int64_t ld_s, int64_t ld_w,
               int64_t row0, int64_t offset, bool exclude, bool cols, const void* scale,
               const void* row_lse, const void* col_lse, const void* g_row, const void* g_col,
               const void* w_scale, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const A* sc = static_cast<const A*>(scale);
  const A* rl = static_cast<const A*>(row_lse);
  const A* cl = static_cast<const A*>(col_lse);
  const A* gr = static_cast<const A*>(g_row);
  const A* gc = static_cast<const A*>(g_col);
  const A* wsc = static_cast<const A*>(w_scale);
  constexpr int VEC = 16 / sizeof(T);  // 16-byte loads of S; W stores are VEC * sizeof(TW)
  const bool vec_ok = n % VEC == 0 && ld_s % VEC == 0 && ld_w % VEC == 0 && aligned(s, 16) &&
                      aligned(w, VEC * sizeof(TW));
  if (vec_ok) {
    const dim3 grid(static_cast<unsigned>(cdiv(n, int64_t(kThreads) * VEC)), grid_cap(rows));
    simlse_bwd_weight_kernel<T, TW, VEC><<<grid, kThreads, 0, stream>>>(
        s, w, rows, n, ld_s, ld_w, row0, offset, exclude, cols, sc, rl, cl, gr, gc, wsc);
  } else {
    const dim3 grid(static_cast<unsigned>(cdiv(n, int64_t(kThreads))), grid_cap(rows));
    simlse_bwd_weight_kernel<T, TW, 1><<<grid, kThreads, 0, stream>>>(
        s, w, rows, n, ld_s, ld_w, row0, offset, exclude, cols, sc, rl, cl, gr, gc, wsc);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

size_t simlse_fwd_workspace_bytes(int64_t rows, int64_t n, bool f64) {
  const FwdWork f = fwd_work(rows, n);
  const size_t a = f64 ? sizeof(double) : sizeof(float);
  return 2 * round_up(f.row_elems * a, 256) + 2 * round_up(f.col_elems * a, 256);
}

int simlse_fwd_chunk(const void* s, gammacl::GcType s_type, int64_t rows, int64_t n, int64_t ld,
                     int64_t row0, int64_t offset, bool exclude, bool cols, const void* scale,
                     void* row_lse, void* col_m, void* col_l, bool first, bool last,
                     void* col_lse, void* work, CUstream_st* stream) {
  if (rows <= 0 || n <= 0) return static_cast<int>(cudaSuccess);
  switch (s_type) {
    case gammacl::GcType::F32:
      return launch_fwd(static_cast<const float*>(s), rows, n, ld, row0, offset, exclude, cols,
                        scale, row_lse, col_m, col_l, first, last, col_lse, work, stream);
    case gammacl::GcType::F64:
      return launch_fwd(static_cast<const double*>(s), rows, n, ld, row0, offset, exclude, cols,
                        scale, row_lse, col_m, col_l, first, last, col_lse, work, stream);
    case gammacl::GcType::F16:
      return launch_fwd(static_cast<const __half*>(s), rows, n, ld, row0, offset, exclude, cols,
                        scale, row_lse, col_m, col_l, first, last, col_lse, work, stream);
    case gammacl::GcType::BF16:
      return launch_fwd(static_cast<const __nv_bfloat16*>(s), rows, n, ld, row0, offset, exclude,
                        cols, scale, row_lse, col_m, col_l, first, last, col_lse, work, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int simlse_bwd_weights(const void* s, gammacl::GcType s_type, void* w, gammacl::GcType w_type,
                       int64_t rows, int64_t n, int64_t ld_s, int64_t ld_w, int64_t row0,
                       int64_t offset, bool exclude, bool cols, const void* scale,
                       const void* row_lse, const void* col_lse, const void* g_row,
                       const void* g_col, const void* w_scale, CUstream_st* stream) {
  using gammacl::GcType;
  if (rows <= 0 || n <= 0) return static_cast<int>(cudaSuccess);
#define GC_BWD(TS, TWT)                                                                         \
  launch_bwd(static_cast<const TS*>(s), static_cast<TWT*>(w), rows, n, ld_s, ld_w, row0, offset, \
             exclude, cols, scale, row_lse, col_lse, g_row, g_col, w_scale, stream)
  if (s_type == GcType::F64) {
    return w_type == GcType::F64 ? GC_BWD(double, double)
                                 : static_cast<int>(cudaErrorInvalidValue);
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

}  // namespace gammacl::cuda
