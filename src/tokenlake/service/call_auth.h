// Authentication of the gRPC calls between a cluster's processes (Register, Heartbeat and the
// Lake calls): the caller attaches a call token made with the cluster secret
// (transport/cluster_secret.h: an HMAC over the method, the time and a nonce) as metadata, and
// the coordinator verifies it before doing anything else. With an empty secret (a cluster
// started without one) nothing is attached and every call is accepted.
//
// Thread-safety: the functions are thread-safe.
#ifndef TOKENLAKE_SERVICE_CALL_AUTH_H_
#define TOKENLAKE_SERVICE_CALL_AUTH_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/statusor.h"

namespace tokenlake::service {

// The metadata key that carries the call token.
inline constexpr char kCallTokenMetadata[] = "x-tokenlake-call-token";

// Attaches a fresh call token for `method` (e.g. "Register") to `context`. No-op when `secret`
// is empty.
void AuthorizeCall(grpc::ClientContext* context, const std::string& secret,
                   std::string_view method);

// OK when `secret` is empty or `context` carries a valid token for `method`; otherwise
// UNAUTHENTICATED saying why (no token, malformed, stale, wrong secret).
grpc::Status CheckCall(const grpc::ServerContext* context, const std::string& secret,
                       std::string_view method);

// CheckCall with one secret, counting the calls it refuses (the coordinator's gRPC services
// share one). Thread-safe.
class CallAuthenticator {
 public:
  explicit CallAuthenticator(std::string secret) : secret_(std::move(secret)) {}
  grpc::Status Check(const grpc::ServerContext* context, std::string_view method) {
    grpc::Status s = CheckCall(context, secret_, method);
    if (!s.ok()) refused_.fetch_add(1, std::memory_order_relaxed);
    return s;
  }
  int64_t refused() const { return refused_.load(std::memory_order_relaxed); }

 private:
  const std::string secret_;
  std::atomic<int64_t> refused_{0};
};

// The cluster secret handed to this process in the environment (transport::kClusterSecretEnv,
// hex), removed from the environment (and overwritten in /proc/<pid>/environ) once read. Empty when
// the variable is not set. Errors: InvalidArgument when it is set but not a valid secret.
absl::StatusOr<std::string> TakeClusterSecretFromEnvironment();

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_CALL_AUTH_H_
