#include "tokenlake/service/grpc_credentials.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace tokenlake::service {

absl::StatusOr<ClusterTls> ClusterTls::FromDir(const std::string& dir) {
  ClusterTls tls;
  if (dir.empty()) return tls;
  absl::StatusOr<transport::TlsIdentity> identity = transport::LoadTlsIdentity(dir);
  if (!identity.ok()) return identity.status();
  absl::StatusOr<std::shared_ptr<const transport::TlsContext>> context =
      transport::TlsContext::Create(*identity);
  if (!context.ok()) return context.status();
  tls.identity = std::make_shared<const transport::TlsIdentity>(*std::move(identity));
  tls.context = *std::move(context);
  return tls;
}

absl::Status CheckExposure(const std::string& what, const std::string& host, const ClusterTls& tls,
                           bool allow_insecure) {
  if (tls.enabled() || allow_insecure || transport::IsLoopbackHost(host)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(what, " on ", host,
                   " would be reachable beyond this machine without TLS: give --tls-dir "
                   "(made by `tokenlake certs`), or --insecure to accept that"));
}

std::shared_ptr<grpc::ServerCredentials> GrpcServerCredentials(const transport::TlsIdentity* tls) {
  if (tls == nullptr) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions options(
      GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  options.pem_root_certs = tls->ca_pem;
  options.pem_key_cert_pairs.push_back({tls->key_pem, tls->cert_pem});
  return grpc::SslServerCredentials(options);
}

std::shared_ptr<grpc::ChannelCredentials> GrpcChannelCredentials(
    const transport::TlsIdentity* tls) {
  if (tls == nullptr) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = tls->ca_pem;
  options.pem_private_key = tls->key_pem;
  options.pem_cert_chain = tls->cert_pem;
  return grpc::SslCredentials(options);
}

grpc::ChannelArguments GrpcChannelArguments() {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxGrpcMessageBytes);
  args.SetMaxSendMessageSize(kMaxGrpcMessageBytes);
  return args;
}

}  // namespace tokenlake::service
