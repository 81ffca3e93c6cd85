// libFuzzer target: the HTTP front end's bounded content decoding (service/http_content.h).
// The first byte picks the Content-Encoding, the rest is the body. Invariants checked on every
// input: no crash, no sanitizer report; a decoded body is never over its limit; a failure is
// ResourceExhausted (over the limit), InvalidArgument (not valid for its encoding) or
// Unimplemented (an encoding that is not served), with a reason.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "tokenlake/service/http_content.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  static const char* const kEncodings[] = {"gzip", "x-gzip", "deflate", "identity", "", "br"};
  const char* encoding = kEncodings[data[0] % 6];
  const std::string body(reinterpret_cast<const char*>(data) + 1, size - 1);
  constexpr int64_t kLimit = 4096;
  auto decoded = tokenlake::service::DecodeContentEncoding(body, encoding, kLimit);
  if (decoded.ok()) {
    if (static_cast<int64_t>(decoded->size()) > kLimit) std::abort();
    return 0;
  }
  const absl::StatusCode code = decoded.status().code();
  if ((code != absl::StatusCode::kResourceExhausted && code != absl::StatusCode::kInvalidArgument &&
       code != absl::StatusCode::kUnimplemented) ||
      decoded.status().message().empty()) {
    std::abort();
  }
  return 0;
}
