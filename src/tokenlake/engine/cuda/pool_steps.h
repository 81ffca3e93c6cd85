// The per-iteration control-plane steps of the GPU engine, over engine::ControlPlane (the same
// interface the CPU engine's loop in engine/engine.cc uses: a LocalControlPlane over a
// lake::Lake here):
//   PlanStep:   the sequence's full-segment keys, at most those before the first token to
//               compute may be served; ControlPlane::PlanIteration (match, plan, admit);
//   CommitStep: ControlPlane::Commit of the iteration's placements, and what the data plane must
//               then do: free the evicted replicas, write the stored segments (which key, which
//               instance), and how far the contiguous pooled prefix now reaches.
// The caller runs the data plane between the two and calls ControlPlane::Release after the
// iteration (also on error).
//
// NOTE: the key computation and the stored / deduplicated / pooled-prefix bookkeeping repeat
// what Engine::GeneratePooled (engine/engine.cc) does inline for the CPU pool; they could move
// next to ControlPlane and serve both.
//
// Thread-safety: as the ControlPlane.
#ifndef TOKENLAKE_ENGINE_CUDA_POOL_STEPS_H_
#define TOKENLAKE_ENGINE_CUDA_POOL_STEPS_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tokenlake/base/ids.h"
#include "tokenlake/engine/control_plane.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/lake/lake.h"

namespace tokenlake::engine::cuda {

struct StepRequest {
  // The request (its id stays the same over all its iterations).
  RequestId id;
  // Namespace salt of the segment ids.
  uint64_t salt = 0;
  // The whole sequence so far (prompt and the tokens fed since); its last token is computed.
  absl::Span<const int32_t> seq;
  // First iteration (prefill): everything after the cached prefix is computed. Otherwise the
  // tokens from `computed` on are.
  bool prefill = true;
  // Tokens whose KV already exists (pool prefix + tail); ignored for prefill.
  int64_t computed = 0;
  // Tokens per segment, >= 1.
  int32_t segment_tokens = 16;
  // Preferred computing instance (invalid = none).
  InstanceId preferred;
  // The pooled prefix the request held before this iteration (0 for a prefill): the match
  // must cover it.
  int64_t pooled = 0;
};

struct StepPlan {
  // Keys of the full segments of seq, cut to the plan's num_keys (so the segments this
  // iteration completes are keys[cached_tokens / S ...]).
  std::vector<index::SegmentKey> keys;
  // The control plane's plan (cached prefix, new tokens, computing instance, serving replicas,
  // new-segment placements).
  IterationPlan plan;
};

// Errors: InvalidArgument (segment_tokens < 1, empty seq, computed outside [0, seq.size()) for
//   a decode step), Internal when the match no longer covers the pooled prefix, and the control
//   plane's errors. On error nothing stays admitted.
absl::StatusOr<StepPlan> PlanStep(ControlPlane& control, const StepRequest& request);

struct StepCommit {
  // Replicas the lake evicted: free them on the data plane first.
  std::vector<lake::StoredReplica> evicted;
  // Segments the data plane must now write: index into StepPlan::keys and the target
  // instance, in key order.
  struct Store {
    size_t key_index = 0;
    InstanceId target;
  };
  std::vector<Store> to_store;
  // The contiguous pooled prefix after the commit (>= the plan's cached_tokens).
  int64_t pooled_tokens = 0;
};

// Commits the step's placements and derives what the data plane must do.
// Errors: the control plane's Commit errors.
absl::StatusOr<StepCommit> CommitStep(ControlPlane& control, RequestId request,
                                      const StepPlan& step, int32_t segment_tokens);

}  // namespace tokenlake::engine::cuda

#endif  // TOKENLAKE_ENGINE_CUDA_POOL_STEPS_H_
