// The `Coordinator` gRPC service (proto/tokenlake/v1/tokenlake.proto): instances Register and
// Heartbeat.
//
// Register checks that the instance uses the coordinator's namespace and segment size and has at
// least the lake's slots per instance (FAILED_PRECONDITION otherwise) and reports everything it
// holds (INVALID_ARGUMENT for holdings changes), admits it in Membership under its name (a live
// member's name only once its old incarnation is proven gone, incarnation.h: ALREADY_EXISTS
// until then), fails over what was sent to an old incarnation, points the coordinator's
// transport at its port, replaces what the lake had on its id with what it reports
// (Reconciler::Report: empty after a restart; everything it holds after a coordinator restart)
// and answers with its id, the heartbeat period, the coordinator's epoch, the peers, the
// segments to free and the acknowledgement of its report. Heartbeat (NOT_FOUND for an instance
// that is not a live member or registered with another coordinator epoch: register again;
// INVALID_ARGUMENT for malformed holdings) takes its report (the changes since the acknowledged
// one, or a full one) into the reconciler and answers with the peers, the segments to free and
// the acknowledgement (or a request for a full report). Every call must carry a call token made
// with the cluster secret (call_auth.h), else UNAUTHENTICATED.
//
// Thread-safety: thread-safe. Register takes the lake's lock, then Membership's; reports are
// taken by the reconciler, which takes the lake's lock in short batches (reconciler.h).
#ifndef TOKENLAKE_SERVICE_MEMBERSHIP_SERVICE_H_
#define TOKENLAKE_SERVICE_MEMBERSHIP_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "tokenlake/service/call_auth.h"
#include "tokenlake/service/guarded_lake.h"
#include "tokenlake/service/leader_gate.h"
#include "tokenlake/service/membership.h"
#include "tokenlake/service/reconciler.h"
#include "tokenlake/transport/tcp_transport.h"
#include "tokenlake/v1/tokenlake.grpc.pb.h"

namespace tokenlake::service {

class MembershipService final : public v1::Coordinator::Service {
 public:
  struct Options {
    // What instances must match (see the file comment).
    std::string namespace_name;
    int32_t segment_tokens = 16;
    int32_t slots_per_instance = 1;
    // The heartbeat period asked of instances; the lease of a live incarnation (incarnation.h).
    absl::Duration heartbeat_interval = absl::Milliseconds(200);
    absl::Duration dead_after = absl::Seconds(1);
    // The cluster secret (incarnation probes authenticate with it).
    std::string cluster_secret;
    // This coordinator incarnation's epoch (heartbeats from another one are refused).
    uint64_t epoch = 0;
    // The cluster's TLS context for probing an old incarnation's transport (null: the clear).
    std::shared_ptr<const transport::TlsContext> tls;
  };
  // Fails every request waiting on instance `id` with `status` (its incarnation is gone).
  using FailPending = std::function<void(int32_t id, const absl::Status& status)>;

  // The pointers are borrowed and outlive this; `tcp` is the coordinator's host transport
  // (instance i is endpoint i + 1).
  MembershipService(const Options& options, GuardedLake* lake, Membership* membership,
                    Reconciler* reconciler, CallAuthenticator* auth, transport::TcpTransport* tcp,
                    FailPending fail_pending);

  grpc::Status Register(grpc::ServerContext* ctx, const v1::RegisterRequest* request,
                        v1::RegisterReply* reply) override;
  grpc::Status Heartbeat(grpc::ServerContext* ctx, const v1::HeartbeatRequest* request,
                         v1::HeartbeatReply* reply) override;

  // Registrations refused because a live member holds the name.
  int64_t refused_registrations() const {
    return refused_registrations_.load(std::memory_order_relaxed);
  }

  // Refuses every call while this coordinator does not lead (leader_gate.h); null: always
  // serves. Set before the server starts.
  void set_gate(const LeaderGate* gate) { gate_ = gate; }

 private:
  // Tells the lake the instances' device domains (Membership::DeviceDomains: a tail's blocks
  // stay on its computing instance's GPU) when they differ from what it was last told; the
  // lake's lock is taken only then. REQUIRES: lake_->mu not held (it orders before domains_mu_).
  absl::Status UpdateDeviceDomains();

  const LeaderGate* gate_ = nullptr;
  const Options options_;
  GuardedLake* const lake_;
  Membership* const membership_;
  Reconciler* const reconciler_;
  CallAuthenticator* const auth_;
  transport::TcpTransport* const tcp_;
  const FailPending fail_pending_;
  std::atomic<int64_t> refused_registrations_{0};
  absl::Mutex domains_mu_;
  std::vector<int32_t> device_domains_ ABSL_GUARDED_BY(domains_mu_);  // what the lake was told
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_MEMBERSHIP_SERVICE_H_
