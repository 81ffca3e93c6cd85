// The cluster secret: a random key shared by the processes of one TokenLake cluster (`tokenlake
// serve` generates it and hands it to its children through the environment), with which they
// prove to each other that they belong to the cluster:
//   - the host transport's connection handshake (tcp_transport.h) is a challenge-response with
//     HMAC-SHA256 under the secret, in both directions;
//   - gRPC calls carry a call token (CallToken): an HMAC over the method, the time and a nonce.
//
// What it protects against: a process on the same host that does not know the secret (it cannot
// complete a handshake or make a token, so none of its frames or calls are accepted). What it
// does not: a process that can read the secret (same user: the environment or a 0600 file), or
// one that can read loopback traffic (root); a token seen on the wire could be replayed for the
// same method within the allowed clock skew.
//
// Thread-safety: the functions are thread-safe.
#ifndef TOKENLAKE_TRANSPORT_CLUSTER_SECRET_H_
#define TOKENLAKE_TRANSPORT_CLUSTER_SECRET_H_

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace tokenlake::transport {

// Bytes of a generated secret.
inline constexpr size_t kClusterSecretBytes = 32;
// The environment variable through which a cluster's processes receive the secret (hex).
inline constexpr char kClusterSecretEnv[] = "TOKENLAKE_CLUSTER_SECRET";

using Mac = std::array<unsigned char, 32>;

// kClusterSecretBytes random bytes from OpenSSL's CSPRNG. Errors: Internal (no randomness).
absl::StatusOr<std::string> GenerateClusterSecret();
// Lower-case hex of `bytes`.
std::string ToHex(std::string_view bytes);
// The bytes of a hex secret (an even number of hex digits, at least 32 of them).
// Errors: InvalidArgument naming the problem (never echoing the secret).
absl::StatusOr<std::string> ClusterSecretFromHex(std::string_view hex);

// HMAC-SHA256 under `key` of `label` || 0x00 || `message` (OpenSSL EVP_MAC). `key` non-empty.
Mac HmacSha256(std::string_view key, std::string_view label, std::string_view message);
// Constant-time equality.
bool MacEqual(const Mac& a, const Mac& b);

// Random bytes / a random 64-bit number from OpenSSL's CSPRNG (unpredictable ids, nonces).
// CHECK-fails only if the CSPRNG cannot be seeded (the process cannot run safely then).
void RandomBytes(unsigned char* out, size_t n);
uint64_t RandomU64();

// A token for one call of `method`, valid around `now`: "<unix_ms>.<nonce hex>.<mac hex>".
std::string CallToken(std::string_view key, std::string_view method, absl::Time now);
// OK when `token` was made by CallToken with the same key and method at a time within
// `max_skew` of `now`. Errors: Unauthenticated naming what is wrong (missing, malformed, stale,
// bad MAC).
absl::Status VerifyCallToken(std::string_view key, std::string_view token, std::string_view method,
                             absl::Time now, absl::Duration max_skew = absl::Seconds(60));

}  // namespace tokenlake::transport

#endif  // TOKENLAKE_TRANSPORT_CLUSTER_SECRET_H_
