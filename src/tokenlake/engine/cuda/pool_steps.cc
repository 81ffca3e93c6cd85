#include "tokenlake/engine/cuda/pool_steps.h"

#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/status_macros.h"

namespace tokenlake::engine::cuda {

absl::StatusOr<StepPlan> PlanStep(ControlPlane& control, const StepRequest& r) {
  const int32_t s = r.segment_tokens;
  if (s < 1) {
    return absl::InvalidArgumentError(absl::StrFormat("PlanStep: segment_tokens %d < 1", s));
  }
  if (r.seq.empty()) return absl::InvalidArgumentError("PlanStep: empty sequence");
  const int64_t end = static_cast<int64_t>(r.seq.size());
  if (!r.prefill && (r.computed < 0 || r.computed >= end)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PlanStep: computed %d outside [0, %d) for a decode step", r.computed, end));
  }
  // Only segments before the first token to compute may be served.
  const int64_t first_new = r.prefill ? end - 1 : r.computed;
  const int64_t full = end / s * s;
  StepPlan out;
  TOKENLAKE_ASSIGN_OR_RETURN(
      out.keys, index::ComputeSegmentKeys(r.salt, r.seq.subspan(0, static_cast<size_t>(full)), s));
  TOKENLAKE_ASSIGN_OR_RETURN(
      out.plan, control.PlanIteration({.request = r.id,
                                       .keys = out.keys,
                                       .max_cached_segments = static_cast<int32_t>(first_new / s),
                                       .end_tokens = end,
                                       .prefill = r.prefill,
                                       .computed_tokens = r.computed,
                                       .preferred_instance = r.preferred,
                                       .count_hits = r.prefill}));
  out.keys.resize(static_cast<size_t>(out.plan.num_keys));
  if (out.plan.cached_tokens < r.pooled) {
    (void)control.Release(r.id);
    return absl::InternalError(
        absl::StrFormat("PlanStep: request %d lost pooled segments (matched %d tokens, had %d)",
                        r.id.value(), out.plan.cached_tokens, r.pooled));
  }
  return out;
}

absl::StatusOr<StepCommit> CommitStep(ControlPlane& control, RequestId request,
                                      const StepPlan& step, int32_t segment_tokens) {
  TOKENLAKE_ASSIGN_OR_RETURN(lake::CommitResult commit,
                             control.Commit(request, step.plan.new_segments));
  StepCommit out;
  out.evicted = std::move(commit.evicted);
  absl::flat_hash_map<SegmentId, InstanceId> stored_on;
  for (const lake::StoredReplica& st : commit.stored) stored_on[st.segment] = st.instance;
  const absl::flat_hash_set<SegmentId> dedup(commit.deduplicated.begin(),
                                             commit.deduplicated.end());
  const int64_t pooled = step.plan.cached_tokens;
  out.pooled_tokens = pooled;
  bool contiguous = true;
  for (size_t j = static_cast<size_t>(pooled / segment_tokens); j < step.keys.size(); ++j) {
    const SegmentId id = step.keys[j].id;
    auto it = stored_on.find(id);
    if (it != stored_on.end()) {
      out.to_store.push_back({j, it->second});
    } else if (!dedup.contains(id)) {
      contiguous = false;  // not stored (no room): the tail keeps it
    }
    if (contiguous) out.pooled_tokens = static_cast<int64_t>(j + 1) * segment_tokens;
  }
  return out;
}

}  // namespace tokenlake::engine::cuda
