// Private to the attention_cuda library: the Hopper (sm_90a) prefill kernel of PagedAttention.
//
// Same function as the mma.sync prefill kernel in prefill_mma.cu (every convention of
// paged_attention.h holds: paged blocks with part-segments anywhere, causal with q_start_pos,
// out = 0 / lse = -inf for rows with no visible key, natural-log LSE), computed with warpgroup
// MMAs (wgmma.mma_async, bf16 in, f32 accumulate):
//   - one thread block = 128 rows of M, where a row is one (query token, query head) pair of ONE
//     KV head's head group (GQA packing: the group's query heads of floor(128 / group) tokens
//     share a tile, so each K/V tile is read once per group);
//   - warp-specialised: a producer warpgroup copies Q and the K/V tiles with cp.async into three
//     shared-memory stages each, 128-byte swizzled (the layout the wgmma descriptors name),
//     signalling per-stage mbarriers; two consumer warpgroups (64 rows each) compute;
//   - keys in tiles of 128 rows that never cross a block (a part-segment's last tile is masked);
//   - S = Q K^T with Q and K from shared memory; online softmax in registers (one FFMA and one
//     ex2 per score); O += P V with P from registers (the A operand) and V from shared memory
//     (transposed B); the S wgmma of tile j is issued before the P V wgmma of tile j - 1, and the
//     two consumer warpgroups take turns to issue (ping-pong), so softmax overlaps the MMAs.
// Grid: x = M tiles, y = KV heads, z = splits of the block list (partials merged by the caller).
// Only head_dim 128; every group size from 1 to 128.
//
// Thread-safety: as paged_attention.h (stateless apart from a once-per-process attribute set).
#ifndef TOKENLAKE_ATTENTION_CUDA_PREFILL_SM90_H_
#define TOKENLAKE_ATTENTION_CUDA_PREFILL_SM90_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "tokenlake/attention/cuda/paged_attention.h"

namespace tokenlake::attention::cuda::internal {

// Rows of M per thread block.
inline constexpr int kSm90PrefillRows = 128;

// True when the sm_90a prefill kernel handles params' shape (head_dim 128, group size <= 128).
bool Sm90PrefillSupports(const PagedAttentionParams& p);

// Thread blocks of one split: M tiles (ceil(num_q / floor(128 / group))) x num_kv_heads.
// REQUIRES: Sm90PrefillSupports(p).
int64_t Sm90PrefillBlocksPerSplit(const PagedAttentionParams& p);

// Enqueues the kernel. With splits == 1 it writes out `[q][head][128]` and lse `[q][head]`; with
// more, split s writes its partial to out + s * num_q * num_heads * 128 and lse + s * num_q *
// num_heads (the caller merges). scale_log2 = softmax scale * log2(e).
// Errors: Internal when the launch or the shared-memory attribute fails.
// REQUIRES: Sm90PrefillSupports(p); p validated as PagedAttention does; num_q_tokens > 0,
// num_blocks > 0, 1 <= splits <= num_blocks; the device is sm_90.
absl::Status LaunchSm90Prefill(const PagedAttentionParams& p, int splits, float scale_log2,
                               float* out, float* lse, cudaStream_t stream);

}  // namespace tokenlake::attention::cuda::internal

#endif  // TOKENLAKE_ATTENTION_CUDA_PREFILL_SM90_H_
