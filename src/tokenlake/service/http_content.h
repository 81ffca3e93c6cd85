// What the HTTP front end (http_front_end.h) does with request bodies and statuses itself,
// whatever server carries the bytes:
//
// DecodeContentEncoding undoes a `Content-Encoding` (gzip, x-gzip, deflate; identity) with the
// output bounded by `max_bytes`: a small compressed body that inflates beyond it is refused after
// inflating at most max_bytes + one buffer, never held whole.
//
// HttpReason / HttpStatusName name a status for the front end's own answers, whose OpenAI error
// body carries the status's name as its "code" ("payload_too_large" for 413).
//
// Thread-safety: the functions are thread-safe.
#ifndef TOKENLAKE_SERVICE_HTTP_CONTENT_H_
#define TOKENLAKE_SERVICE_HTTP_CONTENT_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace tokenlake::service {

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

#endif  // TOKENLAKE_SERVICE_HTTP_CONTENT_H_
