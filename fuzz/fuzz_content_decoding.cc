// libFuzzer target: the HTTP front end's request parser and content decoding
// (service/http_parser.h). Invariants checked on every input: no crash, no sanitizer report;
// the input parsed in two pieces (split where its first byte says) ends as it does whole, with
// the same body and request size; a complete request's body is within the limit and its size
// within the input; an error names a 4xx/5xx status and a reason; decoding the body never yields
// more than its limit.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "tokenlake/service/http_parser.h"

using tokenlake::service::DecodeContentEncoding;
using tokenlake::service::HttpLimits;
using tokenlake::service::HttpRequestParser;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string_view input(reinterpret_cast<const char*>(data) + 1, size - 1);
  const HttpLimits limits{
      .max_request_line = 256, .max_header_bytes = 1024, .max_headers = 16, .max_body_bytes = 4096};
  HttpRequestParser whole(limits);
  const HttpRequestParser::State a = whole.Parse(input);
  HttpRequestParser pieces(limits);
  const size_t split = input.empty() ? 0 : data[0] % (input.size() + 1);
  HttpRequestParser::State b = pieces.Parse(input.substr(0, split));
  if (b == HttpRequestParser::State::kIncomplete) b = pieces.Parse(input);
  if (a != b) std::abort();
  if (a == HttpRequestParser::State::kComplete) {
    if (whole.request().body != pieces.request().body ||
        whole.request_bytes() != pieces.request_bytes() || whole.request_bytes() > input.size() ||
        static_cast<int64_t>(whole.request().body.size()) > limits.max_body_bytes) {
      std::abort();
    }
    auto decoded = DecodeContentEncoding(whole.request().body, whole.content_encoding(), 4096);
    if (decoded.ok() && static_cast<int64_t>(decoded->size()) > 4096) std::abort();
  } else if (a == HttpRequestParser::State::kError) {
    if (whole.error_status() < 400 || whole.error_status() > 599 || whole.error_message().empty() ||
        whole.error_status() != pieces.error_status()) {
      std::abort();
    }
  }
  return 0;
}
