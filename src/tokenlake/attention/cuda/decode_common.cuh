// Private to the attention_cuda library: what the decode kernels (decode_mma.cu,
// decode_cuda_core.cu) share: their arguments, the fold of other instances' partials into a
// finished row, and the fused split merge run by the last thread block of a head group.
//
// Work split of every decode kernel: the keys of a (query token, KV head) are cut into
// num_items work items (runs of blocks_per_item whole blocks, or chunks of chunk_tokens rows of
// one block); grid x = items, y = head groups, z = query tokens. One item writes out/lse
// directly; several write the workspace partials `[q][head][item][D]` / `[q][head][item]`,
// merged by the fused merge below or by the separate merge kernel (merge.cu).
#ifndef TOKENLAKE_ATTENTION_CUDA_DECODE_COMMON_CUH_
#define TOKENLAKE_ATTENTION_CUDA_DECODE_COMMON_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "tokenlake/attention/cuda/device_common.cuh"
#include "tokenlake/attention/cuda/kernels.h"
#include "tokenlake/attention/cuda/paged_attention.h"

namespace tokenlake::attention::cuda::internal {

struct DecodeArgs {
  const uint16_t* q;
  const DeviceKvBlock* blocks;
  int num_blocks;
  int chunks_per_block;  // > 1: an item is one chunk of one block
  int chunk_tokens;
  int blocks_per_item;  // > 1: an item is a run of whole blocks
  int num_items;
  int num_q;
  int num_heads;
  int num_kv_heads;
  int group;
  float scale_log2;
  int causal;
  int q_start_pos;
  float* out;  // final [q][H][D] if num_items == 1, else partial [q][H][items][D]
  float* lse;  // final [q][H] if num_items == 1, else partial [q][H][items]
  // Fused split merge (num_items > 1 only): counters[qi * gridDim.y + blockIdx.y], zero on entry
  // and left zero; the last thread block to finish merges into final_out / final_lse. Null: the
  // partials stay in out/lse for a separate merge kernel.
  unsigned int* counters;
  float* final_out;  // [q][H][D]
  float* final_lse;  // [q][H]
  // Batched decode (shared-memory or tensor-core kernel, chunks_per_block == 1): query token qi
  // attends to blocks [q_block_offsets[qi], q_block_offsets[qi + 1]) only, and item i of it to
  // the i-th run of ceil(n / num_items) of them. Null: every token sees all num_blocks blocks.
  const int32_t* q_block_offsets;
  // Extra partials folded into the final merge (PagedAttentionParams::num_extra): extra e of row
  // r at extra_out[(e * extra_rows + r) * D] / extra_lse[e * extra_rows + r]; num_extra 0 = none.
  const float* extra_out;
  const float* extra_lse;
  int num_extra;
  int64_t extra_rows;  // num_q * num_heads
  // Tensor-core kernel: PagedAttentionParams::pdl (0 off; 1 wait first; 2 the first stages'
  // copies, then wait).
  int pdl;
};

// Folds the extra partials of row `row` into one output element (out_v, lse_v) of the merge
// (element d of the row): every thread of the row computes the row's merged LSE itself (the
// extras' LSEs are a few L2 loads), so no barrier is needed. -inf partials contribute nothing.
template <int D>
__device__ __forceinline__ void FoldExtrasElement(const DecodeArgs& args, int64_t row, int d,
                                                  float& out_v, float& lse_v) {
  float mx = lse_v;
#pragma unroll 4
  for (int e = 0; e < args.num_extra; ++e) {
    mx = fmaxf(mx, __ldg(args.extra_lse + e * args.extra_rows + row));
  }
  const float use = mx == kNegInf ? 0.f : mx;
  float w = __expf(lse_v - use);
  float sum = w;
  float acc = w * out_v;
#pragma unroll 4
  for (int e = 0; e < args.num_extra; ++e) {
    const int64_t er = e * args.extra_rows + row;
    w = __expf(__ldg(args.extra_lse + er) - use);
    sum += w;
    acc = fmaf(w, __ldg(args.extra_out + er * D + d), acc);
  }
  out_v = sum > 0.f ? acc / sum : 0.f;
  lse_v = sum > 0.f ? use + logf(sum) : kNegInf;
}

// The fused split merge, run by every decode thread block after it wrote its partials of query
// token qi, heads kv_head * group + hoff + h for h < G: the last block of the
// (qi, blockIdx.y) group to finish merges the num_items partials of those heads into final_out /
// final_lse and resets the counter. Each thread owns 4 dims of one row and folds the partials in
// with an online max, loading every partial's LSE and output slice together (the loads of 8
// partials in flight at once), so the merge costs about one L2 round trip per 8 partials after
// the counter. Partials are read with ld.global.cg (L2; other multiprocessors wrote them).
// U = partials whose loads are in flight at once (8; 16 for the tensor-core kernel, so its 16
// splits cost one round trip).
template <int D, int G, int U = 8>
__device__ __forceinline__ void DecodeFusedMerge(const DecodeArgs& args, int qi, int kv_head,
                                                 int hoff) {
  constexpr int kRows = G;
  __shared__ int sm_last;
  // The block's partial stores, ordered before thread 0's count by the barrier, are released
  // with it (atom.acq_rel.gpu is cumulative); the last block's thread 0 acquires the others'
  // partials with the same atomic and the barrier after it passes them on to every thread (the
  // pattern of CUTLASS's split-K semaphore: one fence-carrying atomic per block, no per-thread
  // __threadfence on the merge's critical path).
  __syncthreads();
  const int tid = threadIdx.x;
  unsigned int* counter = args.counters + static_cast<int64_t>(qi) * gridDim.y + blockIdx.y;
  if (tid == 0) {
    unsigned int ticket;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;\n"
                 : "=r"(ticket)
                 : "l"(counter)
                 : "memory");
    sm_last = ticket == static_cast<unsigned int>(args.num_items - 1) ? 1 : 0;
  }
  __syncthreads();
  if (sm_last == 0) return;
  const int n = args.num_items;
  constexpr int kLanes4 = D / 4;
  for (int idx = tid; idx < kRows * kLanes4; idx += blockDim.x) {
    const int r = idx / kLanes4;
    const int c = idx % kLanes4;
    const int64_t row = static_cast<int64_t>(qi) * args.num_heads + kv_head * args.group + hoff + r;
    const float* lrow = args.lse + row * n;
    const float4* orow = reinterpret_cast<const float4*>(args.out + row * n * D) + c;
    float mx = kNegInf;
    float sum = 0.f;
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll U
    for (int p = 0; p < n; ++p) {
      const float lp = __ldcg(lrow + p);
      const float4 v = __ldcg(orow + static_cast<int64_t>(p) * kLanes4);
      const float nm = fmaxf(mx, lp);
      const float use = nm == kNegInf ? 0.f : nm;  // (all -inf so far: weights 0, no NaN)
      const float sc = __expf(mx - use);
      const float w = __expf(lp - use);
      sum = fmaf(sum, sc, w);
      a.x = fmaf(w, v.x, a.x * sc);
      a.y = fmaf(w, v.y, a.y * sc);
      a.z = fmaf(w, v.z, a.z * sc);
      a.w = fmaf(w, v.w, a.w * sc);
      mx = nm;
    }
    // Other instances' partials (num_extra), after the splits' (4 extras' loads in flight at
    // once: one round trip for up to 4).
#pragma unroll 4
    for (int e = 0; e < args.num_extra; ++e) {
      const int64_t er = e * args.extra_rows + row;
      const float lp = __ldg(args.extra_lse + er);
      const float4 v = __ldg(reinterpret_cast<const float4*>(args.extra_out + er * D) + c);
      const float nm = fmaxf(mx, lp);
      const float use = nm == kNegInf ? 0.f : nm;
      const float sc = __expf(mx - use);
      const float w = __expf(lp - use);
      sum = fmaf(sum, sc, w);
      a.x = fmaf(w, v.x, a.x * sc);
      a.y = fmaf(w, v.y, a.y * sc);
      a.z = fmaf(w, v.z, a.z * sc);
      a.w = fmaf(w, v.w, a.w * sc);
      mx = nm;
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    reinterpret_cast<float4*>(args.final_out + row * D)[c] =
        make_float4(a.x * inv, a.y * inv, a.z * inv, a.w * inv);
    if (c == 0) args.final_lse[row] = sum > 0.f ? mx + logf(sum) : kNegInf;
  }
  if (tid == 0) *counter = 0u;  // ready for the next call on this workspace
}

}  // namespace tokenlake::attention::cuda::internal

#endif  // TOKENLAKE_ATTENTION_CUDA_DECODE_COMMON_CUH_
