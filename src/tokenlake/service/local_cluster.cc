#include "tokenlake/service/local_cluster.h"

#include <httplib.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "tokenlake/transport/cluster_secret.h"

namespace tokenlake::service {
namespace {

void ConfigureClient(httplib::Client& c, absl::Duration timeout) {
  const auto us = absl::ToChronoMicroseconds(timeout);
  c.set_connection_timeout(std::chrono::duration_cast<std::chrono::microseconds>(us));
  c.set_read_timeout(std::chrono::duration_cast<std::chrono::microseconds>(us));
  c.set_write_timeout(std::chrono::duration_cast<std::chrono::microseconds>(us));
}

}  // namespace

absl::StatusOr<std::pair<int, std::string>> HttpGet(int32_t port, const std::string& path,
                                                    absl::Duration timeout) {
  httplib::Client c("127.0.0.1", port);
  ConfigureClient(c, timeout);
  auto r = c.Get(path.c_str());
  if (!r) {
    return absl::UnavailableError(absl::StrFormat("GET 127.0.0.1:%d%s failed: %s", port, path,
                                                  httplib::to_string(r.error())));
  }
  return std::make_pair(r->status, r->body);
}

absl::StatusOr<std::pair<int, std::string>> HttpPost(int32_t port, const std::string& path,
                                                     const std::string& body,
                                                     absl::Duration timeout) {
  httplib::Client c("127.0.0.1", port);
  ConfigureClient(c, timeout);
  auto r = c.Post(path.c_str(), body, "application/json");
  if (!r) {
    return absl::UnavailableError(absl::StrFormat("POST 127.0.0.1:%d%s failed: %s", port, path,
                                                  httplib::to_string(r.error())));
  }
  return std::make_pair(r->status, r->body);
}

absl::StatusOr<std::unique_ptr<LocalCluster>> LocalCluster::Start(
    const LocalClusterOptions& options) {
  if (options.binary.empty() || ::access(options.binary.c_str(), X_OK) != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("LocalCluster: '%s' is not an executable", options.binary));
  }
  if (options.instances < 1) {
    return absl::InvalidArgumentError("LocalCluster: instances must be >= 1");
  }
  // The logs' folder is made as `mkdir -p` would.
  std::error_code made;
  std::filesystem::create_directories(options.work_dir, made);
  if (made) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "LocalCluster: cannot make the log folder '%s': %s", options.work_dir, made.message()));
  }
  std::unique_ptr<LocalCluster> c(new LocalCluster(options));
  absl::StatusOr<std::string> secret = transport::GenerateClusterSecret();
  if (!secret.ok()) return secret.status();
  c->secret_env_ = absl::StrCat(transport::kClusterSecretEnv, "=", transport::ToHex(*secret));
  c->port_file_ = absl::StrFormat("%s/tokenlake-coordinator-%d-%p.ports", options.work_dir,
                                  ::getpid(), c.get());
  if (absl::Status s = c->StartCoordinator(false); !s.ok()) return s;
  c->instances_.resize(options.instances);
  for (int32_t i = 0; i < options.instances; ++i) {
    if (absl::Status s = c->StartInstance(i); !s.ok()) return s;
  }
  if (absl::Status s = c->WaitForLive(options.instances, options.ready_timeout); !s.ok()) {
    return absl::DeadlineExceededError(
        absl::StrCat(s.message(), " (logs in ", options.work_dir, "/tokenlake-*.log)"));
  }
  return c;
}

LocalCluster::~LocalCluster() { Stop(); }

std::string LocalCluster::Log(const std::string& name) const {
  return absl::StrFormat("%s/tokenlake-%s-%d.log", options_.work_dir, name, ::getpid());
}

absl::Status LocalCluster::StartCoordinator(bool reuse_ports) {
  ::unlink(port_file_.c_str());
  std::vector<std::string> argv = {options_.binary,
                                   "coordinator",
                                   "--model",
                                   options_.model,
                                   "--segment-tokens",
                                   absl::StrCat(options_.segment_tokens),
                                   "--instances",
                                   absl::StrCat(options_.instances),
                                   "--slots",
                                   absl::StrCat(LakeSlots(options_.slots)),
                                   "--heartbeat-ms",
                                   absl::StrCat(options_.heartbeat_ms),
                                   "--dead-after-ms",
                                   absl::StrCat(options_.dead_after_ms),
                                   "--request-timeout-ms",
                                   absl::StrCat(options_.request_timeout_ms),
                                   "--attempt-timeout-ms",
                                   absl::StrCat(options_.attempt_timeout_ms),
                                   "--port-file",
                                   port_file_,
                                   "--exit-with-parent",
                                   "--http-port",
                                   absl::StrCat(reuse_ports ? http_port_ : options_.http_port)};
  if (reuse_ports) {
    argv.insert(argv.end(), {"--grpc-port", absl::StrCat(grpc_port_), "--transport-port",
                             absl::StrCat(transport_port_)});
  }
  argv.insert(argv.end(), options_.coordinator_flags.begin(), options_.coordinator_flags.end());
  auto child = ChildProcess::Spawn(argv, Log("coordinator"), {secret_env_});
  if (!child.ok()) return child.status();
  coordinator_ = std::move(*child);
  // The old coordinator's ports may take a moment to be free again: retry a few times.
  absl::StatusOr<std::string> text =
      WaitForFile(port_file_, options_.ready_timeout, [this] { return !coordinator_->running(); });
  if (!text.ok()) {
    return absl::UnavailableError(absl::StrCat("LocalCluster: the coordinator did not start (",
                                               text.status().message(), "; log ",
                                               Log("coordinator"), ")"));
  }
  absl::StatusOr<CoordinatorPorts> ports = ParsePortFile(*text, port_file_);
  // The file is written by the coordinator we started: a bad one is our system's fault.
  if (!ports.ok())
    return absl::InternalError(absl::StrCat("LocalCluster: ", ports.status().message()));
  http_port_ = ports->http_port;
  grpc_port_ = ports->grpc_port;
  transport_port_ = ports->transport_port;
  return absl::OkStatus();
}

absl::StatusOr<CoordinatorPorts> ParsePortFile(std::string_view text, std::string_view path) {
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("port file %s is not a JSON object: '%s'", path, text.substr(0, 80)));
  }
  CoordinatorPorts ports;
  for (auto [key, out] : {std::pair<const char*, int32_t*>{"http_port", &ports.http_port},
                          {"grpc_port", &ports.grpc_port},
                          {"transport_port", &ports.transport_port}}) {
    const auto it = j.find(key);
    if (it == j.end()) {
      return absl::InvalidArgumentError(absl::StrFormat("port file %s has no '%s'", path, key));
    }
    // A port is an integer: 8080, not 8080.5, "8080" or true (nlohmann's get<int> would truncate
    // the first and throw on the others). transport_port may be 0: the coordinator listens on no
    // transport port (it dials the instances).
    const int64_t lowest = out == &ports.transport_port ? 0 : 1;
    if (!it->is_number_integer() || it->get<int64_t>() < lowest || it->get<int64_t>() > 65535) {
      return absl::InvalidArgumentError(
          absl::StrFormat("port file %s: '%s' must be an integer in [%d, 65535], got %s", path, key,
                          lowest, it->dump()));
    }
    *out = it->get<int32_t>();
  }
  return ports;
}

int32_t LakeSlots(int32_t instance_slots) {
  return std::max(1, instance_slots - std::max(1, instance_slots / 64));
}

absl::Status LocalCluster::StartInstance(int32_t i) {
  std::vector<std::string> argv = {options_.binary,
                                   "instance",
                                   "--model",
                                   options_.model,
                                   "--coordinator-port",
                                   absl::StrCat(grpc_port_),
                                   "--id",
                                   absl::StrCat(i),
                                   "--segment-tokens",
                                   absl::StrCat(options_.segment_tokens),
                                   "--slots",
                                   absl::StrCat(options_.slots),
                                   "--exit-with-parent"};
  argv.insert(argv.end(), options_.instance_flags.begin(), options_.instance_flags.end());
  auto child = ChildProcess::Spawn(argv, Log(absl::StrCat("instance-", i)), {secret_env_});
  if (!child.ok()) return child.status();
  instances_[i] = std::move(*child);
  return absl::OkStatus();
}

int32_t LocalCluster::LiveInstances() const {
  auto r = HttpGet(http_port_, "/healthz", absl::Seconds(2));
  if (!r.ok()) return -1;
  const nlohmann::json j = nlohmann::json::parse(r->second, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return -1;
  const auto it = j.find("live_instances");
  if (it == j.end() || !it->is_number_integer()) return -1;
  return it->get<int32_t>();
}

absl::Status LocalCluster::WaitForLive(int32_t n, absl::Duration timeout) const {
  const absl::Time deadline = absl::Now() + timeout;
  int32_t live = -1;
  while (absl::Now() < deadline) {
    live = LiveInstances();
    if (live == n) return absl::OkStatus();
    absl::SleepFor(absl::Milliseconds(20));
  }
  return absl::DeadlineExceededError(
      absl::StrFormat("LocalCluster: %d live instances after %s, expected %d", live,
                      absl::FormatDuration(timeout), n));
}

void LocalCluster::KillInstance(int32_t i) {
  if (instances_[i] == nullptr) return;
  instances_[i]->Signal(SIGKILL);
  instances_[i]->Wait(absl::Seconds(10)).IgnoreError();
}

absl::Status LocalCluster::RestartInstance(int32_t i) {
  KillInstance(i);
  return StartInstance(i);
}

bool LocalCluster::InstanceRunning(int32_t i) {
  return instances_[i] != nullptr && instances_[i]->running();
}

int32_t LocalCluster::RestartExitedInstances() {
  int32_t n = 0;
  for (int32_t i = 0; i < num_instances(); ++i) {
    if (!InstanceRunning(i) && StartInstance(i).ok()) ++n;
  }
  return n;
}

std::optional<int> LocalCluster::CoordinatorExitCode() {
  if (coordinator_ == nullptr) return std::nullopt;
  absl::StatusOr<int> code = coordinator_->Wait(absl::ZeroDuration());
  if (!code.ok()) return std::nullopt;
  return *code;
}

int32_t LocalCluster::coordinator_pid() const {
  return coordinator_ != nullptr ? coordinator_->pid() : -1;
}

absl::Status LocalCluster::StartCoordinatorAgain() {
  if (coordinator_ != nullptr && coordinator_->running()) {
    return absl::FailedPreconditionError("LocalCluster: the coordinator is still running");
  }
  return StartCoordinator(true);
}

absl::Status LocalCluster::RestartCoordinator() {
  coordinator_->Signal(SIGKILL);
  coordinator_->Wait(absl::Seconds(10)).IgnoreError();
  if (absl::Status s = StartCoordinator(true); !s.ok()) return s;
  int32_t running = 0;
  for (int32_t i = 0; i < num_instances(); ++i) running += InstanceRunning(i) ? 1 : 0;
  return WaitForLive(running, options_.ready_timeout);
}

void LocalCluster::Stop() {
  for (auto& p : instances_) {
    if (p != nullptr) p->Signal(SIGTERM);
  }
  for (auto& p : instances_) {
    if (p != nullptr) p->Stop(absl::Seconds(5));
  }
  instances_.clear();
  if (coordinator_ != nullptr) coordinator_->Stop(absl::Seconds(5));
  coordinator_.reset();
  ::unlink(port_file_.c_str());
}

}  // namespace tokenlake::service
