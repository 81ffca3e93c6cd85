// Coordinators elected through etcd (issue: a cluster across hosts). Each coordinator of a
// cluster claims the key /tokenlake/<cluster>/leader (key_claim.h) with its addresses; the one
// holding it leads (its LeaderGate opens), the others follow: they refuse to act and point
// instances and HTTP clients to the leader they read from etcd. A leader that loses the key is
// deposed and calls `on_deposed` (the process exits there, to come back as a follower with a
// fresh lake). Instances find the leader with FindLeader and follow it
// (InstanceServerOptions::locate_coordinator); each instance also claims
// /tokenlake/<cluster>/members/<name>, so that one name is one live process cluster-wide.
//
// Thread-safety: thread-safe.
#ifndef TOKENLAKE_SERVICE_ELECTION_H_
#define TOKENLAKE_SERVICE_ELECTION_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tokenlake/service/etcd_client.h"
#include "tokenlake/service/key_claim.h"
#include "tokenlake/service/leader_gate.h"
#include "tokenlake/transport/socket_stream.h"

namespace tokenlake::service {

// What the leader key holds: where the leader serves gRPC (instances) and HTTP (clients).
struct LeaderRecord {
  transport::HostPort grpc;
  std::string http_url;  // "http://host:port"
  friend bool operator==(const LeaderRecord&, const LeaderRecord&) = default;
};

std::string LeaderKey(const std::string& cluster);
std::string MemberKey(const std::string& cluster, const std::string& name);
std::string EncodeLeader(const LeaderRecord& record);
// Errors: InvalidArgument naming what is malformed.
absl::StatusOr<LeaderRecord> DecodeLeader(const std::string& text);

// The cluster's leader now. Errors: NotFound (no leader), etcd's errors, InvalidArgument (a
// malformed record).
absl::StatusOr<LeaderRecord> FindLeader(EtcdClient* etcd, const std::string& cluster);

struct CoordinatorElectionOptions {
  std::string cluster;  // non-empty
  LeaderRecord self;    // this coordinator's advertised addresses
  absl::Duration ttl = absl::Seconds(3);
  absl::Duration retry = absl::Milliseconds(200);
};

class CoordinatorElection {
 public:
  // Starts campaigning; `gate` (borrowed, outlives this) is opened when this coordinator leads.
  // `on_deposed` runs (once, on the election's thread) when a leader loses the key.
  static absl::StatusOr<std::unique_ptr<CoordinatorElection>> Start(
      EtcdClient* etcd, const CoordinatorElectionOptions& options, LeaderGate* gate,
      std::function<void()> on_deposed);
  ~CoordinatorElection();

  bool leading() const { return claim_->Held(); }
  // Stops campaigning and gives the key up at once when held.
  void Resign();
  // Tests: as if cut off from etcd (see KeyClaim::SetPausedForTesting).
  void SetPausedForTesting(bool paused) { claim_->SetPausedForTesting(paused); }

 private:
  CoordinatorElection() = default;
  void WatchLeader();

  EtcdClient* etcd_ = nullptr;
  CoordinatorElectionOptions options_;
  LeaderGate* gate_ = nullptr;
  std::unique_ptr<KeyClaim> claim_;
  std::atomic<bool> stop_{false};
  std::thread watcher_;
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_ELECTION_H_
