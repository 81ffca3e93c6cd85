// The CUDA-core decode kernels of PagedAttention: the default decode for the shapes the
// tensor-core kernel (decode_mma.cu) does not take (head groups other than 1, 2, 4 or 8), and
// selectable with decode_kernel = 1. Numerics as kernels.h says.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/attention/cuda/decode_common.cuh"
#include "tokenlake/attention/cuda/device_common.cuh"
#include "tokenlake/attention/cuda/kernels.h"

namespace tokenlake::attention::cuda::internal {
namespace {

// Decode: split-KV over (block, chunk) work items on CUDA cores.
//
// Thread block of kDecodeThreads threads handles one work item (a chunk of one block), one KV
// head, G query heads of its group and one query token. D/8 lanes share a token (each holds 8
// dims as one 16-byte load); the kDecodeThreads / (D/8) token groups walk the chunk, U tokens
// per step each, with an online softmax per group; groups combine through shared memory. Grid:
// x = work items, y = num_kv_heads * (group / G), z = query tokens. Writes either out/lse (one
// work item) or the workspace partials `[q][head][item][D]` / `[q][head][item]`.

constexpr int kDecodeThreads = 128;

// Decode: this lane's 8-dim share of the scores of one key row against G query heads.
template <int G>
__device__ __forceinline__ void LaneScores(const float (&qf)[G][8], const uint4 kr, float (&s)[G]) {
  float kf[8];
  Bf16x8ToFloat(kr, kf);
#pragma unroll
  for (int h = 0; h < G; ++h) {
    float d = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) d = fmaf(qf[h][i], kf[i], d);
    s[h] = d;
  }
}

// Decode: sums the lanes' shares over the kLanes lanes that hold one key row (xor butterfly;
// every lane ends with the full scores). The whole warp must call it.
template <int kLanes, int U, int G>
__device__ __forceinline__ void SumLaneScores(float (&s)[U][G]) {
#pragma unroll
  for (int off = kLanes / 2; off > 0; off >>= 1) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int h = 0; h < G; ++h) s[u][h] += __shfl_xor_sync(0xffffffffu, s[u][h], off);
    }
  }
}

template <int D, int G, int U>
__global__ void __launch_bounds__(kDecodeThreads) DecodeKernel(const DecodeArgs args) {
  constexpr int kLanes = D / 8;                     // lanes per token
  constexpr int kGroups = kDecodeThreads / kLanes;  // token groups per thread block
  __shared__ float sm_m[kGroups][G];
  __shared__ float sm_l[kGroups][G];
  __shared__ float sm_acc[kGroups][G][D];

  const int tid = threadIdx.x;
  const int sub = tid % kLanes;  // which 8 dims
  const int grp = tid / kLanes;
  const int item = blockIdx.x;
  const int heads_per_cta_group = args.group / G;
  const int kv_head = blockIdx.y / heads_per_cta_group;
  const int head0 = kv_head * args.group + (blockIdx.y % heads_per_cta_group) * G;
  const int qi = blockIdx.z;
  // This item's key range: blocks [b_first, b_last) (blocks_per_item > 1, whole blocks), or
  // token rows [chunk * chunk_tokens, +chunk_tokens) of one block (chunks_per_block > 1).
  const int b_first = (item / args.chunks_per_block) * args.blocks_per_item;
  const int b_last = min(args.num_blocks, b_first + args.blocks_per_item);
  const int chunk = item % args.chunks_per_block;
  const int64_t qpos = static_cast<int64_t>(args.q_start_pos) + qi;

  // Query slice in float32.
  float qf[G][8];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    const uint4 raw = *reinterpret_cast<const uint4*>(
        args.q + (static_cast<int64_t>(qi) * args.num_heads + head0 + h) * D + sub * 8);
    Bf16x8ToFloatScaled(raw, args.scale_log2, qf[h]);
  }

  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    m[h] = kNegInf;
    l[h] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[h][i] = 0.f;
  }

  const int row_stride = args.num_kv_heads * D;
  constexpr int kStep = kGroups * U;  // tokens per thread-block step
  int64_t key_base = 0;               // key number of the current block's row 0 (causal only)
  if (args.causal) key_base = KeysBefore(args.blocks, b_first);

  for (int b = b_first; b < b_last; ++b) {
    const DeviceKvBlock blk = args.blocks[b];
    const int t_begin = args.chunks_per_block > 1 ? chunk * args.chunk_tokens : 0;
    const int t_end = args.chunks_per_block > 1 ? min(blk.num_tokens, t_begin + args.chunk_tokens)
                                                : blk.num_tokens;
    const uint16_t* kbase = static_cast<const uint16_t*>(blk.k) + kv_head * D + sub * 8;
    const uint16_t* vbase = static_cast<const uint16_t*>(blk.v) + kv_head * D + sub * 8;
    auto load = [&](int t_base, uint4(&kr)[U], uint4(&vr)[U]) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int tt = t_base + grp + u * kGroups;
        if (tt < t_end) {
          kr[u] =
              __ldg(reinterpret_cast<const uint4*>(kbase + static_cast<int64_t>(tt) * row_stride));
          vr[u] =
              __ldg(reinterpret_cast<const uint4*>(vbase + static_cast<int64_t>(tt) * row_stride));
        } else {
          kr[u] = make_uint4(0, 0, 0, 0);
          vr[u] = make_uint4(0, 0, 0, 0);
        }
      }
    };
    uint4 kr[U], vr[U];
    if (t_begin < t_end) load(t_begin, kr, vr);
    // The trip count is the same for every thread (the shuffles below need the whole warp);
    // tokens past t_end are masked. Loads of the next step are issued before this step's math.
    for (int t_base = t_begin; t_base < t_end; t_base += kStep) {
      uint4 kn[U], vn[U];
      if (t_base + kStep < t_end) load(t_base + kStep, kn, vn);
      float s[U][G];
#pragma unroll
      for (int u = 0; u < U; ++u) LaneScores<G>(qf, kr[u], s[u]);
      SumLaneScores<kLanes, U, G>(s);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int tt = t_base + grp + u * kGroups;
        const bool visible = tt < t_end && !(args.causal && key_base + tt > qpos);
        if (!visible) {
#pragma unroll
          for (int h = 0; h < G; ++h) s[u][h] = kNegInf;
        }
      }
      float vf[U][8];
#pragma unroll
      for (int u = 0; u < U; ++u) Bf16x8ToFloat(vr[u], vf[u]);
#pragma unroll
      for (int h = 0; h < G; ++h) {
        float mx = s[0][h];
#pragma unroll
        for (int u = 1; u < U; ++u) mx = fmaxf(mx, s[u][h]);
        const float nm = fmaxf(m[h], mx);
        const float use = nm == kNegInf ? 0.f : nm;
        const float corr = exp2f(m[h] - use);
        m[h] = nm;
        float p[U];
        float psum = 0.f;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          p[u] = exp2f(s[u][h] - use);
          psum += p[u];
        }
        l[h] = l[h] * corr + psum;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          float acc_v = acc[h][i] * corr;
#pragma unroll
          for (int u = 0; u < U; ++u) acc_v = fmaf(p[u], vf[u][i], acc_v);
          acc[h][i] = acc_v;
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        kr[u] = kn[u];
        vr[u] = vn[u];
      }
    }
    if (args.causal) key_base += blk.num_tokens;
  }

  // Combine the token groups.
#pragma unroll
  for (int h = 0; h < G; ++h) {
    if (sub == 0) {
      sm_m[grp][h] = m[h];
      sm_l[grp][h] = l[h];
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) sm_acc[grp][h][sub * 8 + i] = acc[h][i];
  }
  __syncthreads();
  const bool final_out = args.num_items == 1;
  for (int idx = tid; idx < G * D; idx += kDecodeThreads) {
    const int h = idx / D;
    const int d = idx % D;
    float mm = kNegInf;
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi) mm = fmaxf(mm, sm_m[gi][h]);
    const float use = mm == kNegInf ? 0.f : mm;
    float ll = 0.f, oo = 0.f;
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi) {
      const float w = exp2f(sm_m[gi][h] - use);
      ll = fmaf(sm_l[gi][h], w, ll);
      oo = fmaf(sm_acc[gi][h][d], w, oo);
    }
    float out_v = ll > 0.f ? oo / ll : 0.f;
    float lse_v = ll > 0.f ? (mm + log2f(ll)) * kLn2 : kNegInf;
    const int64_t row = static_cast<int64_t>(qi) * args.num_heads + head0 + h;
    if (final_out) {
      if (args.num_extra > 0) FoldExtrasElement<D>(args, row, d, out_v, lse_v);
      args.out[row * D + d] = out_v;
      if (d == 0) args.lse[row] = lse_v;
    } else {
      args.out[(row * args.num_items + item) * D + d] = out_v;
      if (d == 0) args.lse[row * args.num_items + item] = lse_v;
    }
  }
  if (!final_out && args.counters != nullptr) {
    DecodeFusedMerge<D, G>(args, qi, kv_head, head0 - kv_head * args.group);
  }
}

// Decode with a shared-memory pipeline: the same work split and math as DecodeKernel, but K and
// V steps (kStep tokens) stream through kDecodeStages shared-memory buffers with cp.async, so
// several steps of loads are in flight without holding them in registers. Dynamic shared memory:
// DecodeSmemBytes<D, U>() (the combine arrays reuse it after the loop).
constexpr int kDecodeStages = 4;

template <int D, int U>
__host__ __device__ constexpr int DecodeStepTokens() {
  return (kDecodeThreads / (D / 8)) * U;
}
template <int D, int U>
__host__ __device__ constexpr int DecodeSmemBytes() {
  return kDecodeStages * DecodeStepTokens<D, U>() * D * 2 * 2;
}

template <int D, int G, int U>
__global__ void __launch_bounds__(kDecodeThreads) DecodeSmemKernel(const DecodeArgs args) {
  constexpr int T = kDecodeThreads;
  constexpr int kLanes = D / 8;
  constexpr int kGroups = T / kLanes;       // token groups
  constexpr int kStep = kGroups * U;        // token rows per step
  constexpr int kStageElems = kStep * D;    // one of K or V
  constexpr int kChunks = kStageElems / 8;  // 16-byte chunks per K (or V) step
  static_assert(kChunks % T == 0);
  static_assert(kStageElems == DecodeStepTokens<D, U>() * D);
  static_assert(kGroups * G * (D + 2) * 4 <= DecodeSmemBytes<D, U>());
  extern __shared__ __align__(128) uint16_t dsmem[];  // [stage][K, V][kStep][D]

  const int tid = threadIdx.x;
  const int sub = tid % kLanes;
  const int grp = tid / kLanes;
  const int item = blockIdx.x;
  const int heads_per_cta_group = args.group / G;
  const int kv_head = blockIdx.y / heads_per_cta_group;
  const int hoff = (blockIdx.y % heads_per_cta_group) * G;
  const int head0 = kv_head * args.group + hoff;
  const int qi = blockIdx.z;
  // This token's blocks: all of them, or its own run in a batched decode.
  const DeviceKvBlock* blocks = args.blocks;
  int num_blocks = args.num_blocks;
  int blocks_per_item = args.blocks_per_item;
  if (args.q_block_offsets != nullptr) {
    const int first = args.q_block_offsets[qi];
    blocks += first;
    num_blocks = args.q_block_offsets[qi + 1] - first;
    blocks_per_item = max(1, (num_blocks + args.num_items - 1) / args.num_items);
  }
  const int b_first = (item / args.chunks_per_block) * blocks_per_item;
  const int b_last = min(num_blocks, b_first + blocks_per_item);
  const bool chunked = args.chunks_per_block > 1;
  const int chunk_begin = (item % args.chunks_per_block) * args.chunk_tokens;
  const int64_t qpos = static_cast<int64_t>(args.q_start_pos) + qi;
  const int row_stride = args.num_kv_heads * D;

  float qf[G][8];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    const uint4 raw = *reinterpret_cast<const uint4*>(
        args.q + (static_cast<int64_t>(qi) * args.num_heads + head0 + h) * D + sub * 8);
    Bf16x8ToFloatScaled(raw, args.scale_log2, qf[h]);
  }
  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    m[h] = kNegInf;
    l[h] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[h][i] = 0.f;
  }

  // A cursor over this item's steps: block b, rows [tb, min(tb + kStep, tend)); key0 is the key
  // number of row 0 of block b. Uniform across the thread block.
  struct Cursor {
    int b;
    int tb;
    int tend;
    int64_t key0;
  };
  auto settle = [&](Cursor& c) {  // moves to the first non-empty range at or after c.b
    while (c.b < b_last) {
      const int n = blocks[c.b].num_tokens;
      c.tend = chunked ? min(n, chunk_begin + args.chunk_tokens) : n;
      if (c.tb < c.tend) return;
      c.key0 += n;
      ++c.b;
      c.tb = chunked ? chunk_begin : 0;
    }
  };
  auto advance = [&](Cursor& c) {
    c.tb += kStep;
    if (c.tb >= c.tend) {
      if (chunked) {
        c.b = b_last;
        return;
      }
      c.key0 += blocks[c.b].num_tokens;
      ++c.b;
      c.tb = 0;
      settle(c);
    }
  };
  // Where each stage's rows come from (written by thread 0 at issue, read by compute).
  __shared__ int sm_desc_tb[kDecodeStages];
  __shared__ int sm_desc_tend[kDecodeStages];
  __shared__ int64_t sm_desc_key0[kDecodeStages];
  auto issue = [&](const Cursor& c, int stage) {
    if (tid == 0) {
      sm_desc_tb[stage] = c.tb;
      sm_desc_tend[stage] = c.tend;
      sm_desc_key0[stage] = c.key0;
    }
    const DeviceKvBlock blk = blocks[c.b];
    const int valid = min(kStep, c.tend - c.tb);
    const uint16_t* kb = static_cast<const uint16_t*>(blk.k) + kv_head * D;
    const uint16_t* vb = static_cast<const uint16_t*>(blk.v) + kv_head * D;
    const uint32_t base = SmemAddr(dsmem + stage * 2 * kStageElems);
#pragma unroll
    for (int it = 0; it < kChunks / T; ++it) {
      const int i = tid + it * T;
      const int row = i / (D / 8);
      const int ch = i % (D / 8);
      const bool ok = row < valid;
      const int64_t off = ok ? static_cast<int64_t>(c.tb + row) * row_stride + ch * 8 : 0;
      CpAsync16(base + (row * D + ch * 8) * 2, kb + off, ok ? 16 : 0);
      CpAsync16(base + (kStageElems + row * D + ch * 8) * 2, vb + off, ok ? 16 : 0);
    }
  };

  Cursor load{b_first, chunked ? chunk_begin : 0, 0, 0};
  if (args.causal) load.key0 = KeysBefore(blocks, b_first);
  settle(load);
  int issued = 0;  // steps issued (uniform)
#pragma unroll
  for (int st = 0; st < kDecodeStages - 1; ++st) {
    if (load.b < b_last) {
      issue(load, st);
      advance(load);
      ++issued;
    }
    CpAsyncCommit();
  }
  int stage = 0;
  for (int computed = 0; computed < issued; ++computed) {
    CpAsyncWait<kDecodeStages - 2>();
    __syncthreads();
    struct {
      int tb;
      int tend;
      int64_t key0;
    } comp = {sm_desc_tb[stage], sm_desc_tend[stage], sm_desc_key0[stage]};
    if (load.b < b_last) {
      issue(load, (stage + kDecodeStages - 1) % kDecodeStages);
      advance(load);
      ++issued;
    }
    CpAsyncCommit();

    const uint16_t* ks = dsmem + stage * 2 * kStageElems;
    const uint16_t* vs = ks + kStageElems;
    float s[U][G];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint4 kr = *reinterpret_cast<const uint4*>(ks + (grp + u * kGroups) * D + sub * 8);
      LaneScores<G>(qf, kr, s[u]);
    }
    SumLaneScores<kLanes, U, G>(s);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int tt = comp.tb + grp + u * kGroups;
      const bool visible = tt < comp.tend && !(args.causal && comp.key0 + tt > qpos);
      if (!visible) {
#pragma unroll
        for (int h = 0; h < G; ++h) s[u][h] = kNegInf;
      }
    }
#pragma unroll
    for (int h = 0; h < G; ++h) {
      float mx = s[0][h];
#pragma unroll
      for (int u = 1; u < U; ++u) mx = fmaxf(mx, s[u][h]);
      const float nm = fmaxf(m[h], mx);
      const float use = nm == kNegInf ? 0.f : nm;
      const float corr = exp2f(m[h] - use);
      m[h] = nm;
      float psum = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[u][h] = exp2f(s[u][h] - use);  // s becomes the probability p
        psum += s[u][h];
      }
      l[h] = l[h] * corr + psum;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[h][i] *= corr;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint4 vr = *reinterpret_cast<const uint4*>(vs + (grp + u * kGroups) * D + sub * 8);
      float vf[8];
      Bf16x8ToFloat(vr, vf);
#pragma unroll
      for (int h = 0; h < G; ++h) {
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[h][i] = fmaf(s[u][h], vf[i], acc[h][i]);
      }
    }
    stage = (stage + 1) % kDecodeStages;
  }
  CpAsyncWait<0>();
  __syncthreads();  // the stage buffers become the combine arrays

  float* sm_m = reinterpret_cast<float*>(dsmem);  // [kGroups][G]
  float* sm_l = sm_m + kGroups * G;               // [kGroups][G]
  float* sm_acc = sm_l + kGroups * G;             // [kGroups][G][D]
#pragma unroll
  for (int h = 0; h < G; ++h) {
    if (sub == 0) {
      sm_m[grp * G + h] = m[h];
      sm_l[grp * G + h] = l[h];
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) sm_acc[(grp * G + h) * D + sub * 8 + i] = acc[h][i];
  }
  __syncthreads();
  const bool final_out = args.num_items == 1;
  for (int idx = tid; idx < G * D; idx += T) {
    const int h = idx / D;
    const int d = idx % D;
    float mm = kNegInf;
#pragma unroll
    for (int t = 0; t < kGroups; ++t) mm = fmaxf(mm, sm_m[t * G + h]);
    const float use = mm == kNegInf ? 0.f : mm;
    float ll = 0.f, oo = 0.f;
#pragma unroll
    for (int t = 0; t < kGroups; ++t) {
      const float w = exp2f(sm_m[t * G + h] - use);
      ll = fmaf(sm_l[t * G + h], w, ll);
      oo = fmaf(sm_acc[(t * G + h) * D + d], w, oo);
    }
    float out_v = ll > 0.f ? oo / ll : 0.f;
    float lse_v = ll > 0.f ? (mm + log2f(ll)) * kLn2 : kNegInf;
    const int64_t row = static_cast<int64_t>(qi) * args.num_heads + head0 + h;
    if (final_out) {
      if (args.num_extra > 0) FoldExtrasElement<D>(args, row, d, out_v, lse_v);
      args.out[row * D + d] = out_v;
      if (d == 0) args.lse[row] = lse_v;
    } else {
      args.out[(row * args.num_items + item) * D + d] = out_v;
      if (d == 0) args.lse[row * args.num_items + item] = lse_v;
    }
  }
  if (!final_out && args.counters != nullptr) {
    DecodeFusedMerge<D, G>(args, qi, kv_head, hoff);
  }
}

template <int D, int G, int U>
cudaError_t PrepareDecodeSmem() {
  static const cudaError_t err =
      cudaFuncSetAttribute(DecodeSmemKernel<D, G, U>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           DecodeSmemBytes<D, U>());
  return err;
}

template <int D, int G, int U, bool kSmem>
absl::StatusOr<int> DecodeBlocksPerSmT() {
  static int blocks = -1;
  static cudaError_t err =
      kSmem
          ? (PrepareDecodeSmem<D, G, U>() != cudaSuccess
                 ? PrepareDecodeSmem<D, G, U>()
                 : cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                       &blocks, DecodeSmemKernel<D, G, U>, kDecodeThreads, DecodeSmemBytes<D, U>()))
          : cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, DecodeKernel<D, G, U>,
                                                          kDecodeThreads, 0);
  if (err != cudaSuccess) {
    return absl::InternalError(absl::StrFormat("cudaOccupancyMaxActiveBlocksPerMultiprocessor: %s",
                                               cudaGetErrorString(err)));
  }
  return blocks;
}

template <int D, int U, bool kSmem>
absl::StatusOr<int> DecodeBlocksPerSmDU(int g) {
  switch (g) {
    case 4:
      return DecodeBlocksPerSmT<D, 4, U, kSmem>();
    case 2:
      return DecodeBlocksPerSmT<D, 2, U, kSmem>();
    default:
      return DecodeBlocksPerSmT<D, 1, U, kSmem>();
  }
}

template <bool kSmem>
absl::StatusOr<int> DecodeBlocksPerSmS(int d, int g, int u) {
  if (d == 128) {
    return u == 2 ? DecodeBlocksPerSmDU<128, 2, kSmem>(g) : DecodeBlocksPerSmDU<128, 4, kSmem>(g);
  }
  return u == 2 ? DecodeBlocksPerSmDU<64, 2, kSmem>(g) : DecodeBlocksPerSmDU<64, 4, kSmem>(g);
}

template <int D, int G, int U>
absl::Status LaunchDecode(const PagedAttentionParams& p, const LaunchConfig& c, const DecodeArgs& a,
                          cudaStream_t stream) {
  const dim3 grid(c.items, p.num_kv_heads * (a.group / G), p.num_q_tokens);
  if (c.decode_smem) {
    if (cudaError_t err = PrepareDecodeSmem<D, G, U>(); err != cudaSuccess) {
      return absl::InternalError(
          absl::StrFormat("cudaFuncSetAttribute(decode): %s", cudaGetErrorString(err)));
    }
    DecodeSmemKernel<D, G, U><<<grid, kDecodeThreads, DecodeSmemBytes<D, U>(), stream>>>(a);
  } else {
    DecodeKernel<D, G, U><<<grid, kDecodeThreads, 0, stream>>>(a);
  }
  return LaunchStatus("decode attention");
}

template <int D, int U>
absl::Status LaunchDecodeDU(const PagedAttentionParams& p, const LaunchConfig& c,
                            const DecodeArgs& a, cudaStream_t stream) {
  switch (c.decode_g) {
    case 4:
      return LaunchDecode<D, 4, U>(p, c, a, stream);
    case 2:
      return LaunchDecode<D, 2, U>(p, c, a, stream);
    default:
      return LaunchDecode<D, 1, U>(p, c, a, stream);
  }
}

template <int D>
absl::Status LaunchDecodeD(const PagedAttentionParams& p, const LaunchConfig& c,
                           const DecodeArgs& a, cudaStream_t stream) {
  return c.decode_unroll == 2 ? LaunchDecodeDU<D, 2>(p, c, a, stream)
                              : LaunchDecodeDU<D, 4>(p, c, a, stream);
}

}  // namespace

absl::StatusOr<int> DecodeCudaCoreBlocksPerSm(int head_dim, int g, int unroll, bool smem) {
  return smem ? DecodeBlocksPerSmS<true>(head_dim, g, unroll)
              : DecodeBlocksPerSmS<false>(head_dim, g, unroll);
}

absl::Status LaunchDecodeCudaCore(const PagedAttentionParams& p, const LaunchConfig& c,
                                  const DecodeArgs& a, cudaStream_t stream) {
  return p.head_dim == 128 ? LaunchDecodeD<128>(p, c, a, stream)
                           : LaunchDecodeD<64>(p, c, a, stream);
}

}  // namespace tokenlake::attention::cuda::internal
