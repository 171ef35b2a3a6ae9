// Fused AdamW + global gradient norm on CUDA: multi-tensor launches in the style of apex's
// multi_tensor_apply. Each launch carries, by value, the pointers of up to kMaxTensors tensors
// and a block -> (tensor, chunk) map for up to kMaxBlocks blocks of kChunk elements, so a model
// with hundreds of parameters needs a handful of launches instead of one per tensor.
//
// Nothing is read back to the host: the skip flag and the grad multiplier (clip coefficient /
// grad scale) are read from `ctrl` (fp32[2]) and the per-tensor bias corrections from `table`
// (fp32[n, 3] = -lr/(1-beta1^t), sqrt(1-beta2^t), 1-lr*wd), prepared on the device by
// fastft/ops/adamw.py. The per-element maths is csrc/include/fastft/adamw.h (shared with the CPU).
// Master kinds (template MK): none, fp32 master, or a split master for bf16 params (w = int16 low
// half of the fp32 master whose high half is the bf16 param; adamw.h adamw_update_split).
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "fastft/adamw.h"
#include "launchers.h"

namespace {

using fastft::AdamWScalars;
using fastft::Elem;

constexpr int kMaxTensors = 24;   // 7 pointer arrays * 24 * 8 B + maps < 4 KiB kernel params
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 65536;  // elements per block
constexpr int kThreads = 512;
enum MasterKind : int { kNoMaster = 0, kFp32Master = 1, kSplitMaster = 2 };

struct AdamWMeta {
  void* p[kMaxTensors];
  const void* g[kMaxTensors];
  float* m[kMaxTensors];
  float* v[kMaxTensors];
  float* vmax[kMaxTensors];
  void* w[kMaxTensors];  // float* master, int16_t* split low half, or unused
  const float* tab[kMaxTensors];
  int64_t n[kMaxTensors];
  unsigned char tensor_of_block[kMaxBlocks];
  int chunk_of_block[kMaxBlocks];
};

struct SumsqMeta {
  const void* g[kMaxTensors];
  int64_t n[kMaxTensors];
  unsigned char tensor_of_block[kMaxBlocks];
  int chunk_of_block[kMaxBlocks];
};

template <int PD, int GD, bool AMS, int MK>
__global__ void __launch_bounds__(kThreads)
adamw_mt_kernel(AdamWMeta meta, const float* __restrict__ ctrl, float w1, float beta2, float omb2,
                float eps, bool maximize) {
  if (ctrl[0] != 0.0f) return;  // skipped step (non-finite norm / found_inf): write nothing
  using P = Elem<PD>;
  using G = Elem<GD>;
  const int t = meta.tensor_of_block[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.chunk_of_block[blockIdx.x]) * kChunk;
  const int64_t end = min(meta.n[t], start + kChunk);
  const float* tab = meta.tab[t];
  AdamWScalars s;
  s.neg_step = tab[0];
  s.bc2_sqrt = tab[1];
  s.decay = tab[2];
  s.w1 = w1;
  s.beta2 = beta2;
  s.omb2 = omb2;
  s.eps = eps;
  s.grad_mult = maximize ? -ctrl[1] : ctrl[1];
  auto* p = static_cast<typename P::T*>(meta.p[t]);
  const auto* g = static_cast<const typename G::T*>(meta.g[t]);
  float* m = meta.m[t];
  float* v = meta.v[t];
  float* vm = meta.vmax[t];
  if constexpr (MK == kSplitMaster) {
    static_assert(PD == fastft::kBFloat16, "split masters are for bf16 params only");
    auto* lo = static_cast<int16_t*>(meta.w[t]);
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
      uint16_t hi = p[i];
      int16_t l = lo[i];
      float mi = m[i], vi = v[i];
      float vmi = AMS ? vm[i] : 0.0f;
      fastft::adamw_update_split<AMS>(hi, l, G::load(g, i), mi, vi, vmi, s);
      m[i] = mi;
      v[i] = vi;
      if (AMS) vm[i] = vmi;
      p[i] = hi;
      lo[i] = l;
    }
    return;
  }
  constexpr bool MASTER = MK == kFp32Master;
  float* w = static_cast<float*>(meta.w[t]);
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    float pv = MASTER ? w[i] : P::load(p, i);
    float mi = m[i], vi = v[i];
    float vmi = AMS ? vm[i] : 0.0f;
    float out = fastft::adamw_update<AMS>(pv, G::load(g, i), mi, vi, vmi, s);
    m[i] = mi;
    v[i] = vi;
    if (AMS) vm[i] = vmi;
    if (MASTER) w[i] = out;
    P::store(p, i, out);
  }
}

template <int GD>
__global__ void __launch_bounds__(kThreads)
sumsq_mt_kernel(SumsqMeta meta, double* __restrict__ partial) {
  using G = Elem<GD>;
  __shared__ double red[kThreads / 32];
  const int t = meta.tensor_of_block[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.chunk_of_block[blockIdx.x]) * kChunk;
  const int64_t end = min(meta.n[t], start + kChunk);
  const auto* g = static_cast<const typename G::T*>(meta.g[t]);
  float acc = 0.0f;  // <= 128 elements per thread in fp32, then fp64 across threads and blocks
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    float x = G::load(g, i);
    acc += x * x;
  }
  double d = acc;
  for (int off = 16; off > 0; off >>= 1) d += __shfl_down_sync(0xffffffffu, d, off);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = d;
  __syncthreads();
  if (threadIdx.x < 32) {
    d = threadIdx.x < kThreads / 32 ? red[threadIdx.x] : 0.0;
    for (int off = 16; off > 0; off >>= 1) d += __shfl_down_sync(0xffffffffu, d, off);
    if (threadIdx.x == 0) partial[blockIdx.x] = d;
  }
}

template <int PD, int GD, bool AMS, int MK>
int launch_adamw(const std::vector<int>& idx, const uintptr_t* p, const uintptr_t* g,
                 const uintptr_t* m, const uintptr_t* v, const uintptr_t* vmax, const uintptr_t* w,
                 const int64_t* numel, const float* table, const float* ctrl, float w1, float beta2,
                 float omb2, float eps, bool maximize, cudaStream_t stream) {
  AdamWMeta meta;
  int nt = 0, nb = 0;
  for (size_t k = 0; k < idx.size(); ++k) {
    const int i = idx[k];
    if (numel[i] == 0) continue;
    meta.p[nt] = reinterpret_cast<void*>(p[i]);
    meta.g[nt] = reinterpret_cast<const void*>(g[i]);
    meta.m[nt] = reinterpret_cast<float*>(m[i]);
    meta.v[nt] = reinterpret_cast<float*>(v[i]);
    meta.vmax[nt] = reinterpret_cast<float*>(vmax[i]);
    meta.w[nt] = reinterpret_cast<void*>(w[i]);
    meta.tab[nt] = table + 3 * i;
    meta.n[nt] = numel[i];
    const int64_t chunks = (numel[i] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.tensor_of_block[nb] = static_cast<unsigned char>(nt);
      meta.chunk_of_block[nb] = static_cast<int>(c);
      ++nb;
      const bool last_chunk = c == chunks - 1;
      if (nb == kMaxBlocks || (last_chunk && nt + 1 == kMaxTensors)) {
        adamw_mt_kernel<PD, GD, AMS, MK><<<nb, kThreads, 0, stream>>>(meta, ctrl, w1, beta2, omb2, eps, maximize);
        nb = 0;
        if (last_chunk) {
          nt = -1;  // tensor finished: start a fresh tensor list
        } else {    // same tensor continues in the next launch as entry 0
          meta.p[0] = meta.p[nt]; meta.g[0] = meta.g[nt]; meta.m[0] = meta.m[nt]; meta.v[0] = meta.v[nt];
          meta.vmax[0] = meta.vmax[nt]; meta.w[0] = meta.w[nt]; meta.tab[0] = meta.tab[nt]; meta.n[0] = meta.n[nt];
          nt = 0;
          continue;
        }
      }
    }
    ++nt;
  }
  if (nb > 0) adamw_mt_kernel<PD, GD, AMS, MK><<<nb, kThreads, 0, stream>>>(meta, ctrl, w1, beta2, omb2, eps, maximize);
  return static_cast<int>(cudaGetLastError());
}

template <int PD, int GD, int MK>
int launch_adamw_ams(bool ams, const std::vector<int>& idx, const uintptr_t* p, const uintptr_t* g,
                     const uintptr_t* m, const uintptr_t* v, const uintptr_t* vmax, const uintptr_t* w,
                     const int64_t* numel, const float* table, const float* ctrl, float w1, float beta2,
                     float omb2, float eps, bool maximize, cudaStream_t st) {
  if (ams) return launch_adamw<PD, GD, true, MK>(idx, p, g, m, v, vmax, w, numel, table, ctrl, w1, beta2, omb2, eps, maximize, st);
  return launch_adamw<PD, GD, false, MK>(idx, p, g, m, v, vmax, w, numel, table, ctrl, w1, beta2, omb2, eps, maximize, st);
}

template <int PD, int GD>
int launch_adamw_flags(bool ams, int mk, const std::vector<int>& idx, const uintptr_t* p,
                       const uintptr_t* g, const uintptr_t* m, const uintptr_t* v,
                       const uintptr_t* vmax, const uintptr_t* w, const int64_t* numel,
                       const float* table, const float* ctrl, float w1, float beta2, float omb2,
                       float eps, bool maximize, cudaStream_t st) {
  if (mk == kSplitMaster) {
    if constexpr (PD == fastft::kBFloat16)
      return launch_adamw_ams<PD, GD, kSplitMaster>(ams, idx, p, g, m, v, vmax, w, numel, table, ctrl, w1, beta2, omb2, eps, maximize, st);
    return -1;  // split masters are for bf16 params only (validated in Python)
  }
  if (mk == kFp32Master)
    return launch_adamw_ams<PD, GD, kFp32Master>(ams, idx, p, g, m, v, vmax, w, numel, table, ctrl, w1, beta2, omb2, eps, maximize, st);
  return launch_adamw_ams<PD, GD, kNoMaster>(ams, idx, p, g, m, v, vmax, w, numel, table, ctrl, w1, beta2, omb2, eps, maximize, st);
}

template <int GD>
int launch_sumsq(const std::vector<int>& idx, const uintptr_t* g, const int64_t* numel,
                 double* partial, cudaStream_t stream) {
  SumsqMeta meta;
  int nt = 0, nb = 0;
  for (int i : idx) {
    if (numel[i] == 0) continue;
    meta.g[nt] = reinterpret_cast<const void*>(g[i]);
    meta.n[nt] = numel[i];
    const int64_t chunks = (numel[i] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.tensor_of_block[nb] = static_cast<unsigned char>(nt);
      meta.chunk_of_block[nb] = static_cast<int>(c);
      ++nb;
      const bool last_chunk = c == chunks - 1;
      if (nb == kMaxBlocks || (last_chunk && nt + 1 == kMaxTensors)) {
        sumsq_mt_kernel<GD><<<nb, kThreads, 0, stream>>>(meta, partial);
        partial += nb;
        nb = 0;
        if (last_chunk) {
          nt = -1;
        } else {
          meta.g[0] = meta.g[nt];
          meta.n[0] = meta.n[nt];
          nt = 0;
          continue;
        }
      }
    }
    ++nt;
  }
  if (nb > 0) sumsq_mt_kernel<GD><<<nb, kThreads, 0, stream>>>(meta, partial);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int64_t fastft_cuda_adamw_chunk_size() { return kChunk; }

extern "C" int fastft_cuda_adamw_sumsq(int n, const uintptr_t* g, const int64_t* numel,
                                       const int* gdt, uintptr_t partial, uintptr_t stream) {
  // partial: fp64[sum_i ceil(numel_i / kChunk)], one entry per block, grads grouped by dtype.
  auto* out = reinterpret_cast<double*>(partial);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  for (int dt = 0; dt < 3; ++dt) {
    std::vector<int> idx;
    int64_t blocks = 0;
    for (int i = 0; i < n; ++i)
      if (gdt[i] == dt) { idx.push_back(i); blocks += (numel[i] + kChunk - 1) / kChunk; }
    if (idx.empty()) continue;
    int err = dt == fastft::kFloat32 ? launch_sumsq<fastft::kFloat32>(idx, g, numel, out, st)
            : dt == fastft::kBFloat16 ? launch_sumsq<fastft::kBFloat16>(idx, g, numel, out, st)
                                      : launch_sumsq<fastft::kFloat16>(idx, g, numel, out, st);
    if (err) return err;
    out += blocks;
  }
  return 0;
}

extern "C" int fastft_cuda_adamw_step(int n, const uintptr_t* p, const uintptr_t* g, const uintptr_t* m,
                                      const uintptr_t* v, const uintptr_t* vmax, const uintptr_t* w,
                                      const int64_t* numel, const int* pdt, const int* gdt,
                                      uintptr_t table, uintptr_t ctrl, float w1, float beta2,
                                      float eps, int amsgrad, int maximize, uintptr_t stream,
                                      const int* master_split) {
  const auto* tab = reinterpret_cast<const float*>(table);
  const auto* ctl = reinterpret_cast<const float*>(ctrl);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const float omb2 = 1.0f - beta2;
  // One template instance per (param dtype, grad dtype, master kind) combination present.
  // master_split may be null (no split masters).
  auto kind = [&](int i) {
    if (w[i] == 0) return static_cast<int>(kNoMaster);
    return master_split != nullptr && master_split[i] ? static_cast<int>(kSplitMaster)
                                                      : static_cast<int>(kFp32Master);
  };
  for (int pd = 0; pd < 3; ++pd)
    for (int gd = 0; gd < 3; ++gd)
      for (int mk = 0; mk < 3; ++mk) {
        std::vector<int> idx;
        for (int i = 0; i < n; ++i)
          if (pdt[i] == pd && gdt[i] == gd && kind(i) == mk) idx.push_back(i);
        if (idx.empty()) continue;
        const bool ams = amsgrad != 0, mx = maximize != 0;
        const int master = mk;
        int err = 0;
        if (pd == fastft::kFloat32 && gd == fastft::kFloat32)
          err = launch_adamw_flags<fastft::kFloat32, fastft::kFloat32>(ams, kNoMaster, idx, p, g, m, v, vmax, w, numel, tab, ctl, w1, beta2, omb2, eps, mx, st);
        else if (pd == fastft::kBFloat16 && gd == fastft::kBFloat16)
          err = launch_adamw_flags<fastft::kBFloat16, fastft::kBFloat16>(ams, master, idx, p, g, m, v, vmax, w, numel, tab, ctl, w1, beta2, omb2, eps, mx, st);
        else if (pd == fastft::kBFloat16 && gd == fastft::kFloat32)
          err = launch_adamw_flags<fastft::kBFloat16, fastft::kFloat32>(ams, master, idx, p, g, m, v, vmax, w, numel, tab, ctl, w1, beta2, omb2, eps, mx, st);
        else if (pd == fastft::kFloat16 && gd == fastft::kFloat16)
          err = launch_adamw_flags<fastft::kFloat16, fastft::kFloat16>(ams, master, idx, p, g, m, v, vmax, w, numel, tab, ctl, w1, beta2, omb2, eps, mx, st);
        else if (pd == fastft::kFloat16 && gd == fastft::kFloat32)
          err = launch_adamw_flags<fastft::kFloat16, fastft::kFloat32>(ams, master, idx, p, g, m, v, vmax, w, numel, tab, ctl, w1, beta2, omb2, eps, mx, st);
        else
          return -1;  // unsupported dtype combination (validated in Python)
        if (err) return err;
      }
  return 0;
}
