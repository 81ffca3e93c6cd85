#include "tokenlake/service/lake_service.h"

#include <vector>

#include "absl/container/flat_hash_set.h"
#include "tokenlake/service/lake_rpc.h"

namespace tokenlake::service {

grpc::Status LakeService::PlanIteration(grpc::ServerContext* ctx,
                                        const v1::PlanIterationRequest* request,
                                        v1::PlanIterationReply* reply) {
  if (grpc::Status a = auth_->Check(ctx, "PlanIteration"); !a.ok()) return a;
  if (gate_ != nullptr) {
    if (grpc::Status g = gate_->Check(); !g.ok()) return g;
  }
  Count(kPlanIteration);
  absl::MutexLock lake_lock(&lake_->mu);
  return PlanLocked(FromProto(*request), reply);
}

grpc::Status LakeService::Commit(grpc::ServerContext* ctx, const v1::CommitRequest* request,
                                 v1::CommitReply* reply) {
  if (grpc::Status a = auth_->Check(ctx, "Commit"); !a.ok()) return a;
  if (gate_ != nullptr) {
    if (grpc::Status g = gate_->Check(); !g.ok()) return g;
  }
  Count(kCommit);
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
  if (grpc::Status a = auth_->Check(ctx, "Release"); !a.ok()) return a;
  if (gate_ != nullptr) {
    if (grpc::Status g = gate_->Check(); !g.ok()) return g;
  }
  Count(kRelease);
  absl::MutexLock lake_lock(&lake_->mu);
  return ToGrpc(lake_->lake->Release(RequestId(request->request_id())));
}

grpc::Status LakeService::ReleaseAndPlan(grpc::ServerContext* ctx,
                                         const v1::ReleaseAndPlanRequest* request,
                                         v1::PlanIterationReply* reply) {
  if (grpc::Status a = auth_->Check(ctx, "ReleaseAndPlan"); !a.ok()) return a;
  if (gate_ != nullptr) {
    if (grpc::Status g = gate_->Check(); !g.ok()) return g;
  }
  Count(kReleaseAndPlan);
  absl::MutexLock lake_lock(&lake_->mu);
  if (absl::Status released = lake_->lake->Release(RequestId(request->release_request_id()));
      !released.ok()) {
    return ToGrpc(released);
  }
  return PlanLocked(FromProto(request->plan()), reply);
}

grpc::Status LakeService::PlanBatch(grpc::ServerContext* ctx, const v1::PlanBatchRequest* request,
                                    v1::PlanBatchReply* reply) {
  if (grpc::Status a = auth_->Check(ctx, "PlanBatch"); !a.ok()) return a;
  if (gate_ != nullptr) {
    if (grpc::Status g = gate_->Check(); !g.ok()) return g;
  }
  Count(kPlanBatch);
  std::vector<lake::StoreConfirmation> confirm;
  confirm.reserve(static_cast<size_t>(request->confirm_size()));
  for (const v1::StoreConfirmation& c : request->confirm()) confirm.push_back(FromProto(c));
  absl::MutexLock lake_lock(&lake_->mu);
  lake::Lake& lake = *lake_->lake;
  // Confirmations first: the releases below drop the copies still pending.
  if (!confirm.empty()) {
    absl::StatusOr<lake::ConfirmResult> confirmed = lake.ConfirmStored(confirm);
    if (!confirmed.ok()) return ToGrpc(confirmed.status());
  }
  absl::flat_hash_set<uint64_t> planned, own;
  for (const v1::PlanIterationRequest& plan : request->plans()) planned.insert(plan.request_id());
  for (uint64_t id : request->release_request_ids()) {
    if (planned.contains(id)) {
      own.insert(id);
    } else {
      lake.Release(RequestId(id)).IgnoreError();
    }
  }
  lake::BatchTokenBudget budget(request->token_budget());
  for (const v1::PlanIterationRequest& plan : request->plans()) {
    v1::PlanBatchEntry* e = reply->add_entries();
    absl::Status s = absl::OkStatus();
    if (own.contains(plan.request_id())) s = lake.Release(RequestId(plan.request_id()));
    lake::IterationRequest in = FromProto(plan);
    if (s.ok() && !budget.Fit(in)) {
      e->mutable_plan()->set_deferred(true);
      continue;
    }
    if (s.ok()) {
      if (grpc::Status g = PlanLocked(in, e->mutable_plan()); !g.ok()) {
        s = absl::Status(static_cast<absl::StatusCode>(g.error_code()), g.error_message());
      } else if (!e->plan().deferred()) {
        budget.Charge(e->plan().new_tokens());
      }
    }
    if (!s.ok()) {
      e->clear_plan();
      e->set_status_code(ToProto(s.code()));
      e->set_error_message(std::string(s.message()));
    }
  }
  return grpc::Status::OK;
}

grpc::Status LakeService::PlanLocked(const lake::IterationRequest& in,
                                     v1::PlanIterationReply* reply) {
  absl::StatusOr<lake::IterationPlan> plan =
      lake::PlanIterationOnLake(*lake_->lake, &lake_->clock, in);
  if (!plan.ok()) return ToGrpc(plan.status());
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
  ToProto(*plan, reply);
  return grpc::Status::OK;
}

}  // namespace tokenlake::service
