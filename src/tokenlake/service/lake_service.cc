#include "tokenlake/service/lake_service.h"

#include <string>
#include <vector>

#include "tokenlake/service/lake_rpc.h"

namespace tokenlake::service {

// The lake under the service's lock as a lake::ControlPlane, so that ReleaseAndPlan and PlanBatch
// run the one implementation of each protocol (lake::ControlPlane's) with this service's plans
// (PlanLocked). Lives inside one call that holds the lock.
class LakeService::LockedPlane final : public lake::ControlPlane {
 public:
  explicit LockedPlane(LakeService* service) : s_(service) {}
  int32_t num_instances() const override {
    s_->lake_->mu.AssertHeld();
    return s_->lake_->lake->num_instances();
  }
  absl::StatusOr<lake::IterationPlan> PlanIteration(
      const lake::IterationRequest& request) override {
    s_->lake_->mu.AssertHeld();
    return s_->PlanLocked(request);
  }
  absl::StatusOr<lake::CommitResult> Commit(
      RequestId request, absl::Span<const plan::NewSegmentPlacement> placements) override {
    s_->lake_->mu.AssertHeld();
    return s_->lake_->lake->CommitPending(request, placements);
  }
  absl::Status ConfirmStored(absl::Span<const lake::StoreConfirmation> copies) override {
    s_->lake_->mu.AssertHeld();
    return s_->lake_->lake->ConfirmStored(copies).status();
  }
  absl::Status Release(RequestId request) override {
    s_->lake_->mu.AssertHeld();
    return s_->lake_->lake->Release(request);
  }
  absl::Status ReleaseTail(RequestId request) override {
    s_->lake_->mu.AssertHeld();
    s_->lake_->lake->ReleaseTail(request);
    return absl::OkStatus();
  }

 private:
  LakeService* const s_;
};

namespace {

// A plan as the reply of PlanIteration / ReleaseAndPlan, or its error.
grpc::Status PlanReply(const absl::StatusOr<lake::IterationPlan>& plan,
                       v1::PlanIterationReply* reply) {
  if (!plan.ok()) return ToGrpc(plan.status());
  ToProto(*plan, reply);
  return grpc::Status::OK;
}

}  // namespace

grpc::Status LakeService::AcceptCall(grpc::ServerContext* ctx, const char* name, Call call) {
  if (grpc::Status a = auth_->Check(ctx, name); !a.ok()) return a;
  if (gate_ != nullptr) {
    if (grpc::Status g = gate_->Check(); !g.ok()) return g;
  }
  Count(call);
  return grpc::Status::OK;
}

grpc::Status LakeService::PlanIteration(grpc::ServerContext* ctx,
                                        const v1::PlanIterationRequest* request,
                                        v1::PlanIterationReply* reply) {
  if (grpc::Status a = AcceptCall(ctx, "PlanIteration", kPlanIteration); !a.ok()) return a;
  absl::MutexLock lake_lock(&lake_->mu);
  return PlanReply(PlanLocked(FromProto(*request)), reply);
}

grpc::Status LakeService::Commit(grpc::ServerContext* ctx, const v1::CommitRequest* request,
                                 v1::CommitReply* reply) {
  if (grpc::Status a = AcceptCall(ctx, "Commit", kCommit); !a.ok()) return a;
  const RequestId id(request->request_id());
  std::vector<plan::NewSegmentPlacement> placements;
  for (const v1::Placement& p : request->placements()) placements.push_back(FromProto(p, id));
  absl::MutexLock lake_lock(&lake_->mu);
  // A peer that predates pending copies (no `pending`) gets the old, immediate listing.
  absl::StatusOr<lake::CommitResult> r = request->pending()
                                             ? lake_->lake->CommitPending(id, placements)
                                             : lake_->lake->Commit(id, placements);
  if (!r.ok()) return ToGrpc(r.status());
  ToProto(*r, reply);
  return grpc::Status::OK;
}

grpc::Status LakeService::Release(grpc::ServerContext* ctx, const v1::ReleaseRequest* request,
                                  v1::ReleaseReply*) {
  if (grpc::Status a = AcceptCall(ctx, "Release", kRelease); !a.ok()) return a;
  absl::MutexLock lake_lock(&lake_->mu);
  return ToGrpc(lake_->lake->Release(RequestId(request->request_id())));
}

grpc::Status LakeService::ReleaseTail(grpc::ServerContext* ctx, const v1::ReleaseRequest* request,
                                      v1::ReleaseReply*) {
  if (grpc::Status a = AcceptCall(ctx, "ReleaseTail", kReleaseTail); !a.ok()) return a;
  absl::MutexLock lake_lock(&lake_->mu);
  lake_->lake->ReleaseTail(RequestId(request->request_id()));
  return grpc::Status::OK;
}

grpc::Status LakeService::ReleaseAndPlan(grpc::ServerContext* ctx,
                                         const v1::ReleaseAndPlanRequest* request,
                                         v1::PlanIterationReply* reply) {
  if (grpc::Status a = AcceptCall(ctx, "ReleaseAndPlan", kReleaseAndPlan); !a.ok()) return a;
  absl::MutexLock lake_lock(&lake_->mu);
  LockedPlane plane(this);
  return PlanReply(
      plane.ReleaseAndPlan(RequestId(request->release_request_id()), FromProto(request->plan())),
      reply);
}

grpc::Status LakeService::PlanBatch(grpc::ServerContext* ctx, const v1::PlanBatchRequest* request,
                                    v1::PlanBatchReply* reply) {
  if (grpc::Status a = AcceptCall(ctx, "PlanBatch", kPlanBatch); !a.ok()) return a;
  std::vector<lake::StoreConfirmation> confirm;
  confirm.reserve(static_cast<size_t>(request->confirm_size()));
  for (const v1::StoreConfirmation& c : request->confirm()) confirm.push_back(FromProto(c));
  std::vector<RequestId> release;
  release.reserve(static_cast<size_t>(request->release_request_ids_size()));
  for (uint64_t id : request->release_request_ids()) release.emplace_back(id);
  std::vector<lake::IterationRequest> requests;
  requests.reserve(static_cast<size_t>(request->plans_size()));
  for (const v1::PlanIterationRequest& plan : request->plans()) requests.push_back(FromProto(plan));
  absl::MutexLock lake_lock(&lake_->mu);
  LockedPlane plane(this);
  absl::StatusOr<std::vector<lake::BatchPlanEntry>> entries =
      plane.PlanBatch(confirm, release, requests, request->token_budget());
  if (!entries.ok()) return ToGrpc(entries.status());
  for (const lake::BatchPlanEntry& entry : *entries) {
    v1::PlanBatchEntry* e = reply->add_entries();
    if (entry.status.ok()) {
      ToProto(entry.plan, e->mutable_plan());
    } else {
      e->set_status_code(ToProto(entry.status.code()));
      const std::string message(entry.status.message());
      e->set_error_message(message);
    }
  }
  return grpc::Status::OK;
}

absl::StatusOr<lake::IterationPlan> LakeService::PlanLocked(const lake::IterationRequest& in) {
  absl::StatusOr<lake::IterationPlan> plan =
      lake::PlanIterationOnLake(*lake_->lake, &lake_->clock, in);
  if (!plan.ok()) return plan;
  plan_iterations_.fetch_add(1, std::memory_order_relaxed);
  const std::vector<bool> routable = membership_->RoutableSet();
  auto is_routable = [&](int32_t i) {
    return i >= 0 && i < static_cast<int32_t>(routable.size()) && routable[static_cast<size_t>(i)];
  };
  // New segments go where the plan says, unless that instance is not routable: then to the
  // computing instance (the caller), which holds their KV.
  const int32_t caller = InstanceToWire(in.preferred_instance);
  for (plan::NewSegmentPlacement& p : plan->new_segments) {
    if (!is_routable(InstanceToWire(p.target)) && is_routable(caller)) {
      p.target = InstanceId(caller);
    }
  }
  // A copy the rebalancer just ordered may not be there yet: read from its source.
  reconciler_->RedirectUnconfirmed(&*plan, routable);
  return plan;
}

}  // namespace tokenlake::service
