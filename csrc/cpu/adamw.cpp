// Fused AdamW + global-norm gradient clipping on CPU (OpenMP threads, SIMD via target_clones).
//
// One call does the whole optimizer step for every parameter of every group:
//   1. (clipping) sum of squares of all gradients, one multi-tensor read pass, fp64 partials
//      per 32K-element chunk summed in chunk order (deterministic for any thread count);
//   2. non-finite norm -> nothing is written (step counters included), the caller counts a skip;
//   3. one pass over p, g, m, v (+ vmax, fp32 master) per parameter; the clip coefficient and
//      1/grad_scale are applied as each gradient is read, so gradients are never rewritten.
// Each thread owns one contiguous range of chunks (static split, same in both passes).
// Walking pass 3 backwards to reuse the L3-resident tail of pass 1 was tried: it can save at most
// L3/(28 B per param) elements' grad reads (~0.3% of the traffic here) and measured no difference.
//
// Pointers arrive as uintptr_t, validated by fastft/ops/adamw.py (device, dtype, contiguity,
// numel). No torch C++ API.
// No FMA contraction here (setup.py passes -ffp-contract=fast): torch rounds p*(1-lr*wd), v*beta2
// and each product separately, and matching that keeps fp32 results within ~1 ulp of
// torch.optim.AdamW instead of drifting by a few ulps per step.
#pragma GCC optimize("fp-contract=off")
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastft/adamw.h"
#include "ops.h"

namespace py = pybind11;

namespace fastft {
namespace {

// 32K elements = 128 KiB of fp32 per stream: small enough that 5 streams fit in L2 (1 MiB/core),
// large enough that the per-chunk dispatch is noise (1.5K chunks for 50M parameters).
constexpr int64_t kChunk = 32768;

struct Chunk {
  int32_t tensor;
  int64_t start;
  int64_t len;
};

std::vector<Chunk> make_chunks(const std::vector<int64_t>& numel) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < numel.size(); ++t)
    for (int64_t s = 0; s < numel[t]; s += kChunk)
      chunks.push_back({static_cast<int32_t>(t), s, std::min(kChunk, numel[t] - s)});
  return chunks;
}

template <int DT>
inline __attribute__((always_inline)) double sumsq_span(const void* base, int64_t start, int64_t len) {
  using E = Elem<DT>;
  const auto* x = static_cast<const typename E::T*>(base) + start;
  // 32 independent fp64 lanes (4 AVX-512 registers), vectorized without reassociation. One
  // accumulator (omp simd reduction) is bound by the add latency: bf16 grads ran at 28 GB/s
  // (3.5 ms for 50M) vs 41 GB/s (2.5 ms) now; fp32 grads are at the read bandwidth either way.
  constexpr int L = 32;
  double acc[L] = {};
  int64_t i = 0;
  for (; i + L <= len; i += L)
    for (int j = 0; j < L; ++j) {
      double f = static_cast<double>(E::load(x, i + j));
      acc[j] += f * f;
    }
  for (int j = 0; i < len; ++i, ++j) {
    double f = static_cast<double>(E::load(x, i));
    acc[j] += f * f;
  }
  for (int w = L / 2; w > 0; w /= 2)  // fixed pairwise order: deterministic
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
double sumsq_chunk(const void* base, int dtype, int64_t start, int64_t len) {
  switch (dtype) {
    case kFloat32: return sumsq_span<kFloat32>(base, start, len);
    case kBFloat16: return sumsq_span<kBFloat16>(base, start, len);
    default: return sumsq_span<kFloat16>(base, start, len);
  }
}

// Pointers of one parameter's tensors for the update pass.
struct ParamPtrs {
  void* p;
  const void* g;
  float* m;
  float* v;
  float* vmax;    // nullptr unless amsgrad
  float* master;  // nullptr unless a fp32 master copy exists
  int16_t* lo;    // nullptr unless a split master (bf16 param = high half, this = low half)
  int pdt, gdt;
  bool amsgrad;
};

// PD/GD: dtype codes of param and grad. With a master, the fp32 master is the working value and
// the low-precision param is written only (not read): 2 bytes/param saved.
template <int PD, int GD, bool AMS, bool MASTER>
inline __attribute__((always_inline)) void update_span(const ParamPtrs& t, const AdamWScalars& s,
                                                       int64_t start, int64_t len) {
  using P = Elem<PD>;
  using G = Elem<GD>;
  auto* p = static_cast<typename P::T*>(t.p) + start;
  const auto* g = static_cast<const typename G::T*>(t.g) + start;
  float* m = t.m + start;
  float* v = t.v + start;
  float* vm = AMS ? t.vmax + start : nullptr;
  float* w = MASTER ? t.master + start : nullptr;
  const AdamWScalars sc = s;  // local copy: lets the compiler keep the scalars in registers
  // simdlen(16): full 512-bit vectors in the AVX-512 clone (GCC's generic tuning picks 256-bit,
  // which left the 2 divisions + sqrt per element compute-bound: 28 ms vs 23 ms on 50M params).
#pragma omp simd simdlen(16)
  for (int64_t i = 0; i < len; ++i) {
    float pv = MASTER ? w[i] : P::load(p, i);
    float mi = m[i], vi = v[i];
    float vmi = AMS ? vm[i] : 0.0f;
    float out = adamw_update<AMS>(pv, G::load(g, i), mi, vi, vmi, sc);
    m[i] = mi;
    v[i] = vi;
    if (AMS) vm[i] = vmi;
    if (MASTER) w[i] = out;
    P::store(p, i, out);
  }
}

// bf16 param with a split master (adamw.h: split_master_decode/encode): reads and writes the param
// and its int16 low half, 8 bytes/param instead of the fp32 master's 10 (4 + 4 + the param write).
template <int GD, bool AMS>
inline __attribute__((always_inline)) void update_span_split(const ParamPtrs& t, const AdamWScalars& s,
                                                             int64_t start, int64_t len) {
  using G = Elem<GD>;
  auto* p = static_cast<uint16_t*>(t.p) + start;
  const auto* g = static_cast<const typename G::T*>(t.g) + start;
  int16_t* lo = t.lo + start;
  float* m = t.m + start;
  float* v = t.v + start;
  float* vm = AMS ? t.vmax + start : nullptr;
  const AdamWScalars sc = s;
#pragma omp simd simdlen(16)
  for (int64_t i = 0; i < len; ++i) {
    uint16_t hi = p[i];
    int16_t l = lo[i];
    float mi = m[i], vi = v[i];
    float vmi = AMS ? vm[i] : 0.0f;
    adamw_update_split<AMS>(hi, l, G::load(g, i), mi, vi, vmi, sc);
    m[i] = mi;
    v[i] = vi;
    if (AMS) vm[i] = vmi;
    p[i] = hi;
    lo[i] = l;
  }
}

template <int PD, int GD>
inline __attribute__((always_inline)) void update_dt(const ParamPtrs& t, const AdamWScalars& s,
                                                     int64_t start, int64_t len) {
  if (PD == kBFloat16 && t.lo != nullptr) {
    if (t.amsgrad) update_span_split<GD, true>(t, s, start, len);
    else update_span_split<GD, false>(t, s, start, len);
    return;
  }
  const bool master = t.master != nullptr;
  if (t.amsgrad) {
    if (master) update_span<PD, GD, true, true>(t, s, start, len);
    else update_span<PD, GD, true, false>(t, s, start, len);
  } else {
    if (master) update_span<PD, GD, false, true>(t, s, start, len);
    else update_span<PD, GD, false, false>(t, s, start, len);
  }
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void update_chunk(const ParamPtrs& t, const AdamWScalars& s, int64_t start, int64_t len) {
  // Grads are either the param dtype or fp32; fp32 params have fp32 grads (checked in Python).
  if (t.pdt == kFloat32) {
    update_dt<kFloat32, kFloat32>(t, s, start, len);
  } else if (t.pdt == kBFloat16) {
    if (t.gdt == kBFloat16) update_dt<kBFloat16, kBFloat16>(t, s, start, len);
    else update_dt<kBFloat16, kFloat32>(t, s, start, len);
  } else {
    if (t.gdt == kFloat16) update_dt<kFloat16, kFloat16>(t, s, start, len);
    else update_dt<kFloat16, kFloat32>(t, s, start, len);
  }
}

// Threads for `elems` elements of work: one per 256K elements (~7 MB of AdamW traffic, ~0.2 ms on
// one core). A parallel region costs little on an idle machine but up to ~10 ms when the other
// core is busy (measured: 300 tiny params took 22 ms with 2 threads under load 6, vs 0.1 ms).
inline int threads_for(int64_t elems) {
  int64_t want = elems / (1 << 18);
  int mx = omp_get_max_threads();
  return static_cast<int>(want < 1 ? 1 : (want > mx ? mx : want));
}

// Thread `tid` of `nth` owns chunks [lo, hi): contiguous ranges, identical in both passes.
inline void thread_range(int64_t n, int tid, int nth, int64_t& lo, int64_t& hi) {
  lo = n * tid / nth;
  hi = n * (tid + 1) / nth;
}

double sumsq_impl(const std::vector<uintptr_t>& g, const std::vector<int64_t>& numel,
                  const std::vector<int>& gdt, const std::vector<Chunk>& chunks) {
  const int64_t n = static_cast<int64_t>(chunks.size());
  std::vector<double> part(n, 0.0);
  int64_t elems = 0;
  for (int64_t x : numel) elems += x;
#pragma omp parallel num_threads(threads_for(elems))
  {
    int64_t lo, hi;
    thread_range(n, omp_get_thread_num(), omp_get_num_threads(), lo, hi);
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& k = chunks[c];
      part[c] = sumsq_chunk(reinterpret_cast<const void*>(g[k.tensor]), gdt[k.tensor], k.start, k.len);
    }
  }
  double total = 0.0;
  for (double x : part) total += x;
  return total;
}

void check_sizes(size_t n, std::initializer_list<std::pair<const char*, size_t>> lists) {
  for (auto& kv : lists)
    if (kv.second != n)
      throw std::invalid_argument(std::string("adamw: list '") + kv.first + "' has " +
                                  std::to_string(kv.second) + " entries, expected " + std::to_string(n));
}

// Sum of squares of all elements of the given gradients (fp64 accumulation).
double grad_sumsq(const std::vector<uintptr_t>& g, const std::vector<int64_t>& numel,
                  const std::vector<int>& gdt) {
  check_sizes(g.size(), {{"numel", numel.size()}, {"grad_dtype", gdt.size()}});
  return sumsq_impl(g, numel, gdt, make_chunks(numel));
}

// The fused step. Returns (pre-clip global L2 norm of the unscaled gradients or -1 when not
// clipping, skipped). hparams[k] = (lr, beta1, beta2, eps, weight_decay, amsgrad, maximize) for
// group k; group[i] says which group parameter i belongs to. step[i] points at the float32
// step counter of parameter i, incremented here unless the step is skipped. master[i] is 0 (no
// master), an fp32 master, or with master_split[i] != 0 the int16 low half of a bf16 param's split
// master (empty master_split: no split masters).
py::tuple adamw_step(const std::vector<uintptr_t>& p, const std::vector<uintptr_t>& g,
                     const std::vector<uintptr_t>& m, const std::vector<uintptr_t>& v,
                     const std::vector<uintptr_t>& vmax, const std::vector<uintptr_t>& master,
                     const std::vector<uintptr_t>& step, const std::vector<int64_t>& numel,
                     const std::vector<int>& pdt, const std::vector<int>& gdt,
                     const std::vector<int>& group,
                     const std::vector<std::tuple<double, double, double, double, double, bool, bool>>& hparams,
                     double max_norm, double inv_grad_scale, const std::vector<int>& master_split) {
  const size_t n = p.size();
  if (!master_split.empty()) check_sizes(n, {{"master_split", master_split.size()}});
  check_sizes(n, {{"grad", g.size()}, {"exp_avg", m.size()}, {"exp_avg_sq", v.size()},
                  {"max_exp_avg_sq", vmax.size()}, {"master", master.size()}, {"step", step.size()},
                  {"numel", numel.size()}, {"param_dtype", pdt.size()}, {"grad_dtype", gdt.size()},
                  {"group", group.size()}});
  for (size_t i = 0; i < n; ++i)
    if (group[i] < 0 || static_cast<size_t>(group[i]) >= hparams.size())
      throw std::invalid_argument("adamw: group index out of range for parameter " + std::to_string(i));
  for (size_t i = 0; i < master_split.size(); ++i)
    if (master_split[i] && (pdt[i] != kBFloat16 || (master[i] == 0 && numel[i] != 0)))
      throw std::invalid_argument("adamw: parameter " + std::to_string(i) +
                                  " has a split master but is not bf16 or has no master pointer");
  std::vector<Chunk> chunks = make_chunks(numel);
  double norm = -1.0, mult = inv_grad_scale;
  bool skipped = false;
  {
    py::gil_scoped_release nogil;
    if (max_norm >= 0.0) {
      norm = std::sqrt(sumsq_impl(g, numel, gdt, chunks)) * inv_grad_scale;
      skipped = !std::isfinite(norm);
      // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1 (fp32 tensor maths)
      float coef = static_cast<float>(max_norm) / (static_cast<float>(norm) + 1e-6f);
      mult = inv_grad_scale * static_cast<double>(coef < 1.0f ? coef : 1.0f);
    }
    if (!skipped) {
      std::vector<AdamWScalars> sc(n);
      std::vector<ParamPtrs> tp(n);
      for (size_t i = 0; i < n; ++i) {
        const auto& h = hparams[group[i]];
        float* st = reinterpret_cast<float*>(step[i]);
        *st += 1.0f;  // torch: step_t += 1 on a float32 tensor
        sc[i] = adamw_scalars(std::get<0>(h), std::get<1>(h), std::get<2>(h), std::get<3>(h),
                              std::get<4>(h), static_cast<double>(*st), mult, std::get<6>(h));
        const bool split = !master_split.empty() && master_split[i] != 0;
        tp[i] = {reinterpret_cast<void*>(p[i]), reinterpret_cast<const void*>(g[i]),
                 reinterpret_cast<float*>(m[i]), reinterpret_cast<float*>(v[i]),
                 std::get<5>(h) ? reinterpret_cast<float*>(vmax[i]) : nullptr,
                 split ? nullptr : reinterpret_cast<float*>(master[i]),
                 split ? reinterpret_cast<int16_t*>(master[i]) : nullptr, pdt[i], gdt[i], std::get<5>(h)};
      }
      const int64_t nc = static_cast<int64_t>(chunks.size());
      int64_t elems = 0;
      for (int64_t x : numel) elems += x;
#pragma omp parallel num_threads(threads_for(elems))
      {
        int64_t lo, hi;
        thread_range(nc, omp_get_thread_num(), omp_get_num_threads(), lo, hi);
        for (int64_t c = lo; c < hi; ++c) {
          const Chunk& k = chunks[c];
          update_chunk(tp[k.tensor], sc[k.tensor], k.start, k.len);
        }
      }
    }
  }
  return py::make_tuple(norm, skipped);
}

}  // namespace

void register_adamw(py::module_& m) {
  m.def("adamw_grad_sumsq", &grad_sumsq, py::arg("grads"), py::arg("numel"), py::arg("grad_dtype"),
        py::call_guard<py::gil_scoped_release>(),
        "Sum of squares (fp64) of all elements of a list of contiguous gradients given as pointers.");
  m.def("adamw_step", &adamw_step, py::arg("params"), py::arg("grads"), py::arg("exp_avg"),
        py::arg("exp_avg_sq"), py::arg("max_exp_avg_sq"), py::arg("master"), py::arg("step"),
        py::arg("numel"), py::arg("param_dtype"), py::arg("grad_dtype"), py::arg("group"),
        py::arg("hparams"), py::arg("max_norm"), py::arg("inv_grad_scale"),
        py::arg("master_split") = std::vector<int>{},
        "Fused clip + AdamW step over all parameters; returns (pre-clip norm or -1, skipped).");
  m.def("adamw_num_threads", []() { return omp_get_max_threads(); });
}

}  // namespace fastft
