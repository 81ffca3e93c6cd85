#include "tokenlake/service/membership_service.h"

#include <cstdio>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/service/incarnation.h"
#include "tokenlake/service/lake_rpc.h"

namespace tokenlake::service {
namespace {

// The address a gRPC call came from ("ipv4:198.51.100.4:5123", "ipv6:[2001:db8::1]:5123"), as a
// host to dial back; "127.0.0.1" when it is not an IP peer.
std::string CallerHost(const grpc::ServerContext* ctx) {
  const std::string peer = ctx->peer();
  std::string rest;
  if (peer.rfind("ipv4:", 0) == 0) {
    rest = peer.substr(5);
    return rest.substr(0, rest.rfind(':'));
  }
  if (peer.rfind("ipv6:", 0) == 0) {
    rest = peer.substr(5);
    const size_t close = rest.find(']');
    if (!rest.empty() && rest[0] == '[' && close != std::string::npos) {
      std::string host = rest.substr(1, close - 1);
      // gRPC escapes '%' (an interface scope) as %25.
      if (const size_t pct = host.find("%25"); pct != std::string::npos) host.erase(pct + 1, 2);
      return host;
    }
  }
  return "127.0.0.1";
}

}  // namespace

MembershipService::MembershipService(const Options& options, GuardedLake* lake,
                                     Membership* membership, Reconciler* reconciler,
                                     CallAuthenticator* auth, transport::TcpTransport* tcp,
                                     FailPending fail_pending)
    : options_(options),
      lake_(lake),
      membership_(membership),
      reconciler_(reconciler),
      auth_(auth),
      tcp_(tcp),
      fail_pending_(std::move(fail_pending)) {}

grpc::Status MembershipService::Register(grpc::ServerContext* ctx,
                                         const v1::RegisterRequest* request,
                                         v1::RegisterReply* reply) {
  if (grpc::Status a = auth_->Check(ctx, "Register"); !a.ok()) return a;
  if (gate_ != nullptr) {
    if (grpc::Status g = gate_->Check(); !g.ok()) return g;
  }
  if (request->namespace_name() != options_.namespace_name ||
      request->segment_tokens() != options_.segment_tokens) {
    return grpc::Status(
        grpc::StatusCode::FAILED_PRECONDITION,
        absl::StrFormat("instance '%s' uses namespace '%s' and %d-token "
                        "segments; the coordinator uses '%s' and %d",
                        request->name(), request->namespace_name(), request->segment_tokens(),
                        options_.namespace_name, options_.segment_tokens));
  }
  if (request->state().capacity_slots() > 0 &&
      request->state().capacity_slots() < options_.slots_per_instance) {
    return grpc::Status(
        grpc::StatusCode::FAILED_PRECONDITION,
        absl::StrFormat("instance '%s' has %d slots; the lake counts %d per instance",
                        request->name(), request->state().capacity_slots(),
                        options_.slots_per_instance));
  }
  if (request->transport_port() < 1 || request->transport_port() > 65535) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "transport_port outside [1, 65535]");
  }
  // Where its transports are dialled: the host it advertises, else the address it called from.
  const std::string host = request->state().advertise_host().empty()
                               ? CallerHost(ctx)
                               : request->state().advertise_host();
  // A live member's name is taken over only once its old incarnation is proven gone
  // (incarnation.h); checked without the locks (it may probe the old transport port).
  if (std::optional<LiveIncarnation> old = membership_->FindLive(request->name());
      old.has_value()) {
    absl::Status gone = CheckIncarnationGone(
        *old, transport::HostPort{.host = host, .port = request->transport_port()},
        options_.dead_after, options_.cluster_secret, absl::Now(), absl::Milliseconds(300),
        options_.tls);
    if (!gone.ok()) {
      refused_registrations_.fetch_add(1, std::memory_order_relaxed);
      return ToGrpc(gone);
    }
  }
  if (request->state().has_holdings_changes()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "a registration carries everything the instance holds (segments), not "
                        "holdings changes");
  }
  int32_t id = -1;
  {
    absl::MutexLock lake_lock(&lake_->mu);
    absl::StatusOr<Membership::Admission> admitted =
        membership_->Register(request->name(), request->preferred_id(), request->transport_port(),
                              absl::Now(), host, request->transport_incarnation());
    if (!admitted.ok()) return ToGrpc(admitted.status());
    id = admitted->id;
    if (admitted->rejoin) {
      // A new incarnation of a known instance (it restarted, possibly before it was declared
      // dead): what was sent to the old one will never be answered; fail it over now. The KV
      // tails in the pool of the requests the old one computed go too: nobody else would end
      // them, and its peers give back the slots it took there when they see the new process's
      // arena handle (docs/adr/0018). Not when it is only declared dead: a process that still
      // runs may still write them.
      const std::vector<RequestId> tails = lake_->lake->ReleaseTailsComputedOn(InstanceId(id));
      if (!tails.empty()) {
        std::fprintf(stderr,
                     "tokenlake coordinator: released the KV tails of %zu requests of instance %d "
                     "(it restarted)\n",
                     tails.size(), id);
      }
      fail_pending_(id, absl::UnavailableError(
                            absl::StrFormat("instance %d ('%s') restarted", id, request->name())));
    }
    if (!tcp_->SetPeer(InstanceId(id + 1),
                       transport::HostPort{.host = host, .port = request->transport_port()})
             .ok()) {
      return grpc::Status(grpc::StatusCode::INTERNAL, "cannot route to the instance");
    }
    // What the lake had on this id is replaced by what the instance reports now (empty after a
    // restart; everything it holds after a coordinator restart). O(tree): only when the lake
    // lists anything there (never after a coordinator restart).
    if (lake_->lake->prefix_tree().SegmentsOn(InstanceId(id)) > 0) {
      if (absl::Status s = lake_->lake->DropInstance(InstanceId(id)); !s.ok()) return ToGrpc(s);
    }
    membership_->Report(id, request->state());
  }
  if (absl::Status s = UpdateDeviceDomains(); !s.ok()) return ToGrpc(s);
  // Restored in batches, without holding up the plan path.
  absl::StatusOr<Reconciler::Outcome> outcome =
      reconciler_->Report(id, request->state(), /*registration=*/true, absl::Now());
  if (!outcome.ok()) return ToGrpc(outcome.status());
  reply->set_instance_id(id);
  reply->set_endpoint(id + 1);
  reply->set_coordinator_transport_port(tcp_->port());
  reply->set_heartbeat_interval_ms(absl::ToInt64Milliseconds(options_.heartbeat_interval));
  reply->set_coordinator_epoch(options_.epoch);
  reply->set_lake_instances(membership_->num_instances());
  membership_->AddPeers(id, reply->mutable_peers());
  for (uint64_t seg : outcome->to_free) reply->add_free_segments(seg);
  reply->set_takes_holdings_changes(true);
  reply->set_holdings_acked_seq(outcome->acked_seq);
  reply->set_full_holdings_wanted(outcome->full_wanted);
  return grpc::Status::OK;
}

grpc::Status MembershipService::Heartbeat(grpc::ServerContext* ctx,
                                          const v1::HeartbeatRequest* request,
                                          v1::HeartbeatReply* reply) {
  if (grpc::Status a = auth_->Check(ctx, "Heartbeat"); !a.ok()) return a;
  if (gate_ != nullptr) {
    if (grpc::Status g = gate_->Check(); !g.ok()) return g;
  }
  const int32_t id = request->instance_id();
  if (request->coordinator_epoch() != options_.epoch) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown instance: register again");
  }
  if (absl::Status s = membership_->Heartbeat(id, absl::Now()); !s.ok()) return ToGrpc(s);
  membership_->Report(id, request->state());
  if (absl::Status s = UpdateDeviceDomains(); !s.ok()) return ToGrpc(s);
  // The report is taken without holding the lake's lock here: the reconciler takes it in short
  // batches, so that plans never wait long behind a heartbeat.
  absl::StatusOr<Reconciler::Outcome> outcome =
      reconciler_->Report(id, request->state(), /*registration=*/false, absl::Now());
  if (!outcome.ok()) return ToGrpc(outcome.status());
  // Declared dead meanwhile (the lake dropped its copies): it registers again with everything
  // it holds rather than free what the lake no longer lists.
  if (!membership_->Alive(id)) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown instance: register again");
  }
  membership_->AddPeers(id, reply->mutable_peers());
  for (uint64_t seg : outcome->to_free) reply->add_free_segments(seg);
  reply->set_holdings_acked_seq(outcome->acked_seq);
  reply->set_full_holdings_wanted(outcome->full_wanted);
  return grpc::Status::OK;
}

absl::Status MembershipService::UpdateDeviceDomains() {
  std::vector<int32_t> domains = membership_->DeviceDomains();
  {
    absl::MutexLock lock(&domains_mu_);
    if (domains == device_domains_) return absl::OkStatus();
  }
  absl::MutexLock lake_lock(&lake_->mu);
  domains = membership_->DeviceDomains();  // the latest, now that changes to the lake wait
  TOKENLAKE_RETURN_IF_ERROR(lake_->lake->SetDeviceDomains(domains));
  absl::MutexLock lock(&domains_mu_);
  device_domains_ = std::move(domains);
  return absl::OkStatus();
}

}  // namespace tokenlake::service
