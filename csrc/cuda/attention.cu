// Causal GQA attention forward and backward on CUDA: simple shared-memory tiled kernels with fp32
// accumulation (maths in fastft/ops/attention.py; per-element helpers attn_prob / attn_dscore /
// attn_lse in csrc/include/fastft/attention.h, which the CPU build and its tests share).
//
// Tiles: BT query rows and BT key rows (32 for head dims <= 128, 16 up to 256), held as fp32 in
// dynamic shared memory (at most 75 KB, dK/dV at D = 128: under the 99 KB of sm_86/89) with an
// odd row stride (D | 1) so the 32 lanes reading 32 different key rows hit 32 banks. 128 threads
// per block; accumulators of a (BT x D) tile live in registers, TPR = 128 / BT consecutive lanes
// per row, lane l holding columns l, l + TPR, ... (DMAX / TPR of them: DMAX = 64/128/256 is the
// compile-time bound on D).
//
// * forward: one block per (batch * query head, query tile); online softmax over the key tiles up
//   to the diagonal; writes out and the fp32 lse.
// * dK/dV: one block per (batch * kv head, key tile), looping over the G query heads of the group
//   and the query tiles at or below the diagonal, so a block owns its dK/dV rows (no atomics);
//   delta_i = do_i . o_i is recomputed per query tile (no scratch buffer to allocate).
// * dQ: one block per (batch * query head, query tile), looping over the key tiles up to the
//   diagonal.
// * packed rows: optional (B, T) int32 tables of each token's sample start and end
//   (fastft/ops/segments.py; nullptr = plain causal). Key loops start at the tile holding the
//   query tile's first sample start (starts never decrease along a row) and the dK/dV query loop
//   stops at the end of the key tile's last sample, so tiles wholly across a sample boundary are
//   never visited; inside a tile key j is visible to query i iff start[i] <= j <= i.
// Written for correctness and clarity, not peak speed (no tensor cores). It has never run on a GPU
// (none on the development machine): tests/test_attention_cuda_emulated.py runs this file on CPU
// threads through a small CUDA emulation (tests/cuda_emu/) against the reference. The Triton
// kernels (kernels/attention.py) come first in fastft/_backend.py.
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "attention_launchers.h"
#include "fastft/adamw.h"      // Elem<>: per-dtype load/store
#include "fastft/attention.h"  // attn_prob, attn_dscore, attn_lse

namespace {

using fastft::Elem;

constexpr int kThreads = 128;
constexpr int kMaxHeadDim = 256;

struct Str {
  int64_t b, h, t;
};

template <int DMAX>
struct Cfg {
  static constexpr int BT = DMAX <= 128 ? 32 : 16;  // rows per tile (queries and keys)
  static constexpr int TPR = kThreads / BT;          // threads per accumulator row
  static constexpr int NC = DMAX / TPR;              // accumulator columns per thread
};

// Reductions over the TPR consecutive lanes that share a row.
template <int TPR>
__device__ __forceinline__ float row_max(float v) {
#pragma unroll
  for (int o = TPR / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <int TPR>
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
  for (int o = TPR / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// rows x D elements at src (row stride st) -> fp32 dst[r * ld + d]; rows >= valid are zeroed so
// the tile GEMMs can run over whole tiles.
template <int DT>
__device__ void load_tile(const typename Elem<DT>::T* src, int64_t st, int rows, int valid, int D, float* dst,
                          int ld) {
  for (int e = threadIdx.x; e < rows * D; e += kThreads) {
    const int r = e / D, d = e % D;
    dst[r * ld + d] = r < valid ? Elem<DT>::load(src, r * st + d) : 0.0f;
  }
}

// First key query i may see: its sample's start (0 without a table; T past the end, seeing nothing).
__device__ __forceinline__ int key_start(const int* seg_start, int64_t b, int T, int i) {
  return seg_start == nullptr ? 0 : (i < T ? seg_start[b * T + i] : T);
}

__device__ __forceinline__ float dot_rows(const float* a, const float* b, int D) {
  float s = 0.0f;
  for (int d = 0; d < D; ++d) s = fmaf(a[d], b[d], s);
  return s;
}

// Row i's delta = do_i . o_i (o as stored) by the TPR lanes of row r; do from shared memory, 0
// for padding rows (valid == false). Every lane must call it: the shuffles use the full mask.
template <int DT, int TPR>
__device__ __forceinline__ float row_delta(const typename Elem<DT>::T* o_row, const float* do_row, int D, int lane,
                                           bool valid) {
  float s = 0.0f;
  if (valid)
    for (int d = lane; d < D; d += TPR) s = fmaf(Elem<DT>::load(o_row, d), do_row[d], s);
  return row_sum<TPR>(s);
}

template <int DT, int DMAX>
__global__ void __launch_bounds__(kThreads)
attn_fwd_kernel(const typename Elem<DT>::T* __restrict__ q, Str qs, const typename Elem<DT>::T* __restrict__ k, Str ks,
                const typename Elem<DT>::T* __restrict__ v, Str vs, typename Elem<DT>::T* __restrict__ o, Str os,
                float* __restrict__ lse, const int* __restrict__ seg_start, int Hq, int G, int T, int D, int tiles,
                float scale) {
  using C = Cfg<DMAX>;
  constexpr int BT = C::BT, TPR = C::TPR, NC = C::NC;
  extern __shared__ float sm[];
  const int ld = D | 1, lds = BT + 1;
  float* sq = sm;             // BT x ld: the query tile
  float* skv = sq + BT * ld;  // BT x ld: a key tile, then the value tile
  float* sp = skv + BT * ld;  // BT x lds: scores, then probabilities
  const int64_t bh = blockIdx.x / tiles;
  const int i0 = static_cast<int>(blockIdx.x % tiles) * BT;
  const int64_t b = bh / Hq, h = bh % Hq, hk = h / G;
  const int r = threadIdx.x / TPR, lane = threadIdx.x % TPR;
  load_tile<DT>(q + b * qs.b + h * qs.h + i0 * qs.t, qs.t, BT, min(BT, T - i0), D, sq, ld);
  const auto* kh = k + b * ks.b + hk * ks.h;
  const auto* vh = v + b * vs.b + hk * vs.h;
  float acc[NC];
#pragma unroll
  for (int c = 0; c < NC; ++c) acc[c] = 0.0f;
  // running max of scaled scores, running sum of exp(s - m); -FLT_MAX (not -inf) keeps a row that
  // has seen no key yet (its sample starts in a later tile) at alpha = 1, l = 0, acc = 0
  float m = -FLT_MAX, l = 0.0f;
  const int kend = min(T, i0 + BT);  // keys past the tile's last query are masked for all its rows
  const int kbeg = key_start(seg_start, b, T, i0) / BT * BT;  // earlier key tiles: all masked
  const int my_start = key_start(seg_start, b, T, i0 + r);
  for (int j0 = kbeg; j0 < kend; j0 += BT) {
    __syncthreads();  // the previous tile's value reads are done
    load_tile<DT>(kh + j0 * ks.t, ks.t, BT, min(BT, T - j0), D, skv, ld);
    __syncthreads();
    for (int e = threadIdx.x; e < BT * BT; e += kThreads) {
      const int rr = e / BT, jj = e % BT;
      const bool vis = j0 + jj <= i0 + rr && j0 + jj < T && j0 + jj >= key_start(seg_start, b, T, i0 + rr);
      sp[rr * lds + jj] = vis ? dot_rows(sq + rr * ld, skv + jj * ld, D) : 0.0f;
    }
    __syncthreads();
    float mx = -FLT_MAX;
    for (int jj = lane; jj < BT; jj += TPR)
      if (j0 + jj <= i0 + r && j0 + jj < T && j0 + jj >= my_start) mx = fmaxf(mx, sp[r * lds + jj] * scale);
    const float m_new = fmaxf(m, row_max<TPR>(mx));
    const float alpha = fastft::ce_exp(m - m_new);
    float sum = 0.0f;
    for (int jj = lane; jj < BT; jj += TPR) {
      const bool vis = j0 + jj <= i0 + r && j0 + jj < T && j0 + jj >= my_start;
      const float p = vis ? fastft::attn_prob(sp[r * lds + jj], scale, m_new) : 0.0f;
      sp[r * lds + jj] = p;
      sum += p;
    }
    l = l * alpha + row_sum<TPR>(sum);
    m = m_new;
    __syncthreads();  // probabilities written, key reads done
    load_tile<DT>(vh + j0 * vs.t, vs.t, BT, min(BT, T - j0), D, skv, ld);
    __syncthreads();
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[c] *= alpha;
    for (int jj = 0; jj < BT; ++jj) {
      const float p = sp[r * lds + jj];
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const int d = lane + TPR * c;
        if (d < D) acc[c] = fmaf(p, skv[jj * ld + d], acc[c]);
      }
    }
  }
  const int i = i0 + r;
  if (i < T) {
    auto* orow = o + b * os.b + h * os.h + i * os.t;
    const float inv = 1.0f / l;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int d = lane + TPR * c;
      if (d < D) Elem<DT>::store(orow, d, acc[c] * inv);
    }
    if (lane == 0) lse[bh * T + i] = fastft::attn_lse(m, l);
  }
}

template <int DT, int DMAX>
__global__ void __launch_bounds__(kThreads)
attn_bwd_dkdv_kernel(const typename Elem<DT>::T* __restrict__ q, Str qs, const typename Elem<DT>::T* __restrict__ k,
                     Str ks, const typename Elem<DT>::T* __restrict__ v, Str vs,
                     const typename Elem<DT>::T* __restrict__ o, Str os, const typename Elem<DT>::T* __restrict__ dout,
                     Str dos, const float* __restrict__ lse, typename Elem<DT>::T* __restrict__ dk, Str dks,
                     typename Elem<DT>::T* __restrict__ dv, Str dvs, const int* __restrict__ seg_start,
                     const int* __restrict__ seg_end, int Hq, int Hkv, int G, int T, int D, int tiles, float scale) {
  using C = Cfg<DMAX>;
  constexpr int BT = C::BT, TPR = C::TPR, NC = C::NC;
  extern __shared__ float sm[];
  const int ld = D | 1, lds = BT + 1;
  float* sk = sm;               // BT x ld each
  float* sv = sk + BT * ld;
  float* sq = sv + BT * ld;
  float* sdo = sq + BT * ld;
  float* sp = sdo + BT * ld;    // BT (queries) x lds (keys): probabilities
  float* sds = sp + BT * lds;   // score gradients
  float* slse = sds + BT * lds; // BT
  float* sdelta = slse + BT;    // BT
  const int64_t bhk = blockIdx.x / tiles;
  const int j0 = static_cast<int>(blockIdx.x % tiles) * BT;
  const int64_t b = bhk / Hkv, hk = bhk % Hkv;
  const int r = threadIdx.x / TPR, lane = threadIdx.x % TPR;  // r: this thread's key row
  load_tile<DT>(k + b * ks.b + hk * ks.h + j0 * ks.t, ks.t, BT, min(BT, T - j0), D, sk, ld);
  load_tile<DT>(v + b * vs.b + hk * vs.h + j0 * vs.t, vs.t, BT, min(BT, T - j0), D, sv, ld);
  float dka[NC], dva[NC];
#pragma unroll
  for (int c = 0; c < NC; ++c) dka[c] = dva[c] = 0.0f;
  for (int g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    const auto* qh = q + b * qs.b + h * qs.h;
    const auto* oh = o + b * os.b + h * os.h;
    const auto* doh = dout + b * dos.b + h * dos.h;
    const float* lse_h = lse + (b * Hq + h) * T;
    // tiles are aligned: the first one seeing key j0 starts at j0; the last ends the last key's sample
    const int qend = seg_end == nullptr ? T : seg_end[b * T + min(j0 + BT, T) - 1];
    for (int i0 = j0; i0 < qend; i0 += BT) {
      const int rows = min(BT, T - i0);
      __syncthreads();  // the previous tile's reads are done
      load_tile<DT>(qh + i0 * qs.t, qs.t, BT, rows, D, sq, ld);
      load_tile<DT>(doh + i0 * dos.t, dos.t, BT, rows, D, sdo, ld);
      __syncthreads();
      {  // here r indexes query rows
        const int i = i0 + r;
        const float dl = row_delta<DT, TPR>(oh + i * os.t, sdo + r * ld, D, lane, i < T);
        if (lane == 0) {
          sdelta[r] = dl;
          slse[r] = i < T ? lse_h[i] : 0.0f;
        }
      }
      __syncthreads();
      for (int e = threadIdx.x; e < BT * BT; e += kThreads) {
        const int rr = e / BT, jj = e % BT;  // query rr, key jj
        float p = 0.0f, ds = 0.0f;
        if (j0 + jj <= i0 + rr && i0 + rr < T && j0 + jj >= key_start(seg_start, b, T, i0 + rr)) {
          p = fastft::attn_prob(dot_rows(sq + rr * ld, sk + jj * ld, D), scale, slse[rr]);
          ds = fastft::attn_dscore(p, dot_rows(sdo + rr * ld, sv + jj * ld, D), sdelta[rr], scale);
        }
        sp[rr * lds + jj] = p;
        sds[rr * lds + jj] = ds;
      }
      __syncthreads();
      // dV_j += sum_i p_ij do_i;  dK_j += sum_i ds_ij q_i
      for (int rr = 0; rr < BT; ++rr) {
        const float p = sp[rr * lds + r], ds = sds[rr * lds + r];
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          const int d = lane + TPR * c;
          if (d < D) {
            dva[c] = fmaf(p, sdo[rr * ld + d], dva[c]);
            dka[c] = fmaf(ds, sq[rr * ld + d], dka[c]);
          }
        }
      }
    }
  }
  const int j = j0 + r;
  if (j < T) {
    auto* dkrow = dk + b * dks.b + hk * dks.h + j * dks.t;
    auto* dvrow = dv + b * dvs.b + hk * dvs.h + j * dvs.t;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int d = lane + TPR * c;
      if (d < D) {
        Elem<DT>::store(dkrow, d, dka[c]);
        Elem<DT>::store(dvrow, d, dva[c]);
      }
    }
  }
}

template <int DT, int DMAX>
__global__ void __launch_bounds__(kThreads)
attn_bwd_dq_kernel(const typename Elem<DT>::T* __restrict__ q, Str qs, const typename Elem<DT>::T* __restrict__ k,
                   Str ks, const typename Elem<DT>::T* __restrict__ v, Str vs,
                   const typename Elem<DT>::T* __restrict__ o, Str os, const typename Elem<DT>::T* __restrict__ dout,
                   Str dos, const float* __restrict__ lse, typename Elem<DT>::T* __restrict__ dq, Str dqs,
                   const int* __restrict__ seg_start, int Hq, int G, int T, int D, int tiles, float scale) {
  using C = Cfg<DMAX>;
  constexpr int BT = C::BT, TPR = C::TPR, NC = C::NC;
  extern __shared__ float sm[];
  const int ld = D | 1, lds = BT + 1;
  float* sq = sm;               // BT x ld each
  float* sdo = sq + BT * ld;
  float* sk = sdo + BT * ld;
  float* sv = sk + BT * ld;
  float* sds = sv + BT * ld;    // BT (queries) x lds (keys)
  float* slse = sds + BT * lds; // BT
  float* sdelta = slse + BT;    // BT
  const int64_t bh = blockIdx.x / tiles;
  const int i0 = static_cast<int>(blockIdx.x % tiles) * BT;
  const int64_t b = bh / Hq, h = bh % Hq, hk = h / G;
  const int r = threadIdx.x / TPR, lane = threadIdx.x % TPR;  // r: this thread's query row
  const int i = i0 + r;
  const int rows = min(BT, T - i0);
  load_tile<DT>(q + b * qs.b + h * qs.h + i0 * qs.t, qs.t, BT, rows, D, sq, ld);
  load_tile<DT>(dout + b * dos.b + h * dos.h + i0 * dos.t, dos.t, BT, rows, D, sdo, ld);
  __syncthreads();
  {
    const float dl = row_delta<DT, TPR>(o + b * os.b + h * os.h + i * os.t, sdo + r * ld, D, lane, i < T);
    if (lane == 0) {
      sdelta[r] = dl;
      slse[r] = i < T ? lse[bh * T + i] : 0.0f;
    }
  }
  const auto* kh = k + b * ks.b + hk * ks.h;
  const auto* vh = v + b * vs.b + hk * vs.h;
  float acc[NC];
#pragma unroll
  for (int c = 0; c < NC; ++c) acc[c] = 0.0f;
  const int kend = min(T, i0 + BT);
  const int kbeg = key_start(seg_start, b, T, i0) / BT * BT;  // as in the forward
  for (int j0 = kbeg; j0 < kend; j0 += BT) {
    __syncthreads();  // the previous tile's reads are done (and sdelta/slse written on the first pass)
    load_tile<DT>(kh + j0 * ks.t, ks.t, BT, min(BT, T - j0), D, sk, ld);
    load_tile<DT>(vh + j0 * vs.t, vs.t, BT, min(BT, T - j0), D, sv, ld);
    __syncthreads();
    for (int e = threadIdx.x; e < BT * BT; e += kThreads) {
      const int rr = e / BT, jj = e % BT;  // query rr, key jj
      float ds = 0.0f;
      if (j0 + jj <= i0 + rr && i0 + rr < T && j0 + jj >= key_start(seg_start, b, T, i0 + rr)) {
        const float p = fastft::attn_prob(dot_rows(sq + rr * ld, sk + jj * ld, D), scale, slse[rr]);
        ds = fastft::attn_dscore(p, dot_rows(sdo + rr * ld, sv + jj * ld, D), sdelta[rr], scale);
      }
      sds[rr * lds + jj] = ds;
    }
    __syncthreads();
    for (int jj = 0; jj < BT; ++jj) {  // dq_i += sum_j ds_ij k_j
      const float ds = sds[r * lds + jj];
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const int d = lane + TPR * c;
        if (d < D) acc[c] = fmaf(ds, sk[jj * ld + d], acc[c]);
      }
    }
  }
  if (i < T) {
    auto* dqrow = dq + b * dqs.b + h * dqs.h + i * dqs.t;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int d = lane + TPR * c;
      if (d < D) Elem<DT>::store(dqrow, d, acc[c]);
    }
  }
}

inline Str str3(const int64_t* s) { return {s[0], s[1], s[2]}; }

// Dynamic shared memory of a kernel; above 48 KB the kernel must opt in.
template <typename K>
int prepare(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return 0;
  return static_cast<int>(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <int DT, int DMAX>
int launch_fwd(uintptr_t q, const int64_t* qs, uintptr_t k, const int64_t* ks, uintptr_t v, const int64_t* vs,
               uintptr_t out, const int64_t* os, uintptr_t lse, int64_t B, int64_t Hq, int64_t Hkv, int64_t T,
               int64_t D, float scale, cudaStream_t st, uintptr_t seg_start) {
  using TT = typename Elem<DT>::T;
  constexpr int BT = Cfg<DMAX>::BT;
  const int ld = static_cast<int>(D) | 1;
  const size_t smem = sizeof(float) * (2 * BT * ld + BT * (BT + 1));
  auto kern = attn_fwd_kernel<DT, DMAX>;
  if (int err = prepare(kern, smem)) return err;
  const int64_t tiles = (T + BT - 1) / BT;
  kern<<<static_cast<unsigned>(B * Hq * tiles), kThreads, smem, st>>>(
      reinterpret_cast<const TT*>(q), str3(qs), reinterpret_cast<const TT*>(k), str3(ks),
      reinterpret_cast<const TT*>(v), str3(vs), reinterpret_cast<TT*>(out), str3(os), reinterpret_cast<float*>(lse),
      reinterpret_cast<const int*>(seg_start), static_cast<int>(Hq), static_cast<int>(Hq / Hkv), static_cast<int>(T), static_cast<int>(D),
      static_cast<int>(tiles), scale);
  return static_cast<int>(cudaGetLastError());
}

template <int DT, int DMAX>
int launch_bwd(uintptr_t q, const int64_t* qs, uintptr_t k, const int64_t* ks, uintptr_t v, const int64_t* vs,
               uintptr_t out, const int64_t* os, uintptr_t dout, const int64_t* dos, uintptr_t lse, uintptr_t dq,
               const int64_t* dqs, uintptr_t dk, const int64_t* dks, uintptr_t dv, const int64_t* dvs, int64_t B,
               int64_t Hq, int64_t Hkv, int64_t T, int64_t D, float scale, cudaStream_t st, uintptr_t seg_start,
               uintptr_t seg_end) {
  using TT = typename Elem<DT>::T;
  constexpr int BT = Cfg<DMAX>::BT;
  const int ld = static_cast<int>(D) | 1;
  const int64_t tiles = (T + BT - 1) / BT;
  const int G = static_cast<int>(Hq / Hkv);
  const auto* qp = reinterpret_cast<const TT*>(q);
  const auto* kp = reinterpret_cast<const TT*>(k);
  const auto* vp = reinterpret_cast<const TT*>(v);
  const auto* op = reinterpret_cast<const TT*>(out);
  const auto* dop = reinterpret_cast<const TT*>(dout);
  const auto* lp = reinterpret_cast<const float*>(lse);

  const size_t smem_kv = sizeof(float) * (4 * BT * ld + 2 * BT * (BT + 1) + 2 * BT);
  auto kv = attn_bwd_dkdv_kernel<DT, DMAX>;
  if (int err = prepare(kv, smem_kv)) return err;
  kv<<<static_cast<unsigned>(B * Hkv * tiles), kThreads, smem_kv, st>>>(
      qp, str3(qs), kp, str3(ks), vp, str3(vs), op, str3(os), dop, str3(dos), lp, reinterpret_cast<TT*>(dk),
      str3(dks), reinterpret_cast<TT*>(dv), str3(dvs), reinterpret_cast<const int*>(seg_start),
      reinterpret_cast<const int*>(seg_end), static_cast<int>(Hq), static_cast<int>(Hkv), G,
      static_cast<int>(T), static_cast<int>(D), static_cast<int>(tiles), scale);
  if (int err = static_cast<int>(cudaGetLastError())) return err;

  const size_t smem_q = sizeof(float) * (4 * BT * ld + BT * (BT + 1) + 2 * BT);
  auto qk = attn_bwd_dq_kernel<DT, DMAX>;
  if (int err = prepare(qk, smem_q)) return err;
  qk<<<static_cast<unsigned>(B * Hq * tiles), kThreads, smem_q, st>>>(
      qp, str3(qs), kp, str3(ks), vp, str3(vs), op, str3(os), dop, str3(dos), lp, reinterpret_cast<TT*>(dq),
      str3(dqs), reinterpret_cast<const int*>(seg_start), static_cast<int>(Hq), G, static_cast<int>(T), static_cast<int>(D), static_cast<int>(tiles), scale);
  return static_cast<int>(cudaGetLastError());
}

// return LAUNCH<DT, DMAX>(args...) for the runtime dtype code and the smallest DMAX in 64/128/256 >= D.
#define FASTFT_ATTN_DISPATCH(LAUNCH, ...)                                                        \
  do {                                                                                           \
    switch (dtype) {                                                                             \
      case fastft::kFloat32:                                                                     \
        return D <= 64 ? LAUNCH<fastft::kFloat32, 64>(__VA_ARGS__)                               \
                       : (D <= 128 ? LAUNCH<fastft::kFloat32, 128>(__VA_ARGS__)                  \
                                   : LAUNCH<fastft::kFloat32, 256>(__VA_ARGS__));                \
      case fastft::kBFloat16:                                                                    \
        return D <= 64 ? LAUNCH<fastft::kBFloat16, 64>(__VA_ARGS__)                              \
                       : (D <= 128 ? LAUNCH<fastft::kBFloat16, 128>(__VA_ARGS__)                 \
                                   : LAUNCH<fastft::kBFloat16, 256>(__VA_ARGS__));               \
      case fastft::kFloat16:                                                                     \
        return D <= 64 ? LAUNCH<fastft::kFloat16, 64>(__VA_ARGS__)                               \
                       : (D <= 128 ? LAUNCH<fastft::kFloat16, 128>(__VA_ARGS__)                  \
                                   : LAUNCH<fastft::kFloat16, 256>(__VA_ARGS__));                \
      default:                                                                                   \
        return static_cast<int>(cudaErrorInvalidValue);                                          \
    }                                                                                            \
  } while (0)

}  // namespace

extern "C" int fastft_cuda_attention_max_head_dim() { return kMaxHeadDim; }

extern "C" int fastft_cuda_attention_fwd(uintptr_t q, const int64_t* qs, uintptr_t k, const int64_t* ks, uintptr_t v,
                                         const int64_t* vs, uintptr_t out, const int64_t* os, uintptr_t lse, int64_t B,
                                         int64_t Hq, int64_t Hkv, int64_t T, int64_t D, float scale, int dtype,
                                         uintptr_t stream, uintptr_t seg_start) {
  if (B == 0 || T == 0) return 0;
  if (D <= 0 || D > kMaxHeadDim || Hkv <= 0 || Hq % Hkv != 0) return static_cast<int>(cudaErrorInvalidValue);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  FASTFT_ATTN_DISPATCH(launch_fwd, q, qs, k, ks, v, vs, out, os, lse, B, Hq, Hkv, T, D, scale, st, seg_start);
}

extern "C" int fastft_cuda_attention_bwd(uintptr_t q, const int64_t* qs, uintptr_t k, const int64_t* ks, uintptr_t v,
                                         const int64_t* vs, uintptr_t out, const int64_t* os, uintptr_t dout,
                                         const int64_t* dos, uintptr_t lse, uintptr_t dq, const int64_t* dqs,
                                         uintptr_t dk, const int64_t* dks, uintptr_t dv, const int64_t* dvs, int64_t B,
                                         int64_t Hq, int64_t Hkv, int64_t T, int64_t D, float scale, int dtype,
                                         uintptr_t stream, uintptr_t seg_start, uintptr_t seg_end) {
  if (B == 0 || T == 0) return 0;
  if (D <= 0 || D > kMaxHeadDim || Hkv <= 0 || Hq % Hkv != 0) return static_cast<int>(cudaErrorInvalidValue);
  if ((seg_start == 0) != (seg_end == 0)) return static_cast<int>(cudaErrorInvalidValue);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  FASTFT_ATTN_DISPATCH(launch_bwd, q, qs, k, ks, v, vs, out, os, dout, dos, lse, dq, dqs, dk, dks, dv, dvs, B, Hq, Hkv,
                       T, D, scale, st, seg_start, seg_end);
}
