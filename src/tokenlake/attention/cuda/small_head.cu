// The small-head kernel of PagedAttention (head_dim 16 and 32, e.g. tiny test models): CUDA
// cores, float32, not tuned.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "absl/status/status.h"
#include "tokenlake/attention/cuda/kernels.h"
#include "tokenlake/attention/cuda/paged_attention.h"

namespace tokenlake::attention::cuda::internal {
namespace {

// Small head dims (16, 32; e.g. tiny test models): one warp per (query token, head), each lane an
// online softmax over every 32nd key of the concatenated blocks, then a butterfly merge of the
// lanes' (max, sum, accumulator). CUDA cores, float32; not tuned (the tensor-core and split-KV
// kernels need head_dim >= 64). Same conventions as the other kernels (causal,
// q_block_offsets, out/lse).
template <int D>
__global__ void __launch_bounds__(32)
    SmallHeadKernel(const uint16_t* __restrict__ q, const DeviceKvBlock* __restrict__ blocks,
                    int num_blocks, const int32_t* __restrict__ q_block_offsets, int num_heads,
                    int num_kv_heads, float scale, int causal, int q_start_pos,
                    float* __restrict__ out, float* __restrict__ lse) {
  const int i = blockIdx.x;  // query token
  const int h = blockIdx.y;  // query head
  const int lane = threadIdx.x;
  const int kvh = h / (num_heads / num_kv_heads);
  const int64_t row = static_cast<int64_t>(i) * num_heads + h;
  float qf[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    qf[d] = __uint_as_float(static_cast<uint32_t>(q[row * D + d]) << 16);
  }
  int b_begin = 0;
  int b_end = num_blocks;
  if (q_block_offsets != nullptr) {
    b_begin = q_block_offsets[i];
    b_end = q_block_offsets[i + 1];
  }
  const int64_t limit = causal ? static_cast<int64_t>(q_start_pos) + i : INT64_MAX;
  float m = -INFINITY;
  float l = 0.f;
  float acc[D];
#pragma unroll
  for (int d = 0; d < D; ++d) acc[d] = 0.f;
  int64_t base = 0;  // key number of the block's first row
  for (int b = b_begin; b < b_end; ++b) {
    const DeviceKvBlock blk = blocks[b];
    const uint16_t* kb = static_cast<const uint16_t*>(blk.k);
    const uint16_t* vb = static_cast<const uint16_t*>(blk.v);
    for (int t = lane; t < blk.num_tokens; t += 32) {
      if (base + t > limit) break;
      const int64_t off = (static_cast<int64_t>(t) * num_kv_heads + kvh) * D;
      float s = 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) {
        s += qf[d] * __uint_as_float(static_cast<uint32_t>(kb[off + d]) << 16);
      }
      s *= scale;
      const float m_new = fmaxf(m, s);
      const float corr = __expf(m - m_new);  // exp(-inf) = 0 on the first key
      const float p = __expf(s - m_new);
      l = l * corr + p;
#pragma unroll
      for (int d = 0; d < D; ++d) {
        acc[d] = acc[d] * corr + p * __uint_as_float(static_cast<uint32_t>(vb[off + d]) << 16);
      }
      m = m_new;
    }
    base += blk.num_tokens;
  }
  // Merge the 32 lanes.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m_o = __shfl_xor_sync(0xffffffffu, m, off);
    const float l_o = __shfl_xor_sync(0xffffffffu, l, off);
    const float m_new = fmaxf(m, m_o);
    const float c_self = m == -INFINITY ? 0.f : __expf(m - m_new);
    const float c_o = m_o == -INFINITY ? 0.f : __expf(m_o - m_new);
    l = l * c_self + l_o * c_o;
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const float a_o = __shfl_xor_sync(0xffffffffu, acc[d], off);
      acc[d] = acc[d] * c_self + a_o * c_o;
    }
    m = m_new;
  }
  if (lane == 0) {
    const bool empty = !(l > 0.f);
    const float inv = empty ? 0.f : 1.0f / l;
#pragma unroll
    for (int d = 0; d < D; ++d) out[row * D + d] = acc[d] * inv;
    lse[row] = empty ? -INFINITY : m + logf(l);
  }
}

}  // namespace

absl::Status LaunchSmallHead(const PagedAttentionParams& p, float scale, cudaStream_t stream) {
  const dim3 grid(p.num_q_tokens, p.num_heads);
  if (p.head_dim == 16) {
    SmallHeadKernel<16><<<grid, 32, 0, stream>>>(
        static_cast<const uint16_t*>(p.q), p.blocks, p.num_blocks, p.q_block_offsets, p.num_heads,
        p.num_kv_heads, scale, p.causal ? 1 : 0, p.q_start_pos, p.out, p.lse);
  } else {
    SmallHeadKernel<32><<<grid, 32, 0, stream>>>(
        static_cast<const uint16_t*>(p.q), p.blocks, p.num_blocks, p.q_block_offsets, p.num_heads,
        p.num_kv_heads, scale, p.causal ? 1 : 0, p.q_start_pos, p.out, p.lse);
  }
  return LaunchStatus("small-head attention");
}

}  // namespace tokenlake::attention::cuda::internal
