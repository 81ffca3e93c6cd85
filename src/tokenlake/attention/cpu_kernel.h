// Internal: the vectorised single-tile kernel behind PartialAttention (attention.h). Not part of
// the module's public contract; attention.cc validates everything before calling in here.
//
// Thread-safety: RunAttentionTile is reentrant; each call uses thread-local scratch.
#ifndef TOKENLAKE_ATTENTION_CPU_KERNEL_H_
#define TOKENLAKE_ATTENTION_CPU_KERNEL_H_

#include <cstdint>

#include "absl/types/span.h"
#include "tokenlake/attention/attention.h"

namespace tokenlake::attention::internal {

// Maximum (token, head) rows one tile processes together.
inline constexpr int kMaxTileRows = 32;

// A validated problem: the shapes and pointers of one PartialAttention call.
struct KernelProblem {
  int32_t num_heads = 1;
  int32_t num_kv_heads = 1;
  int32_t head_dim = 1;
  KvDtype dtype = KvDtype::kFloat32;
  float scale = 1.0f;  // effective softmax scale
  bool causal = false;
  int64_t q_start_pos = 0;
  const float* q = nullptr;              // [num_q_tokens][num_heads][head_dim]
  absl::Span<const KvBlock> blocks;      // the key list
  const int64_t* block_start = nullptr;  // blocks.size() + 1 prefix sums of num_tokens
};

// One unit of work: query tokens [token_begin, token_end) x query heads [head_begin, head_end)
// (any contiguous head range, possibly spanning several KV groups; at most kMaxTileRows rows in
// all) over keys [key_begin, key_end) of the concatenated key list.
struct TileRange {
  int32_t token_begin = 0;
  int32_t token_end = 0;
  int32_t head_begin = 0;
  int32_t head_end = 0;
  int64_t key_begin = 0;
  int64_t key_end = 0;
};

// Computes the normalised partial of the tile's rows over the tile's keys and writes them into
// out [num_q_tokens][num_heads][head_dim] and lse [num_q_tokens][num_heads] (only the tile's
// rows are written; empty rows get out 0, lse -inf).
void RunAttentionTile(const KernelProblem& problem, const TileRange& tile, float* out, float* lse);

// True when the AVX2+FMA clone of the kernel is used on this CPU (and not forced off).
bool KernelUsesAvx2();

// Tests only: when `force` is true, RunAttentionTile uses the SSE2 baseline clone even on a CPU
// with AVX2, so both clones can be tested on one machine. Not thread-safe with running kernels.
void ForceBaselineKernelForTesting(bool force);

}  // namespace tokenlake::attention::internal

#endif  // TOKENLAKE_ATTENTION_CPU_KERNEL_H_
