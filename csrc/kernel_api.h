// The torch-free kernel API of gammacl's C++ (*.cpp), CUDA-kernel (*.cu) and CUDA-binding
// (*_cuda.cpp) translation units: the row-chunk budget and the raw-pointer kernel launchers. No
// torch and no CUDA header here: the .cu files include it and are compile-checked by nvcc alone
// (tests/test_cuda_compile.py).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>

namespace gammacl {

// Row-chunk memory budget in bytes: environment variable `env` in MiB (a float, e.g. "0.5"), or
// `default_mib` when unset/invalid. Read on every call, so it can be changed at run time.
inline int64_t chunk_budget_bytes(const char* env, double default_mib) {
  double mib = default_mib;
  if (const char* v = std::getenv(env)) {
    char* end = nullptr;
    const double parsed = std::strtod(v, &end);
    if (end != v && parsed > 0.0) mib = parsed;
  }
  const double bytes = mib * 1048576.0;
  return bytes < 1.0 ? int64_t{1} : static_cast<int64_t>(bytes);
}

// Rows per chunk so that rows * bytes_per_row <= budget (at least 1, at most m). Counts above
// `multiple` are rounded down to a multiple of it (GEMM tile friendliness).
inline int64_t chunk_rows(int64_t m, int64_t bytes_per_row, int64_t budget, int64_t multiple) {
  int64_t rows = budget / (bytes_per_row > 0 ? bytes_per_row : 1);
  if (multiple > 1 && rows > multiple) rows -= rows % multiple;
  if (rows < 1) rows = 1;
  return rows < m ? rows : (m > 0 ? m : 1);
}

// Element types of the buffers handed to the CUDA launchers.
enum class GcType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

}  // namespace gammacl

// ---------------------------------------------------------------------------------------------
// CUDA launchers for the simlse epilogues (defined in simlse_cuda.cu). Plain C++ with raw pointers,
// sizes, leading dimensions and a stream; `CUstream_st*` is exactly cudaStream_t. Every launcher
// returns a cudaError_t value as int (0 = cudaSuccess) from cudaGetLastError() after its launches.
// The accumulation type `acc` is double when the logit buffer is F64, float otherwise; `scale`,
// statistics, upstream gradients and workspaces are acc-typed device pointers. The scale is read on
// the device (no host sync). Sizes are int64 and all indexing is int64: chunk x N may pass 2^31.
// Logits l_ij = scale * S[i, j]; entry (row0 + i, row0 + i + offset) is excluded when `exclude`.
// ---------------------------------------------------------------------------------------------
struct CUstream_st;

namespace gammacl::cuda {

// One row chunk as every launcher takes it: S (rows x n, leading dim ld_s, type s_type) holds raw
// dot products a_i . b_j of global rows row0..row0+rows-1; W (rows x n, ld_w, type w_type) receives
// the gradient weights (w may alias s when the types match; null, and w_type ignored, where none
// are written); entry (row0 + i, row0 + i + offset) is the one `exclude` / the positive refers to.
struct ChunkView {
  const void* s;
  gammacl::GcType s_type;
  void* w;
  gammacl::GcType w_type;
  int64_t rows, n, ld_s, ld_w, row0, offset;
};

// Bytes of device workspace simlse_fwd_chunk needs for a chunk of `rows` rows (acc = f64 or f32).
size_t simlse_fwd_workspace_bytes(int64_t rows, int64_t n, bool f64);

// Forward epilogue of one row chunk (S of c; no W).
//   row_lse[row0 + i] = log sum_j exp(l_ij)                       (written for the chunk's rows)
//   cols: (col_m, col_l)[j] <- running column stats (max m, sum of e^(l - m)) merged with this
//         chunk's; `first` starts them fresh (no initialisation needed), `last` writes
//         col_lse[j] = m + ln l instead of storing them.
// Rows with every entry excluded get -inf. Race-free: per-(row-tile, column) partials in `work`
// are merged by one thread per column; no atomics.
int simlse_fwd_chunk(const ChunkView& c, bool exclude, bool cols, const void* scale, void* row_lse,
                     void* col_m, void* col_l, bool first, bool last, void* col_lse, void* work,
                     CUstream_st* stream, bool vec_scale = false, const void* col_scale = nullptr);

// Backward weights of one row chunk, written to W of c:
//   W_ij = w_scale[i] * (g_row[i] exp(l_ij - row_lse[i]) + [cols] g_col[j] exp(l_ij - col_lse[j]))
// (0 if excluded) with i = row0 + local row. c.s_type in {F32, F64, F16, BF16}; c.w_type = F64
// iff c.s_type is F64. w_scale: optional acc-typed device vector over all rows (nullptr = 1),
// powers of two that keep each row's fp16 weights out of fp16's subnormal range; the caller divides
// them back out of the GEMM results. ds_part (acc type, >= simlse_bwd_ds_partials(rows, n)
// elements) receives *ds_count partial sums of W_ij S_ij (the unscaled weights in the acc type: d
// loss / d scale without the 16-bit rounding of W); their sum is this chunk's share of sum_ij W_ij
// S_ij.
size_t simlse_bwd_ds_partials(int64_t rows, int64_t n);
int simlse_bwd_weights(const ChunkView& c, bool exclude, bool cols, const void* scale,
                       const void* row_lse, const void* col_lse, const void* g_row,
                       const void* g_col, const void* w_scale, void* ds_part, int64_t* ds_count,
                       CUstream_st* stream);

// Vector scales (vec_scale: `scale` is [M] row scales rs, indexed by global row; col_scale [N]
// column scales cs, needed when cols): the forward's row LSE reads rs_i S_ij and its column LSE
// cs_j S_ij. simlse_bwd_weights_vec writes W_ij = w_scale[i] * (g_row[i] rs_i p_ij + [cols]
// g_col[j] cs_j p'_ij), p_ij = exp(rs_i S_ij - row_lse[i]), p'_ij = exp(cs_j S_ij - col_lse[j])
// (0 if excluded; S must be F32 or F64), and from the acc-typed p the partial sums
//   drs_part[r * *drs_stride + k] (k < *drs_stride):  sum_k = sum_j p_ij S_ij of local row r
//   dcs_part[t * n + j]        (t < *dcs_rows):      sum_t = sum_i p'_ij S_ij of this chunk
// sized by simlse_bwd_vec_row_partials(n) per row and simlse_bwd_vec_col_partials(rows) x n.
size_t simlse_bwd_vec_row_partials(int64_t n);
size_t simlse_bwd_vec_col_partials(int64_t rows);
int simlse_bwd_weights_vec(const ChunkView& c, bool exclude, bool cols, const void* row_scale,
                           const void* col_scale, const void* row_lse, const void* col_lse,
                           const void* g_row, const void* g_col, const void* w_scale,
                           void* drs_part, int64_t* drs_stride, void* dcs_part, int64_t* dcs_rows,
                           CUstream_st* stream);

// Bytes of device workspace gamma_onepass_chunk needs for a chunk of `rows` rows.
size_t gamma_onepass_workspace_bytes(int64_t rows, int64_t n, bool f64);

// One row chunk of the gamma one-pass op (contract: python/gammacl/ops/gamma_onepass.py): S of c
// F32 or F64, the entry at c.offset excluded. With l = scale * S:
//   row_lse[row0 + i], row_term[row0 + i] = sum_j e^{min(l_ij + alpha_row[row0 + i], clamp)}
//   columns: running (col_m, col_s) LSE stats and col_t term sums merged with this chunk's
//            (`first` starts them fresh; `last` writes col_lse / col_term instead of storing them)
//   grad: W_ij = w_row e^{min(l_ij + alpha_row_i, clamp)} + w_col e^{min(l_ij + alpha_col_j,
//   clamp)}
//         (0 if excluded) into W of c: w_type == s_type (w may alias s) or BF16 for F32.
// alpha_row: [row0 + rows] (indexed globally), alpha_col: [n]; acc-typed device pointers. No
// atomics; `work` holds gamma_onepass_workspace_bytes(rows, n, s_type == F64) bytes.
int gamma_onepass_chunk(const ChunkView& c, const void* scale, const void* alpha_row,
                        const void* alpha_col, double w_row, double w_col, double clamp, bool grad,
                        void* row_lse, void* row_term, void* col_m, void* col_s, void* col_t,
                        bool first, bool last, void* col_lse, void* col_term, void* work,
                        CUstream_st* stream);

}  // namespace gammacl::cuda

// ---------------------------------------------------------------------------------------------
// CUDA launchers of the siglip op (defined in siglip_cuda.cu; contract: python/gammacl/ops/
// siglip.py). Conventions as above.
// ---------------------------------------------------------------------------------------------
namespace gammacl::cuda {

// Bytes of device workspace siglip_chunk needs for a chunk of `rows` rows.
size_t siglip_workspace_bytes(int64_t rows, int64_t n, bool f64);

// One row chunk of the siglip op: S of c F32 or F64. With l = scale * S + bias, z = +1 at
// (row0 + i, row0 + i + offset), -1 elsewhere, y = -z l, W = -z sigmoid(y), the kSiglipStats
// row statistics row_stats[k * ld_stats + row0 + i] (acc type):
//   k = 0: sum_j softplus(y_ij),  1: sum_j W_ij,  2: sum_j W_ij S_ij (from the acc-typed W)
//   grad: w_scale * W into W of c: w_type == s_type (w may alias s), or BF16 / F16 for F32
//         (w_scale: a power of two; 2^14 keeps fp16 weights normal, |W| <= 1).
// scale, bias: acc-typed device scalars. No atomics: per-(row, column-tile) partials in `work`
// (siglip_workspace_bytes(rows, n, s_type == F64) bytes) summed in a fixed order.
constexpr int kSiglipStats = 3;
int siglip_chunk(const ChunkView& c, const void* scale, const void* bias, double w_scale, bool grad,
                 void* row_stats, int64_t ld_stats, void* work, CUstream_st* stream);

}  // namespace gammacl::cuda
