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

// ---- Cache load: the roofline of paper section 6.1 (get_cache_load) ----
//
// For a batch of requests with `prefix` cached and `input` new tokens each, on a pool of N
// instances of memory bandwidth B and attention throughput P:
//   M = sum KvBytes(prefix + input)            (the KV that attention reads; for the paper's
//                                               multi-head bf16 model, 4 d (prefix + input) per
//                                               layer, d = the model width)
//   F = sum AttentionFlops(input, prefix)      (4 d prefix input per layer: QK^T and PV at 2
//                                               FLOPs per multiply-add. The paper's formula is
//                                               written 2 d prefix input, i.e. multiply-adds; we
//                                               count FLOPs so that P is in FLOP/s like every
//                                               profile of this project)
//   L = max(M / (M + N B T), F / (F + N P T))
// where T is the batch's own iteration time. L in [0, 1) is the share of the iteration that
// reading the cache takes when the pool spreads it evenly over its N instances, memory-bound or
// compute-bound, whichever is slower; T / (1 - L) = T + max(M / (N B), F / (N P)) is then the
// iteration with its cache access.

// One batch's cache access, summed over its requests.
struct CacheAccess {
  double kv_bytes = 0;         // M
  double attention_flops = 0;  // F
  CacheAccess& operator+=(const CacheAccess& o) {
    kv_bytes += o.kv_bytes;
    attention_flops += o.attention_flops;
    return *this;
  }
};

// What one instance of the pool sustains for cache access.
struct InstanceRoofline {
  // B: bytes of KV that attention reads per second (> 0).
  double kv_bytes_per_s = 0;
  // P: attention FLOP/s (> 0).
  double attention_flops_per_s = 0;
};

// M and F of one request with `prefix_tokens` cached and `input_tokens` new tokens (both >= 0).
CacheAccess CacheAccessOf(const ModelShape& shape, int64_t prefix_tokens, int64_t input_tokens);

// L = max(M / (M + N B T), F / (F + N P T)) for `access` on `instances` (N >= 1) instances of
// `roofline`, with batch time `batch_seconds` (T > 0). 0 when M and F are 0.
// REQUIRES (CHECK; callers validate user input): N >= 1, B > 0, P > 0, T > 0.
double CacheLoad(const CacheAccess& access, int32_t instances, const InstanceRoofline& roofline,
                 double batch_seconds);

}  // namespace tokenlake::plan

#endif  // TOKENLAKE_PLAN_COST_MODEL_H_
