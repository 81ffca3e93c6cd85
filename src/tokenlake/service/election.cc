#include "tokenlake/service/election.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace tokenlake::service {

std::string LeaderKey(const std::string& cluster) {
  return absl::StrCat("/tokenlake/", cluster, "/leader");
}

std::string MemberKey(const std::string& cluster, const std::string& name) {
  return absl::StrCat("/tokenlake/", cluster, "/members/", name);
}

std::string EncodeLeader(const LeaderRecord& record) {
  return nlohmann::json{{"grpc", record.grpc.ToString()}, {"http", record.http_url}}.dump();
}

absl::StatusOr<LeaderRecord> DecodeLeader(const std::string& text) {
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("grpc") || !j["grpc"].is_string() || !j.contains("http") ||
      !j["http"].is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat("leader record is not {\"grpc\": ..., \"http\": ...}: ", text.substr(0, 200)));
  }
  absl::StatusOr<transport::HostPort> grpc = transport::ParseHostPort(j["grpc"].get<std::string>());
  if (!grpc.ok()) return grpc.status();
  return LeaderRecord{.grpc = *grpc, .http_url = j["http"].get<std::string>()};
}

absl::StatusOr<LeaderRecord> FindLeader(EtcdClient* etcd, const std::string& cluster) {
  absl::StatusOr<std::optional<EtcdKeyValue>> kv = etcd->Get(LeaderKey(cluster));
  if (!kv.ok()) return kv.status();
  if (!kv->has_value()) {
    return absl::NotFoundError(absl::StrCat("cluster '", cluster, "' has no leader in etcd yet"));
  }
  return DecodeLeader((*kv)->value);
}

absl::StatusOr<std::unique_ptr<CoordinatorElection>> CoordinatorElection::Start(
    EtcdClient* etcd, const CoordinatorElectionOptions& options, LeaderGate* gate,
    std::function<void()> on_deposed) {
  if (options.cluster.empty()) return absl::InvalidArgumentError("election: empty cluster name");
  auto e = std::unique_ptr<CoordinatorElection>(new CoordinatorElection());
  e->etcd_ = etcd;
  e->options_ = options;
  e->gate_ = gate;
  auto deposed = std::make_shared<std::atomic<bool>>(false);
  absl::StatusOr<std::unique_ptr<KeyClaim>> claim = KeyClaim::Start(
      etcd,
      {.key = LeaderKey(options.cluster),
       .value = EncodeLeader(options.self),
       .ttl = options.ttl,
       .retry = options.retry},
      [gate, self = options.self, on_deposed = std::move(on_deposed), deposed](bool held) {
        if (held) {
          gate->SetLeader(self.http_url, self.grpc.ToString());
          gate->Lead();
          return;
        }
        if (gate->state() == LeaderGate::State::kLeader && !deposed->exchange(true)) {
          gate->Depose();
          if (on_deposed) on_deposed();
        }
      });
  if (!claim.ok()) return claim.status();
  e->claim_ = *std::move(claim);
  e->watcher_ = std::thread([p = e.get()] { p->WatchLeader(); });
  return e;
}

CoordinatorElection::~CoordinatorElection() { Resign(); }

void CoordinatorElection::Resign() {
  stop_.store(true);
  if (watcher_.joinable()) watcher_.join();
  if (claim_ != nullptr) claim_->Release();
}

// Followers learn the leader's addresses (for redirects and error messages) from the claim's
// reads of the key.
void CoordinatorElection::WatchLeader() {
  while (!stop_.load()) {
    if (gate_->state() == LeaderGate::State::kFollower) {
      if (std::optional<std::string> holder = claim_->HolderValue(); holder.has_value()) {
        if (absl::StatusOr<LeaderRecord> r = DecodeLeader(*holder); r.ok()) {
          gate_->SetLeader(r->http_url, r->grpc.ToString());
        }
      }
    }
    absl::SleepFor(options_.retry);
  }
}

}  // namespace tokenlake::service
