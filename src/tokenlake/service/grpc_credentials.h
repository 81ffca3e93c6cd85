// A process's TLS for the cluster (ClusterTls: the identity, for gRPC, and the host transport's
// context, read once from a --tls-dir folder) and the gRPC credentials made from it: mutual TLS
// (transport/tls.h: the server requires a client certificate signed by the cluster CA, and the
// client checks that the server's certificate names the address it dials), or none.
//
// Thread-safety: pure functions; ClusterTls is immutable after FromDir.
#ifndef TOKENLAKE_SERVICE_GRPC_CREDENTIALS_H_
#define TOKENLAKE_SERVICE_GRPC_CREDENTIALS_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "tokenlake/transport/socket_stream.h"
#include "tokenlake/transport/tls.h"

namespace tokenlake::service {

struct ClusterTls {
  std::shared_ptr<const transport::TlsIdentity> identity;
  std::shared_ptr<const transport::TlsContext> context;

  bool enabled() const { return identity != nullptr; }
  const transport::TlsIdentity* get() const { return identity.get(); }

  // Reads and checks DIR (ca.pem, cert.pem, key.pem); an empty `dir` gives none.
  // Errors: LoadTlsIdentity's and TlsContext::Create's (naming the file).
  static absl::StatusOr<ClusterTls> FromDir(const std::string& dir);
};

// OK when a listener of `what` on `host` is safe: on loopback, or with TLS, or when
// `allow_insecure`. Errors: InvalidArgument naming it and saying how to allow it.
absl::Status CheckExposure(const std::string& what, const std::string& host, const ClusterTls& tls,
                           bool allow_insecure);

// The largest gRPC message a process of the cluster sends or accepts, on both sides of every
// channel. A registration carries every segment its instance holds (about 24 bytes each), so
// gRPC's default receive limit of 4 MiB refused an instance holding more than about 170,000;
// 64 MiB takes about 2.7 million (an instance that would need more is told so by name when it
// registers). Messages are only this large from members: the coordinator's memory quota
// (CoordinatorOptions::grpc_memory_bytes) bounds what any callers may make it hold.
inline constexpr int kMaxGrpcMessageBytes = 64 << 20;

// Channel arguments for the cluster's gRPC clients: the message limits above.
grpc::ChannelArguments GrpcChannelArguments();

// Null `tls`: insecure credentials (the clear, for loopback).
std::shared_ptr<grpc::ServerCredentials> GrpcServerCredentials(const transport::TlsIdentity* tls);
std::shared_ptr<grpc::ChannelCredentials> GrpcChannelCredentials(const transport::TlsIdentity* tls);

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_GRPC_CREDENTIALS_H_
