// simlse, CPU backend: row / column log-sum-exp of l = scale * a @ b^T without an M x N buffer.
//
//   r_i = log sum_j exp(l_ij),  c_j = log sum_i exp(l_ij)       (entry (i, i+offset) left out
//                                                                 when exclude_pos)
//   backward, given g_r [M], g_c [N]:
//   W_ij = g_r_i exp(l_ij - r_i) + g_c_j exp(l_ij - c_j)  (0 on excluded entries)
//   da_raw = W @ b,  db_raw = W^T @ a
//   vector scales (scale [M] = rs, col_scale [N] = cs; ops/simlse.py): r_i = LSE_j rs_i s_ij,
//   c_j = LSE_i cs_j s_ij, W_ij = g_r_i rs_i p^r_ij + g_c_j cs_j p^c_ij, and the third output is
//   cat(drs, dcs): drs_i = g_r_i sum_j p^r_ij s_ij, dcs_j = g_c_j sum_i p^c_ij s_ij
//
// Rows are processed in chunks of R rows, R chosen so the R x N accumulation-dtype buffer stays
// under GAMMACL_CPU_CHUNK_MIB (default 32 MiB). Per chunk: S = A_c @ B^T by ATen (MKL/oneDNN,
// fp32 accumulation; fp16/bf16 operands are upcast to fp32 once, O((M+N)D) memory), then one fused
// pass over S in L1/L2-sized rows (at::parallel_for over row blocks):
//   forward : row max, then sum exp(l - max) (row LSE) and, in the same pass, the column partial
//             (m_j, s_j) of that row block updated online with one exp per entry:
//               d = l - m_j;  e = exp(-|d|);  d > 0 ? (s_j = s_j e + 1, m_j = l) : s_j += e
//             Each row block owns its own (m, s) column arrays (no races, no atomics); the blocks
//             are merged once at the end.
//   backward: S is turned into W in place (two exps per entry), then da_c = W @ B and
//             db += W^T @ A_c.
// GEMMs: forward 2MND FLOPs, backward 6MND (recompute + 2): 4 GEMMs per forward+backward,
// against 6 for open_clip's materialised loss (2 forward + 4 backward). exp is a vectorisable
// Cephes-style polynomial (float; rel. error <= 1.4 ulp) compiled for AVX-512, AVX2 and x86-64
// with runtime selection (GCC target_clones); fp64 uses std::exp.
// Statistics and raw gradients are fp32 (fp64 for fp64 inputs); indices are int64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "checks.h"
#include "kernel_api.h"

namespace gammacl {
namespace {

constexpr double kCpuChunkMiB = 32.0;  // default budget of the R x N buffer; GAMMACL_CPU_CHUNK_MIB

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && \
    defined(__linux__)
#define GC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GC_CLONES
#endif
// The row kernels are forced inline into each clone so they are vectorised for its ISA.
#if defined(__GNUC__)
#define GC_INLINE inline __attribute__((always_inline))
#else
#define GC_INLINE inline
#endif

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

#if defined(__has_builtin)
#if __has_builtin(__builtin_bit_cast)
#define GC_HAS_BIT_CAST 1
#endif
#endif

template <typename To, typename From>
GC_INLINE To bit_cast_(From x) {
#ifdef GC_HAS_BIT_CAST
  return __builtin_bit_cast(To, x);
#else
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
#endif
}

// exp(x) for float, branch-free so loops over it vectorise. Range-reduced x = n ln2 + r,
// |r| <= ln2/2, exp(r) by the Cephes degree-6 polynomial, 2^n by exponent bits. x < ln(FLT_MIN)
// (including -inf) gives exactly 0; x is clamped below ln(FLT_MAX) (callers only pass x <~ 0);
// NaN propagates through r.
GC_INLINE float exp_f32(float x) {
  constexpr float kHi = 88.3762626647949f, kLo = -87.3365447504f;
  float xc = x > kHi ? kHi : x;
  xc = xc < kLo ? kLo : xc;
  const float t = xc * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: round to nearest int
  const float fn = t - 12582912.0f;
  const uint32_t n = bit_cast_<uint32_t>(t) - 0x4B400000u;
  float r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const float res = y * bit_cast_<float>((n + 127u) << 23);
  return x < kLo ? 0.0f : res;
}

GC_INLINE float exp_(float x) { return exp_f32(x); }
inline double exp_(double x) { return std::exp(x); }

// ---- per-row kernels (templates; float instantiations below are compiled per ISA) ----
// Every kernel forms the logit l = s * x as one rounded product and takes both the shift (row
// max, column max, LSE) and the exponent l - shift from that same value, so the maximum entry
// gives exp(0) = 1 exactly. The library is built with -ffp-contract=off (gammacl/_ext.py):
// contracted into fma(s, x, -m) the exponent would see the unrounded product, and at |l| ~ 1e3
// the weights would be off by ~ulp(l) = 6e-5 relative.

// max_j s x_j, NaN if any s x_j is NaN (a NaN row must give a NaN LSE, never -inf or a number).
template <typename T>
GC_INLINE T max_scaled(const T* x, int64_t n, T s) {
  T m = kNegInf<T>;
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t j = 0; j < n; ++j) {
    const T l = s * x[j];
    m = l > m ? l : m;
    nan |= l != l;
  }
  return nan ? std::numeric_limits<T>::quiet_NaN() : m;
}

template <typename T>
GC_INLINE T sum_exp(const T* x, int64_t n, T s, T m) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    const T l = s * x[j];
    acc += exp_(l - m);
  }
  return acc;
}

// sum_j exp(l_j - m) and the online column update (cm, cl) <- merge((cm, cl), (l_j, 1)).
template <typename T>
GC_INLINE T sum_exp_cols(const T* x, int64_t n, T s, T m, T* cm, T* cl) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    const T l = s * x[j];
    acc += exp_(l - m);
    const T cmj = cm[j], clj = cl[j];
    const T d = l - cmj;
    const T e = exp_(-std::abs(d));  // d = +inf on a fresh column (cm = -inf): e = 0
    const bool up = d > T(0);        // new max: (m, s) <- (l, s e + 1), else (m, s + e)
    cl[j] = clj * (up ? e : T(1)) + (up ? T(1) : e);
    cm[j] = up ? l : cmj;
  }
  return acc;
}

// In place: x_j <- gr exp(s x_j - r) [if row] + gc_j exp(s x_j - c_j) [if gc].
template <typename T>
GC_INLINE void weights(T* x, int64_t n, T s, T gr, T r, const T* gc, const T* c) {
  if (gc) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T l = s * x[j];
      x[j] = gr * exp_(l - r) + gc[j] * exp_(l - c[j]);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T l = s * x[j];
      x[j] = gr * exp_(l - r);
    }
  }
}

// Vector scales (ops/simlse.py): the column LSE reads l^c_j = cs_j x_j. Online column update
// (cm, cl) <- merge((cm, cl), (cs_j x_j, 1)), as in sum_exp_cols.
template <typename T>
GC_INLINE void cols_online(const T* x, int64_t n, const T* cs, T* cm, T* cl) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T l = cs[j] * x[j];
    const T cmj = cm[j], clj = cl[j];
    const T d = l - cmj;
    const T e = exp_(-std::abs(d));
    const bool up = d > T(0);
    cl[j] = clj * (up ? e : T(1)) + (up ? T(1) : e);
    cm[j] = up ? l : cmj;
  }
}

// Vector scales, in place: x_j <- grs p^r_j + gccs_j p^c_j [if gccs], with
// p^r_j = exp(rs x_j - r), p^c_j = exp(cs_j x_j - c_j) and grs = g_r rs, gccs_j = g_c_j cs_j.
// Every entry is formed, g = 0 rows too (0 * exp(NaN) stays NaN, as on the torch backend).
// Returns sum_j p^r_j x_j (drs / g_r) and adds p^c_j x_j to pcs_j (dcs / g_c).
template <typename T>
GC_INLINE T weights_vec(T* x, int64_t n, T rs, T grs, T r, const T* cs, const T* gccs, const T* c,
                        T* pcs) {
  T acc = 0;
  if (gccs) {
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) {
      const T sj = x[j];
      const T pr = exp_(rs * sj - r), pc = exp_(cs[j] * sj - c[j]);
      acc += pr * sj;
      pcs[j] += pc * sj;
      x[j] = grs * pr + gccs[j] * pc;
    }
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) {
      const T sj = x[j];
      const T pr = exp_(rs * sj - r);
      acc += pr * sj;
      x[j] = grs * pr;
    }
  }
  return acc;
}

GC_CLONES void cols_online_f32(const float* x, int64_t n, const float* cs, float* cm, float* cl) {
  cols_online(x, n, cs, cm, cl);
}
GC_CLONES float weights_vec_f32(float* x, int64_t n, float rs, float grs, float r, const float* cs,
                                const float* gccs, const float* c, float* pcs) {
  return weights_vec(x, n, rs, grs, r, cs, gccs, c, pcs);
}
inline void col_update(const float* x, int64_t n, const float* cs, float* cm, float* cl) {
  cols_online_f32(x, n, cs, cm, cl);
}
inline void col_update(const double* x, int64_t n, const double* cs, double* cm, double* cl) {
  cols_online(x, n, cs, cm, cl);
}
inline float row_weights_vec(float* x, int64_t n, float rs, float grs, float r, const float* cs,
                             const float* gccs, const float* c, float* pcs) {
  return weights_vec_f32(x, n, rs, grs, r, cs, gccs, c, pcs);
}
inline double row_weights_vec(double* x, int64_t n, double rs, double grs, double r,
                              const double* cs, const double* gccs, const double* c, double* pcs) {
  return weights_vec(x, n, rs, grs, r, cs, gccs, c, pcs);
}

GC_CLONES float max_scaled_f32(const float* x, int64_t n, float s) { return max_scaled(x, n, s); }
GC_CLONES float sum_exp_f32(const float* x, int64_t n, float s, float m) {
  return sum_exp(x, n, s, m);
}
GC_CLONES float sum_exp_cols_f32(const float* x, int64_t n, float s, float m, float* cm,
                                 float* cl) {
  return sum_exp_cols(x, n, s, m, cm, cl);
}
GC_CLONES void weights_f32(float* x, int64_t n, float s, float gr, float r, const float* gc,
                           const float* c) {
  weights(x, n, s, gr, r, gc, c);
}

inline float row_max(const float* x, int64_t n, float s) { return max_scaled_f32(x, n, s); }
inline double row_max(const double* x, int64_t n, double s) { return max_scaled(x, n, s); }
inline float row_sum(const float* x, int64_t n, float s, float m) {
  return sum_exp_f32(x, n, s, m);
}
inline double row_sum(const double* x, int64_t n, double s, double m) {
  return sum_exp(x, n, s, m);
}
inline float row_sum_cols(const float* x, int64_t n, float s, float m, float* cm, float* cl) {
  return sum_exp_cols_f32(x, n, s, m, cm, cl);
}
inline double row_sum_cols(const double* x, int64_t n, double s, double m, double* cm, double* cl) {
  return sum_exp_cols(x, n, s, m, cm, cl);
}
inline void row_weights(float* x, int64_t n, float s, float gr, float r, const float* gc,
                        const float* c) {
  weights_f32(x, n, s, gr, r, gc, c);
}
inline void row_weights(double* x, int64_t n, double s, double gr, double r, const double* gc,
                        const double* c) {
  weights(x, n, s, gr, r, gc, c);
}

// Column excluded from global row i, or -1 when none falls inside [0, n).
inline int64_t excluded_col(bool exclude, int64_t i, int64_t offset, int64_t n) {
  if (!exclude) return -1;
  const int64_t e = i + offset;
  return (e >= 0 && e < n) ? e : -1;
}

// Row LSE of s * x over j != e, updating the row block's column partials when cm != nullptr.
template <typename T>
T row_lse(const T* x, int64_t n, T s, int64_t e, T* cm, T* cl) {
  const int64_t n0 = e < 0 ? n : e;  // [0, n0) and [n0 + 1, n) when e >= 0
  const int64_t n1 = e < 0 ? 0 : n - e - 1;
  const T* x1 = x + n0 + 1;
  T m = row_max(x, n0, s);
  if (n1 > 0) {
    const T m1 = row_max(x1, n1, s);
    m = (m1 > m || m1 != m1) ? m1 : m;  // keep a NaN from either segment
  }
  if (m == kNegInf<T>) return m;  // every entry excluded
  T sum;
  if (cm) {
    sum = row_sum_cols(x, n0, s, m, cm, cl);
    if (n1 > 0) sum += row_sum_cols(x1, n1, s, m, cm + n0 + 1, cl + n0 + 1);
  } else {
    sum = row_sum(x, n0, s, m);
    if (n1 > 0) sum += row_sum(x1, n1, s, m);
  }
  return m + std::log(sum);
}

int64_t cpu_chunk_rows(int64_t m, int64_t n, int64_t itemsize) {
  return chunk_rows(m, n * itemsize, chunk_budget_bytes("GAMMACL_CPU_CHUNK_MIB", kCpuChunkMiB), 8);
}

// Row LSE of row i with scale rs and, when cm != nullptr, the column partials with the column
// scales cs over j != e (vector mode: two logits per entry, two updates).
template <typename T>
T row_lse_vec(const T* x, int64_t n, T rs, const T* cs, int64_t e, T* cm, T* cl) {
  const T r = row_lse(x, n, rs, e, static_cast<T*>(nullptr), static_cast<T*>(nullptr));
  if (cm) {
    const int64_t n0 = e < 0 ? n : e;
    col_update(x, n0, cs, cm, cl);
    if (e >= 0 && e + 1 < n) col_update(x + e + 1, n - e - 1, cs + e + 1, cm + e + 1, cl + e + 1);
  }
  return r;
}

// Per chunk of R rows of a [M, D] against b [N, D] (acc dtype): S[rows, N] = A_c @ B^T in a
// buffer (zeros when D = 0), then epilogue(i0, rows, S) (grad: W over S in place), then with grad
// da[i0:i0+rows] = W @ B and, unless db is null, db += W^T @ A_c (db zeroed by the caller).
template <typename Epilogue>
void chunk_mm(const at::Tensor& a, const at::Tensor& b, int64_t R, bool grad, at::Tensor* da,
              at::Tensor* db, Epilogue&& epilogue) {
  const int64_t M = a.size(0), D = a.size(1);
  at::Tensor buf = at::empty({R, b.size(0)}, a.options());
  const at::Tensor bt = b.t();
  for (int64_t i0 = 0; i0 < M; i0 += R) {
    const int64_t rows = std::min(R, M - i0);
    at::Tensor S = buf.narrow(0, 0, rows);
    const at::Tensor a_c = a.narrow(0, i0, rows);
    if (D == 0) {
      S.zero_();
    } else {
      at::mm_out(S, a_c, bt);  // raw dots, acc dtype
    }
    epilogue(i0, rows, S);
    if (!grad) continue;
    at::Tensor da_c = da->narrow(0, i0, rows);
    at::mm_out(da_c, S, b);          // da_c = W @ B
    if (db) db->addmm_(S.t(), a_c);  // db += W^T @ A_c
  }
}

// rs, cs: nullptr (scalar mode, scale s) or the [M] row / [N] column scales.
template <typename T>
void fwd_impl(const at::Tensor& a, const at::Tensor& b, T s, const T* rs, const T* cs,
              int64_t offset, bool exclude, bool cols, at::Tensor& row, at::Tensor& col) {
  const int64_t M = a.size(0), N = b.size(0);
  const int64_t R = cpu_chunk_rows(M, N, sizeof(T));
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t nblk_max = std::min(nthreads, R);
  // Column partials, one (max, sum) row per row block.
  std::vector<T> cm(cols ? nblk_max * N : 0, kNegInf<T>), cl(cols ? nblk_max * N : 0, T(0));
  T* rowp = row.data_ptr<T>();
  chunk_mm(a, b, R, false, nullptr, nullptr, [&](int64_t i0, int64_t rows, const at::Tensor& S) {
    const T* sp = S.const_data_ptr<T>();
    const int64_t nblk = std::min(nthreads, rows);
    at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        T* bm = cols ? cm.data() + blk * N : nullptr;
        T* bl = cols ? cl.data() + blk * N : nullptr;
        for (int64_t r = rows * blk / nblk; r < rows * (blk + 1) / nblk; ++r) {
          const int64_t i = i0 + r;
          const int64_t e = excluded_col(exclude, i, offset, N);
          rowp[i] = rs ? row_lse_vec(sp + r * N, N, rs[i], cs, e, bm, bl)
                       : row_lse(sp + r * N, N, s, e, bm, bl);
        }
      }
    });
  });
  if (!cols) return;
  T* colp = col.data_ptr<T>();
  at::parallel_for(0, N, 4096, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      T m = kNegInf<T>;
      bool nan = false;  // a NaN logit leaves cm untouched but makes its block's cl NaN
      for (int64_t t = 0; t < nblk_max; ++t) {
        m = std::max(m, cm[t * N + j]);
        nan |= cl[t * N + j] != cl[t * N + j];
      }
      if (nan) {
        colp[j] = std::numeric_limits<T>::quiet_NaN();
        continue;
      }
      if (m == kNegInf<T>) {  // every entry of the column excluded
        colp[j] = m;
        continue;
      }
      T l = 0;
      for (int64_t t = 0; t < nblk_max; ++t) {
        const T mt = cm[t * N + j];
        if (mt != kNegInf<T>) l += cl[t * N + j] * std::exp(mt - m);
      }
      colp[j] = m + std::log(l);
    }
  });
}

template <typename T>
void bwd_impl(const at::Tensor& a, const at::Tensor& b, T s, const T* rl, const T* clse,
              const T* gr, const T* gc, int64_t offset, bool exclude, bool cols, at::Tensor& da,
              at::Tensor* db) {
  const int64_t M = a.size(0), N = b.size(0);
  const int64_t R = cpu_chunk_rows(M, N, sizeof(T));
  chunk_mm(a, b, R, true, &da, db, [&](int64_t i0, int64_t rows, const at::Tensor& S) {
    T* sp = S.data_ptr<T>();
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = i0 + r;
        T* x = sp + r * N;
        const int64_t e = excluded_col(exclude, i, offset, N);
        // Every non-excluded entry is formed, g = 0 rows too: 0 * exp(NaN) stays NaN, so a
        // non-finite feature reaches the gradients as on the torch backend (excluded entries
        // are set to 0 and never formed, so an all-excluded row gives W = 0, not -inf - -inf).
        const T* gcp = cols ? gc : nullptr;
        const int64_t n0 = e < 0 ? N : e;
        row_weights(x, n0, s, gr[i], rl[i], gcp, clse);
        if (e >= 0) {
          x[e] = T(0);
          row_weights(x + e + 1, N - e - 1, s, gr[i], rl[i], gcp ? gcp + e + 1 : nullptr,
                      clse ? clse + e + 1 : nullptr);
        }
      }
    });
  });
}

// Vector mode backward (ops/simlse.py): W_ij = g_r_i rs_i p^r_ij + g_c_j cs_j p^c_ij in place over
// S, da = W @ B, db = W^T @ A, drs_i = g_r_i sum_j p^r_ij s_ij, dcs_j = g_c_j sum_i p^c_ij s_ij.
// Each row block owns one [N] partial of sum_i p^c_ij s_ij (no races); merged at the end.
template <typename T>
void bwd_vec_impl(const at::Tensor& a, const at::Tensor& b, const T* rs, const T* cs, const T* rl,
                  const T* clse, const T* gr, const T* gc, int64_t offset, bool exclude, bool cols,
                  at::Tensor& da, at::Tensor* db, T* drs, T* dcs) {
  const int64_t M = a.size(0), N = b.size(0);
  const int64_t R = cpu_chunk_rows(M, N, sizeof(T));
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t nblk_max = std::min(nthreads, R);
  std::vector<T> pcs(cols ? nblk_max * N : 0, T(0)), gccs(cols ? N : 0);
  for (int64_t j = 0; j < (cols ? N : 0); ++j) gccs[j] = gc[j] * cs[j];
  chunk_mm(a, b, R, true, &da, db, [&](int64_t i0, int64_t rows, const at::Tensor& S) {
    T* sp = S.data_ptr<T>();
    const int64_t nblk = std::min(nthreads, rows);
    at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        T* bp = cols ? pcs.data() + blk * N : nullptr;
        const T* gcp = cols ? gccs.data() : nullptr;
        for (int64_t r = rows * blk / nblk; r < rows * (blk + 1) / nblk; ++r) {
          const int64_t i = i0 + r;
          T* x = sp + r * N;
          const int64_t e = excluded_col(exclude, i, offset, N);
          const T grs = gr[i] * rs[i];
          const int64_t n0 = e < 0 ? N : e;
          T sum = row_weights_vec(x, n0, rs[i], grs, rl[i], cs, gcp, clse, bp);
          if (e >= 0) {
            x[e] = T(0);
            const int64_t k = e + 1;
            sum += row_weights_vec(x + k, N - k, rs[i], grs, rl[i], cs ? cs + k : nullptr,
                                   gcp ? gcp + k : nullptr, clse ? clse + k : nullptr,
                                   bp ? bp + k : nullptr);
          }
          drs[i] = gr[i] * sum;
        }
      }
    });
  });
  if (!cols) return;
  for (int64_t j = 0; j < N; ++j) {
    T t = 0;
    for (int64_t blk = 0; blk < nblk_max; ++blk) t += pcs[blk * N + j];
    dcs[j] = gc[j] * t;
  }
}

// Non-empty problems (simlse_fwd_entry in checks.h does the checks and the empty ones).
std::tuple<at::Tensor, at::Tensor> simlse_fwd_cpu(const SimlseProblem& pr, const at::Tensor& a_in,
                                                  const at::Tensor& b_in, const at::Tensor& scale,
                                                  int64_t offset, bool exclude_pos, bool cols,
                                                  const std::optional<at::Tensor>& col_scale) {
  const auto acc = pr.acc;
  const auto opts = a_in.options().dtype(acc);
  at::Tensor row = at::empty({pr.M}, opts), col = at::empty({cols ? pr.N : 0}, opts);
  // fp16/bf16 operands are upcast once: fp32 GEMM and fp32 logits (bf16 logits would carry
  // ~0.4 absolute error at scale 100).
  const at::Tensor a = a_in.to(acc), b = b_in.to(acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "simlse_fwd_cpu", [&] {
    if (!pr.vec) {
      fwd_impl<scalar_t>(a, b, scale.item<scalar_t>(), nullptr, nullptr, offset, exclude_pos, cols,
                         row, col);
      return;
    }
    const at::Tensor rs = scale.contiguous();
    const at::Tensor cs = cols ? col_scale->contiguous() : at::Tensor();
    fwd_impl<scalar_t>(a, b, scalar_t(0), rs.const_data_ptr<scalar_t>(),
                       cols ? cs.const_data_ptr<scalar_t>() : nullptr, offset, exclude_pos, cols,
                       row, col);
  });
  return {row, col};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> simlse_bwd_cpu(
    const SimlseProblem& pr, const at::Tensor& a_in, const at::Tensor& b_in,
    const at::Tensor& scale, const at::Tensor& row_lse, const at::Tensor& col_lse,
    const at::Tensor& g_row, const at::Tensor& g_col, int64_t offset, bool exclude_pos, bool cols,
    const std::optional<at::Tensor>& col_scale, bool need_db) {
  const auto acc = pr.acc;
  const int64_t M = pr.M, N = pr.N, D = pr.D;
  const auto opts = a_in.options().dtype(acc);
  at::Tensor da = at::empty({M, D}, opts);
  at::Tensor db = at::zeros({need_db ? N : 0, D}, opts);  // accumulated by chunk_mm
  at::Tensor* dbp = need_db ? &db : nullptr;
  const at::Tensor a = a_in.to(acc), b = b_in.to(acc);
  const at::Tensor rl = row_lse.contiguous(), gr = g_row.contiguous();
  const at::Tensor cl = col_lse.contiguous(), gc = g_col.contiguous();
  if (pr.vec) {  // (dA, dB, cat(drs, dcs)): the scales are inside W
    at::Tensor ds = at::empty({M + (cols ? N : 0)}, opts);
    const at::Tensor rs = scale.contiguous();
    const at::Tensor cs = cols ? col_scale->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(acc, "simlse_bwd_cpu", [&] {
      scalar_t* dsp = ds.data_ptr<scalar_t>();
      bwd_vec_impl<scalar_t>(
          a, b, rs.const_data_ptr<scalar_t>(), cols ? cs.const_data_ptr<scalar_t>() : nullptr,
          rl.const_data_ptr<scalar_t>(), cols ? cl.const_data_ptr<scalar_t>() : nullptr,
          gr.const_data_ptr<scalar_t>(), cols ? gc.const_data_ptr<scalar_t>() : nullptr, offset,
          exclude_pos, cols, da, dbp, dsp, dsp + M);
    });
    return {da, db, ds};
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "simlse_bwd_cpu", [&] {
    bwd_impl<scalar_t>(
        a, b, scale.item<scalar_t>(), rl.const_data_ptr<scalar_t>(),
        cols ? cl.const_data_ptr<scalar_t>() : nullptr, gr.const_data_ptr<scalar_t>(),
        cols ? gc.const_data_ptr<scalar_t>() : nullptr, offset, exclude_pos, cols, da, dbp);
  });
  // sum_ij W_ij <a_i, b_j> = <A, W B>_F: W is acc-typed here, so no cancellation (cf. the CUDA
  // backend, which rounds W to 16 bits for its GEMMs and sums W_ij S_ij in the kernel).
  return {da, db, (a * da).sum()};
}

}  // namespace

// The schemas are shared by every backend of the op (CPU here, CUDA in simlse_cuda.cpp). Fake
// (meta) implementations for torch.compile / opcheck are registered from Python in
// gammacl/_ext.py. Both ops return fresh tensors (no aliasing).
TORCH_LIBRARY_FRAGMENT(gammacl, m) {
  m.def(
      "simlse_fwd(Tensor a, Tensor b, Tensor scale, int offset, bool exclude_pos, bool cols, "
      "Tensor? col_scale=None) -> (Tensor, Tensor)");
  m.def(
      "simlse_bwd(Tensor a, Tensor b, Tensor scale, Tensor row_lse, Tensor col_lse, "
      "Tensor g_row, Tensor g_col, int offset, bool exclude_pos, bool cols, "
      "Tensor? col_scale=None, bool need_db=True) -> (Tensor, Tensor, Tensor)");
}

namespace {
constexpr char kFwdOp[] = "gammacl::simlse_fwd (cpu)";
constexpr char kBwdOp[] = "gammacl::simlse_bwd (cpu)";
}  // namespace

TORCH_LIBRARY_IMPL(gammacl, CPU, m) {
  m.impl("simlse_fwd", &simlse_fwd_entry<kFwdOp, at::kCPU, simlse_fwd_cpu>);
  m.impl("simlse_bwd", &simlse_bwd_entry<kBwdOp, at::kCPU, simlse_bwd_cpu>);
}

}  // namespace gammacl
