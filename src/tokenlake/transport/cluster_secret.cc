#include "tokenlake/transport/cluster_secret.h"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "tokenlake/base/check.h"

namespace tokenlake::transport {
namespace {

int HexDigit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

bool FromHexBytes(std::string_view hex, unsigned char* out, size_t n) {
  if (hex.size() != 2 * n) return false;
  for (size_t i = 0; i < n; ++i) {
    const int hi = HexDigit(hex[2 * i]), lo = HexDigit(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    out[i] = static_cast<unsigned char>(hi * 16 + lo);
  }
  return true;
}

}  // namespace

absl::StatusOr<std::string> GenerateClusterSecret() {
  std::string s(kClusterSecretBytes, '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(s.data()), static_cast<int>(s.size())) != 1) {
    return absl::InternalError("cannot generate a cluster secret: OpenSSL RAND_bytes failed");
  }
  return s;
}

std::string ToHex(std::string_view bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(2 * bytes.size());
  for (char c : bytes) {
    const auto b = static_cast<unsigned char>(c);
    out.push_back(kDigits[b >> 4]);
    out.push_back(kDigits[b & 15]);
  }
  return out;
}

absl::StatusOr<std::string> ClusterSecretFromHex(std::string_view hex) {
  if (hex.size() < 32 || hex.size() % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "cluster secret: expected an even number (>= 32) of hex digits, got %d characters",
        hex.size()));
  }
  std::string out(hex.size() / 2, '\0');
  if (!FromHexBytes(hex, reinterpret_cast<unsigned char*>(out.data()), out.size())) {
    return absl::InvalidArgumentError("cluster secret: not a hex string");
  }
  return out;
}

Mac HmacSha256(std::string_view key, std::string_view label, std::string_view message) {
  TOKENLAKE_CHECK(!key.empty(), "HmacSha256: empty key");
  // One EVP_MAC per call: fetching is cheap next to a connection or a call, and no state is
  // shared between threads.
  EVP_MAC* mac = EVP_MAC_fetch(nullptr, "HMAC", nullptr);
  TOKENLAKE_CHECK(mac != nullptr, "OpenSSL: no HMAC implementation");
  EVP_MAC_CTX* ctx = EVP_MAC_CTX_new(mac);
  TOKENLAKE_CHECK(ctx != nullptr);
  char digest[] = "SHA256";
  OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
                         OSSL_PARAM_construct_end()};
  TOKENLAKE_CHECK((EVP_MAC_init(ctx, reinterpret_cast<const unsigned char*>(key.data()), key.size(),
                                params)) == 1);
  const unsigned char zero = 0;
  TOKENLAKE_CHECK((EVP_MAC_update(ctx, reinterpret_cast<const unsigned char*>(label.data()),
                                  label.size())) == 1);
  TOKENLAKE_CHECK((EVP_MAC_update(ctx, &zero, 1)) == 1);
  TOKENLAKE_CHECK((EVP_MAC_update(ctx, reinterpret_cast<const unsigned char*>(message.data()),
                                  message.size())) == 1);
  Mac out{};
  size_t len = 0;
  TOKENLAKE_CHECK((EVP_MAC_final(ctx, out.data(), &len, out.size())) == 1);
  TOKENLAKE_CHECK(len == out.size());
  EVP_MAC_CTX_free(ctx);
  EVP_MAC_free(mac);
  return out;
}

bool MacEqual(const Mac& a, const Mac& b) {
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

void RandomBytes(unsigned char* out, size_t n) {
  TOKENLAKE_CHECK(RAND_bytes(out, static_cast<int>(n)) == 1, "OpenSSL RAND_bytes failed");
}

uint64_t RandomU64() {
  unsigned char b[8];
  RandomBytes(b, sizeof(b));
  uint64_t v = 0;
  std::memcpy(&v, b, sizeof(v));
  return v;
}

namespace {
constexpr char kCallLabel[] = "tokenlake call token v1";
std::string CallMessage(std::string_view method, std::string_view ms, std::string_view nonce) {
  std::string out(method);
  out.append("|").append(ms).append("|").append(nonce);
  return out;
}
}  // namespace

std::string CallToken(std::string_view key, std::string_view method, absl::Time now) {
  unsigned char nonce[16];
  RandomBytes(nonce, sizeof(nonce));
  const std::string nonce_hex = ToHex(std::string_view(reinterpret_cast<char*>(nonce), 16));
  const std::string ms = absl::StrCat(absl::ToUnixMillis(now));
  const Mac mac = HmacSha256(key, kCallLabel, CallMessage(method, ms, nonce_hex));
  return absl::StrCat(ms, ".", nonce_hex, ".",
                      ToHex(std::string_view(reinterpret_cast<const char*>(mac.data()), 32)));
}

absl::Status VerifyCallToken(std::string_view key, std::string_view token, std::string_view method,
                             absl::Time now, absl::Duration max_skew) {
  if (token.empty()) return absl::UnauthenticatedError("no cluster call token");
  // (absl::string_view is not std::string_view in every abseil build.)
  std::vector<std::string> parts =
      absl::StrSplit(absl::string_view(token.data(), token.size()), '.');
  int64_t ms = 0;
  Mac got{};
  if (parts.size() != 3 || !absl::SimpleAtoi(parts[0], &ms) || parts[1].size() != 32 ||
      !FromHexBytes(parts[2], got.data(), got.size())) {
    return absl::UnauthenticatedError("malformed cluster call token");
  }
  const absl::Duration skew = absl::AbsDuration(now - absl::FromUnixMillis(ms));
  if (skew > max_skew) {
    return absl::UnauthenticatedError(
        absl::StrFormat("cluster call token is %s away from this process's clock (max %s)",
                        absl::FormatDuration(skew), absl::FormatDuration(max_skew)));
  }
  if (!MacEqual(got, HmacSha256(key, kCallLabel, CallMessage(method, parts[0], parts[1])))) {
    return absl::UnauthenticatedError("cluster call token for " + std::string(method) +
                                      " does not verify (wrong secret?)");
  }
  return absl::OkStatus();
}

}  // namespace tokenlake::transport
