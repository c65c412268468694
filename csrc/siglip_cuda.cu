// siglip, CUDA kernels: the element-wise epilogue of one row chunk of S (contract:
// python/gammacl/ops/siglip.py; launcher declared in kernel_api.h, torch side in siglip_cuda.cpp).
//
// Per entry (l = scale * S + bias, y = -z l, z = +1 only on the positive (i, i + offset)):
//   e = 2^{-|y| log2 e}              one ex2.approx (MUFU) in fp32, exp2 in fp64
//   softplus(y) = max(y, 0) + log1p(e)          sigmoid(y) = (y >= 0 ? 1 : e) / (1 + e)
//   W = -z sigmoid(y)                |W| <= 1: stored as w_scale * W in the GEMM operand dtype
// A block of kThreads owns a kTileRows x kTileCols tile; warp w takes rows w, w + kWarps, ...;
// lane holds columns col0 + k * 32 + lane (coalesced loads of S and stores of W). Each row's
// loss, wsum = sum_j W_ij and wdot = sum_j W_ij S_ij (from the acc-typed W: the scale's gradient,
// which a 16-bit W would lose to cancellation) over the tile go to [rows, n_ct] partials; a warp
// per row then sums its n_ct partials in a fixed order (no atomics: bitwise reproducible).
// Bytes per entry: S read once (4 B), W written once (2 B in bf16 / fp16, or 4 B in place);
// partials 3 * 4 B per 256 columns. FLOPs ~14 per entry + one exp2, one log1p, one division.
//
// All math is fp32 (fp64 for fp64 buffers); indexing is int64. No torch headers: nvcc
// compile-checks this file alone (tests/test_cuda_compile.py).
#include <cstdint>

#include "cuda_epilogue.cuh"
#include "kernel_api.h"

namespace gammacl::cuda {
namespace {

__device__ __forceinline__ float log1p_(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_(double x) { return log1p(x); }

// grid = (n_col_tiles, min(n_row_tiles, 65535)), block = kThreads. s: rows x n (ld_s); w: rows x
// n (ld_w; may alias s when TW == T: every element is read and then written by the same thread;
// unused when !grad). part: kSiglipStats [rows, n_ct] partials, stat k at part + k * ld_part.
template <typename T, typename TW>
__global__ void __launch_bounds__(kThreads)
    siglip_tile_kernel(const T* s, TW* w, int64_t rows, int64_t n, int64_t ld_s, int64_t ld_w,
                       int64_t row0, int64_t offset, const Acc<T>* __restrict__ scale,
                       const Acc<T>* __restrict__ bias, Acc<T> w_scale, bool grad,
                       Acc<T>* __restrict__ part, int64_t ld_part, int64_t n_ct, int64_t n_rt) {
  using A = Acc<T>;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t ct = blockIdx.x;
  const int64_t col0 = ct * kTileCols;
  const A sc = scale[0];
  const A bi = bias[0];
  for (int64_t rt = blockIdx.y; rt < n_rt; rt += gridDim.y) {
    for (int rr = warp; rr < kTileRows; rr += kWarps) {
      const int64_t r = rt * kTileRows + rr;
      if (r >= rows) break;                   // warp-uniform
      const int64_t pos = row0 + r + offset;  // the row's positive column (may lie outside)
      const T* srow = s + r * ld_s;
      TW* wrow = grad ? w + r * ld_w : nullptr;
      A loss = A(0), wsum = A(0), wdot = A(0);
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const int64_t j = col0 + int64_t(k) * 32 + lane;
        if (j < n) {
          const A sv = to_acc(srow[j]);
          const A l = sc * sv + bi;
          const bool p = j == pos;
          const A y = p ? -l : l;
          const A e = ex2(-abs_(y) * A(kLog2e));  // in [0, 1]; NaN stays NaN
          const A one = A(1);
          loss += (y > A(0) ? y : A(0)) + log1p_(e);
          const A sig = (y >= A(0) ? one : e) / (one + e);
          const A wv = p ? -sig : sig;
          wsum += wv;
          wdot += wv * sv;
          if (grad) wrow[j] = from_acc<TW>(wv * w_scale);  // kernel-uniform branch
        }
      }
      loss = warp_sum(loss);
      wsum = warp_sum(wsum);
      wdot = warp_sum(wdot);
      if (lane == 0) {
        part[r * n_ct + ct] = loss;
        part[ld_part + r * n_ct + ct] = wsum;
        part[2 * ld_part + r * n_ct + ct] = wdot;
      }
    }
  }
}

// A warp per row: for each statistic k its n_ct partials (lane-strided, then a fixed shuffle
// tree) -> row_stats[k * ld_stats + row0 + r].
template <typename A>
__global__ void __launch_bounds__(kThreads)
    siglip_row_merge_kernel(const A* __restrict__ part, int64_t ld_part, int64_t rows, int64_t n_ct,
                            int64_t row0, A* __restrict__ row_stats, int64_t ld_stats) {
  const int lane = threadIdx.x & 31;
  const int64_t warps_total = int64_t(gridDim.x) * kWarps;
  for (int64_t r = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); r < rows; r += warps_total) {
#pragma unroll
    for (int k = 0; k < kSiglipStats; ++k) {
      A t = A(0);
      for (int64_t p = lane; p < n_ct; p += 32) t += part[k * ld_part + r * n_ct + p];
      t = warp_sum(t);
      if (lane == 0) row_stats[k * ld_stats + row0 + r] = t;
    }
  }
}

inline size_t part_bytes(int64_t rows, int64_t n, size_t acc_size) {
  return round_up(static_cast<size_t>(rows * cdiv(n, kTileCols)) * acc_size, 256);
}

template <typename T, typename TW>
int launch(const ChunkView& c, const void* scale, const void* bias, double w_scale, bool grad,
           void* row_stats, int64_t ld_stats, void* work, cudaStream_t stream) {
  using A = Acc<T>;
  const int64_t rows = c.rows, n = c.n;
  const int64_t n_ct = cdiv(n, kTileCols), n_rt = cdiv(rows, kTileRows);
  const int64_t ld_part = static_cast<int64_t>(part_bytes(rows, n, sizeof(A)) / sizeof(A));
  A* part = static_cast<A*>(work);
  const dim3 grid(static_cast<unsigned>(n_ct), grid_cap(n_rt));
  GC_LAUNCH(grid, kThreads, stream, siglip_tile_kernel<T, TW>)(
      typed<T>(c.s), typed<TW>(c.w), rows, n, c.ld_s, c.ld_w, c.row0, c.offset, typed<A>(scale),
      typed<A>(bias), static_cast<A>(w_scale), grad, part, ld_part, n_ct, n_rt);
  GC_LAUNCH(grid_cap(cdiv(rows, kWarps)), kThreads, stream, siglip_row_merge_kernel<A>)(
      part, ld_part, rows, n_ct, c.row0, typed<A>(row_stats), ld_stats);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

size_t siglip_workspace_bytes(int64_t rows, int64_t n, bool f64) {
  return kSiglipStats * part_bytes(rows, n, f64 ? sizeof(double) : sizeof(float));
}

int siglip_chunk(const ChunkView& c, const void* scale, const void* bias, double w_scale, bool grad,
                 void* row_stats, int64_t ld_stats, void* work, CUstream_st* stream) {
  using gammacl::GcType;
  if (c.rows <= 0 || c.n <= 0) return static_cast<int>(cudaSuccess);
#define GC_DISPATCH(TS, TWT) \
  launch<TS, TWT>(c, scale, bias, w_scale, grad, row_stats, ld_stats, work, stream)
  const GcType s_type = c.s_type, w_type = c.w_type;
  if (s_type == GcType::F32 && (!grad || w_type == GcType::F32)) return GC_DISPATCH(float, float);
  if (s_type == GcType::F32 && w_type == GcType::BF16) return GC_DISPATCH(float, __nv_bfloat16);
  if (s_type == GcType::F32 && w_type == GcType::F16) return GC_DISPATCH(float, __half);
  if (s_type == GcType::F64 && (!grad || w_type == GcType::F64)) return GC_DISPATCH(double, double);
#undef GC_DISPATCH
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace gammacl::cuda
