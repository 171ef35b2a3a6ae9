// Causal (GQA-aware) attention forward and backward on CPU, fp32 maths on bf16/fp16/fp32 I/O.
//
// Why not SDPA: torch 2.13's CPU flash attention (bf16, B=4, 9 heads, T=256, D=64) takes 5.1 ms
// forward and 22 ms forward+backward per layer here, ~60 GFLOP/s with the causal skip, a quarter
// of what this CPU's GEMMs reach in the same step; at SmolLM2's 30 layers that is 28% of a
// fastft LoRA step (benchmarks/README.md, profile). Attention at these sizes is a handful of
// small GEMMs (T x T x D per head), so this file is register-blocked GEMM micro-kernels (8 rows x
// 32 columns) and the softmax glue around them. Two tile kinds: fp32 AVX-512 FMA (fp32/fp16 I/O,
// and bf16 on CPUs without AVX512-BF16) and bf16 dot products (bf16 I/O with AVX512-BF16, twice
// the multiply-adds per instruction: fwd+bwd 10.0 -> 6.4 ms, benchmarks/results/attention.md).
//
// Work split: one task per (batch, kv head); a task runs the G = Hq/Hkv query heads sharing that
// kv head, so dK/dV accumulate in task-local fp32 buffers (no atomics). Queries go in blocks of
// kBQ rows; the score block (kBQ x T fp32) stays in L2. Causality is exploited per micro-tile:
// tiles entirely above the diagonal are never computed. The forward writes lse (fp32) for the
// backward, which recomputes the probabilities (no T x T tensor is ever saved).
//
// Packed rows (several samples per row, fastft/ops/segments.py): with a (B, T) int32 table of
// each token's sample start, every sample runs as its own causal problem on offset pointers, so
// nothing across a sample boundary is computed or even visited.
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
#include <type_traits>
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
  kQueryDepth, // C[.][j] = sum_i A[.][i] B[i][j], depth = queries from off, cols = keys: only i >= j
  kKeyRows     // C[j][.] = sum_i A[j][i] B[i][.], rows = keys, depth = queries from off: only i >= j
};

// Lane masks of a tile's two 16-float column halves for its first n (<= kNR) columns.
inline void tile_masks(int n, __mmask16& m0, __mmask16& m1) {
  m0 = n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
  m1 = n >= 32 ? static_cast<__mmask16>(0xFFFF)
               : (n > 16 ? static_cast<__mmask16>((1u << (n - 16)) - 1) : static_cast<__mmask16>(0));
}

// A tile's epilogue: C rows (+)= the 2R accumulators, masked to the tile's columns.
template <int R>
__attribute__((target("avx512f"), always_inline)) inline void tile_store(__m512* c0, __m512* c1, float* C,
                                                                        int64_t ldc, __mmask16 m0, __mmask16 m1,
                                                                        bool acc) {
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

// C[R x n] (+)= A[R x (k0..k1)] * B[(k0..k1) x n]; fp32 row-major, n <= kNR. AT: A is stored
// transposed (A[k * lda + r]), which spares the backward two transposing copies per block.
template <int R, bool AT>
__attribute__((target("avx512f"))) void tile_avx512(int64_t k0, int64_t k1, const float* A, int64_t lda,
                                                     const float* B, int64_t ldb, float* C, int64_t ldc,
                                                     int n, bool acc) {
  __m512 c0[R], c1[R];
  __mmask16 m0, m1;
  tile_masks(n, m0, m1);
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
  tile_store<R>(c0, c1, C, ldc, m0, m1, acc);
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

// attention_tile_isa(): which fp32 tile runs. Auto = the widest the CPU has; tests force the
// narrower ones so every tile is checked on an AVX-512 machine too.
enum TileIsa { kIsaAuto, kIsaGeneric, kIsaAvx2 };
TileIsa g_tile_isa = kIsaAuto;

bool has_avx2_fma() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return static_cast<bool>(__builtin_cpu_supports("avx2")) && static_cast<bool>(__builtin_cpu_supports("fma"));
  }();
  return yes;
}

// AVX2 + FMA tile for CPUs without AVX-512 (e.g. AMD Zen 2/3 EPYCs): tile_generic's accumulators
// live in a stack array, so GCC reloads and stores them on every k step; there the fp32 attention
// fwd+bwd (4x256, 9/3 heads of 64) ran at 0.44x torch's SDPA. With 16 ymm registers a 32-column
// tile does not fit, so this covers one 16-column half for up to 4 rows: 8 accumulators, 2 B
// vectors and 1 broadcast per k step. FULL: all 16 columns (plain loads, no masks).
template <int R, bool AT, bool FULL>
__attribute__((target("avx2,fma"))) void tile_avx2_half(int64_t k0, int64_t k1, const float* A, int64_t lda,
                                                          const float* B, int64_t ldb, float* C, int64_t ldc,
                                                          int cnt, bool acc) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), lanes);
  const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt - 8), lanes);
  __m256 c0[R], c1[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
  for (int64_t k = k0; k < k1; ++k) {
    const float* b = B + k * ldb;
    const __m256 b0 = FULL ? _mm256_loadu_ps(b) : _mm256_maskload_ps(b, m0);
    const __m256 b1 = FULL ? _mm256_loadu_ps(b + 8) : _mm256_maskload_ps(b + 8, m1);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(AT ? A + k * lda + r : A + r * lda + k);
      c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    float* c = C + r * ldc;
    if (FULL) {
      if (acc) {
        c0[r] = _mm256_add_ps(c0[r], _mm256_loadu_ps(c));
        c1[r] = _mm256_add_ps(c1[r], _mm256_loadu_ps(c + 8));
      }
      _mm256_storeu_ps(c, c0[r]);
      _mm256_storeu_ps(c + 8, c1[r]);
    } else {
      if (acc) {
        c0[r] = _mm256_add_ps(c0[r], _mm256_maskload_ps(c, m0));
        c1[r] = _mm256_add_ps(c1[r], _mm256_maskload_ps(c + 8, m1));
      }
      _mm256_maskstore_ps(c, m0, c0[r]);
      _mm256_maskstore_ps(c + 8, m1, c1[r]);
    }
  }
}

template <bool AT, bool FULL>
void tile_avx2_rows(int R, int64_t k0, int64_t k1, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                    int64_t ldc, int cnt, bool acc) {
  switch (R) {
    case 4: return tile_avx2_half<4, AT, FULL>(k0, k1, A, lda, B, ldb, C, ldc, cnt, acc);
    case 3: return tile_avx2_half<3, AT, FULL>(k0, k1, A, lda, B, ldb, C, ldc, cnt, acc);
    case 2: return tile_avx2_half<2, AT, FULL>(k0, k1, A, lda, B, ldb, C, ldc, cnt, acc);
    default: return tile_avx2_half<1, AT, FULL>(k0, k1, A, lda, B, ldb, C, ldc, cnt, acc);
  }
}

// tile_generic's contract (R <= kMR rows, n <= kNR columns) as 16-column halves x 4-row groups.
void tile_avx2(int R, bool at, int64_t k0, int64_t k1, const float* A, int64_t lda, const float* B, int64_t ldb,
               float* C, int64_t ldc, int n, bool acc) {
  for (int h = 0; h * 16 < n; ++h) {
    const int cnt = std::min(16, n - h * 16);
    for (int r0 = 0; r0 < R; r0 += 4) {
      const int rows = std::min(4, R - r0);
      const float* a = at ? A + r0 : A + r0 * lda;
      const float* b = B + h * 16;
      float* c = C + r0 * ldc + h * 16;
      if (cnt == 16) {
        if (at) tile_avx2_rows<true, true>(rows, k0, k1, a, lda, b, ldb, c, ldc, cnt, acc);
        else tile_avx2_rows<false, true>(rows, k0, k1, a, lda, b, ldb, c, ldc, cnt, acc);
      } else {
        if (at) tile_avx2_rows<true, false>(rows, k0, k1, a, lda, b, ldb, c, ldc, cnt, acc);
        else tile_avx2_rows<false, false>(rows, k0, k1, a, lda, b, ldb, c, ldc, cnt, acc);
      }
    }
  }
}

// Calls fn(std::integral_constant<int, R>) for a tile of R (1..kMR) rows: the row count is a
// template parameter of the tiles, so their accumulators stay in registers.
template <typename Fn>
void with_rows(int R, Fn&& fn) {
  switch (R) {
    case 8: return fn(std::integral_constant<int, 8>{});
    case 7: return fn(std::integral_constant<int, 7>{});
    case 6: return fn(std::integral_constant<int, 6>{});
    case 5: return fn(std::integral_constant<int, 5>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    default: return fn(std::integral_constant<int, 1>{});
  }
}

template <bool AT>
void tile_dispatch(int R, int64_t k0, int64_t k1, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                   int64_t ldc, int n, bool acc) {
  with_rows(R, [&](auto rows) { tile_avx512<decltype(rows)::value, AT>(k0, k1, A, lda, B, ldb, C, ldc, n, acc); });
}

void tile(int R, bool at, int64_t k0, int64_t k1, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, int n, bool acc) {
  if (g_tile_isa != kIsaAuto || !has_avx512()) {
    if (g_tile_isa != kIsaGeneric && has_avx2_fma()) return tile_avx2(R, at, k0, k1, A, lda, B, ldb, C, ldc, n, acc);
    return tile_generic(R, at, k0, k1, A, lda, B, ldb, C, ldc, n, acc);
  }
  if (at) return tile_dispatch<true>(R, k0, k1, A, lda, B, ldb, C, ldc, n, acc);
  return tile_dispatch<false>(R, k0, k1, A, lda, B, ldb, C, ldc, n, acc);
}

// The micro-tiles of C[M x N] (+)= A[M x K] * B[K x N] that the causal mask leaves: calls
// tile(i0, j0, R, n, k0, k1) for each, with the depth range [k0, k1) it needs; zeroes (unless
// acc) the tiles whose whole depth is masked. Columns outer so one B panel (K x 32) stays in L1
// while the row tiles stream past it. Shared by the fp32 and the bf16-pair GEMMs.
template <typename Tile>
void for_each_tile(float* C, int64_t ldc, int64_t M, int64_t N, int64_t K, bool acc, Causal mode, int64_t off,
                   Tile&& tile) {
  if (mode == kQueryDepth) N = std::min(N, off + K);  // keys after the last query see nothing
  if (mode == kKeyRows) M = std::min(M, off + K);
  for (int64_t j0 = 0; j0 < N; j0 += kNR) {
    for (int64_t i0 = 0; i0 < M; i0 += kMR) {
      const int R = static_cast<int>(std::min<int64_t>(kMR, M - i0));
      int64_t n = std::min<int64_t>(kNR, N - j0), k0 = 0, k1 = K;
      if (mode == kKeyCols) {
        n = std::min(n, off + i0 + R - j0);  // last row's last visible key, relative to j0
        if (n <= 0) continue;                // never read: softmax stops at the diagonal
      } else if (mode == kKeyDepth) {
        k1 = std::min(K, off + i0 + R);
      } else if (mode == kKeyRows) {
        k0 = std::max<int64_t>(0, i0 - off);  // the tile's first key; later keys see zeros there
      } else if (mode == kQueryDepth) {
        k0 = std::max<int64_t>(0, j0 - off);
        if (k0 >= K) {
          if (!acc)
            for (int r = 0; r < R; ++r) std::memset(C + (i0 + r) * ldc + j0, 0, sizeof(float) * n);
          continue;
        }
      }
      tile(i0, j0, R, static_cast<int>(n), k0, k1);
    }
  }
}

// C[M x N] (+)= A[M x K] * B[K x N] (fp32 row-major), skipping what the causal mask zeroes.
// at: A is given transposed, A[k * lda + m].
void gemm(bool at, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t M,
          int64_t N, int64_t K, bool acc, Causal mode, int64_t off) {
  for_each_tile(C, ldc, M, N, K, acc, mode, off, [&](int64_t i0, int64_t j0, int R, int n, int64_t k0, int64_t k1) {
    tile(R, at, k0, k1, at ? A + i0 : A + i0 * lda, lda, B + j0, ldb, C + i0 * ldc + j0, ldc, n, acc);
  });
}

// Conversions between the I/O dtype and the fp32 work buffers. The glue (conversions, softmax,
// score gradients) carries target_clones like the other CPU kernels: in the default x86-64 build
// it ran as SSE2 code and took 18% of the kernel's time next to 29% for the GEMM tiles.
#define FASTFT_ATTN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

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

// ------------------------------------------------------------------------------------------------
// bf16 I/O on CPUs with AVX512-BF16: the seven products run on vdpbf16ps (32 multiply-adds per
// instruction, twice the fp32 FMA rate; the fp32 tiles above ran near that FMA peak and were 69%
// of the kernel's time, perf). Operands are bf16 pairs along the product's depth k: A rows as
// stored (a pair is two adjacent elements), B pair-interleaved, (k, j) at B[(k/2)*ldb + 2j + k%2].
// K and V are packed once per task (reused by every query head and block of the group); P and dS
// are rounded to bf16 once, right after the softmax / score-gradient pass.
// Q K^T and dO V^T take bf16 inputs as they are: exact products summed in fp32, like the fp32
// path. P V, dS K, dO^T P and Q^T dS use P and dS rounded to bf16 (RNE), as torch's own bf16 CPU
// flash attention does for its P V product. Tests bound the error by 2x SDPA's in bf16.
#define FASTFT_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

bool g_bf16_dot = true;  // attention_bf16_dot(): tests and benchmarks run both bf16 paths

bool has_avx512_bf16() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return static_cast<bool>(__builtin_cpu_supports("avx512f")) &&
           static_cast<bool>(__builtin_cpu_supports("avx512bw")) &&
           static_cast<bool>(__builtin_cpu_supports("avx512bf16"));
  }();
  return yes;
}

// C[R x n] (+)= sum over depth pairs p in [p0, p1) of A's pair (row r, p) . B's pair (p, column).
// AT: A is pair-interleaved too (pair (p, r) at A[p * lda + 2r]), else pair (r, p) at A[r*lda + 2p].
template <int R, bool AT>
FASTFT_BF16_TARGET void tile_bf16(int64_t p0, int64_t p1, const uint16_t* A, int64_t lda, const uint16_t* B,
                                  int64_t ldb, float* C, int64_t ldc, int n, bool acc) {
  __m512 c0[R], c1[R];
  __mmask16 m0, m1;
  tile_masks(n, m0, m1);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* b = B + p * ldb;
    const __m512bh b0 = (__m512bh)_mm512_maskz_loadu_epi32(m0, b);
    const __m512bh b1 = (__m512bh)_mm512_maskz_loadu_epi32(m1, b + 32);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, AT ? A + p * lda + 2 * r : A + r * lda + 2 * p, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      c0[r] = _mm512_dpbf16_ps(c0[r], a, b0);
      c1[r] = _mm512_dpbf16_ps(c1[r], a, b1);
    }
  }
  tile_store<R>(c0, c1, C, ldc, m0, m1, acc);
}

template <bool AT>
void tile_bf16_dispatch(int R, int64_t p0, int64_t p1, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
                        float* C, int64_t ldc, int n, bool acc) {
  with_rows(R, [&](auto rows) { tile_bf16<decltype(rows)::value, AT>(p0, p1, A, lda, B, ldb, C, ldc, n, acc); });
}

// gemm() on bf16 pairs: the same tiles and causal skips; depth ranges widen to whole pairs, and
// the element a widened range adds is zero (P and dS are zero above the diagonal up to one
// column past their block, padded rows and columns are zero).
void gemm_bf16(bool at, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float* C, int64_t ldc,
               int64_t M, int64_t N, int64_t K, bool acc, Causal mode, int64_t off) {
  for_each_tile(C, ldc, M, N, K, acc, mode, off, [&](int64_t i0, int64_t j0, int R, int n, int64_t k0, int64_t k1) {
    const uint16_t* a = at ? A + 2 * i0 : A + i0 * lda;
    if (at) tile_bf16_dispatch<true>(R, k0 / 2, (k1 + 1) / 2, a, lda, B + 2 * j0, ldb, C + i0 * ldc + j0, ldc, n, acc);
    else tile_bf16_dispatch<false>(R, k0 / 2, (k1 + 1) / 2, a, lda, B + 2 * j0, ldb, C + i0 * ldc + j0, ldc, n, acc);
  });
}

// vpermw index that interleaves the two 16-element halves of a 32 x 16-bit vector: a0 b0 a1 b1 ...
FASTFT_BF16_TARGET inline __m512i interleave_index() {
  alignas(64) static const uint16_t idx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                               8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_load_si512(idx);
}

// Pair-interleave bf16 rows: dst[(k/2)*ld + 2c + k%2] = src[k*st + c], k < rows, c < cols; the
// missing partner of an odd last row is zero.
FASTFT_BF16_TARGET void pair_rows_bf16(const uint16_t* src, int64_t st, int64_t rows, int64_t cols, uint16_t* dst,
                                       int64_t ld) {
  // a0 b0 a1 b1 ... from two vectors holding a (lanes 0-15) and b (lanes 32-47)
  alignas(64) static const uint16_t pick[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i idx = _mm512_load_si512(pick);
  for (int64_t k = 0; k < rows; k += 2) {
    const uint16_t* a = src + k * st;
    const uint16_t* b = k + 1 < rows ? a + st : nullptr;
    uint16_t* d = dst + (k / 2) * ld;
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16) {
      const __m512i va = _mm512_maskz_loadu_epi16(0xFFFF, a + c);
      const __m512i vb = b ? _mm512_maskz_loadu_epi16(0xFFFF, b + c) : _mm512_setzero_si512();
      _mm512_storeu_si512(d + 2 * c, _mm512_permutex2var_epi16(va, idx, vb));
    }
    for (; c < cols; ++c) {
      d[2 * c] = a[c];
      d[2 * c + 1] = b ? b[c] : 0;
    }
  }
}

// The same from fp32 rows (row stride st), rounded to bf16 on the way.
FASTFT_BF16_TARGET void pair_rows_f32(const float* src, int64_t st, int64_t rows, int64_t cols, uint16_t* dst,
                                      int64_t ld) {
  const __m512i idx = interleave_index();
  for (int64_t k = 0; k < rows; k += 2) {
    const float* a = src + k * st;
    const float* b = k + 1 < rows ? a + st : nullptr;
    uint16_t* d = dst + (k / 2) * ld;
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16) {
      const __m512 vb = b ? _mm512_loadu_ps(b + c) : _mm512_setzero_ps();
      const __m512i z = (__m512i)_mm512_cvtne2ps_pbh(vb, _mm512_loadu_ps(a + c));  // a low, b high
      _mm512_storeu_si512(d + 2 * c, _mm512_permutexvar_epi16(idx, z));
    }
    for (; c < cols; ++c) {
      d[2 * c] = float_to_bf16(a[c]);
      d[2 * c + 1] = b ? float_to_bf16(b[c]) : 0;
    }
  }
}

// fp32 rows -> bf16 rows (row strides st, ld): columns [0, cols) rounded, [cols, zero_to) zero.
FASTFT_BF16_TARGET void rows_f32_to_bf16(const float* src, int64_t st, int64_t rows, int64_t cols, int64_t zero_to,
                                         uint16_t* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * st;
    uint16_t* d = dst + r * ld;
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + c), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + c)));
    for (; c < cols; ++c) d[c] = float_to_bf16(s[c]);
    for (; c < zero_to; ++c) d[c] = 0;
  }
}

// bf16 rows (stride st) copied to a buffer with row length ld >= cols, zero-padded to ld.
void copy_rows_bf16(const uint16_t* src, int64_t st, int64_t rows, int64_t cols, uint16_t* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * ld, src + r * st, sizeof(uint16_t) * cols);
    for (int64_t c = cols; c < ld; ++c) dst[r * ld + c] = 0;
  }
}

// K^T (or V^T) as B of a product with depth d: dst[(d/2)*ld + 2j + d%2] = src[j*st + d] (T rows
// of D); a 32-bit transpose of the (d, d+1) pairs, the last pair's partner zero when D is odd.
void pair_transpose(const uint16_t* src, int64_t st, int64_t T, int64_t D, uint16_t* dst, int64_t ld) {
  const int64_t Dp = D / 2;
  for (int64_t j = 0; j < T; ++j) {
    const uint16_t* s = src + j * st;
    for (int64_t p = 0; p < Dp; ++p) std::memcpy(dst + p * ld + 2 * j, s + 2 * p, 2 * sizeof(uint16_t));
    if (D % 2) {
      dst[Dp * ld + 2 * j] = s[D - 1];
      dst[Dp * ld + 2 * j + 1] = 0;
    }
  }
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
  // Row length of the T-long fp32 work rows (K^T, V^T, scores, dK^T, dV^T). T itself is often a
  // power of two: rows 1 KiB apart (T=256) fall into 4 of L1's 64 sets and a 64-row B panel
  // thrashed its 8 ways; one extra 64-byte line per row spreads them over all sets.
  int64_t L;
};

// Softmax of one block's score rows in place: s (unscaled q.k) -> p; writes lse when `lse_out`,
// else reads it from `lse_in`. Zeroes p up to the block's diagonal end so the causal GEMMs that
// read whole micro-tiles see zeros above the diagonal. The forward takes one exp per score
// (e = exp(s - max) kept, then scaled by 1 / sum); it took two before (exp again from lse), and
// the softmax was 19% of the bf16 kernel's time (perf).
FASTFT_ATTN_CLONES void softmax_rows(float* S, int64_t ld, int64_t i0, int64_t rows, float scale, float* lse_out,
                  const float* lse_in) {
  const int64_t end = i0 + rows;
  for (int64_t r = 0; r < rows; ++r) {
    float* s = S + r * ld;
    const int64_t n = i0 + r + 1;  // visible keys 0..i
    if (lse_out) {
      float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < n; ++j) m = s[j] * scale > m ? s[j] * scale : m;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        s[j] = ce_exp(s[j] * scale - m);
        sum += s[j];
      }
      lse_out[r] = attn_lse(m, sum);
      const float inv = 1.0f / sum;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) s[j] *= inv;
    } else {
      const float lse = lse_in[r];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) s[j] = attn_prob(s[j], scale, lse);
    }
    for (int64_t j = n; j < end; ++j) s[j] = 0.0f;
  }
}

struct Buffers {
  std::vector<float> kt, kf, vt, vf, q, s, ds, o, dof, dkt, dvt, delta, lse;
  // bf16 path (see tile_bf16): packed K^T, V^T, K, V; the block's Q, dO (rows), Q^T / dO^T (pairs),
  // P or dS (rows) and P or dS (pairs)
  std::vector<uint16_t> ktp, vtp, kp, vp, qb, dob, qtp, pb, pp;
  Buffers(const Shape& sh, bool bf16) {
    if (bf16) {
      const int64_t L = sh.L, D = sh.D, Dp = (sh.D + 1) / 2, Tp = (sh.T + 1) / 2;
      ktp.resize(Dp * 2 * L); vtp.resize(Dp * 2 * L); kp.resize(Tp * 2 * D); vp.resize(Tp * 2 * D);
      qb.resize(kBQ * 2 * Dp); dob.resize(kBQ * 2 * Dp); qtp.resize(kBQ * D); pb.resize(kBQ * L); pp.resize(kBQ * L);
      // the fp32 ones the bf16 path still uses: scores, dP/dS, an output block, dK and dV (T, D)
      s.resize(kBQ * L); ds.resize(kBQ * L); o.resize(kBQ * D); dkt.resize(sh.T * D); dvt.resize(sh.T * D);
      delta.resize(kBQ);
      return;
    }
    const int64_t T = sh.T, D = sh.D;
    const int64_t L = sh.L;
    kt.resize(D * L); kf.resize(T * D); vt.resize(D * L); vf.resize(T * D);
    q.resize(kBQ * D); s.resize(kBQ * L); ds.resize(kBQ * L); o.resize(kBQ * D);
    dof.resize(kBQ * D); dkt.resize(D * L); dvt.resize(D * L);
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

// 16 bf16 -> 16 fp32 (a 16-bit shift). The maskz forms: the unmasked intrinsics start from an
// "undefined" vector that GCC 12 warns about (-Wmaybe-uninitialized, a false positive).
FASTFT_BF16_TARGET inline __m512 bf16x16_to_f32(const uint16_t* p) {
  const __m512i w = _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, w, 16));
}

// row_dots for the bf16 path: a (bf16 rows, stride sa) . b (bf16 rows, stride sb), fp32 sums.
// Explicit AVX-512: the auto-vectorised loop over the strided
// rows ran scalar and took 0.6% of a LoRA step (perf), a tenth of the attention kernel.
FASTFT_BF16_TARGET void row_dots_bf16(const uint16_t* a, int64_t sa, const uint16_t* b, int64_t sb, int64_t rows,
                                      int64_t D, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* x = a + r * sa;
    const uint16_t* y = b + r * sb;
    __m512 acc = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      const __m512 xf = bf16x16_to_f32(x + d);
      const __m512 yf = bf16x16_to_f32(y + d);
      acc = _mm512_fmadd_ps(xf, yf, acc);
    }
    alignas(64) float lanes[16];  // (_mm512_reduce_add_ps trips the same GCC 12 warning)
    _mm512_store_ps(lanes, acc);
    float sum = 0.0f;
    for (float l : lanes) sum += l;
    for (; d < D; ++d) sum += bf16_to_float(x[d]) * bf16_to_float(y[d]);
    out[r] = sum;
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

// The *_task functions below run one sample [s0, s0 + T) of row b as its own causal problem
// (indices inside are relative to s0; T is the sample's length, sh.T the row's).
void forward_task(int dt, const Shape& sh, int64_t b, int64_t hk, int64_t s0, int64_t T, uintptr_t q, Strides qs,
                  uintptr_t k, Strides ks, uintptr_t v, Strides vs, uintptr_t o, Strides os, float* lse, Buffers& w) {
  const int es = elem_size(dt);
  const int64_t D = sh.D, G = sh.Hq / sh.Hkv, L = sh.L;
  load_rows(dt, at<char>(k, ks, b, hk, es) + s0 * ks.t * es, ks.t, T, D, w.kt.data(), L, true);
  load_rows(dt, at<char>(v, vs, b, hk, es) + s0 * vs.t * es, vs.t, T, D, w.vf.data(), D);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    const char* qh = at<char>(q, qs, b, h, es) + s0 * qs.t * es;
    char* oh = const_cast<char*>(at<char>(o, os, b, h, es)) + s0 * os.t * es;
    float* lse_h = lse + (b * sh.Hq + h) * sh.T + s0;
    for (int64_t i0 = 0; i0 < T; i0 += kBQ) {
      const int64_t rows = std::min<int64_t>(kBQ, T - i0);
      load_rows(dt, qh + i0 * qs.t * es, qs.t, rows, D, w.q.data(), D);
      gemm(false, w.q.data(), D, w.kt.data(), L, w.s.data(), L, rows, T, D, false, kKeyCols, i0);
      softmax_rows(w.s.data(), L, i0, rows, sh.scale, lse_h + i0, nullptr);
      gemm(false, w.s.data(), L, w.vf.data(), D, w.o.data(), D, rows, D, T, false, kKeyDepth, i0);
      store_rows(dt, oh + i0 * os.t * es, os.t, rows, D, w.o.data(), D);
    }
  }
}

void backward_task(int dt, const Shape& sh, int64_t b, int64_t hk, int64_t s0, int64_t T, uintptr_t q, Strides qs,
                   uintptr_t k, Strides ks, uintptr_t v, Strides vs, uintptr_t o, Strides os, uintptr_t dout,
                   Strides dos, const float* lse, uintptr_t dq, Strides dqs, uintptr_t dk, Strides dks, uintptr_t dv,
                   Strides dvs, Buffers& w) {
  const int es = elem_size(dt);
  const int64_t D = sh.D, G = sh.Hq / sh.Hkv, L = sh.L;
  const char* kh = at<char>(k, ks, b, hk, es) + s0 * ks.t * es;
  const char* vh = at<char>(v, vs, b, hk, es) + s0 * vs.t * es;
  load_rows(dt, kh, ks.t, T, D, w.kt.data(), L, true);
  load_rows(dt, kh, ks.t, T, D, w.kf.data(), D);
  load_rows(dt, vh, vs.t, T, D, w.vt.data(), L, true);
  // dK^T, dV^T (D x L): only the sample's T columns are accumulated and stored
  for (int64_t d = 0; d < D; ++d) {
    std::fill_n(w.dkt.data() + d * L, T, 0.0f);
    std::fill_n(w.dvt.data() + d * L, T, 0.0f);
  }
  float* S = w.s.data();
  float* dS = w.ds.data();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    const char* qh = at<char>(q, qs, b, h, es) + s0 * qs.t * es;
    const char* oh = at<char>(o, os, b, h, es) + s0 * os.t * es;
    const char* doh = at<char>(dout, dos, b, h, es) + s0 * dos.t * es;
    char* dqh = const_cast<char*>(at<char>(dq, dqs, b, h, es)) + s0 * dqs.t * es;
    const float* lse_h = lse + (b * sh.Hq + h) * sh.T + s0;
    for (int64_t i0 = 0; i0 < T; i0 += kBQ) {
      const int64_t rows = std::min<int64_t>(kBQ, T - i0);
      load_rows(dt, qh + i0 * qs.t * es, qs.t, rows, D, w.q.data(), D);
      load_rows(dt, doh + i0 * dos.t * es, dos.t, rows, D, w.dof.data(), D);
      load_rows(dt, oh + i0 * os.t * es, os.t, rows, D, w.o.data(), D);
      row_dots(w.dof.data(), w.o.data(), rows, D, w.delta.data());
      gemm(false, w.q.data(), D, w.kt.data(), L, S, L, rows, T, D, false, kKeyCols, i0);
      softmax_rows(S, L, i0, rows, sh.scale, nullptr, lse_h + i0);
      gemm(false, w.dof.data(), D, w.vt.data(), L, dS, L, rows, T, D, false, kKeyCols, i0);
      dscore_rows(S, dS, L, i0, rows, w.delta.data(), sh.scale);
      // dq block = dS K;  dV^T += dO^T P;  dK^T += Q^T dS
      gemm(false, dS, L, w.kf.data(), D, w.o.data(), D, rows, D, T, false, kKeyDepth, i0);
      store_rows(dt, dqh + i0 * dqs.t * es, dqs.t, rows, D, w.o.data(), D);
      gemm(true, w.dof.data(), D, S, L, w.dvt.data(), L, D, T, rows, true, kQueryDepth, i0);
      gemm(true, w.q.data(), D, dS, L, w.dkt.data(), L, D, T, rows, true, kQueryDepth, i0);
    }
  }
  store_rows(dt, const_cast<char*>(at<char>(dk, dks, b, hk, es)) + s0 * dks.t * es, dks.t, T, D, w.dkt.data(), L, true);
  store_rows(dt, const_cast<char*>(at<char>(dv, dvs, b, hk, es)) + s0 * dvs.t * es, dvs.t, T, D, w.dvt.data(), L, true);
}

// forward_task on the bf16 path (bf16 I/O, AVX512-BF16).
void forward_task_bf16(const Shape& sh, int64_t b, int64_t hk, int64_t s0, int64_t T, uintptr_t q, Strides qs,
                       uintptr_t k, Strides ks, uintptr_t v, Strides vs, uintptr_t o, Strides os, float* lse,
                       Buffers& w) {
  const int64_t D = sh.D, G = sh.Hq / sh.Hkv, L = sh.L, D2 = (D + 1) / 2 * 2;
  pair_transpose(at<uint16_t>(k, ks, b, hk, 2) + s0 * ks.t, ks.t, T, D, w.ktp.data(), 2 * L);
  pair_rows_bf16(at<uint16_t>(v, vs, b, hk, 2) + s0 * vs.t, vs.t, T, D, w.vp.data(), 2 * D);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    const uint16_t* qh = at<uint16_t>(q, qs, b, h, 2) + s0 * qs.t;
    char* oh = const_cast<char*>(at<char>(o, os, b, h, 2)) + s0 * os.t * 2;
    float* lse_h = lse + (b * sh.Hq + h) * sh.T + s0;
    for (int64_t i0 = 0; i0 < T; i0 += kBQ) {
      const int64_t rows = std::min<int64_t>(kBQ, T - i0), end = i0 + rows;
      copy_rows_bf16(qh + i0 * qs.t, qs.t, rows, D, w.qb.data(), D2);
      gemm_bf16(false, w.qb.data(), D2, w.ktp.data(), 2 * L, w.s.data(), L, rows, T, D, false, kKeyCols, i0);
      softmax_rows(w.s.data(), L, i0, rows, sh.scale, lse_h + i0, nullptr);
      rows_f32_to_bf16(w.s.data(), L, rows, end, std::min(L, end + 1), w.pb.data(), L);
      gemm_bf16(false, w.pb.data(), L, w.vp.data(), 2 * D, w.o.data(), D, rows, D, T, false, kKeyDepth, i0);
      store_rows(kBFloat16, oh + i0 * os.t * 2, os.t, rows, D, w.o.data(), D);
    }
  }
}

// backward_task on the bf16 path.
void backward_task_bf16(const Shape& sh, int64_t b, int64_t hk, int64_t s0, int64_t T, uintptr_t q, Strides qs,
                        uintptr_t k, Strides ks, uintptr_t v, Strides vs, uintptr_t o, Strides os, uintptr_t dout,
                        Strides dos, const float* lse, uintptr_t dq, Strides dqs, uintptr_t dk, Strides dks,
                        uintptr_t dv, Strides dvs, Buffers& w) {
  const int64_t D = sh.D, G = sh.Hq / sh.Hkv, L = sh.L, D2 = (D + 1) / 2 * 2;
  const uint16_t* kh = at<uint16_t>(k, ks, b, hk, 2) + s0 * ks.t;
  const uint16_t* vh = at<uint16_t>(v, vs, b, hk, 2) + s0 * vs.t;
  pair_transpose(kh, ks.t, T, D, w.ktp.data(), 2 * L);
  pair_rows_bf16(kh, ks.t, T, D, w.kp.data(), 2 * D);
  pair_transpose(vh, vs.t, T, D, w.vtp.data(), 2 * L);
  // dK, dV accumulate as (T, D) rows (keys as the product's rows), stored without a transpose
  std::fill_n(w.dkt.data(), T * D, 0.0f);
  std::fill_n(w.dvt.data(), T * D, 0.0f);
  float* S = w.s.data();
  float* dS = w.ds.data();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    const uint16_t* qh = at<uint16_t>(q, qs, b, h, 2) + s0 * qs.t;
    const uint16_t* oh = at<uint16_t>(o, os, b, h, 2) + s0 * os.t;
    const uint16_t* doh = at<uint16_t>(dout, dos, b, h, 2) + s0 * dos.t;
    char* dqh = const_cast<char*>(at<char>(dq, dqs, b, h, 2)) + s0 * dqs.t * 2;
    const float* lse_h = lse + (b * sh.Hq + h) * sh.T + s0;
    for (int64_t i0 = 0; i0 < T; i0 += kBQ) {
      const int64_t rows = std::min<int64_t>(kBQ, T - i0), end = i0 + rows;
      copy_rows_bf16(qh + i0 * qs.t, qs.t, rows, D, w.qb.data(), D2);
      copy_rows_bf16(doh + i0 * dos.t, dos.t, rows, D, w.dob.data(), D2);
      row_dots_bf16(w.dob.data(), D2, oh + i0 * os.t, os.t, rows, D, w.delta.data());
      gemm_bf16(false, w.qb.data(), D2, w.ktp.data(), 2 * L, S, L, rows, T, D, false, kKeyCols, i0);
      softmax_rows(S, L, i0, rows, sh.scale, nullptr, lse_h + i0);
      gemm_bf16(false, w.dob.data(), D2, w.vtp.data(), 2 * L, dS, L, rows, T, D, false, kKeyCols, i0);
      dscore_rows(S, dS, L, i0, rows, w.delta.data(), sh.scale);
      // dq block = dS K
      rows_f32_to_bf16(dS, L, rows, end, std::min(L, end + 1), w.pb.data(), L);
      gemm_bf16(false, w.pb.data(), L, w.kp.data(), 2 * D, w.o.data(), D, rows, D, T, false, kKeyDepth, i0);
      store_rows(kBFloat16, dqh + i0 * dqs.t * 2, dqs.t, rows, D, w.o.data(), D);
      // dV += P^T dO  (A = P^T: P's pairs along queries; B = dO's pairs along queries)
      pair_rows_f32(S, L, rows, end, w.pp.data(), 2 * L);
      pair_rows_bf16(w.dob.data(), D2, rows, D, w.qtp.data(), 2 * D);
      gemm_bf16(true, w.pp.data(), 2 * L, w.qtp.data(), 2 * D, w.dvt.data(), D, T, D, rows, true, kKeyRows, i0);
      // dK += dS^T Q
      pair_rows_f32(dS, L, rows, end, w.pp.data(), 2 * L);
      pair_rows_bf16(w.qb.data(), D2, rows, D, w.qtp.data(), 2 * D);
      gemm_bf16(true, w.pp.data(), 2 * L, w.qtp.data(), 2 * D, w.dkt.data(), D, T, D, rows, true, kKeyRows, i0);
    }
  }
  store_rows(kBFloat16, const_cast<char*>(at<char>(dk, dks, b, hk, 2)) + s0 * dks.t * 2, dks.t, T, D, w.dkt.data(), D);
  store_rows(kBFloat16, const_cast<char*>(at<char>(dv, dvs, b, hk, 2)) + s0 * dvs.t * 2, dvs.t, T, D, w.dvt.data(), D);
}

Shape make_shape(int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t D, double scale, int dtype) {
  if (B < 0 || Hq <= 0 || Hkv <= 0 || Hq % Hkv != 0 || T < 0 || D <= 0)
    throw std::invalid_argument("attention: bad shape B=" + std::to_string(B) + " Hq=" + std::to_string(Hq) +
                                " Hkv=" + std::to_string(Hkv) + " T=" + std::to_string(T) + " D=" +
                                std::to_string(D) + " (need Hq % Hkv == 0, D > 0)");
  if (dtype < kFloat32 || dtype > kFloat16)
    throw std::invalid_argument("attention: dtype code " + std::to_string(dtype) + ", expected 0, 1 or 2");
  return {B, Hq, Hkv, T, D, static_cast<float>(scale), (T + 15) / 16 * 16 + 16};
}

bool use_bf16_dot(int dtype) { return dtype == kBFloat16 && g_bf16_dot && has_avx512_bf16(); }

int threads_for(const Shape& sh) {
  const int64_t tasks = sh.B * sh.Hkv;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tasks, omp_get_max_threads())));
}

// Runs fn(b, hk, buffers) for every (batch, kv head) task on OpenMP threads, GIL released, one
// set of work buffers per thread.
template <typename Fn>
void for_each_task(const Shape& sh, bool bf16, Fn&& fn) {
  py::gil_scoped_release nogil;
#pragma omp parallel num_threads(threads_for(sh))
  {
    Buffers w(sh, bf16);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < sh.B * sh.Hkv; ++task) fn(task / sh.Hkv, task % sh.Hkv, w);
  }
}

// Calls fn(s0, n) for each sample [s0, s0 + n) of row b: where seg_start[b, i] == i a sample
// starts (fastft/ops/segments.py); the whole row when there is no table. Any table content gives
// in-bounds samples that tile the row.
template <typename Fn>
void for_each_sample(const int32_t* seg_start, int64_t b, int64_t T, Fn&& fn) {
  if (seg_start == nullptr) return fn(int64_t{0}, T);
  const int32_t* st = seg_start + b * T;
  int64_t s0 = 0;
  for (int64_t i = 1; i <= T; ++i)
    if (i == T || st[i] == i) {
      fn(s0, i - s0);
      s0 = i;
    }
}

void attention_fwd(uintptr_t q, std::vector<int64_t> qst, uintptr_t k, std::vector<int64_t> kst, uintptr_t v,
                   std::vector<int64_t> vst, uintptr_t o, std::vector<int64_t> ost, uintptr_t lse, int64_t B,
                   int64_t Hq, int64_t Hkv, int64_t T, int64_t D, double scale, int dtype, uintptr_t seg_start) {
  const Shape sh = make_shape(B, Hq, Hkv, T, D, scale, dtype);
  const Strides qs = strides_of(qst, "q"), ks = strides_of(kst, "k"), vs = strides_of(vst, "v"),
                os = strides_of(ost, "out");
  if (B == 0 || T == 0) return;
  float* l = reinterpret_cast<float*>(lse);
  const bool bf16 = use_bf16_dot(dtype);
  const auto* seg = reinterpret_cast<const int32_t*>(seg_start);
  for_each_task(sh, bf16, [&](int64_t b, int64_t hk, Buffers& w) {
    for_each_sample(seg, b, T, [&](int64_t s0, int64_t n) {
      if (bf16) forward_task_bf16(sh, b, hk, s0, n, q, qs, k, ks, v, vs, o, os, l, w);
      else forward_task(dtype, sh, b, hk, s0, n, q, qs, k, ks, v, vs, o, os, l, w);
    });
  });
}

void attention_bwd(uintptr_t q, std::vector<int64_t> qst, uintptr_t k, std::vector<int64_t> kst, uintptr_t v,
                   std::vector<int64_t> vst, uintptr_t o, std::vector<int64_t> ost, uintptr_t dout,
                   std::vector<int64_t> dost, uintptr_t lse, uintptr_t dq, std::vector<int64_t> dqst, uintptr_t dk,
                   std::vector<int64_t> dkst, uintptr_t dv, std::vector<int64_t> dvst, int64_t B, int64_t Hq,
                   int64_t Hkv, int64_t T, int64_t D, double scale, int dtype, uintptr_t seg_start) {
  const Shape sh = make_shape(B, Hq, Hkv, T, D, scale, dtype);
  const Strides qs = strides_of(qst, "q"), ks = strides_of(kst, "k"), vs = strides_of(vst, "v"),
                os = strides_of(ost, "out"), dos = strides_of(dost, "grad_out"), dqs = strides_of(dqst, "dq"),
                dks = strides_of(dkst, "dk"), dvs = strides_of(dvst, "dv");
  if (B == 0 || T == 0) return;
  const float* l = reinterpret_cast<const float*>(lse);
  const bool bf16 = use_bf16_dot(dtype);
  const auto* seg = reinterpret_cast<const int32_t*>(seg_start);
  for_each_task(sh, bf16, [&](int64_t b, int64_t hk, Buffers& w) {
    for_each_sample(seg, b, T, [&](int64_t s0, int64_t n) {
      if (bf16)
        backward_task_bf16(sh, b, hk, s0, n, q, qs, k, ks, v, vs, o, os, dout, dos, l, dq, dqs, dk, dks, dv, dvs, w);
      else
        backward_task(dtype, sh, b, hk, s0, n, q, qs, k, ks, v, vs, o, os, dout, dos, l, dq, dqs, dk, dks, dv, dvs,
                      w);
    });
  });
}

}  // namespace

void register_attention(py::module_& m) {
  m.def("attention_fwd", &attention_fwd, py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"),
        py::arg("v"), py::arg("v_strides"), py::arg("out"), py::arg("out_strides"), py::arg("lse"), py::arg("B"),
        py::arg("Hq"), py::arg("Hkv"), py::arg("T"), py::arg("D"), py::arg("scale"), py::arg("dtype"),
        py::arg("seg_start") = 0,
        "Causal attention forward; strides (batch, head, time) in elements, last dim contiguous; "
        "lse (B, Hq, T) fp32 contiguous; seg_start: 0 or a (B, T) int32 contiguous table of each "
        "token's sample start (packed rows: a query sees only its own sample).");
  m.def("attention_bwd", &attention_bwd, py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"),
        py::arg("v"), py::arg("v_strides"), py::arg("out"), py::arg("out_strides"), py::arg("grad_out"),
        py::arg("grad_out_strides"), py::arg("lse"), py::arg("dq"), py::arg("dq_strides"), py::arg("dk"),
        py::arg("dk_strides"), py::arg("dv"), py::arg("dv_strides"), py::arg("B"), py::arg("Hq"), py::arg("Hkv"),
        py::arg("T"), py::arg("D"), py::arg("scale"), py::arg("dtype"), py::arg("seg_start") = 0,
        "Causal attention backward (probabilities recomputed from lse); writes dq, dk, dv; "
        "seg_start as in attention_fwd.");
  m.def(
      "attention_bf16_dot",
      [](py::object on) {
        const bool prev = g_bf16_dot;
        if (!on.is_none()) g_bf16_dot = on.cast<bool>();
        return prev;
      },
      py::arg("on") = py::none(),
      "bf16 inputs use AVX512-BF16 dot products when the CPU has them (default on); returns the "
      "previous setting, sets it unless `on` is None.");
  m.def("attention_has_bf16_dot", &has_avx512_bf16, "True when this CPU has AVX512-BF16.");
  m.def(
      "attention_tile_isa",
      [](py::object isa) {
        const char* names[] = {"auto", "generic", "avx2"};
        const std::string prev = names[g_tile_isa];
        if (!isa.is_none()) {
          const std::string want = isa.cast<std::string>();
          if (want == "auto") g_tile_isa = kIsaAuto;
          else if (want == "generic") g_tile_isa = kIsaGeneric;
          else if (want == "avx2" && has_avx2_fma()) g_tile_isa = kIsaAvx2;
          else
            throw std::invalid_argument("attention_tile_isa: '" + want + "', expected auto, generic" +
                                        (has_avx2_fma() ? ", avx2" : " (this CPU has no AVX2+FMA)"));
        }
        return prev;
      },
      py::arg("isa") = py::none(),
      "The fp32 GEMM tiles' instruction set: 'auto' (AVX-512 > AVX2+FMA > plain C++, the default), "
      "'generic' or 'avx2' (tests); returns the previous setting, sets it unless `isa` is None.");
  m.def(
      "attention_tile_isas",
      [] {
        std::vector<std::string> v{"generic"};
        if (has_avx2_fma()) v.push_back("avx2");
        if (has_avx512()) v.push_back("avx512");
        return v;
      },
      "The fp32 tiles this CPU can run, narrowest first; 'auto' uses the last.");
}

}  // namespace fastft
