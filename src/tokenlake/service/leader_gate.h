// LeaderGate: whether this coordinator may act, when several run for one cluster and etcd elects
// one (key_claim.h). Only the leader admits instances, answers their heartbeats, plans (the Lake
// RPCs) and serves requests; a follower refuses each with UNAVAILABLE naming the leader, and its
// HTTP front end redirects clients there. A leader that loses its claim is deposed for good: it
// never acts again (its lake may be stale; the process is meant to exit and come back as a
// follower), so a cut-off coordinator cannot hand out plans after its lease ran out.
//
// A coordinator started without an election leads from the start (the gate is always open).
//
// Thread-safety: thread-safe.
#ifndef TOKENLAKE_SERVICE_LEADER_GATE_H_
#define TOKENLAKE_SERVICE_LEADER_GATE_H_

#include <grpcpp/grpcpp.h>

#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace tokenlake::service {

class LeaderGate {
 public:
  enum class State { kFollower, kLeader, kDeposed };

  explicit LeaderGate(State initial = State::kLeader) : state_(initial) {}

  // follower -> leader (no-op once deposed).
  void Lead();
  // leader -> deposed, follower stays follower.
  void Depose();
  // The current leader's HTTP base URL ("http://host:port") and gRPC address, as the election
  // says (empty when unknown), for followers' answers.
  void SetLeader(const std::string& http_url, const std::string& grpc_address);

  State state() const;
  bool leading() const { return state() == State::kLeader; }
  std::string leader_http() const;

  // OK while leading; UNAVAILABLE naming the leader otherwise (instances re-resolve on it).
  grpc::Status Check() const;

 private:
  mutable absl::Mutex mu_;
  State state_ ABSL_GUARDED_BY(mu_);
  std::string leader_http_ ABSL_GUARDED_BY(mu_);
  std::string leader_grpc_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_LEADER_GATE_H_
