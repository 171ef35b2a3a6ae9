// Per-chunk softmax / loss / gradient pass of the fused linear cross-entropy on CPU.
//
// fastft/ops/fused_linear_cross_entropy.py computes a chunk's logits with one GEMM into a reused
// (rows, V) buffer and calls cross_entropy_chunk on it; this pass then, per row (OpenMP threads
// over rows, SIMD via target_clones):
//   A. max of the raw logits (tanh is monotonic, so the capped max is cap*tanh(max/cap));
//   B. sum of exp(z - zmax), sum of z (label smoothing) and the first argmax index;
//   C. overwrites the row with dloss/dlogits (scaled), then fixes the label element.
// A row is V elements (192 KiB at V=49152 fp32, 501 KiB at V=128256): it stays in the 1 MiB L2
// between the three reads, so the buffer is read once from memory and written once.
// exp is the polynomial of fastft/cross_entropy.h (vectorised; libm's expf is a scalar call).
//
// Pointers arrive as uintptr_t, validated by the Python side (dtype, contiguity, shapes,
// label range). No torch C++ API.
// GCC 12 reports -Wmaybe-uninitialized / -Wuninitialized inside avx512fintrin.h for unmasked
// intrinsics (their _mm512_undefined_* pass-through operand; GCC bug 105593, fixed in later releases):
// 94 false warnings from this file. GCC checks the pragma state at the header's own lines, so the
// include is where they are silenced; our code keeps every warning.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#include <omp.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "fastft/adamw.h"  // Elem<>: fp32/bf16/fp16 loads and stores
#include "fastft/cross_entropy.h"
#include "ops.h"

namespace py = pybind11;

namespace fastft {
namespace {

// Loads/stores of the buffer dtype: Elem<> (adamw.h) except the vectorisable bf16 store.
template <int DT> struct CEElem : Elem<DT> {};
template <> struct CEElem<kBFloat16> : Elem<kBFloat16> {
  static inline __attribute__((always_inline)) void store(uint16_t* p, int64_t i, float x) {
    p[i] = ce_float_to_bf16(x);
  }
};

struct RowOut {
  float loss, zterm;
  bool correct;
};

// The loops below keep kLanes independent partial results in local arrays, which GCC turns into
// full-width vector code in every target_clones variant. `omp simd` reductions did not: the
// float sum + int64 min-index reduction of pass B stayed scalar in the AVX-512 clone (2.7 ns per
// element for A+B on one core, vs 0.3 ns now). Scalars are copied to locals so the in-place
// stores cannot alias them.
constexpr int kLanes = 16;

template <int DT, bool CAP>
inline __attribute__((always_inline)) RowOut ce_row(typename Elem<DT>::T* __restrict x, int64_t V,
                                                    int64_t y, float scale, const CEParams& pr,
                                                    bool write_grad) {
  using E = CEElem<DT>;
  const CEParams p = pr;
  const int64_t Vb = V - V % kLanes;
  // A: max of the raw logits, then the first index holding it (block-wise early exit)
  float mxl[kLanes];
  for (int l = 0; l < kLanes; ++l) mxl[l] = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < Vb; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      float v = E::load(x, j + l);
      mxl[l] = v > mxl[l] ? v : mxl[l];
    }
  for (int64_t j = Vb; j < V; ++j) {
    float v = E::load(x, j);
    mxl[0] = v > mxl[0] ? v : mxl[0];
  }
  float mx = mxl[0];
  for (int l = 1; l < kLanes; ++l) mx = mxl[l] > mx ? mxl[l] : mx;
  int64_t am = V;
  for (int64_t j = 0; j < V && am == V; j += kLanes) {
    const int64_t n = V - j < kLanes ? V - j : kLanes;
    int hit = 0;
    for (int64_t l = 0; l < n; ++l) hit |= E::load(x, j + l) == mx;
    if (hit)
      for (int64_t l = 0; l < n; ++l)
        if (E::load(x, j + l) == mx) { am = j + l; break; }
  }
  const float zmax = CAP ? ce_capped(mx, p) : mx;
  // B: sum of exp(z - zmax) and of z
  float sl[kLanes], szl[kLanes];
  for (int l = 0; l < kLanes; ++l) sl[l] = szl[l] = 0.0f;
  for (int64_t j = 0; j < Vb; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      float v = E::load(x, j + l);
      float z = CAP ? ce_capped(v, p) : v;
      sl[l] += ce_exp(z - zmax);
      szl[l] += z;
    }
  for (int64_t j = Vb; j < V; ++j) {
    float v = E::load(x, j);
    float z = CAP ? ce_capped(v, p) : v;
    sl[0] += ce_exp(z - zmax);
    szl[0] += z;
  }
  float s = 0.0f, sz = 0.0f;
  for (int l = 0; l < kLanes; ++l) { s += sl[l]; sz += szl[l]; }
  const float lse = zmax + std::log(s);
  const float z_label = CAP ? ce_capped(E::load(x, y), p) : E::load(x, y);
  RowOut out;
  out.loss = ce_row_loss(lse, z_label, sz, p);
  out.zterm = p.z_loss * lse * lse;
  out.correct = am == y;
  if (write_grad) {
    // C: gradient in place, fp32 maths, one rounding to the buffer dtype
    const CERowCoef k = ce_row_coef(lse, scale, p);
    for (int64_t j = 0; j < Vb; j += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        float v = E::load(x, j + l);
        float z = CAP ? ce_capped(v, p) : v;
        E::store(x, j + l, ce_grad<CAP>(z, k, p));
      }
    for (int64_t j = Vb; j < V; ++j) {
      float v = E::load(x, j);
      float z = CAP ? ce_capped(v, p) : v;
      E::store(x, j, ce_grad<CAP>(z, k, p));
    }
    E::store(x, y, ce_grad_label(z_label, k, p));
  }
  return out;
}

// ---- AVX-512 path for fp32 / bf16 rows (explicit intrinsics) ----------------------------------
// GCC auto-vectorised the generic loops above only partly (bf16 stores and the capped variants
// stayed scalar: 2.0 ns/element for a bf16 row vs 0.7 for fp32 on one core). Same maths as
// fastft/cross_entropy.h: exp = 2^n * poly6(r), bf16 stores round to nearest even.
#define FASTFT_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"), always_inline)) inline

FASTFT_AVX512 __m512 v_exp(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 q = _mm512_set1_ps(1.0f / 720.0f);
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f / 120.0f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f / 24.0f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f / 6.0f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.5f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(q, n);
}

template <bool BF16>
FASTFT_AVX512 __m512 v_load(const void* p, int64_t j, __mmask16 m) {
  if (BF16) {
    __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + j);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + j);
}

template <bool BF16>
FASTFT_AVX512 void v_store(void* p, int64_t j, __mmask16 m, __m512 v) {
  if (BF16) {
    __m512i b = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), odd), 16);
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + j, m, _mm512_cvtepi32_epi16(b));
  } else {
    _mm512_mask_storeu_ps(static_cast<float*>(p) + j, m, v);
  }
}

// capped logit: cap * tanh(x / cap) = cap * (1 - 2 / (exp(2x/cap) + 1))
template <bool CAP>
FASTFT_AVX512 __m512 v_logit(__m512 x, __m512 two_inv_cap, __m512 cap) {
  if (!CAP) return x;
  __m512 e = v_exp(_mm512_mul_ps(x, two_inv_cap));
  __m512 t = _mm512_sub_ps(_mm512_set1_ps(1.0f), _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
  return _mm512_mul_ps(cap, t);
}

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
}

template <bool BF16, bool CAP>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
RowOut ce_row_avx512(void* x, int64_t V, int64_t y, float scale, const CEParams& p, bool write_grad) {
  const __m512 cap = _mm512_set1_ps(p.softcap), two_inv_cap = _mm512_set1_ps(2.0f * p.inv_softcap);
  // A: max of the raw logits
  __m512 vmx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < V; j += 16) {
    __mmask16 m = tail_mask(V - j);
    vmx = _mm512_mask_max_ps(vmx, m, vmx, v_load<BF16>(x, j, m));
  }
  const float mx = _mm512_reduce_max_ps(vmx);
  int64_t am = V;  // first index holding the max
  const __m512 bmx = _mm512_set1_ps(mx);
  for (int64_t j = 0; j < V; j += 16) {
    __mmask16 m = tail_mask(V - j);
    __mmask16 eq = _mm512_mask_cmp_ps_mask(m, v_load<BF16>(x, j, m), bmx, _CMP_EQ_OQ);
    if (eq) { am = j + __builtin_ctz(static_cast<unsigned>(eq)); break; }
  }
  const float zmax = CAP ? ce_capped(mx, p) : mx;
  // B: sum of exp(z - zmax) and of z
  const __m512 bz = _mm512_set1_ps(zmax);
  __m512 vs = _mm512_setzero_ps(), vsz = _mm512_setzero_ps();
  for (int64_t j = 0; j < V; j += 16) {
    __mmask16 m = tail_mask(V - j);
    __m512 z = v_logit<CAP>(v_load<BF16>(x, j, m), two_inv_cap, cap);
    vs = _mm512_mask_add_ps(vs, m, vs, v_exp(_mm512_sub_ps(z, bz)));
    vsz = _mm512_mask_add_ps(vsz, m, vsz, z);
  }
  const float lse = zmax + std::log(_mm512_reduce_add_ps(vs));
  const float xl = BF16 ? bf16_to_float(static_cast<uint16_t*>(x)[y]) : static_cast<float*>(x)[y];
  const float z_label = CAP ? ce_capped(xl, p) : xl;
  RowOut out;
  out.loss = ce_row_loss(lse, z_label, _mm512_reduce_add_ps(vsz), p);
  out.zterm = p.z_loss * lse * lse;
  out.correct = am == y;
  if (write_grad) {
    const CERowCoef k = ce_row_coef(lse, scale, p);
    const __m512 blse = _mm512_set1_ps(lse), a = _mm512_set1_ps(k.a), b = _mm512_set1_ps(k.b);
    const __m512 inv_cap = _mm512_set1_ps(p.inv_softcap), one = _mm512_set1_ps(1.0f);
    for (int64_t j = 0; j < V; j += 16) {
      __mmask16 m = tail_mask(V - j);
      __m512 z = v_logit<CAP>(v_load<BF16>(x, j, m), two_inv_cap, cap);
      __m512 g = _mm512_fmsub_ps(v_exp(_mm512_sub_ps(z, blse)), a, b);
      if (CAP) {
        __m512 t = _mm512_mul_ps(z, inv_cap);
        g = _mm512_mul_ps(g, _mm512_fnmadd_ps(t, t, one));
      }
      v_store<BF16>(x, j, m, g);
    }
    const float gl = ce_grad_label(z_label, k, p);
    if (BF16) static_cast<uint16_t*>(x)[y] = ce_float_to_bf16(gl);
    else static_cast<float*>(x)[y] = gl;
  }
  return out;
}

bool have_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return ok;
}

RowOut ce_row_any(void* row, int dtype, int64_t V, int64_t y, float scale, const CEParams& p,
                  bool write_grad);

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
RowOut ce_row_dispatch(void* row, int dtype, int64_t V, int64_t y, float scale, const CEParams& p,
                       bool write_grad) {
  const bool cap = p.softcap > 0.0f;
  switch (dtype) {
    case kFloat32:
      return cap ? ce_row<kFloat32, true>(static_cast<float*>(row), V, y, scale, p, write_grad)
                 : ce_row<kFloat32, false>(static_cast<float*>(row), V, y, scale, p, write_grad);
    case kBFloat16:
      return cap ? ce_row<kBFloat16, true>(static_cast<uint16_t*>(row), V, y, scale, p, write_grad)
                 : ce_row<kBFloat16, false>(static_cast<uint16_t*>(row), V, y, scale, p, write_grad);
    default:
      return cap ? ce_row<kFloat16, true>(static_cast<uint16_t*>(row), V, y, scale, p, write_grad)
                 : ce_row<kFloat16, false>(static_cast<uint16_t*>(row), V, y, scale, p, write_grad);
  }
}

RowOut ce_row_any(void* row, int dtype, int64_t V, int64_t y, float scale, const CEParams& p,
                  bool write_grad) {
  if (dtype != kFloat16 && have_avx512()) {
    const bool cap = p.softcap > 0.0f;
    if (dtype == kFloat32)
      return cap ? ce_row_avx512<false, true>(row, V, y, scale, p, write_grad)
                 : ce_row_avx512<false, false>(row, V, y, scale, p, write_grad);
    return cap ? ce_row_avx512<true, true>(row, V, y, scale, p, write_grad)
               : ce_row_avx512<true, false>(row, V, y, scale, p, write_grad);
  }
  return ce_row_dispatch(row, dtype, V, y, scale, p, write_grad);
}

// buf: (rows, V) with row stride ld elements, dtype code `dtype`, overwritten by dloss/dlogits
// when write_grad. labels: int64[rows] in [0, V). scale: fp32[rows]. Outputs: loss fp32[rows]
// (z-loss included), zterm fp32[rows], correct uint8[rows] (first argmax == label).
void cross_entropy_chunk(uintptr_t buf, int dtype, int64_t rows, int64_t V, int64_t ld,
                         uintptr_t labels, uintptr_t scale, uintptr_t loss, uintptr_t zterm,
                         uintptr_t correct, double smoothing, double z_loss, double softcap,
                         bool write_grad) {
  if (rows < 0 || V <= 0 || ld < V)
    throw std::invalid_argument("cross_entropy_chunk: need rows >= 0, V > 0, ld >= V");
  if (dtype < kFloat32 || dtype > kFloat16)
    throw std::invalid_argument("cross_entropy_chunk: dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16)");
  CEParams p;
  p.smoothing = static_cast<float>(smoothing);
  p.z_loss = static_cast<float>(z_loss);
  p.softcap = static_cast<float>(softcap);
  p.inv_softcap = softcap > 0.0 ? static_cast<float>(1.0 / softcap) : 0.0f;
  p.vocab = V;
  const int64_t esize = dtype == kFloat32 ? 4 : 2;
  auto* base = reinterpret_cast<char*>(buf);
  const auto* y = reinterpret_cast<const int64_t*>(labels);
  const auto* sc = reinterpret_cast<const float*>(scale);
  auto* lo = reinterpret_cast<float*>(loss);
  auto* zo = reinterpret_cast<float*>(zterm);
  auto* co = reinterpret_cast<uint8_t*>(correct);
  for (int64_t r = 0; r < rows; ++r)
    if (y[r] < 0 || y[r] >= V)
      throw std::invalid_argument("cross_entropy_chunk: label " + std::to_string(y[r]) + " of row " +
                                  std::to_string(r) + " is outside [0, " + std::to_string(V) + ")");
  // One thread per 64K elements of work at least: a parallel region costs ~10 us idle but up to
  // ms when the other core is busy, so tiny chunks (tests) stay on one thread.
  int64_t want = rows * V / (1 << 16);
  const int nth = static_cast<int>(want < 1 ? 1 : (want > omp_get_max_threads() ? omp_get_max_threads() : want));
  py::gil_scoped_release nogil;
#pragma omp parallel for schedule(static) num_threads(nth)
  for (int64_t r = 0; r < rows; ++r) {
    RowOut o = ce_row_any(base + r * ld * esize, dtype, V, y[r], sc[r], p, write_grad);
    lo[r] = o.loss;
    zo[r] = o.zterm;
    co[r] = o.correct ? 1 : 0;
  }
}

}  // namespace

void register_cross_entropy(py::module_& m) {
  m.def("cross_entropy_chunk", &cross_entropy_chunk, py::arg("buf"), py::arg("dtype"), py::arg("rows"),
        py::arg("vocab"), py::arg("ld"), py::arg("labels"), py::arg("scale"), py::arg("loss"),
        py::arg("zterm"), py::arg("correct"), py::arg("label_smoothing"), py::arg("z_loss"),
        py::arg("softcap"), py::arg("write_grad"),
        "Per-row softmax/loss/argmax of a (rows, V) logits buffer; overwrites it with dloss/dlogits.");
}

}  // namespace fastft
