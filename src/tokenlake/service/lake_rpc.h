// The lake's per-iteration calls over gRPC (proto/tokenlake/v1/tokenlake.proto, service Lake):
// conversions between the engine's control-plane types (lake/control_plane.h) and their
// messages, and RemoteControlPlane, the lake::ControlPlane of an instance process, which calls
// the coordinator that owns the cluster's one lake::Lake.
//
// Conversions never fail on well-formed messages; instance ids travel as int32 (-1 = none) and
// segment ids as fixed64 (SegmentId's invalid value = none). Range checks are the lake's
// (coordinator side) and the data plane's (instance side): a bad value gives an
// InvalidArgument there, never a crash.
//
// Thread-safety: the functions are pure; RemoteControlPlane is thread-safe (gRPC stubs are).
#ifndef TOKENLAKE_SERVICE_LAKE_RPC_H_
#define TOKENLAKE_SERVICE_LAKE_RPC_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "tokenlake/lake/control_plane.h"
#include "tokenlake/transport/socket_stream.h"
#include "tokenlake/transport/tls.h"
#include "tokenlake/v1/tokenlake.grpc.pb.h"

namespace tokenlake::service {

inline int32_t InstanceToWire(InstanceId i) { return i.valid() ? i.value() : -1; }
inline InstanceId InstanceFromWire(int32_t v) { return v < 0 ? InstanceId() : InstanceId(v); }

void ToProto(const lake::IterationRequest& in, v1::PlanIterationRequest* out);
lake::IterationRequest FromProto(const v1::PlanIterationRequest& in);
void ToProto(const lake::IterationPlan& in, v1::PlanIterationReply* out);
lake::IterationPlan FromProto(const v1::PlanIterationReply& in, RequestId request);
void ToProto(const plan::NewSegmentPlacement& in, v1::Placement* out);
plan::NewSegmentPlacement FromProto(const v1::Placement& in, RequestId request);
void ToProto(const lake::CommitResult& in, v1::CommitReply* out);
lake::CommitResult FromProto(const v1::CommitReply& in);
void ToProto(const lake::StoreConfirmation& in, v1::StoreConfirmation* out);
lake::StoreConfirmation FromProto(const v1::StoreConfirmation& in);
// The protocol's enums, numbered as ours. An unknown value (from a newer peer) reads as
// kMoveQueries and as kUnknown.
v1::HolderAction ToProto(plan::HolderAction action);
plan::HolderAction FromProto(v1::HolderAction action);
v1::StatusCode ToProto(absl::StatusCode code);
absl::StatusCode FromProto(v1::StatusCode code);

// absl::StatusCode and grpc::StatusCode share their numbering.
grpc::Status ToGrpc(const absl::Status& s);
absl::Status FromGrpc(const grpc::Status& s, const char* call);

// Commit with no placements makes no RPC and returns an empty CommitResult (sequence 0): for
// an active request, lake::Lake::Commit with no placements changes nothing but the lake's change
// sequence number, which only orders the copies stored and the frees sent by Commit and
// Rebalance (instance_pool.h, placement_sequence / evicted_at), and an empty Commit stores and
// evicts nothing, so no copy or free ever carries its number. Most iterations commit nothing
// (a decode step completes a segment every segment_tokens tokens). The only other answer the
// lake could give, NotFound for a request that is not active (e.g. released by the coordinator
// after its attempt timed out), reaches the engine at its next call
// which then fails the same way (PlanBatch / Release).
class RemoteControlPlane final : public lake::ControlPlane {
 public:
  struct Options {
    // The coordinator's gRPC address: host (name or address) and port in [1, 65535].
    std::string coordinator_host = "127.0.0.1";
    int32_t coordinator_port = 0;
    // The cluster's TLS identity for mutual TLS (null: the clear).
    std::shared_ptr<const transport::TlsIdentity> tls;
    // Instances of the coordinator's lake (from RegisterReply), >= 1.
    int32_t num_instances = 1;
    // Deadline of one call (DeadlineExceeded after).
    absl::Duration call_timeout = absl::Seconds(5);
    // The cluster secret (raw bytes): every call carries a token made with it (call_auth.h);
    // empty = none.
    std::string cluster_secret;
  };
  // Errors: InvalidArgument naming a bad option.
  static absl::StatusOr<std::unique_ptr<RemoteControlPlane>> Create(const Options& options);

  // Sends later calls to the coordinator at `coordinator` (a new leader); calls in flight finish
  // on the old one. Thread-safe.
  void Retarget(const transport::HostPort& coordinator);

  int32_t num_instances() const override { return options_.num_instances; }
  absl::StatusOr<lake::IterationPlan> PlanIteration(const lake::IterationRequest& request) override;
  // A Commit RPC asking for pending copies (CommitRequest.pending).
  absl::StatusOr<lake::CommitResult> Commit(
      RequestId request, absl::Span<const plan::NewSegmentPlacement> placements) override;
  // One PlanBatch RPC carrying only the confirmations.
  absl::Status ConfirmStored(absl::Span<const lake::StoreConfirmation> copies) override;
  absl::Status Release(RequestId request) override;
  // One ReleaseTail RPC (tails in the pool: lake::IterationRequest::tail_in_pool).
  absl::Status ReleaseTail(RequestId request) override;
  // One ReleaseAndPlan RPC (lake::ControlPlane::ReleaseAndPlan; its outcomes).
  absl::StatusOr<lake::IterationPlan> ReleaseAndPlan(RequestId release,
                                                     const lake::IterationRequest& next) override;
  // One PlanBatch RPC for a whole iteration (lake::ControlPlane::PlanBatch; its outcomes).
  // Errors: as the RPC's, and DataLoss for a reply with the wrong number of entries.
  absl::StatusOr<std::vector<lake::BatchPlanEntry>> PlanBatch(
      absl::Span<const lake::StoreConfirmation> confirm, absl::Span<const RequestId> release,
      absl::Span<const lake::IterationRequest> requests, int64_t token_budget) override;

 private:
  explicit RemoteControlPlane(const Options& options) : options_(options) {}
  const Options options_;
  std::shared_ptr<v1::Lake::Stub> Stub() const;
  mutable absl::Mutex stub_mu_;
  std::shared_ptr<v1::Lake::Stub> stub_ ABSL_GUARDED_BY(stub_mu_);
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_LAKE_RPC_H_
