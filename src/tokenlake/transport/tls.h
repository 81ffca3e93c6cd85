// The cluster's TLS identities: one certificate authority per cluster, and per host a
// certificate (for both serving and dialling: mutual TLS) signed by it, as PEM files in a folder:
//
//   DIR/ca.pem     the cluster CA's certificate (what every peer is verified against)
//   DIR/cert.pem   this host's certificate, with its names and addresses as subjectAltNames
//   DIR/key.pem    this host's private key (mode 0600)
//   DIR/ca-key.pem the CA's private key, only in the folder that issues certificates
//
// MakeClusterCertificates writes such a folder (`tokenlake certs --out DIR`), either with a new
// CA or signed by an existing one, so that each host gets its own key. Keys are ECDSA P-256,
// signatures SHA-256, certificates X.509 v3.
//
// LoadTlsIdentity reads a folder and checks it before any connection is made: every file
// present and parseable, the key matching the certificate, the certificate signed by the CA and
// valid now. Errors name the file and what is wrong with it.
//
// Thread-safety: pure functions (OpenSSL 3 is thread-safe without set-up).
#ifndef TOKENLAKE_TRANSPORT_TLS_H_
#define TOKENLAKE_TRANSPORT_TLS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace tokenlake::transport {

// One host's identity, as PEM text (what gRPC's credentials and the transport's TLS context
// take).
struct TlsIdentity {
  std::string ca_pem;
  std::string cert_pem;
  std::string key_pem;
  // Where it was read from (for messages).
  std::string dir;
  // The certificate's subjectAltNames (DNS names and IP addresses, as text) and expiry.
  std::vector<std::string> names;
  absl::Time not_after;
};

struct CertificateOptions {
  // Folder to write ca.pem, cert.pem, key.pem (and ca-key.pem with a new CA) into; created if
  // absent. Existing files there are replaced.
  std::string out_dir;
  // The host's names and addresses (DNS names, IPv4 or IPv6 addresses) for subjectAltName;
  // "localhost", "127.0.0.1" and "::1" are always added. The first is the subject's CN.
  std::vector<std::string> hosts;
  // Validity of the host certificate (and of a new CA), > 0.
  absl::Duration valid_for = absl::Hours(24 * 365);
  // Empty: make a new CA. Otherwise a folder with ca.pem and ca-key.pem to sign with.
  std::string ca_dir;
};

// Writes a host certificate (and a CA when options.ca_dir is empty). Returns the identity written.
// Errors: InvalidArgument (no out_dir, a host that is neither a DNS name nor an address,
// valid_for <= 0), NotFound / InvalidArgument naming a missing or unreadable CA file, Internal
// naming the OpenSSL step that failed, PermissionDenied when the folder cannot be written.
absl::StatusOr<TlsIdentity> MakeClusterCertificates(const CertificateOptions& options);

// Reads and checks DIR/ca.pem, DIR/cert.pem and DIR/key.pem (see the file comment).
// Errors: NotFound (a file is missing), InvalidArgument (a file is not what it should be, the key
// does not match the certificate, the certificate is not signed by the CA, or it is expired or
// not yet valid), each naming the file.
absl::StatusOr<TlsIdentity> LoadTlsIdentity(const std::string& dir);

}  // namespace tokenlake::transport

#endif  // TOKENLAKE_TRANSPORT_TLS_H_
