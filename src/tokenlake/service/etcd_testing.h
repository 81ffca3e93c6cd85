// A real etcd server for tests: one member on 127.0.0.1 with free ports and a fresh data folder,
// stopped (and its folder removed) with the object. Needs the `etcd` binary (Debian's
// etcd-server, installed by scripts/install-deps.sh); TOKENLAKE_ETCD names another one.
//
// Thread-safety: not thread-safe.
#ifndef TOKENLAKE_SERVICE_ETCD_TESTING_H_
#define TOKENLAKE_SERVICE_ETCD_TESTING_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "tokenlake/service/process.h"

namespace tokenlake::service {

class EtcdTestServer {
 public:
  // Starts etcd and waits until it answers /health (up to 20 s).
  // Errors: NotFound (no etcd binary; the message says how to install it), DeadlineExceeded
  // (it did not become healthy; the message has the end of its log).
  static absl::StatusOr<std::unique_ptr<EtcdTestServer>> Start();
  ~EtcdTestServer();

  // "http://127.0.0.1:PORT".
  const std::string& endpoint() const { return endpoint_; }
  // Stops etcd (SIGKILL), keeping its data; Restart starts it again on the same ports and data.
  void Kill();
  absl::Status Restart();

 private:
  EtcdTestServer() = default;
  absl::Status Launch();

  std::string binary_;
  std::string dir_;
  int client_port_ = 0;
  int peer_port_ = 0;
  std::string endpoint_;
  std::unique_ptr<ChildProcess> process_;
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_ETCD_TESTING_H_
