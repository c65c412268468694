// Device-side helpers shared by the CUDA epilogue kernels (simlse_cuda.cu, gamma_onepass_cuda.cu).
// No torch header (the .cu files are compile-checked by nvcc alone). Everything here is inline or
// a template, so each translation unit can include it.
//
// Online LSE in natural units: a partial is (m, s) = (max l, sum e^(l - m)) and
//   (m, s) + (m', s') = (M, s e^(m - M) + s' e^(m' - M)),  M = max(m, m'),
//   LSE = m + ln s;  empty partial: m = -inf, s = 0.
// Every e^d is ex2(d * log2 e) with d formed in natural units first: the shift (a max, an LSE)
// and the exponent then come from the same rounded logit l = mul_rn(S, scale), so the maximum
// entry's weight e^(l_max - LSE) is exact at |l| ~ 1e3. Folding log2(e) into the scale instead
// (l2 = S * (scale log2 e), LSE stored as ln2 * (m2 + log2 s)) rounds the logit twice and puts
// ~ulp(l) (8e-5 relative at |l| ~ 1e3) into that weight (tests/test_large_logits.py).
#pragma once

// The platform (CUDA runtime, 16-bit types, GC_LAUNCH, gc_ex2_approx_ftz), chosen by the include
// path: csrc/platform/ for nvcc, tests/cuda_emu/ for the CPU emulator.
#include <gammacl_cuda_device.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kernel_api.h"

namespace gammacl::cuda {

constexpr int kThreads = 256;  // 8 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int kPerLane = 8;               // columns per lane per row
constexpr int kTileCols = 32 * kPerLane;  // 256
constexpr int kTileRows = 64;             // rows per forward tile (8 per warp)
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
template <typename T>
using Acc = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <typename T>
__device__ __forceinline__ T from_acc(double x);
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}

// 2^x by the MUFU unit (ex2.approx.ftz: rel. error ~2^-22, -inf -> 0, NaN -> NaN; results
// below 2^-126 flush to 0, irrelevant next to the running max's term 1).
__device__ __forceinline__ float ex2(float x) { return gc_ex2_approx_ftz(x); }
__device__ __forceinline__ double ex2(double x) { return exp2(x); }
// e^d for a d already formed in natural units (one FMUL + one MUFU ex2).
template <typename A>
__device__ __forceinline__ A ex(A d) {
  return ex2(d * A(kLog2e));
}
// x * y rounded once, never contracted into an fma with a later add: a logit that feeds both a
// max and an exponent l - max must be the same rounded value in both (exp(0) = 1 exactly at
// the maximum; contracted, the exponent sees the unrounded product, off by ~ulp(l)).
__device__ __forceinline__ float mul_rn(float x, float y) { return __fmul_rn(x, y); }
__device__ __forceinline__ double mul_rn(double x, double y) { return __dmul_rn(x, y); }
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

// (m, s) <- (m, s) + (om, os); empty partials have m = -inf (and s = 0). A NaN max or
// sum anywhere makes the result NaN (a partial may hold m = -inf with s = NaN: a NaN logit in a
// column whose other entries are all excluded).
template <typename A>
__device__ __forceinline__ void merge(A& m, A& s, A om, A os) {
  const A mx = max_nan(m, om);
  if (mx == neg_inf<A>()) {  // both empty (s + os = 0), or a NaN sum that must survive
    s = s + os;
    return;
  }
  const A a = (m == neg_inf<A>()) ? (s != s ? s : A(0)) : s * ex(m - mx);
  const A b = (om == neg_inf<A>()) ? (os != os ? os : A(0)) : os * ex(om - mx);
  m = mx;
  s = a + b;
}

template <typename A>
__device__ __forceinline__ A finalize_lse(A m, A s) {
  return s != s ? s : (m == neg_inf<A>() ? m : m + lg2(s) * A(kLn2));
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max_nan(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// Merges the (m, s) partials of the 32 lanes; every lane gets the result.
template <typename A>
__device__ __forceinline__ void warp_merge(A& m, A& s) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A om = __shfl_xor_sync(kFull, m, o);
    const A os = __shfl_xor_sync(kFull, s, o);
    merge(m, s, om, os);
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// ---- tile building blocks (a block of kThreads owns kTileRows x kTileCols of S; warp w takes
// rows w, w + kWarps, ...; lane holds the kPerLane columns col0 + (u * 32 + lane) * VEC + v,
// u < kPerLane / VEC, v < VEC: VEC-wide vector loads, coalesced across the warp) ----

// Tile column of the lane's k-th value, k = u * VEC + v.
template <int VEC>
__device__ __forceinline__ int tile_col(int k, int lane) {
  return ((k / VEC) * 32 + lane) * VEC + k % VEC;
}

// The scale of column j: one value for the row, or a per-column vector sc[j].
template <typename A>
__device__ __forceinline__ A scale_at(A sc, int64_t) {
  return sc;
}
template <typename A>
__device__ __forceinline__ A scale_at(const A* sc, int64_t j) {
  return sc[j];
}

// Logits l_j = mul_rn(S_j, scale_at(sc, j)) of one row for the lane's columns; column `excl` and
// columns >= n are -inf. VEC > 1 only when n % VEC == 0 (and the row is VEC-aligned), so a vector
// is either fully inside or fully outside the row.
template <int VEC, typename T, typename A, typename Scale>
__device__ __forceinline__ void load_row_logits(const T* srow, int64_t col0, int lane, int64_t n,
                                                int64_t excl, Scale sc, A (&l)[kPerLane]) {
  constexpr int U = kPerLane / VEC;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t j0 = col0 + int64_t(u * 32 + lane) * VEC;
    if (j0 < n) {
      const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(srow + j0);
#pragma unroll
      for (int v = 0; v < VEC; ++v)
        l[u * VEC + v] =
            (j0 + v == excl) ? neg_inf<A>() : mul_rn(to_acc(p.v[v]), scale_at(sc, j0 + v));
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) l[u * VEC + v] = neg_inf<A>();
    }
  }
}

// Row partial (m, s) of the warp's kTileCols logits: exact two-step (max, then sum of
// e^(l - m)) from registers; every lane gets the result.
template <typename A>
__device__ __forceinline__ void warp_row_partial(const A (&l)[kPerLane], A& m, A& s) {
  m = neg_inf<A>();
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) m = max_nan(m, l[k]);
  m = warp_max(m);
  s = A(0);
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) s += (l[k] == neg_inf<A>()) ? A(0) : ex(l[k] - m);
  s = warp_sum(s);
}

// One logit into a running column partial with one exp:
//   d = l - m;  e = e^-|d|;  d > 0 ? (s = s e + 1, m = l) : s += e
// d = +inf on an empty partial (e = 0, s = 1); l = -inf (excluded / padded) leaves (m, s)
// unchanged; a NaN l makes s NaN.
template <typename A>
__device__ __forceinline__ void online_push(A& m, A& s, A l) {
  const A d = l - m;
  const A e = ex(-abs_(d));
  const bool up = d > A(0);
  const bool live = l != neg_inf<A>();
  s = live ? (up ? s * e + A(1) : s + e) : s;
  m = (live && up) ? l : m;
}

// A tile's column values in shared memory, one row per warp: (m, s) partials for
// block_col_merge, m alone for block_col_sum.
template <typename A>
struct ColSmem {
  A m[kWarps][kTileCols];
  A s[kWarps][kTileCols];
};

// Merges the kWarps per-warp column partials of a tile through shared memory: thread c
// (kThreads == kTileCols) returns column c's merged (m, s). Ends with a barrier, so the shared
// arrays can be reused at once.
template <int VEC, typename A>
__device__ __forceinline__ void block_col_merge(const A (&cm)[kPerLane], const A (&cs)[kPerLane],
                                                ColSmem<A>& sm, A& m, A& s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    sm.m[warp][tile_col<VEC>(k, lane)] = cm[k];
    sm.s[warp][tile_col<VEC>(k, lane)] = cs[k];
  }
  __syncthreads();
  m = neg_inf<A>();
  s = A(0);
#pragma unroll
  for (int w = 0; w < kWarps; ++w) merge(m, s, sm.m[w][threadIdx.x], sm.s[w][threadIdx.x]);
  __syncthreads();
}

// Sum over the kWarps per-warp column values of a tile through shared memory (as above).
template <int VEC, typename A>
__device__ __forceinline__ A block_col_sum(const A (&ct)[kPerLane], A (*sm)[kTileCols]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) sm[warp][tile_col<VEC>(k, lane)] = ct[k];
  __syncthreads();
  A t = A(0);
#pragma unroll
  for (int w = 0; w < kWarps; ++w) t += sm[w][threadIdx.x];
  __syncthreads();
  return t;
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

inline size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// A launcher's untyped device pointer as the kernel's typed one.
template <typename A>
inline const A* typed(const void* p) {
  return static_cast<const A*>(p);
}
template <typename A>
inline A* typed(void* p) {
  return static_cast<A*>(p);
}

// Whether S and W of c take packs of `vec` elements: n and the leading dimensions multiples of
// vec, S 16-byte aligned, W (w_size-byte elements; 0: no W written) aligned to vec * w_size.
inline bool packed(const ChunkView& c, int vec, size_t w_size) {
  return c.n % vec == 0 && c.ld_s % vec == 0 && aligned(c.s, 16) &&
         (w_size == 0 || (c.ld_w % vec == 0 && aligned(c.w, vec * w_size)));
}

}  // namespace gammacl::cuda
