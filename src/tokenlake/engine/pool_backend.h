// PoolBackend: the attention backend of one iteration of one request served from the TokenLake
// pool, on its computing instance. Built from the iteration's query plan:
//   - remote kMoveQueries holders: per layer, the queries go to the holder (InstancePool::
//     StartAttend), which returns the partial over its segments;
//   - local segments (held by the computing instance): partial over its own store;
//   - pulled segments (kPullKv): partial over the KV copied at the start of the iteration;
//   - the tail (the sequence's tokens after the pooled prefix, float32, kept by the computing
//     instance) plus the new tokens: causal partial (q_start_pos = tail length before them).
// All partials are merged with log-sum-exp (attention::MergePartialsInPlace). A whole batch's
// attention at one layer runs through AttendBatch, which sends each holder the queries of every
// request it serves in one message.
//
// Thread-safety: not thread-safe (the driver thread of the computing instance).
#ifndef TOKENLAKE_ENGINE_POOL_BACKEND_H_
#define TOKENLAKE_ENGINE_POOL_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "tokenlake/base/ids.h"
#include "tokenlake/engine/instance_pool.h"
#include "tokenlake/engine/iteration_loop.h"
#include "tokenlake/engine/llama_config.h"
#include "tokenlake/engine/llama_model.h"

namespace tokenlake::engine {

// The sequence's KV after its pooled prefix, per layer [tokens][num_kv_heads][head_dim] float32.
struct SequenceTail {
  std::vector<std::vector<float>> k;
  std::vector<std::vector<float>> v;
};

// Segments served by one remote holder for the queries of one request.
struct RemoteHolder {
  InstanceId holder;
  std::vector<SegmentRef> segments;
};

// A segment whose KV was pulled to the computing instance for this iteration.
struct PulledSegment {
  SegmentRef ref;
  std::vector<std::byte> slot;  // one whole slot (layout of the pool)
};

// Counters of the data-plane work of one request.
struct PoolTraffic {
  int64_t remote_attend_calls = 0;
  int64_t local_attend_calls = 0;
  // Bytes of the remote attend calls: query tensors sent, partial results (out, lse) back.
  int64_t query_bytes_out = 0;
  int64_t partial_bytes_back = 0;
};

class PoolBackend final : public AttentionBackend {
 public:
  // Borrowed: pool, tail, traffic (must outlive the backend). REQUIRES: tail has num_layers
  // entries with the same token count.
  PoolBackend(InstancePool* pool, const LlamaConfig& config, InstanceId compute,
              std::vector<RemoteHolder> remote, std::vector<SegmentRef> local,
              std::vector<PulledSegment> pulled, SequenceTail* tail, PoolTraffic* traffic);

  absl::Status Attend(int32_t layer, int32_t num_tokens, absl::Span<const float> q,
                      absl::Span<const float> k, absl::Span<const float> v,
                      absl::Span<float> out) override;

  // The attention of a batch at one layer: calls[i] for backends[i] (all over the same pool).
  // The queries of every sequence served by a holder go to it in ONE message per (computing
  // instance, holder) pair (InstancePool::StartAttendBatch); each sequence's own partials are
  // computed meanwhile; then every sequence merges its partials. Attend is the batch of one.
  static absl::Status AttendBatch(absl::Span<PoolBackend* const> backends, int32_t layer,
                                  absl::Span<const AttendCall> calls);

 private:
  InstancePool* pool_;
  LlamaConfig config_;
  InstanceId compute_;
  std::vector<RemoteHolder> remote_;
  std::vector<SegmentRef> local_;
  std::vector<PulledSegment> pulled_;
  SequenceTail* tail_;
  PoolTraffic* traffic_;
};

// The CPU engine's IterationExecutor: the model (LlamaModel::ForwardBatch, one forward over the
// batch's tokens) over the InstancePool's data plane, each request attending through its own
// PoolBackend built from its plan (kPullKv segments pulled first, kMoveQueries holders sent the
// queries per layer). Tails are float32, per request.
//
// Thread-safety: not thread-safe (the driver thread of the computing instances).
class PoolExecutor final : public IterationExecutor {
 public:
  // Borrowed, must outlive the executor.
  PoolExecutor(const LlamaModel* model, InstancePool* pool) : model_(model), pool_(pool) {}

  absl::Status BeginSequence(RequestId request, int64_t max_tokens) override;
  DataPlaneCounters EndSequence(RequestId request) override;
  absl::Status DropTailRows(RequestId request, int64_t rows) override;
  absl::StatusOr<std::vector<WorkOutput>> Run(absl::Span<const IterationWork> batch) override;
  absl::StatusOr<int64_t> StoreSegment(RequestId request, InstanceId compute, int64_t first_row,
                                       InstanceId target, SegmentId segment,
                                       const StoredMeta& meta) override;
  absl::Status FreeSegment(InstanceId compute, InstanceId target, SegmentId segment,
                           uint64_t evicted_at) override;

 private:
  struct Sequence {
    SequenceTail tail;
    PoolTraffic traffic;
    int64_t pulled_segments = 0;
    int64_t pulled_bytes = 0;
  };
  absl::StatusOr<Sequence*> Find(RequestId request);

  const LlamaModel* model_;
  InstancePool* pool_;
  absl::flat_hash_map<RequestId, std::unique_ptr<Sequence>> sequences_;
};

}  // namespace tokenlake::engine

#endif  // TOKENLAKE_ENGINE_POOL_BACKEND_H_
