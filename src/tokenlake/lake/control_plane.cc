#include "tokenlake/lake/control_plane.h"

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/status_macros.h"

namespace tokenlake::lake {

absl::StatusOr<IterationPlan> PlanIterationOnLake(lake::Lake& lake, ManualClock* clock,
                                                  const IterationRequest& request) {
  if (request.max_cached_segments < 0 || request.end_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PlanIteration: max_cached_segments %d and end_tokens %d must be >= 0 and >= 1",
        request.max_cached_segments, request.end_tokens));
  }
  std::vector<index::SegmentKey> keys = request.keys;
  index::MatchResult match = lake.Match(keys);
  if (match.matched_segments > request.max_cached_segments) {
    keys.resize(static_cast<size_t>(request.max_cached_segments));
    match = lake.Match(keys);
  }
  IterationPlan out;
  out.cached_tokens = match.matched_tokens;
  out.end_tokens = request.end_tokens;
  if (request.prefill && request.max_new_tokens > 0 &&
      out.end_tokens - out.cached_tokens > request.max_new_tokens) {
    // A chunk of the prompt: the keys end with its last full segment (the cached prefix is a
    // prefix of them: cached <= the chunk's end).
    out.end_tokens = out.cached_tokens + request.max_new_tokens;
    const int64_t s = keys.empty() ? 1 : keys.front().num_tokens;
    keys.resize(std::min(keys.size(), static_cast<size_t>(out.end_tokens / s)));
  }
  out.num_keys = static_cast<int32_t>(keys.size());
  out.new_tokens = out.end_tokens - (request.prefill ? out.cached_tokens : request.computed_tokens);
  if (out.new_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PlanIteration: request %d computes %d tokens (end %d, computed %d)",
        request.request.value(), out.new_tokens, request.end_tokens, request.computed_tokens));
  }
  lake::LakeRequest lr{.id = request.request,
                       .keys = std::move(keys),
                       .new_tokens = out.new_tokens,
                       .preferred_instance = request.preferred_instance,
                       .count_hits = request.count_hits};
  if (lr.preferred_instance.valid() && (lr.preferred_instance.value() < 0 ||
                                        lr.preferred_instance.value() >= lake.num_instances())) {
    lr.preferred_instance = InstanceId();
  }
  if (clock != nullptr) clock->AdvanceUs(1000);
  TOKENLAKE_ASSIGN_OR_RETURN(
      std::vector<plan::BatchPlan> plans,
      lake.GenPlans({lake::Batch{.requests = {lr}, .dop = lake.num_instances()}}));
  if (plans.size() != 1 || plans[0].requests.size() != 1) {
    return absl::InternalError("PlanIteration: the lake returned no plan for the request");
  }
  const plan::RequestPlan& rp = plans[0].requests[0];
  if (rp.cached_tokens != out.cached_tokens) {
    return absl::InternalError(
        absl::StrFormat("PlanIteration: plan caches %d tokens, match said %d", rp.cached_tokens,
                        out.cached_tokens));
  }
  if (request.tail_in_pool) {
    // The tail covers the iteration's rows, on the computing instance where it has room.
    lr.tail_end_tokens = out.end_tokens;
    lr.tail_instance = rp.compute_instance;
  }
  lake::AdmitResult admitted;
  if (request.try_admit) {
    TOKENLAKE_ASSIGN_OR_RETURN(std::optional<lake::AdmitResult> tried, lake.TryAdmit(lr));
    if (!tried.has_value()) {
      IterationPlan deferred;
      deferred.admitted = false;
      deferred.end_tokens = out.end_tokens;
      return deferred;
    }
    admitted = *std::move(tried);
  } else {
    TOKENLAKE_ASSIGN_OR_RETURN(admitted, lake.Admit(lr));
  }
  out.tail_slots = std::move(admitted.tail_slots);
  out.evicted = std::move(admitted.evicted);
  out.evicted_at = admitted.sequence;
  out.compute_instance = rp.compute_instance;
  out.segments = rp.segments;
  for (const plan::NewSegmentPlacement& p : plans[0].transfer.new_segments) {
    if (p.request == request.request) out.new_segments.push_back(p);
  }
  return out;
}

absl::StatusOr<IterationPlan> ControlPlane::ReleaseAndPlan(RequestId release,
                                                           const IterationRequest& next) {
  TOKENLAKE_RETURN_IF_ERROR(Release(release));
  return PlanIteration(next);
}

bool BatchTokenBudget::Fit(IterationRequest& request) const {
  if (left_ < 0) return true;
  if (!request.prefill) return request.end_tokens - request.computed_tokens <= left_;
  if (left_ < 1) return false;
  request.max_new_tokens =
      request.max_new_tokens > 0 ? std::min(request.max_new_tokens, left_) : left_;
  return true;
}

void BatchTokenBudget::Charge(int64_t new_tokens) {
  if (left_ >= 0) left_ = std::max<int64_t>(0, left_ - new_tokens);
}

absl::StatusOr<std::vector<BatchPlanEntry>> ControlPlane::PlanBatch(
    absl::Span<const StoreConfirmation> confirm, absl::Span<const RequestId> release,
    absl::Span<const IterationRequest> requests, int64_t token_budget) {
  // Confirmations first: the releases below drop the copies still pending.
  if (!confirm.empty()) TOKENLAKE_RETURN_IF_ERROR(ConfirmStored(confirm));
  // Ids not planned here first; a planned request's own pins are released just before it is
  // planned again, so that no other request of the batch can evict its prefix in between.
  absl::flat_hash_set<RequestId> planned;
  for (const IterationRequest& r : requests) planned.insert(r.request);
  absl::flat_hash_set<RequestId> own;
  for (RequestId r : release) {
    if (planned.contains(r)) {
      own.insert(r);
      continue;
    }
    absl::Status s = Release(r);
    if (FailedOnTheWire(s)) return s;
    // Not planned again: the request ended, its tail goes with its pins.
    s = ReleaseTail(r);
    if (FailedOnTheWire(s)) return s;
  }
  std::vector<BatchPlanEntry> out(requests.size());
  BatchTokenBudget budget(token_budget);
  for (size_t i = 0; i < requests.size(); ++i) {
    if (own.contains(requests[i].request)) {
      absl::Status s = Release(requests[i].request);
      if (FailedOnTheWire(s)) return s;
      if (!s.ok()) {
        // Not active any more: not planned (as ReleaseAndPlan).
        out[i].status = s;
        continue;
      }
    }
    IterationRequest request = requests[i];
    if (!budget.Fit(request)) {
      out[i].plan.admitted = false;
      continue;
    }
    absl::StatusOr<IterationPlan> p = PlanIteration(request);
    if (!p.ok() && FailedOnTheWire(p.status())) return p.status();
    if (p.ok()) {
      if (p->admitted) budget.Charge(p->new_tokens);
      out[i].plan = *std::move(p);
    } else {
      out[i].status = p.status();
    }
  }
  return out;
}

bool FailedOnTheWire(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kCancelled:
      return true;
    default:
      return false;
  }
}

absl::StatusOr<IterationPlan> LocalControlPlane::PlanIteration(const IterationRequest& request) {
  return PlanIterationOnLake(*lake_, clock_, request);
}

absl::StatusOr<lake::CommitResult> LocalControlPlane::Commit(
    RequestId request, absl::Span<const plan::NewSegmentPlacement> placements) {
  return lake_->CommitPending(request, placements);
}

absl::Status LocalControlPlane::ConfirmStored(absl::Span<const StoreConfirmation> copies) {
  return lake_->ConfirmStored(copies).status();
}

absl::Status LocalControlPlane::Release(RequestId request) { return lake_->Release(request); }

absl::Status LocalControlPlane::ReleaseTail(RequestId request) {
  lake_->ReleaseTail(request);
  return absl::OkStatus();
}

}  // namespace tokenlake::lake
