// gRPC credentials between a cluster's processes: mutual TLS with the cluster's identities
// (transport/tls.h: the server requires a client certificate signed by the cluster CA, and the
// client checks that the server's certificate names the address it dials), or none.
//
// Thread-safety: pure functions.
#ifndef TOKENLAKE_SERVICE_GRPC_CREDENTIALS_H_
#define TOKENLAKE_SERVICE_GRPC_CREDENTIALS_H_

#include <grpcpp/grpcpp.h>

#include <memory>

#include "tokenlake/transport/tls.h"

namespace tokenlake::service {

// Null `tls`: insecure credentials (the clear, for loopback).
std::shared_ptr<grpc::ServerCredentials> GrpcServerCredentials(const transport::TlsIdentity* tls);
std::shared_ptr<grpc::ChannelCredentials> GrpcChannelCredentials(const transport::TlsIdentity* tls);

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_GRPC_CREDENTIALS_H_
