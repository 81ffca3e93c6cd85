// Partial attention over pooled segments, and the merge of partials (the composition primitive of
// TokenLake's segment-level split attention; TOKENLAKE.md section 4.5).
//
// ---------------------------------------------------------------------------------------------
// Shared KV layout and numerical conventions. The CPU kernels here, the CUDA kernels
// (attention/cuda/, a separate target) and the engine all follow exactly these.
//
// Segment slot. A segment holds S = segment_tokens consecutive tokens. One segment's KV for ALL
// layers lives in one store slot of
//     slot_bytes = num_layers * 2 * S * num_kv_heads * head_dim * sizeof(dtype)
// laid out [layer][kv: 0=K, 1=V][token][kv_head][head_dim], row-major. dtype is float32 or
// bfloat16 (bf16 stored as uint16 raw bits, float->bf16 rounds to nearest even; see bf16.h).
// A part-segment (the last, incomplete segment of a sequence) uses the first num_tokens token
// rows of its slot. KvSlotLayout below computes the offsets.
//
// KV blocks. Per layer, the attention over a list of segments takes one KvBlock per segment:
// k and v point at that layer's [S][num_kv_heads][head_dim] K and V blocks (token stride =
// num_kv_heads * head_dim elements) and num_tokens (0..S) says how many token rows are used.
// The keys of a block list are numbered 0, 1, ... in list order (the concatenation of the
// blocks' used rows).
//
// Queries: q [num_q_tokens][num_heads][head_dim] float32, row-major. GQA: query head h uses KV
// head h / (num_heads / num_kv_heads) (MHA: num_kv_heads == num_heads; MQA: num_kv_heads == 1).
// Score s_ij = softmax_scale * dot(q_i,h, k_j,kvh(h)); softmax_scale defaults to 1/sqrt(head_dim).
//
// Partial output: out [num_q_tokens][num_heads][head_dim] float32, normalised within the partial
// (out = sum_j exp(s_j - m) v_j / sum_j exp(s_j - m)), and lse [num_q_tokens][num_heads] float32,
// NATURAL log: lse = m + log(sum_j exp(s_j - m)), m = max_j s_j. An empty partial for a
// (query, head) (no keys, or every key masked for that query) gives out = 0 and lse = -inf.
//
// Causal masking: query i has position q_start_pos + i; with causal = true, key j is visible to
// query i iff j <= q_start_pos + i. Partials over cached segments use causal = false (every new
// token sees all cached tokens); the partial over the new tokens' own KV uses causal = true with
// q_start_pos = 0.
//
// Merge of two partials (a, b) -> (o, lse): lse = log(exp(lse_a) + exp(lse_b)) computed stably
// from the max; o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b. A -inf partial contributes
// nothing; two -inf partials give out = 0, lse = -inf. Merging the partials over any split of the
// keys equals the attention over all keys up to float rounding.
// ---------------------------------------------------------------------------------------------
//
// Thread-safety: all functions are reentrant; they read their inputs and write only their output
// spans. Concurrent calls on disjoint outputs are safe.
#ifndef TOKENLAKE_ATTENTION_ATTENTION_H_
#define TOKENLAKE_ATTENTION_ATTENTION_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tokenlake/attention/bf16.h"

namespace tokenlake::attention {

// Element type of the stored K and V.
enum class KvDtype : uint8_t {
  kFloat32 = 0,   // IEEE binary32.
  kBFloat16 = 1,  // bfloat16 stored as uint16 raw bits.
};

// Size of one element of `dtype` in bytes (4 or 2).
constexpr size_t KvDtypeBytes(KvDtype dtype) { return dtype == KvDtype::kFloat32 ? 4 : 2; }

// "f32" / "bf16".
const char* KvDtypeName(KvDtype dtype);

// One segment's K and V for one layer. Borrowed pointers: the memory (a store slot) must stay
// valid and unchanged for the duration of the call that reads it.
struct KvBlock {
  // [S][num_kv_heads][head_dim] elements of the KV dtype; the first num_tokens rows are read.
  // May be null only when num_tokens == 0.
  const void* k = nullptr;
  // Same shape and dtype as k.
  const void* v = nullptr;
  // Number of used token rows, >= 0.
  int32_t num_tokens = 0;
};

// Geometry of a segment slot ([layer][kv][token][kv_head][head_dim]); computes byte offsets.
struct KvSlotLayout {
  // Transformer layers stored per slot, >= 1.
  int32_t num_layers = 1;
  // S: token rows per segment, >= 1.
  int32_t segment_tokens = 1;
  // KV heads per layer, >= 1.
  int32_t num_kv_heads = 1;
  // Elements per head, >= 1.
  int32_t head_dim = 1;
  // Element type.
  KvDtype dtype = KvDtype::kFloat32;

  // Returns InvalidArgument naming the first field out of range (or a slot size overflowing
  // int64), OK otherwise.
  absl::Status Validate() const;
  // Bytes of one token row of one K (or V) block: num_kv_heads * head_dim * sizeof(dtype).
  // REQUIRES: Validate().ok() (all accessors).
  int64_t TokenRowBytes() const;
  // Bytes of one layer's K (or V) block: segment_tokens * TokenRowBytes().
  int64_t BlockBytes() const;
  // Bytes of the whole slot: num_layers * 2 * BlockBytes().
  int64_t SlotBytes() const;
  // Byte offset of layer `layer`'s K block (kv == 0) or V block (kv == 1) inside the slot.
  // REQUIRES: 0 <= layer < num_layers, kv in {0, 1}.
  int64_t BlockOffsetBytes(int32_t layer, int kv) const;

  friend bool operator==(const KvSlotLayout&, const KvSlotLayout&) = default;
};

// Returns the KvBlock of layer `layer` of the slot at `slot` using its first `num_tokens` rows.
// Errors: InvalidArgument for an invalid layout, layer out of [0, num_layers), num_tokens out of
// [0, segment_tokens], or a null slot with num_tokens > 0.
absl::StatusOr<KvBlock> SlotLayerBlock(const KvSlotLayout& layout, const void* slot, int32_t layer,
                                       int32_t num_tokens);

// Shape and options of one partial-attention call.
struct AttentionParams {
  // Query heads, >= 1 and a multiple of num_kv_heads.
  int32_t num_heads = 1;
  // KV heads, >= 1.
  int32_t num_kv_heads = 1;
  // Elements per head (any value >= 1; 64 and 128 are the fast paths), <= 4096.
  int32_t head_dim = 1;
  // Element type of every block's K and V.
  KvDtype kv_dtype = KvDtype::kFloat32;
  // Multiplier of q.k; 0 means the default 1/sqrt(head_dim). Must be finite.
  float softmax_scale = 0.0f;
  // Apply the causal mask (key j visible to query i iff j <= q_start_pos + i).
  bool causal = false;
  // Position of query 0 in the key numbering, used only when causal; >= 0.
  int64_t q_start_pos = 0;
};

// Returns the effective scale (params.softmax_scale, or 1/sqrt(head_dim) when it is 0).
float EffectiveSoftmaxScale(const AttentionParams& params);

// Validates params and the shapes of a call. Returns InvalidArgument naming the offending field
// (num_heads not a multiple of num_kv_heads, head_dim 0, negative num_q_tokens, span sizes that
// do not match, a block with num_tokens < 0 or null k/v with num_tokens > 0, non-finite scale,
// negative q_start_pos...). PartialAttention and ReferencePartialAttention call it first.
absl::Status ValidateAttentionArgs(const AttentionParams& params, int32_t num_q_tokens,
                                   absl::Span<const float> q, absl::Span<const KvBlock> blocks,
                                   absl::Span<const float> out, absl::Span<const float> lse);

// The fast CPU path: partial attention of num_q_tokens queries over the keys of `blocks` (in list
// order), writing out [num_q_tokens][num_heads][head_dim] and lse [num_q_tokens][num_heads] per
// the conventions above. Single pass, online softmax (flash-style) per (query, head) over key
// tiles, float32 accumulation (bf16 KV is widened exactly), vectorised (AVX2+FMA when the CPU has
// it, SSE2 otherwise), on the calling thread, tile by tile: (query-token tile, head tile).
// Deterministic. (Callers that want several cores run several calls on disjoint outputs: the
// data plane attends one holder's segments per call.)
//
// REQUIRES: every non-empty block's k and v point at >= num_tokens * num_kv_heads * head_dim
// elements; out and lse do not overlap q, each other or the KV.
// Returns InvalidArgument (see ValidateAttentionArgs) with out and lse untouched on bad shapes.
absl::Status PartialAttention(const AttentionParams& params, int32_t num_q_tokens,
                              absl::Span<const float> q, absl::Span<const KvBlock> blocks,
                              absl::Span<float> out, absl::Span<float> lse);

// Shape of a partial: out [num_q_tokens][num_heads][head_dim], lse [num_q_tokens][num_heads].
struct PartialShape {
  // Query tokens, >= 0.
  int32_t num_q_tokens = 0;
  // Query heads, >= 1.
  int32_t num_heads = 1;
  // Elements per head, >= 1.
  int32_t head_dim = 1;
};

// A read-only partial (borrowed spans).
struct PartialView {
  absl::Span<const float> out;  // num_q_tokens * num_heads * head_dim
  absl::Span<const float> lse;  // num_q_tokens * num_heads
};

// A writable partial (borrowed spans).
struct MutablePartialView {
  absl::Span<float> out;  // num_q_tokens * num_heads * head_dim
  absl::Span<float> lse;  // num_q_tokens * num_heads
};

// Sets every (query, head) of `partial` to the empty partial (out 0, lse -inf), the identity of
// the merge. Returns InvalidArgument on a shape/span-size mismatch.
absl::Status FillEmptyPartial(const PartialShape& shape, MutablePartialView partial);

// result = merge(a, b). result may be exactly a or b (same data pointers: in place) but must not
// partially overlap them. lse values may be -inf (an empty partial). lse values are not checked
// per element (cost): REQUIRES lse is finite or -inf (as produced by this module).
// Returns InvalidArgument on a bad shape or span sizes that do not match the shape.
absl::Status MergePartials(const PartialShape& shape, PartialView a, PartialView b,
                           MutablePartialView result);

// acc = merge(acc, others[0], others[1], ...) in one pass per (query, head) (n-way merge from the
// running max; equal to folding MergePartials up to rounding). others must not overlap acc.
// Returns InvalidArgument on a bad shape or any span size mismatch (acc is then untouched).
absl::Status MergePartialsInPlace(const PartialShape& shape, MutablePartialView acc,
                                  absl::Span<const PartialView> others);

// Merges one (query, head) row: (o_a, lse_a) and (o_b, lse_b) -> (o, *lse) over head_dim
// elements. o may equal o_a or o_b. No validation (inner loop helper for callers that merge
// their own layouts). REQUIRES: head_dim >= 1, pointers valid.
void MergeRow(int32_t head_dim, const float* o_a, float lse_a, const float* o_b, float lse_b,
              float* o, float* lse);

}  // namespace tokenlake::attention

#endif  // TOKENLAKE_ATTENTION_ATTENTION_H_
