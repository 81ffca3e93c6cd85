// The model shape and the byte / FLOP formulas of cache operations (design doc 4.4).
//
// Conventions (every function returns a total over ALL layers; divide by num_layers for the
// per-layer figure the data plane moves each layer):
//   - A query tensor of q new tokens: q x num_heads x head_dim elements of dtype_bytes.
//   - A partial attention result sent back: the same, plus one log-sum-exp per (head, token) in
//     fp32 (4 bytes): q x num_heads x (head_dim x dtype_bytes + 4) bytes.
//   - Pulling (or storing elsewhere) the KV of T tokens: 2 (K and V) x T x num_kv_heads x
//     head_dim elements of dtype_bytes.
//   - Attention of q queries over T cached tokens: 4 x q x T x num_heads x head_dim FLOPs (two
//     matmuls, QK^T and PV, 2 FLOPs per multiply-add); it reads the T tokens' KV once.
// "Move queries" to a holder costs QueryBytes + PartialResultBytes; "pull KV" costs PullKvBytes.
// The planner moves queries when that is no more than pulling (ties move queries: the KV stays
// put and the computing instance needs no scratch memory).
//
// Thread-safety: value types and pure functions.
#ifndef TOKENLAKE_PLAN_COST_MODEL_H_
#define TOKENLAKE_PLAN_COST_MODEL_H_

#include <cstdint>

#include "absl/status/status.h"

namespace tokenlake::plan {

struct ModelShape {
  // Transformer layers. Must be > 0.
  int32_t num_layers = 32;
  // Query heads. Must be > 0 and a multiple of num_kv_heads.
  int32_t num_heads = 32;
  // Key/value heads (GQA). Must be > 0.
  int32_t num_kv_heads = 8;
  // Elements per head. Must be > 0.
  int32_t head_dim = 128;
  // Bytes per KV / query element (2 for bf16). Must be > 0.
  int32_t dtype_bytes = 2;

  // OK, or InvalidArgument naming the first bad field.
  absl::Status Validate() const;
  friend bool operator==(const ModelShape&, const ModelShape&) = default;
};

// Bytes of the queries of `q` tokens sent to one holder (all layers).
int64_t QueryBytes(const ModelShape& shape, int64_t q);
// Bytes of the partial outputs plus fp32 LSEs of `q` tokens sent back by one holder.
int64_t PartialResultBytes(const ModelShape& shape, int64_t q);
// QueryBytes + PartialResultBytes.
int64_t MoveQueriesBytes(const ModelShape& shape, int64_t q);
// Bytes of the KV of `tokens` tokens (K and V, all layers): what pulling a segment, or storing a
// new segment away from where it was computed, moves; also one slot's payload.
int64_t KvBytes(const ModelShape& shape, int64_t tokens);
// Attention FLOPs of `q` queries over `tokens` cached tokens (all layers).
double AttentionFlops(const ModelShape& shape, int64_t q, int64_t tokens);

// True when moving the queries of `q` tokens to a holder of `cached_tokens` tokens of the
// request costs no more bytes than pulling that KV to the computing instance.
bool PreferMoveQueries(const ModelShape& shape, int64_t q, int64_t cached_tokens);

}  // namespace tokenlake::plan

#endif  // TOKENLAKE_PLAN_COST_MODEL_H_
