// Causal (GQA-aware) attention forward and backward on CPU, fp32 maths on bf16/fp16/fp32 I/O.
//
// Why not SDPA: torch 2.13's CPU flash attention (bf16, B=4, 9 heads, T=256, D=64) takes 5.1 ms
// forward and 22 ms forward+backward per layer here, ~60 GFLOP/s with the causal skip, a quarter
// of what this CPU's GEMMs reach in the same step; at SmolLM2's 30 layers that is 28% of a
// fastft LoRA step (benchmarks/README.md, profile). Attention at these sizes is a handful of
// small GEMMs (T x T x D per head), so this file is one register-blocked fp32 GEMM micro-kernel
// (8 rows x 32 columns, AVX-512 FMA; plain loops elsewhere) and the softmax glue around it.
//
// Work split: one task per (batch, kv head); a task runs the G = Hq/Hkv query heads sharing that
// kv head, so dK/dV accumulate in task-local fp32 buffers (no atomics). Queries go in blocks of
// kBQ rows; the score block (kBQ x T fp32) stays in L2. Causality is exploited per micro-tile:
// tiles entirely above the diagonal are never computed. The forward writes lse (fp32) for the
// backward, which recomputes the probabilities (no T x T tensor is ever saved).
//
// Tensors arrive as raw pointers plus (batch, head, time) element strides with a contiguous
// last dim, so HF's (B, T, H, D) projections are read in place; fastft/ops/attention.py checks
// devices, dtypes, shapes and strides.
#include <immintrin.h>
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastft/adamw.h"      // Elem<>: per-dtype load/store
#include "fastft/attention.h"  // attn_prob, attn_dscore, attn_lse
#include "ops.h"

namespace py = pybind11;

namespace fastft {
namespace {

constexpr int kMR = 8;     // micro-tile rows
constexpr int kNR = 32;    // micro-tile columns (two 16-float vectors)
constexpr int kBQ = 64;    // query rows per block (multiple of kMR)

// Which part of a GEMM the causal mask lets us skip. Queries i and keys j are global indices;
// `off` is the global query index of the GEMM's first query (row or k).
enum Causal {
  kNoMask,
  kKeyCols,   // C[i][j], rows = queries from off, cols = keys from 0: only j <= i
  kKeyDepth,  // C[i][.] = sum_j A[i][j] B[j][.], rows = queries from off: only j <= i
  kQueryDepth // C[.][j] = sum_i A[.][i] B[i][j], depth = queries from off, cols = keys: only i >= j
};

// C[R x n] (+)= A[R x (k0..k1)] * B[(k0..k1) x n]; fp32 row-major, n <= kNR. AT: A is stored
// transposed (A[k * lda + r]), which spares the backward two transposing copies per block.
template <int R, bool AT>
__attribute__((target("avx512f"))) void tile_avx512(int64_t k0, int64_t k1, const float* A, int64_t lda,
                                                     const float* B, int64_t ldb, float* C, int64_t ldc,
                                                     int n, bool acc) {
  __m512 c0[R], c1[R];
  const __mmask16 m0 = n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
  const __mmask16 m1 = n >= 32 ? static_cast<__mmask16>(0xFFFF)
                               : (n > 16 ? static_cast<__mmask16>((1u << (n - 16)) - 1) : static_cast<__mmask16>(0));
  // full unrolls keep the 2R accumulators in registers (without them GCC spilled all 16 to the
  // stack on every k step)
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; ++k) {
    const float* b = B + k * ldb;
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, b);
    const __m512 b1 = _mm512_maskz_loadu_ps(m1, b + 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(AT ? A[k * lda + r] : A[r * lda + k]);
      c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* c = C + r * ldc;
    if (acc) {
      c0[r] = _mm512_add_ps(c0[r], _mm512_maskz_loadu_ps(m0, c));
      c1[r] = _mm512_add_ps(c1[r], _mm512_maskz_loadu_ps(m1, c + 16));
    }
    _mm512_mask_storeu_ps(c, m0, c0[r]);
    _mm512_mask_storeu_ps(c + 16, m1, c1[r]);
  }
}

// The same tile in plain C++ for CPUs without AVX-512 (the compiler vectorises the j loop).
void tile_generic(int R, bool at, int64_t k0, int64_t k1, const float* A, int64_t lda, const float* B, int64_t ldb,
                  float* C, int64_t ldc, int n, bool acc) {
  float c[kMR][kNR];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kNR; ++j) c[r][j] = 0.0f;
  for (int64_t k = k0; k < k1; ++k) {
    const float* b = B + k * ldb;
    for (int r = 0; r < R; ++r) {
      const float a = at ? A[k * lda + r] : A[r * lda + k];
      for (int j = 0; j < n; ++j) c[r][j] += a * b[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < n; ++j) C[r * ldc + j] = (acc ? C[r * ldc + j] : 0.0f) + c[r][j];
}

bool has_avx512() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return static_cast<bool>(__builtin_cpu_supports("avx512f"));
  }();
  return yes;
}

template <bool AT>
void tile_dispatch(int R, int64_t k0, int64_t k1, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                   int64_t ldc, int n, bool acc) {
  switch (R) {
    case 8: return tile_avx512<8, AT>(k0, k1, A, lda, B, ldb, C, ldc, n, acc);
    case 7: return tile_avx512<7, AT>(k0, k1, A, lda, B, ldb, C, ldc, n, acc);
    case 6: return tile_avx512<6, AT>(k0, k1, A, lda, B, ldb, C, ldc, n, acc);
    case 5: return tile_avx512<5, AT>(k0, k1, A, lda, B, ldb, C, ldc, n, acc);
    case 4: return tile_avx512<4, AT>(k0, k1, A, lda, B, ldb, C, ldc, n, acc);
    case 3: return tile_avx512<3, AT>(k0, k1, A, lda, B, ldb, C, ldc, n, acc);
    case 2: return tile_avx512<2, AT>(k0, k1, A, lda, B, ldb, C, ldc, n, acc);
    default: return tile_avx512<1, AT>(k0, k1, A, lda, B, ldb, C, ldc, n, acc);
  }
}

void tile(int R, bool at, int64_t k0, int64_t k1, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, int n, bool acc) {
  if (!has_avx512()) return tile_generic(R, at, k0, k1, A, lda, B, ldb, C, ldc, n, acc);
  if (at) return tile_dispatch<true>(R, k0, k1, A, lda, B, ldb, C, ldc, n, acc);
  return tile_dispatch<false>(R, k0, k1, A, lda, B, ldb, C, ldc, n, acc);
}

// C[M x N] (+)= A[M x K] * B[K x N] (fp32 row-major), skipping what the causal mask zeroes.
// Columns outer so one B panel (K x 32) stays in L1 while the row tiles stream past it.
// at: A is given transposed, A[k * lda + m].
void gemm(bool at, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t M,
          int64_t N, int64_t K, bool acc, Causal mode, int64_t off) {
  if (mode == kQueryDepth) N = std::min(N, off + K);  // keys after the last query see nothing
  for (int64_t j0 = 0; j0 < N; j0 += kNR) {
    for (int64_t i0 = 0; i0 < M; i0 += kMR) {
      const int R = static_cast<int>(std::min<int64_t>(kMR, M - i0));
      int64_t n = std::min<int64_t>(kNR, N - j0), k0 = 0, k1 = K;
      if (mode == kKeyCols) {
        n = std::min(n, off + i0 + R - j0);  // last row's last visible key, relative to j0
        if (n <= 0) continue;                // never read: softmax stops at the diagonal
      } else if (mode == kKeyDepth) {
        k1 = std::min(K, off + i0 + R);
      } else if (mode == kQueryDepth) {
        k0 = std::max<int64_t>(0, j0 - off);
        if (k0 >= K) {
          if (!acc)
            for (int r = 0; r < R; ++r) std::memset(C + (i0 + r) * ldc + j0, 0, sizeof(float) * n);
          continue;
        }
      }
      tile(R, at, k0, k1, at ? A + i0 : A + i0 * lda, lda, B + j0, ldb, C + i0 * ldc + j0, ldc, static_cast<int>(n), acc);
    }
  }
}

// Conversions between the I/O dtype and the fp32 work buffers. The glue (conversions, softmax,
// score gradients) carries target_clones like the other CPU kernels: in the default x86-64 build
// it ran as SSE2 code and took 18% of the kernel's time next to 29% for the GEMM tiles.
#define FASTFT_ATTN_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))

template <int DT>
inline __attribute__((always_inline)) void load_impl(const void* base, int64_t st, int64_t rows, int64_t D,
                                                     float* dst, int64_t ld, bool transpose) {
  using E = Elem<DT>;
  const auto* x = static_cast<const typename E::T*>(base);
  if (transpose) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < D; ++d) dst[d * ld + r] = E::load(x, r * st + d);
  } else {
    for (int64_t r = 0; r < rows; ++r)
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dst[r * ld + d] = E::load(x, r * st + d);
  }
}

// rows x D elements at base (row stride st, contiguous last dim) -> fp32 dst[r][d] (row length
// ld) or, transposed, dst[d][r].
FASTFT_ATTN_CLONES void load_rows(int dt, const void* base, int64_t st, int64_t rows, int64_t D, float* dst,
                                  int64_t ld, bool transpose = false) {
  if (dt == kFloat32) load_impl<kFloat32>(base, st, rows, D, dst, ld, transpose);
  else if (dt == kBFloat16) load_impl<kBFloat16>(base, st, rows, D, dst, ld, transpose);
  else load_impl<kFloat16>(base, st, rows, D, dst, ld, transpose);
}

template <int DT>
inline __attribute__((always_inline)) void store_impl(void* base, int64_t st, int64_t rows, int64_t D,
                                                      const float* src, int64_t ld, bool transpose) {
  using E = Elem<DT>;
  auto* y = static_cast<typename E::T*>(base);
  if (transpose) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < D; ++d) E::store(y, r * st + d, src[d * ld + r]);
  } else {
    for (int64_t r = 0; r < rows; ++r)
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) E::store(y, r * st + d, src[r * ld + d]);
  }
}

// The inverse: fp32 src[r][d] (or src[d][r] when transposed) -> rows x D elements at base.
FASTFT_ATTN_CLONES void store_rows(int dt, void* base, int64_t st, int64_t rows, int64_t D, const float* src,
                                   int64_t ld, bool transpose = false) {
  if (dt == kFloat32) store_impl<kFloat32>(base, st, rows, D, src, ld, transpose);
  else if (dt == kBFloat16) store_impl<kBFloat16>(base, st, rows, D, src, ld, transpose);
  else store_impl<kFloat16>(base, st, rows, D, src, ld, transpose);
}

struct Strides {
  int64_t b, h, t;
};

Strides strides_of(const std::vector<int64_t>& s, const char* name) {
  if (s.size() != 3) throw std::invalid_argument(std::string("attention: ") + name + " strides need 3 entries");
  return {s[0], s[1], s[2]};
}

template <typename T>
const T* at(uintptr_t base, const Strides& s, int64_t b, int64_t h, int elem) {
  return reinterpret_cast<const T*>(base + static_cast<uintptr_t>((b * s.b + h * s.h) * elem));
}

struct Shape {
  int64_t B, Hq, Hkv, T, D;
  float scale;
};

// Softmax of one block's score rows in place: s (unscaled q.k) -> p; writes lse when `lse_out`,
// else reads it from `lse_in`. Zeroes p up to the block's diagonal end so the causal GEMMs that
// read whole micro-tiles see zeros above the diagonal.
FASTFT_ATTN_CLONES void softmax_rows(float* S, int64_t ld, int64_t i0, int64_t rows, float scale, float* lse_out,
                  const float* lse_in) {
  const int64_t end = i0 + rows;
  for (int64_t r = 0; r < rows; ++r) {
    float* s = S + r * ld;
    const int64_t n = i0 + r + 1;  // visible keys 0..i
    float lse;
    if (lse_out) {
      float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < n; ++j) m = s[j] * scale > m ? s[j] * scale : m;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) sum += ce_exp(s[j] * scale - m);
      lse = attn_lse(m, sum);
      lse_out[r] = lse;
    } else {
      lse = lse_in[r];
    }
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] = attn_prob(s[j], scale, lse);
    for (int64_t j = n; j < end; ++j) s[j] = 0.0f;
  }
}

struct Buffers {
  std::vector<float> kt, kf, vt, vf, q, s, ds, o, dof, dkt, dvt, delta, lse;
  Buffers(const Shape& sh) {
    const int64_t T = sh.T, D = sh.D;
    kt.resize(D * T); kf.resize(T * D); vt.resize(D * T); vf.resize(T * D);
    q.resize(kBQ * D); s.resize(kBQ * T); ds.resize(kBQ * T); o.resize(kBQ * D);
    dof.resize(kBQ * D); dkt.resize(D * T); dvt.resize(D * T);
    delta.resize(kBQ); lse.resize(kBQ);
  }
};

// delta_r = do_r . o_r over a block's rows (o as stored, rounded like SDPA's saved output).
FASTFT_ATTN_CLONES void row_dots(const float* a, const float* b, int64_t rows, int64_t D, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < D; ++d) acc += a[r * D + d] * b[r * D + d];
    out[r] = acc;
  }
}

// dP -> dS in place for a block's rows (j <= i), zero up to the block's diagonal end.
FASTFT_ATTN_CLONES void dscore_rows(const float* P, float* dS, int64_t ld, int64_t i0, int64_t rows,
                                    const float* delta, float scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = P + r * ld;
    float* ds = dS + r * ld;
    const float dl = delta[r];
    const int64_t n = i0 + r + 1;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) ds[j] = attn_dscore(p[j], ds[j], dl, scale);
    for (int64_t j = n; j < i0 + rows; ++j) ds[j] = 0.0f;
  }
}

inline int elem_size(int dt) { return dt == kFloat32 ? 4 : 2; }

void forward_task(int dt, const Shape& sh, int64_t b, int64_t hk, uintptr_t q, Strides qs, uintptr_t k, Strides ks,
                  uintptr_t v, Strides vs, uintptr_t o, Strides os, float* lse, Buffers& w) {
  const int es = elem_size(dt);
  const int64_t T = sh.T, D = sh.D, G = sh.Hq / sh.Hkv;
  load_rows(dt, at<char>(k, ks, b, hk, es), ks.t, T, D, w.kt.data(), T, true);
  load_rows(dt, at<char>(v, vs, b, hk, es), vs.t, T, D, w.vf.data(), D);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    const char* qh = at<char>(q, qs, b, h, es);
    char* oh = const_cast<char*>(at<char>(o, os, b, h, es));
    float* lse_h = lse + (b * sh.Hq + h) * T;
    for (int64_t i0 = 0; i0 < T; i0 += kBQ) {
      const int64_t rows = std::min<int64_t>(kBQ, T - i0);
      load_rows(dt, qh + i0 * qs.t * es, qs.t, rows, D, w.q.data(), D);
      gemm(false, w.q.data(), D, w.kt.data(), T, w.s.data(), T, rows, T, D, false, kKeyCols, i0);
      softmax_rows(w.s.data(), T, i0, rows, sh.scale, lse_h + i0, nullptr);
      gemm(false, w.s.data(), T, w.vf.data(), D, w.o.data(), D, rows, D, T, false, kKeyDepth, i0);
      store_rows(dt, oh + i0 * os.t * es, os.t, rows, D, w.o.data(), D);
    }
  }
}

void backward_task(int dt, const Shape& sh, int64_t b, int64_t hk, uintptr_t q, Strides qs, uintptr_t k,
                   Strides ks, uintptr_t v, Strides vs, uintptr_t o, Strides os, uintptr_t dout, Strides dos,
                   const float* lse, uintptr_t dq, Strides dqs, uintptr_t dk, Strides dks, uintptr_t dv,
                   Strides dvs, Buffers& w) {
  const int es = elem_size(dt);
  const int64_t T = sh.T, D = sh.D, G = sh.Hq / sh.Hkv;
  const char* kh = at<char>(k, ks, b, hk, es);
  const char* vh = at<char>(v, vs, b, hk, es);
  load_rows(dt, kh, ks.t, T, D, w.kt.data(), T, true);
  load_rows(dt, kh, ks.t, T, D, w.kf.data(), D);
  load_rows(dt, vh, vs.t, T, D, w.vt.data(), T, true);
  std::fill(w.dkt.begin(), w.dkt.end(), 0.0f);
  std::fill(w.dvt.begin(), w.dvt.end(), 0.0f);
  float* S = w.s.data();
  float* dS = w.ds.data();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    const char* qh = at<char>(q, qs, b, h, es);
    const char* oh = at<char>(o, os, b, h, es);
    const char* doh = at<char>(dout, dos, b, h, es);
    char* dqh = const_cast<char*>(at<char>(dq, dqs, b, h, es));
    const float* lse_h = lse + (b * sh.Hq + h) * T;
    for (int64_t i0 = 0; i0 < T; i0 += kBQ) {
      const int64_t rows = std::min<int64_t>(kBQ, T - i0);
      load_rows(dt, qh + i0 * qs.t * es, qs.t, rows, D, w.q.data(), D);
      load_rows(dt, doh + i0 * dos.t * es, dos.t, rows, D, w.dof.data(), D);
      load_rows(dt, oh + i0 * os.t * es, os.t, rows, D, w.o.data(), D);
      row_dots(w.dof.data(), w.o.data(), rows, D, w.delta.data());
      gemm(false, w.q.data(), D, w.kt.data(), T, S, T, rows, T, D, false, kKeyCols, i0);
      softmax_rows(S, T, i0, rows, sh.scale, nullptr, lse_h + i0);
      gemm(false, w.dof.data(), D, w.vt.data(), T, dS, T, rows, T, D, false, kKeyCols, i0);
      dscore_rows(S, dS, T, i0, rows, w.delta.data(), sh.scale);
      // dq block = dS K;  dV^T += dO^T P;  dK^T += Q^T dS
      gemm(false, dS, T, w.kf.data(), D, w.o.data(), D, rows, D, T, false, kKeyDepth, i0);
      store_rows(dt, dqh + i0 * dqs.t * es, dqs.t, rows, D, w.o.data(), D);
      gemm(true, w.dof.data(), D, S, T, w.dvt.data(), T, D, T, rows, true, kQueryDepth, i0);
      gemm(true, w.q.data(), D, dS, T, w.dkt.data(), T, D, T, rows, true, kQueryDepth, i0);
    }
  }
  store_rows(dt, const_cast<char*>(at<char>(dk, dks, b, hk, es)), dks.t, T, D, w.dkt.data(), T, true);
  store_rows(dt, const_cast<char*>(at<char>(dv, dvs, b, hk, es)), dvs.t, T, D, w.dvt.data(), T, true);
}

Shape make_shape(int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t D, double scale, int dtype) {
  if (B < 0 || Hq <= 0 || Hkv <= 0 || Hq % Hkv != 0 || T < 0 || D <= 0)
    throw std::invalid_argument("attention: bad shape B=" + std::to_string(B) + " Hq=" + std::to_string(Hq) +
                                " Hkv=" + std::to_string(Hkv) + " T=" + std::to_string(T) + " D=" +
                                std::to_string(D) + " (need Hq % Hkv == 0, D > 0)");
  if (dtype < kFloat32 || dtype > kFloat16)
    throw std::invalid_argument("attention: dtype code " + std::to_string(dtype) + ", expected 0, 1 or 2");
  return {B, Hq, Hkv, T, D, static_cast<float>(scale)};
}

int threads_for(const Shape& sh) {
  const int64_t tasks = sh.B * sh.Hkv;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tasks, omp_get_max_threads())));
}

// Runs fn(b, hk, buffers) for every (batch, kv head) task on OpenMP threads, GIL released, one
// set of work buffers per thread.
template <typename Fn>
void for_each_task(const Shape& sh, Fn&& fn) {
  py::gil_scoped_release nogil;
#pragma omp parallel num_threads(threads_for(sh))
  {
    Buffers w(sh);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < sh.B * sh.Hkv; ++task) fn(task / sh.Hkv, task % sh.Hkv, w);
  }
}

void attention_fwd(uintptr_t q, std::vector<int64_t> qst, uintptr_t k, std::vector<int64_t> kst, uintptr_t v,
                   std::vector<int64_t> vst, uintptr_t o, std::vector<int64_t> ost, uintptr_t lse, int64_t B,
                   int64_t Hq, int64_t Hkv, int64_t T, int64_t D, double scale, int dtype) {
  const Shape sh = make_shape(B, Hq, Hkv, T, D, scale, dtype);
  const Strides qs = strides_of(qst, "q"), ks = strides_of(kst, "k"), vs = strides_of(vst, "v"),
                os = strides_of(ost, "out");
  if (B == 0 || T == 0) return;
  float* l = reinterpret_cast<float*>(lse);
  for_each_task(sh, [&](int64_t b, int64_t hk, Buffers& w) {
    forward_task(dtype, sh, b, hk, q, qs, k, ks, v, vs, o, os, l, w);
  });
}

void attention_bwd(uintptr_t q, std::vector<int64_t> qst, uintptr_t k, std::vector<int64_t> kst, uintptr_t v,
                   std::vector<int64_t> vst, uintptr_t o, std::vector<int64_t> ost, uintptr_t dout,
                   std::vector<int64_t> dost, uintptr_t lse, uintptr_t dq, std::vector<int64_t> dqst, uintptr_t dk,
                   std::vector<int64_t> dkst, uintptr_t dv, std::vector<int64_t> dvst, int64_t B, int64_t Hq,
                   int64_t Hkv, int64_t T, int64_t D, double scale, int dtype) {
  const Shape sh = make_shape(B, Hq, Hkv, T, D, scale, dtype);
  const Strides qs = strides_of(qst, "q"), ks = strides_of(kst, "k"), vs = strides_of(vst, "v"),
                os = strides_of(ost, "out"), dos = strides_of(dost, "grad_out"), dqs = strides_of(dqst, "dq"),
                dks = strides_of(dkst, "dk"), dvs = strides_of(dvst, "dv");
  if (B == 0 || T == 0) return;
  const float* l = reinterpret_cast<const float*>(lse);
  for_each_task(sh, [&](int64_t b, int64_t hk, Buffers& w) {
    backward_task(dtype, sh, b, hk, q, qs, k, ks, v, vs, o, os, dout, dos, l, dq, dqs, dk, dks, dv, dvs, w);
  });
}

}  // namespace

void register_attention(py::module_& m) {
  m.def("attention_fwd", &attention_fwd, py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"),
        py::arg("v"), py::arg("v_strides"), py::arg("out"), py::arg("out_strides"), py::arg("lse"), py::arg("B"),
        py::arg("Hq"), py::arg("Hkv"), py::arg("T"), py::arg("D"), py::arg("scale"), py::arg("dtype"),
        "Causal attention forward; strides (batch, head, time) in elements, last dim contiguous; "
        "lse (B, Hq, T) fp32 contiguous.");
  m.def("attention_bwd", &attention_bwd, py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"),
        py::arg("v"), py::arg("v_strides"), py::arg("out"), py::arg("out_strides"), py::arg("grad_out"),
        py::arg("grad_out_strides"), py::arg("lse"), py::arg("dq"), py::arg("dq_strides"), py::arg("dk"),
        py::arg("dk_strides"), py::arg("dv"), py::arg("dv_strides"), py::arg("B"), py::arg("Hq"), py::arg("Hkv"),
        py::arg("T"), py::arg("D"), py::arg("scale"), py::arg("dtype"),
        "Causal attention backward (probabilities recomputed from lse); writes dq, dk, dv.");
}

}  // namespace fastft
