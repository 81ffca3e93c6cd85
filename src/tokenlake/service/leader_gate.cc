#include "tokenlake/service/leader_gate.h"

#include "absl/strings/str_cat.h"

namespace tokenlake::service {

void LeaderGate::Lead() {
  absl::MutexLock lock(&mu_);
  if (state_ == State::kFollower) state_ = State::kLeader;
}

void LeaderGate::Depose() {
  absl::MutexLock lock(&mu_);
  if (state_ == State::kLeader) state_ = State::kDeposed;
}

void LeaderGate::SetLeader(const std::string& http_url, const std::string& grpc_address) {
  absl::MutexLock lock(&mu_);
  leader_http_ = http_url;
  leader_grpc_ = grpc_address;
}

LeaderGate::State LeaderGate::state() const {
  absl::MutexLock lock(&mu_);
  return state_;
}

std::string LeaderGate::leader_http() const {
  absl::MutexLock lock(&mu_);
  return leader_http_;
}

grpc::Status LeaderGate::Check() const {
  absl::MutexLock lock(&mu_);
  if (state_ == State::kLeader) return grpc::Status::OK;
  return grpc::Status(
      grpc::StatusCode::UNAVAILABLE,
      absl::StrCat(state_ == State::kDeposed ? "this coordinator lost its leadership"
                                             : "this coordinator is not the leader",
                   leader_grpc_.empty() ? "" : "; the leader is at " + leader_grpc_));
}

}  // namespace tokenlake::service
