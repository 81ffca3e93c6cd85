// LocalCluster: a whole TokenLake cluster on loopback as processes of the `tokenlake` binary:
// one `tokenlake coordinator` and N `tokenlake instance` children (each dies with this process).
// It generates the cluster secret (random) and hands it to every child in the environment
// (TOKENLAKE_CLUSTER_SECRET, never on a command line), so that the children authenticate each
// other's transport connections and gRPC calls.
// Used by `tokenlake serve`, the cluster fault tests and the load test. Faults: kill or restart
// an instance, restart the coordinator (on the same ports, so instances find it again).
//
// Thread-safety: not thread-safe.
#ifndef TOKENLAKE_SERVICE_LOCAL_CLUSTER_H_
#define TOKENLAKE_SERVICE_LOCAL_CLUSTER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tokenlake/service/process.h"

namespace tokenlake::service {

struct LocalClusterOptions {
  // Path of the `tokenlake` executable.
  std::string binary;
  // Checkpoint directory given to every process.
  std::string model;
  // Number of instance processes, >= 1.
  int32_t instances = 2;
  // HTTP port of the coordinator (0 = any free port).
  int32_t http_port = 0;
  // Segment size, slots per instance (each instance's store). The coordinator's lake counts
  // LakeSlots(slots) per instance: a few slots of headroom, so that frees still in flight (or
  // deferred while a copy is being read) never make a store refuse a segment the lake placed.
  int32_t segment_tokens = 16;
  int32_t slots = 1024;
  // Membership timing (see CoordinatorOptions).
  int32_t heartbeat_ms = 100;
  int32_t dead_after_ms = 600;
  int32_t request_timeout_ms = 30000;
  int32_t attempt_timeout_ms = 10000;
  // Extra flags for the coordinator (e.g. fault injection, --kv-dtype) and for every instance
  // (e.g. --device gpu).
  std::vector<std::string> coordinator_flags;
  std::vector<std::string> instance_flags;
  // Directory for the port file and the processes' logs (made if missing).
  std::string work_dir = "/tmp";
  // How long Start / restarts wait for the cluster to become ready.
  absl::Duration ready_timeout = absl::Seconds(60);
};

// The slots per instance the lake counts for stores of `instance_slots` slots (1/64 less).
int32_t LakeSlots(int32_t instance_slots);

// The ports a coordinator writes to its --port-file once it listens.
struct CoordinatorPorts {
  int32_t http_port = 0;
  int32_t grpc_port = 0;
  int32_t transport_port = 0;
};

// Parses a port file's text: a JSON object {"http_port", "grpc_port", "transport_port"}, each an
// integer in [1, 65535], transport_port in [0, 65535] (0: the coordinator listens on no
// transport port; other fields are ignored).
// Errors: InvalidArgument naming `path` and what is wrong (not a JSON object; which field is
// missing, not an integer or out of range).
absl::StatusOr<CoordinatorPorts> ParsePortFile(std::string_view text, std::string_view path);

class LocalCluster {
 public:
  // Starts the coordinator, then the instances, and waits until all instances are live.
  // Errors: InvalidArgument (options), DeadlineExceeded (not ready in time; names the logs),
  // Internal (the coordinator's port file is malformed: names the file and the field).
  static absl::StatusOr<std::unique_ptr<LocalCluster>> Start(const LocalClusterOptions& options);
  // Stops everything (SIGTERM, then SIGKILL).
  ~LocalCluster();

  int32_t http_port() const { return http_port_; }
  int32_t grpc_port() const { return grpc_port_; }
  int32_t num_instances() const { return static_cast<int32_t>(instances_.size()); }

  // Live instances as the coordinator reports on /healthz (-1 when it does not answer).
  int32_t LiveInstances() const;
  // Waits until LiveInstances() == n. Errors: DeadlineExceeded.
  absl::Status WaitForLive(int32_t n, absl::Duration timeout) const;

  // SIGKILLs instance i (REQUIRES 0 <= i < num_instances()) and reaps it.
  void KillInstance(int32_t i);
  // Starts instance i again (it rejoins empty). Does not wait for it.
  absl::Status RestartInstance(int32_t i);
  // SIGKILLs the coordinator and starts a new one on the same ports; waits until every running
  // instance has registered again.
  absl::Status RestartCoordinator();
  // The coordinator's exit code once its process has exited (reaped); nullopt while it runs.
  std::optional<int> CoordinatorExitCode();
  // The coordinator process's id (-1 before Start).
  int32_t coordinator_pid() const;
  // Starts the coordinator again on the same ports after it exited (serve's supervisor; the
  // instances find it again and re-register). Does not wait for the instances.
  // Errors: FailedPrecondition (still running); Unavailable when it exits before it listens
  // (names its log), DeadlineExceeded when it does not listen within ready_timeout.
  absl::Status StartCoordinatorAgain();
  // Whether instance i's process is running.
  bool InstanceRunning(int32_t i);
  // Restarts instances whose process exited (serve's supervisor). Returns how many.
  int32_t RestartExitedInstances();

  // Stops every process. Idempotent.
  void Stop();

 private:
  explicit LocalCluster(const LocalClusterOptions& options) : options_(options) {}
  absl::Status StartCoordinator(bool reuse_ports);
  absl::Status StartInstance(int32_t i);
  std::string Log(const std::string& name) const;

  const LocalClusterOptions options_;
  std::unique_ptr<ChildProcess> coordinator_;
  std::vector<std::unique_ptr<ChildProcess>> instances_;
  int32_t http_port_ = 0;
  int32_t grpc_port_ = 0;
  int32_t transport_port_ = 0;
  std::string port_file_;
  // "TOKENLAKE_CLUSTER_SECRET=<hex>", given to every child.
  std::string secret_env_;
};

// GET http://127.0.0.1:port/path with a timeout. Returns (status, body).
// Errors: Unavailable when the connection fails.
absl::StatusOr<std::pair<int, std::string>> HttpGet(int32_t port, const std::string& path,
                                                    absl::Duration timeout = absl::Seconds(5));
// POST body (application/json) to http://127.0.0.1:port/path. Returns (status, body).
absl::StatusOr<std::pair<int, std::string>> HttpPost(int32_t port, const std::string& path,
                                                     const std::string& body,
                                                     absl::Duration timeout = absl::Seconds(60));

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_LOCAL_CLUSTER_H_
