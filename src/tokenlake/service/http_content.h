// HTTP/1.1 request parsing for the front end (http_front_end.h), with every size bounded, kept
// apart from sockets so that it is unit-tested and fuzzed on its own.
//
// HttpRequestParser reads one request from the bytes received so far on a connection (called
// again as more arrive; it remembers how far it got, so a request that arrives a byte at a time
// costs linear work):
//   - the request line, at most `max_request_line` bytes (414 beyond);
//   - header fields, at most `max_header_bytes` in all and `max_headers` of them (431 beyond);
//   - the body: by Content-Length (413 as soon as it announces more than `max_body_bytes`), or
//     `Transfer-Encoding: chunked` (decoded as it arrives, 413 as soon as the decoded size passes
//     `max_body_bytes`, or when chunk framing makes the raw body larger than twice that); both at
//     once is refused (400); a POST or PUT with neither gets 411 (a body without a length would
//     have no end);
//   - `Expect: 100-continue` is noted (the server answers 100 once the headers are accepted).
// The Content-Type is not looked at: the handlers read JSON whatever it says.
//
// DecodeContentEncoding undoes a `Content-Encoding` (gzip, x-gzip, deflate; identity) with the
// output bounded by `max_bytes`: a small compressed body that inflates beyond it is refused after
// inflating at most max_bytes + one buffer, never held whole.
//
// Thread-safety: HttpRequestParser is not thread-safe (one per connection); the functions are.
#ifndef TOKENLAKE_SERVICE_HTTP_PARSER_H_
#define TOKENLAKE_SERVICE_HTTP_PARSER_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "tokenlake/service/http_front_end.h"

namespace tokenlake::service {

struct HttpLimits {
  // The request line (method, target, version), bytes. 414 beyond.
  size_t max_request_line = 8192;
  // All header fields (and a chunked body's trailer fields), bytes; and their number. 431 beyond.
  size_t max_header_bytes = 16384;
  size_t max_headers = 100;
  // The body after transfer decoding (and, in DecodeContentEncoding, after content decoding).
  // 413 beyond.
  int64_t max_body_bytes = int64_t{1} << 20;
};

class HttpRequestParser {
 public:
  enum class State {
    kIncomplete,  // more bytes are needed
    kComplete,    // request() holds the request; request_bytes() of the buffer belong to it
    kError,       // error_status() / error_message() say why; the connection must close
  };

  explicit HttpRequestParser(const HttpLimits& limits) : limits_(limits) {}

  // Parses `buffer`: the bytes received since the start of this request (the same prefix as on
  // the previous call, possibly longer). Once kComplete or kError, further calls return the same.
  State Parse(std::string_view buffer);

  // Headers parsed and accepted (a body may still be on its way).
  bool headers_done() const { return phase_ >= Phase::kBody; }
  // The client asked to be told to send its body (Expect: 100-continue).
  bool expects_continue() const { return expect_continue_; }
  // The connection may be kept for another request (HTTP/1.1 without "Connection: close", or
  // HTTP/1.0 with "Connection: keep-alive").
  bool keep_alive() const { return keep_alive_; }

  // kComplete only: the request (body transfer-decoded, not content-decoded), its
  // Content-Encoding (lower case, empty when none) and its size in the buffer.
  HttpRequest& request() { return request_; }
  const std::string& content_encoding() const { return content_encoding_; }
  size_t request_bytes() const { return request_bytes_; }

  // kError only: the HTTP status to answer with (400, 411, 413, 414, 431, 501) and why.
  int error_status() const { return error_status_; }
  const std::string& error_message() const { return error_message_; }

  // Bytes of decoded body held by the parser (chunked bodies), for memory accounting.
  size_t held_bytes() const { return request_.body.size(); }

 private:
  enum class Phase { kRequestLine, kHeaders, kBody, kChunkSize, kChunkData, kTrailers, kDone };
  State Fail(int status, std::string message);
  State ParseRequestLine(std::string_view line);
  State ParseHeaderLine(std::string_view line);
  State HeadersDone();
  State ParseChunked(std::string_view buffer);

  const HttpLimits limits_;
  Phase phase_ = Phase::kRequestLine;
  State state_ = State::kIncomplete;
  size_t pos_ = 0;            // bytes of the buffer consumed so far
  size_t header_start_ = 0;   // where the header fields start
  size_t trailer_bytes_ = 0;  // bytes of trailer fields so far
  size_t body_start_ = 0;
  int64_t content_length_ = -1;
  int64_t chunk_left_ = 0;  // bytes of the current chunk still to read
  bool chunked_ = false;
  bool keep_alive_ = true;
  bool http10_ = false;
  bool expect_continue_ = false;
  HttpRequest request_;
  std::string content_encoding_;
  size_t request_bytes_ = 0;
  int error_status_ = 0;
  std::string error_message_;
};

// Undoes `encoding` (a Content-Encoding value; empty or "identity" = none) on `body`.
// Errors: ResourceExhausted when the decoded body would exceed `max_bytes` (answer 413),
// InvalidArgument when the body is not valid for its encoding (400), Unimplemented for an
// encoding other than gzip, x-gzip, deflate or identity (415).
absl::StatusOr<std::string> DecodeContentEncoding(std::string body, std::string_view encoding,
                                                  int64_t max_bytes);

// The reason phrase of an HTTP status ("Payload Too Large" for 413), and the same in snake case
// ("payload_too_large").
const char* HttpReason(int status);
std::string HttpStatusName(int status);

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_HTTP_PARSER_H_
