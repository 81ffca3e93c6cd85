#include "tokenlake/service/call_auth.h"

#include <cstdlib>
#include <cstring>

#include "absl/time/clock.h"
#include "tokenlake/transport/cluster_secret.h"

namespace tokenlake::service {

void AuthorizeCall(grpc::ClientContext* context, const std::string& secret,
                   std::string_view method) {
  if (secret.empty()) return;
  context->AddMetadata(kCallTokenMetadata, transport::CallToken(secret, method, absl::Now()));
}

grpc::Status CheckCall(const grpc::ServerContext* context, const std::string& secret,
                       std::string_view method) {
  if (secret.empty()) return grpc::Status::OK;
  const auto& metadata = context->client_metadata();
  auto it = metadata.find(kCallTokenMetadata);
  const std::string_view token = it == metadata.end()
                                     ? std::string_view()
                                     : std::string_view(it->second.data(), it->second.size());
  const absl::Status s = transport::VerifyCallToken(secret, token, method, absl::Now());
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, std::string(s.message()));
}

absl::StatusOr<std::string> TakeClusterSecretFromEnvironment() {
  const char* hex = std::getenv(transport::kClusterSecretEnv);
  if (hex == nullptr) return std::string();
  absl::StatusOr<std::string> secret = transport::ClusterSecretFromHex(hex);
  // Overwritten in place first: /proc/<pid>/environ shows the initial environment block, which
  // unsetenv alone leaves as it was.
  std::memset(const_cast<char*>(hex), '0', std::strlen(hex));
  ::unsetenv(transport::kClusterSecretEnv);
  if (!secret.ok()) {
    return absl::InvalidArgumentError(std::string(transport::kClusterSecretEnv) + ": " +
                                      std::string(secret.status().message()));
  }
  return secret;
}

}  // namespace tokenlake::service
