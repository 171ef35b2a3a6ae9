// Fused RMSNorm, SwiGLU and rotary embedding (forward and backward) on CPU: OpenMP threads over
// rows / element chunks, SIMD via target_clones, bf16/fp16/fp32 I/O with fp32 maths
// (csrc/include/fastft/elementwise.h). Each kernel reads its inputs once and writes its outputs
// once; eager PyTorch's RMSNorm makes ~6 passes (cast, pow, mean, rsqrt-mul, cast, weight-mul).
//
// SIMD loops ask for simdlen(16) like adamw.cpp (512-bit fp32 vectors in the AVX-512 clone); on
// this EPYC (512-bit ops issue as two 256-bit halves) it measured no different from the default.
//
// Pointers arrive as uintptr_t, validated by fastft/ops/{rms_norm,swiglu,rope}.py (device,
// dtype, contiguity, shapes). No torch C++ API.
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastft/elementwise.h"
#include "ops.h"

namespace py = pybind11;

namespace fastft {
namespace {

// One thread per 64K elements of work (~0.1 ms of streaming on one core): a parallel region
// costs up to several ms when the other core is busy (see adamw.cpp), so small calls stay serial.
inline int threads_for(int64_t elems) {
  int64_t want = elems / (1 << 16);
  int mx = omp_get_max_threads();
  return static_cast<int>(want < 1 ? 1 : (want > mx ? mx : want));
}

inline void thread_range(int64_t n, int tid, int nth, int64_t& lo, int64_t& hi) {
  lo = n * tid / nth;
  hi = n * (tid + 1) / nth;
}

void check_dtype(int dt, const char* op) {
  if (dt < kFloat32 || dt > kFloat16)
    throw std::invalid_argument(std::string(op) + ": dtype code " + std::to_string(dt) + ", expected 0, 1 or 2");
}

// ------------------------------------------------------------------------------------------------
// RMSNorm
// ------------------------------------------------------------------------------------------------
// 16-bit rows are converted into fp32 row buffers first and results written back by a separate
// loop, for the reason given at kTile below (bf16 1024x576, one core: forward 0.26 -> 0.22 ms,
// backward 0.31 -> 0.26 ms). fp32 rows are used in place.
template <int DT>
inline __attribute__((always_inline)) const float* row_f32(const void* base, int64_t n, float* buf) {
  using E = Elem<DT>;
  if (DT == kFloat32) return static_cast<const float*>(base);
  const auto* x = static_cast<const typename E::T*>(base);
#pragma omp simd simdlen(16)
  for (int64_t i = 0; i < n; ++i) buf[i] = E::load(x, i);
  return buf;
}

template <int DT>
inline __attribute__((always_inline)) void row_store(void* base, const float* v, int64_t n) {
  using E = Elem<DT>;
  auto* y = static_cast<typename E::T*>(base);
#pragma omp simd simdlen(16)
  for (int64_t i = 0; i < n; ++i) E::store(y, i, v[i]);
}

// The weight in fp32: its dtype WDT is x's, or fp32 with 16-bit x (fastft keeps trainable norm
// weights in fp32, fastft/train/precision.py), loaded once per thread.
inline const float* weight_f32(int wdt, const void* wp, int64_t n, float* buf) {
  switch (wdt) {
    case kFloat32: return static_cast<const float*>(wp);
    case kBFloat16: return row_f32<kBFloat16>(wp, n, buf);
    default: return row_f32<kFloat16>(wp, n, buf);
  }
}

template <int DT>
inline __attribute__((always_inline)) void rms_fwd_rows(const void* xp, const void* wp, int wdt, void* yp,
                                                        float* rstd, int64_t lo, int64_t hi, int64_t n, float eps) {
  using E = Elem<DT>;
  std::vector<float> wbuf(wdt == kFloat32 ? 0 : n), xbuf(DT == kFloat32 ? 0 : n), ybuf(DT == kFloat32 ? 0 : n);
  const float* w = weight_f32(wdt, wp, n, wbuf.data());
  for (int64_t r = lo; r < hi; ++r) {
    const float* x = row_f32<DT>(static_cast<const typename E::T*>(xp) + r * n, n, xbuf.data());
    float acc = 0.0f;
#pragma omp simd simdlen(16) reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) acc += x[i] * x[i];
    const float rs = rms_rstd(acc, n, eps);
    rstd[r] = rs;
    // round to x's dtype before the weight multiply (HF LlamaRMSNorm: weight * x.to(dtype))
    float* y = DT == kFloat32 ? static_cast<float*>(yp) + r * n : ybuf.data();
#pragma omp simd simdlen(16)
    for (int64_t i = 0; i < n; ++i) y[i] = round_to<DT>(x[i] * rs) * w[i];
    if (DT != kFloat32) row_store<DT>(static_cast<typename E::T*>(yp) + r * n, y, n);
  }
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void rms_fwd_chunk(int dt, const void* x, const void* w, int wdt, void* y, float* rstd, int64_t lo, int64_t hi,
                   int64_t n, float eps) {
  switch (dt) {
    case kFloat32: rms_fwd_rows<kFloat32>(x, w, wdt, y, rstd, lo, hi, n, eps); break;
    case kBFloat16: rms_fwd_rows<kBFloat16>(x, w, wdt, y, rstd, lo, hi, n, eps); break;
    default: rms_fwd_rows<kFloat16>(x, w, wdt, y, rstd, lo, hi, n, eps); break;
  }
}

// dw_acc: this thread's fp32 (n,) accumulator of sum_rows dy * round_x(x * rstd).
template <int DT>
inline __attribute__((always_inline)) void rms_bwd_rows(const void* dyp, const void* xp, const void* wp,
                                                        int wdt, const float* rstd, void* dxp, float* dw_acc,
                                                        int64_t lo, int64_t hi, int64_t n) {
  using E = Elem<DT>;
  const int64_t nb = DT == kFloat32 ? 0 : n;
  std::vector<float> wbuf(wdt == kFloat32 ? 0 : n), xbuf(nb), dybuf(nb), dxbuf(nb);
  const float* w = weight_f32(wdt, wp, n, wbuf.data());
  const float inv_n = 1.0f / static_cast<float>(n);
  for (int64_t r = lo; r < hi; ++r) {
    const float* x = row_f32<DT>(static_cast<const typename E::T*>(xp) + r * n, n, xbuf.data());
    const float* dy = row_f32<DT>(static_cast<const typename E::T*>(dyp) + r * n, n, dybuf.data());
    const float rs = rstd[r];
    float dot = 0.0f;  // sum (dy*w) * (x*r)
#pragma omp simd simdlen(16) reduction(+ : dot)
    for (int64_t i = 0; i < n; ++i) {
      float nh = x[i] * rs;
      dw_acc[i] += dy[i] * round_to<DT>(nh);
      dot += dy[i] * w[i] * nh;
    }
    const float c = dot * inv_n;
    float* dx = DT == kFloat32 ? static_cast<float*>(dxp) + r * n : dxbuf.data();
#pragma omp simd simdlen(16)
    for (int64_t i = 0; i < n; ++i) dx[i] = rs * (dy[i] * w[i] - x[i] * rs * c);
    if (DT != kFloat32) row_store<DT>(static_cast<typename E::T*>(dxp) + r * n, dx, n);
  }
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void rms_bwd_chunk(int dt, const void* dy, const void* x, const void* w, int wdt, const float* rstd, void* dx,
                   float* dw_acc, int64_t lo, int64_t hi, int64_t n) {
  switch (dt) {
    case kFloat32: rms_bwd_rows<kFloat32>(dy, x, w, wdt, rstd, dx, dw_acc, lo, hi, n); break;
    case kBFloat16: rms_bwd_rows<kBFloat16>(dy, x, w, wdt, rstd, dx, dw_acc, lo, hi, n); break;
    default: rms_bwd_rows<kFloat16>(dy, x, w, wdt, rstd, dx, dw_acc, lo, hi, n); break;
  }
}

// weight dtype code: -1 means x's; otherwise x's or fp32 (fp32 weight with 16-bit x).
int resolve_wdt(int dt, int wdt, const char* op) {
  if (wdt < 0) return dt;
  if (wdt != dt && wdt != kFloat32)
    throw std::invalid_argument(std::string(op) + ": weight dtype code " + std::to_string(wdt) +
                                ", expected x's (" + std::to_string(dt) + ") or 0 (fp32)");
  return wdt;
}

// x, y: (rows, n) contiguous, dtype dt; w: (n,) dtype wdt (dt or fp32); rstd: (rows,) fp32 out.
void rms_norm_fwd(uintptr_t x, uintptr_t w, uintptr_t y, uintptr_t rstd, int64_t rows, int64_t n, double eps,
                  int dt, int wdt) {
  check_dtype(dt, "rms_norm_fwd");
  wdt = resolve_wdt(dt, wdt, "rms_norm_fwd");
  if (rows <= 0 || n <= 0) return;
  py::gil_scoped_release nogil;
#pragma omp parallel num_threads(threads_for(rows * n))
  {
    int64_t lo, hi;
    thread_range(rows, omp_get_thread_num(), omp_get_num_threads(), lo, hi);
    rms_fwd_chunk(dt, reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(w), wdt,
                  reinterpret_cast<void*>(y), reinterpret_cast<float*>(rstd), lo, hi, n, static_cast<float>(eps));
  }
}

// dy, x, dx: (rows, n) dtype dt; w: (n,) dtype wdt (dt or fp32); rstd: (rows,) fp32; dw: (n,) fp32 out (the
// per-thread partial sums added in thread order: deterministic for a given thread count).
void rms_norm_bwd(uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t rstd, uintptr_t dx, uintptr_t dw,
                  int64_t rows, int64_t n, int dt, int wdt) {
  check_dtype(dt, "rms_norm_bwd");
  wdt = resolve_wdt(dt, wdt, "rms_norm_bwd");
  float* dw_out = reinterpret_cast<float*>(dw);
  if (n <= 0) return;
  py::gil_scoped_release nogil;
  const int nth = rows > 0 ? threads_for(rows * n) : 1;
  std::vector<float> part(static_cast<size_t>(nth) * n, 0.0f);
  if (rows > 0) {
#pragma omp parallel num_threads(nth)
    {
      int64_t lo, hi;
      const int tid = omp_get_thread_num();
      thread_range(rows, tid, omp_get_num_threads(), lo, hi);
      rms_bwd_chunk(dt, reinterpret_cast<const void*>(dy), reinterpret_cast<const void*>(x),
                    reinterpret_cast<const void*>(w), wdt, reinterpret_cast<const float*>(rstd),
                    reinterpret_cast<void*>(dx), part.data() + static_cast<size_t>(tid) * n, lo, hi, n);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    float s = 0.0f;
    for (int t = 0; t < nth; ++t) s += part[static_cast<size_t>(t) * n + i];
    dw_out[i] = s;
  }
}

// ------------------------------------------------------------------------------------------------
// SwiGLU
// ------------------------------------------------------------------------------------------------
// 16-bit I/O goes through fp32 tiles on the stack: GCC vectorises a loop that mixes 16-bit loads
// and stores with the fp32 maths of exp_f at half the speed of the same loop on fp32 data (one core,
// 1.5M elements, forward: bf16 1.35 ms vs fp32 0.70 ms); converting a tile in, running the fp32
// loop and converting out took 0.96 ms. 512 elements x 5 arrays = 10 KiB, well inside L1.
constexpr int64_t kTile = 512;

template <int DT>
inline __attribute__((always_inline)) void swiglu_fwd_span(const void* gp, const void* up, void* yp, int64_t lo,
                                                           int64_t hi) {
  using E = Elem<DT>;
  const auto* g = static_cast<const typename E::T*>(gp);
  const auto* u = static_cast<const typename E::T*>(up);
  auto* y = static_cast<typename E::T*>(yp);
  if (DT == kFloat32) {
#pragma omp simd simdlen(16)
    for (int64_t i = lo; i < hi; ++i) E::store(y, i, swiglu_fwd(E::load(g, i), E::load(u, i)));
    return;
  }
  alignas(64) float tg[kTile], tu[kTile];
  for (int64_t s = lo; s < hi; s += kTile) {
    const int64_t m = hi - s < kTile ? hi - s : kTile;
#pragma omp simd simdlen(16)
    for (int64_t i = 0; i < m; ++i) {
      tg[i] = E::load(g, s + i);
      tu[i] = E::load(u, s + i);
    }
#pragma omp simd simdlen(16)
    for (int64_t i = 0; i < m; ++i) tg[i] = swiglu_fwd(tg[i], tu[i]);
#pragma omp simd simdlen(16)
    for (int64_t i = 0; i < m; ++i) E::store(y, s + i, tg[i]);
  }
}

template <int DT>
inline __attribute__((always_inline)) void swiglu_bwd_span(const void* gp, const void* up, const void* dyp,
                                                           void* dgp, void* dup, int64_t lo, int64_t hi) {
  using E = Elem<DT>;
  const auto* g = static_cast<const typename E::T*>(gp);
  const auto* u = static_cast<const typename E::T*>(up);
  const auto* dy = static_cast<const typename E::T*>(dyp);
  auto* dg = static_cast<typename E::T*>(dgp);
  auto* du = static_cast<typename E::T*>(dup);
  if (DT == kFloat32) {
#pragma omp simd simdlen(16)
    for (int64_t i = lo; i < hi; ++i) {
      float a, b;
      swiglu_bwd(E::load(g, i), E::load(u, i), E::load(dy, i), a, b);
      E::store(dg, i, a);
      E::store(du, i, b);
    }
    return;
  }
  alignas(64) float tg[kTile], tu[kTile], td[kTile];
  for (int64_t s = lo; s < hi; s += kTile) {
    const int64_t m = hi - s < kTile ? hi - s : kTile;
#pragma omp simd simdlen(16)
    for (int64_t i = 0; i < m; ++i) {
      tg[i] = E::load(g, s + i);
      tu[i] = E::load(u, s + i);
      td[i] = E::load(dy, s + i);
    }
#pragma omp simd simdlen(16)
    for (int64_t i = 0; i < m; ++i) swiglu_bwd(tg[i], tu[i], td[i], tg[i], tu[i]);
#pragma omp simd simdlen(16)
    for (int64_t i = 0; i < m; ++i) {
      E::store(dg, s + i, tg[i]);
      E::store(du, s + i, tu[i]);
    }
  }
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void swiglu_fwd_chunk(int dt, const void* g, const void* u, void* y, int64_t lo, int64_t hi) {
  switch (dt) {
    case kFloat32: swiglu_fwd_span<kFloat32>(g, u, y, lo, hi); break;
    case kBFloat16: swiglu_fwd_span<kBFloat16>(g, u, y, lo, hi); break;
    default: swiglu_fwd_span<kFloat16>(g, u, y, lo, hi); break;
  }
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void swiglu_bwd_chunk(int dt, const void* g, const void* u, const void* dy, void* dg, void* du, int64_t lo,
                      int64_t hi) {
  switch (dt) {
    case kFloat32: swiglu_bwd_span<kFloat32>(g, u, dy, dg, du, lo, hi); break;
    case kBFloat16: swiglu_bwd_span<kBFloat16>(g, u, dy, dg, du, lo, hi); break;
    default: swiglu_bwd_span<kFloat16>(g, u, dy, dg, du, lo, hi); break;
  }
}

// 16K-element blocks, split contiguously over threads (static: each thread streams one range).
void swiglu_fwd_all(uintptr_t g, uintptr_t u, uintptr_t y, int64_t numel, int dt) {
  check_dtype(dt, "swiglu_fwd");
  if (numel <= 0) return;
  py::gil_scoped_release nogil;
#pragma omp parallel num_threads(threads_for(numel))
  {
    int64_t lo, hi;
    thread_range(numel, omp_get_thread_num(), omp_get_num_threads(), lo, hi);
    swiglu_fwd_chunk(dt, reinterpret_cast<const void*>(g), reinterpret_cast<const void*>(u),
                     reinterpret_cast<void*>(y), lo, hi);
  }
}

void swiglu_bwd_all(uintptr_t g, uintptr_t u, uintptr_t dy, uintptr_t dg, uintptr_t du, int64_t numel, int dt) {
  check_dtype(dt, "swiglu_bwd");
  if (numel <= 0) return;
  py::gil_scoped_release nogil;
#pragma omp parallel num_threads(threads_for(numel))
  {
    int64_t lo, hi;
    thread_range(numel, omp_get_thread_num(), omp_get_num_threads(), lo, hi);
    swiglu_bwd_chunk(dt, reinterpret_cast<const void*>(g), reinterpret_cast<const void*>(u),
                     reinterpret_cast<const void*>(dy), reinterpret_cast<void*>(dg), reinterpret_cast<void*>(du),
                     lo, hi);
  }
}

// ------------------------------------------------------------------------------------------------
// Rotary embedding
// ------------------------------------------------------------------------------------------------
// x, y: (B, H, T, D) with element strides xs/ys for B, H, T (D contiguous); cos/sin: (B, T, D) with
// strides cs for B, T (D contiguous, batch stride may be 0). Rows (b, t) are the parallel unit;
// each row rotates its H heads with the same cos/sin (kept in L1).
struct RopeArgs {
  const void* x;
  void* y;
  const void* c;
  const void* s;
  int64_t B, H, T, D;
  int64_t xs[3], ys[3], cs[2];
  bool backward;
};

template <int DT, bool BWD>
inline __attribute__((always_inline)) void rope_rows(const RopeArgs& a, int64_t lo, int64_t hi) {
  using E = Elem<DT>;
  using T = typename E::T;
  const int64_t half = a.D / 2;
  for (int64_t row = lo; row < hi; ++row) {
    const int64_t b = row / a.T, t = row % a.T;
    const T* c = static_cast<const T*>(a.c) + b * a.cs[0] + t * a.cs[1];
    const T* s = static_cast<const T*>(a.s) + b * a.cs[0] + t * a.cs[1];
    for (int64_t h = 0; h < a.H; ++h) {
      const T* x = static_cast<const T*>(a.x) + b * a.xs[0] + h * a.xs[1] + t * a.xs[2];
      T* y = static_cast<T*>(a.y) + b * a.ys[0] + h * a.ys[1] + t * a.ys[2];
#pragma omp simd simdlen(16)
      for (int64_t j = 0; j < half; ++j) {
        float lo_v, hi_v;
        if (BWD)
          rope_pair_bwd(E::load(x, j), E::load(x, j + half), E::load(c, j), E::load(s, j), E::load(c, j + half),
                        E::load(s, j + half), lo_v, hi_v);
        else
          rope_pair_fwd(E::load(x, j), E::load(x, j + half), E::load(c, j), E::load(s, j), E::load(c, j + half),
                        E::load(s, j + half), lo_v, hi_v);
        E::store(y, j, lo_v);
        E::store(y, j + half, hi_v);
      }
    }
  }
}

template <int DT>
inline __attribute__((always_inline)) void rope_dt(const RopeArgs& a, int64_t lo, int64_t hi) {
  if (a.backward) rope_rows<DT, true>(a, lo, hi);
  else rope_rows<DT, false>(a, lo, hi);
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void rope_chunk(int dt, const RopeArgs& a, int64_t lo, int64_t hi) {
  switch (dt) {
    case kFloat32: rope_dt<kFloat32>(a, lo, hi); break;
    case kBFloat16: rope_dt<kBFloat16>(a, lo, hi); break;
    default: rope_dt<kFloat16>(a, lo, hi); break;
  }
}

void rope_apply(uintptr_t x, uintptr_t y, uintptr_t c, uintptr_t s, const std::vector<int64_t>& shape,
                const std::vector<int64_t>& xs, const std::vector<int64_t>& ys, const std::vector<int64_t>& cs,
                bool backward, int dt) {
  check_dtype(dt, "rope");
  if (shape.size() != 4 || xs.size() != 3 || ys.size() != 3 || cs.size() != 2)
    throw std::invalid_argument("rope: expected shape (B, H, T, D), 3 x/y strides and 2 cos/sin strides");
  if (shape[3] % 2 != 0) throw std::invalid_argument("rope: head dim must be even, got " + std::to_string(shape[3]));
  RopeArgs a{reinterpret_cast<const void*>(x), reinterpret_cast<void*>(y), reinterpret_cast<const void*>(c),
             reinterpret_cast<const void*>(s), shape[0], shape[1], shape[2], shape[3],
             {xs[0], xs[1], xs[2]}, {ys[0], ys[1], ys[2]}, {cs[0], cs[1]}, backward};
  const int64_t rows = a.B * a.T;
  if (rows <= 0 || a.H <= 0 || a.D <= 0) return;
  py::gil_scoped_release nogil;
#pragma omp parallel num_threads(threads_for(rows * a.H * a.D))
  {
    int64_t lo, hi;
    thread_range(rows, omp_get_thread_num(), omp_get_num_threads(), lo, hi);
    rope_chunk(dt, a, lo, hi);
  }
}

}  // namespace

void register_elementwise(py::module_& m) {
  m.def("rms_norm_fwd", &rms_norm_fwd, py::arg("x"), py::arg("weight"), py::arg("y"), py::arg("rstd"),
        py::arg("rows"), py::arg("n"), py::arg("eps"), py::arg("dtype"), py::arg("weight_dtype") = -1,
        "RMSNorm forward over (rows, n); writes y and the per-row fp32 1/rms. weight_dtype -1: x's.");
  m.def("rms_norm_bwd", &rms_norm_bwd, py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("rstd"),
        py::arg("dx"), py::arg("dweight"), py::arg("rows"), py::arg("n"), py::arg("dtype"),
        py::arg("weight_dtype") = -1, "RMSNorm backward; dweight is an fp32 (n,) output.");
  m.def("swiglu_fwd", &swiglu_fwd_all, py::arg("gate"), py::arg("up"), py::arg("y"), py::arg("numel"),
        py::arg("dtype"), "y = silu(gate) * up over numel contiguous elements.");
  m.def("swiglu_bwd", &swiglu_bwd_all, py::arg("gate"), py::arg("up"), py::arg("dy"), py::arg("dgate"),
        py::arg("dup"), py::arg("numel"), py::arg("dtype"), "SwiGLU backward, silu recomputed from gate.");
  m.def("rope", &rope_apply, py::arg("x"), py::arg("y"), py::arg("cos"), py::arg("sin"), py::arg("shape"),
        py::arg("x_strides"), py::arg("y_strides"), py::arg("cs_strides"), py::arg("backward"), py::arg("dtype"),
        "Rotary embedding (or its transpose when backward) of a strided (B, H, T, D) tensor.");
}

}  // namespace fastft
