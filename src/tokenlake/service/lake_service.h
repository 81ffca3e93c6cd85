// The `Lake` gRPC service of the coordinator (proto/tokenlake/v1/tokenlake.proto): the engines'
// per-iteration calls on the cluster's one lake (lake/control_plane.h).
//   - PlanIteration: match + plan + admit one request's iteration;
//   - ReleaseAndPlan: an iteration's Release and the next one's PlanIteration under one hold of
//     the lake's lock (lake::ControlPlane::ReleaseAndPlan over this service's plans), so that an
//     engine makes one round trip per iteration; a failed Release (NotFound: the request is not
//     active, e.g. the coordinator released a given-up attempt, or the call is a late duplicate)
//     plans nothing, so no pin is left by a call that arrives after its attempt was given up;
//   - PlanBatch: a whole iteration of an engine's batch under one hold of the lock, as
//     lake::ControlPlane::PlanBatch (the same implementation, over this service's plans): the
//     confirmations of copies the engine stored (they become visible to plans), the releases
//     of ids not planned here (a failure ignored), then per request its own release (if listed;
//     a failure skips its plan, as in ReleaseAndPlan) and its PlanIteration under the batch's
//     token budget, so that no other request of the batch can evict its prefix in between;
//   - Commit (CommitPending when the request asks for pending copies, as every current engine
//     does), Release and ReleaseTail (the slots of a request's KV tail in the pool) as the
//     lake's.
// A plan's new segments go where the lake says unless that instance is not routable (then to the
// computing instance, which holds their KV); reads of a rebalance copy not yet confirmed go to
// its source (Reconciler::RedirectUnconfirmed). Every call must carry a call token made with
// the cluster secret (call_auth.h), else UNAUTHENTICATED.
//
// Thread-safety: thread-safe (gRPC calls it from many threads).
#ifndef TOKENLAKE_SERVICE_LAKE_SERVICE_H_
#define TOKENLAKE_SERVICE_LAKE_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <array>
#include <atomic>
#include <cstdint>

#include "absl/status/statusor.h"
#include "tokenlake/lake/control_plane.h"
#include "tokenlake/service/call_auth.h"
#include "tokenlake/service/guarded_lake.h"
#include "tokenlake/service/leader_gate.h"
#include "tokenlake/service/membership.h"
#include "tokenlake/service/reconciler.h"
#include "tokenlake/v1/tokenlake.grpc.pb.h"

namespace tokenlake::service {

class LakeService final : public v1::Lake::Service {
 public:
  // The calls served, by kind (tokenlake_lake_rpcs_total{call=...}).
  enum Call {
    kPlanIteration,
    kCommit,
    kRelease,
    kReleaseAndPlan,
    kPlanBatch,
    kReleaseTail,
    kNumCalls
  };

  // The pointers are borrowed and outlive this.
  LakeService(GuardedLake* lake, Membership* membership, Reconciler* reconciler,
              CallAuthenticator* auth)
      : lake_(lake), membership_(membership), reconciler_(reconciler), auth_(auth) {}

  grpc::Status PlanIteration(grpc::ServerContext* ctx, const v1::PlanIterationRequest* request,
                             v1::PlanIterationReply* reply) override;
  grpc::Status Commit(grpc::ServerContext* ctx, const v1::CommitRequest* request,
                      v1::CommitReply* reply) override;
  grpc::Status Release(grpc::ServerContext* ctx, const v1::ReleaseRequest* request,
                       v1::ReleaseReply* reply) override;
  grpc::Status ReleaseAndPlan(grpc::ServerContext* ctx, const v1::ReleaseAndPlanRequest* request,
                              v1::PlanIterationReply* reply) override;
  grpc::Status PlanBatch(grpc::ServerContext* ctx, const v1::PlanBatchRequest* request,
                         v1::PlanBatchReply* reply) override;
  grpc::Status ReleaseTail(grpc::ServerContext* ctx, const v1::ReleaseRequest* request,
                           v1::ReleaseReply* reply) override;

  int64_t calls(Call call) const { return calls_[call].load(std::memory_order_relaxed); }
  // Iterations planned (PlanIteration, and each planned entry of ReleaseAndPlan / PlanBatch).
  int64_t plan_iterations() const { return plan_iterations_.load(std::memory_order_relaxed); }

  // Refuses every call while this coordinator does not lead (leader_gate.h); null: always
  // serves. Set before the server starts.
  void set_gate(const LeaderGate* gate) { gate_ = gate; }

 private:
  class LockedPlane;
  const LeaderGate* gate_ = nullptr;
  // PlanIterationOnLake, then the service's redirects (new segments of an unroutable target to
  // the caller; reads of an unconfirmed rebalance copy to its source).
  absl::StatusOr<lake::IterationPlan> PlanLocked(const lake::IterationRequest& request)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(lake_->mu);
  void Count(Call call) { calls_[call].fetch_add(1, std::memory_order_relaxed); }
  // Every call's prologue: the caller's token for `name`, then the leader gate; counted once
  // both pass.
  grpc::Status AcceptCall(grpc::ServerContext* ctx, const char* name, Call call);

  GuardedLake* const lake_;
  Membership* const membership_;
  Reconciler* const reconciler_;
  CallAuthenticator* const auth_;
  std::array<std::atomic<int64_t>, kNumCalls> calls_{};
  std::atomic<int64_t> plan_iterations_{0};
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_LAKE_SERVICE_H_
