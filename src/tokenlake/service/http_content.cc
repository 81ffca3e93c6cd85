#include "tokenlake/service/http_content.h"

#include <zlib.h>

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/str_format.h"

namespace tokenlake::service {

absl::StatusOr<std::string> DecodeContentEncoding(std::string body, std::string_view encoding,
                                                  int64_t max_bytes) {
  if (encoding.empty() || encoding == "identity") {
    if (static_cast<int64_t>(body.size()) > max_bytes) {
      return absl::ResourceExhaustedError(
          absl::StrFormat("request body exceeds the limit of %d bytes", max_bytes));
    }
    return body;
  }
  int window_bits;
  if (encoding == "gzip" || encoding == "x-gzip") {
    window_bits = 16 + MAX_WBITS;
  } else if (encoding == "deflate") {
    window_bits = MAX_WBITS;
  } else {
    return absl::UnimplementedError(
        absl::StrFormat("Content-Encoding '%s' is not supported (gzip, deflate, identity are)",
                        std::string(encoding.substr(0, 64))));
  }
  z_stream z{};
  if (inflateInit2(&z, window_bits) != Z_OK) return absl::InternalError("inflateInit2 failed");
  std::string out;
  char buf[64 * 1024];
  z.next_in = reinterpret_cast<Bytef*>(body.data());
  z.avail_in = static_cast<uInt>(body.size());
  absl::Status status = absl::OkStatus();
  while (true) {
    z.next_out = reinterpret_cast<Bytef*>(buf);
    z.avail_out = sizeof(buf);
    const int rc = inflate(&z, Z_NO_FLUSH);
    out.append(buf, sizeof(buf) - z.avail_out);
    if (static_cast<int64_t>(out.size()) > max_bytes) {
      status = absl::ResourceExhaustedError(absl::StrFormat(
          "request body inflates to more than the limit of %d bytes (Content-Encoding %s)",
          max_bytes, std::string(encoding)));
      break;
    }
    if (rc == Z_STREAM_END) {
      if (z.avail_in == 0) break;
      // Concatenated gzip members.
      if (inflateReset(&z) != Z_OK) {
        status = absl::InvalidArgumentError("cannot continue inflating the request body");
        break;
      }
      continue;
    }
    if (rc != Z_OK) {
      status = absl::InvalidArgumentError(absl::StrFormat("request body is not valid %s data (%s)",
                                                          std::string(encoding),
                                                          z.msg != nullptr ? z.msg : "truncated"));
      break;
    }
    if (z.avail_in == 0 && z.avail_out != 0) {
      status = absl::InvalidArgumentError(
          absl::StrFormat("request body is truncated %s data", std::string(encoding)));
      break;
    }
  }
  inflateEnd(&z);
  if (!status.ok()) return status;
  return out;
}

const char* HttpReason(int status) {
  switch (status) {
    case 100:
      return "Continue";
    case 200:
      return "OK";
    case 400:
      return "Bad Request";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 408:
      return "Request Timeout";
    case 411:
      return "Length Required";
    case 413:
      return "Payload Too Large";
    case 414:
      return "URI Too Long";
    case 415:
      return "Unsupported Media Type";
    case 429:
      return "Too Many Requests";
    case 431:
      return "Request Header Fields Too Large";
    case 500:
      return "Internal Server Error";
    case 501:
      return "Not Implemented";
    case 503:
      return "Service Unavailable";
    case 504:
      return "Gateway Timeout";
    case 505:
      return "HTTP Version Not Supported";
    default:
      return "Error";
  }
}

std::string HttpStatusName(int status) {
  std::string name = absl::AsciiStrToLower(HttpReason(status));
  std::replace(name.begin(), name.end(), ' ', '_');
  return name;
}

}  // namespace tokenlake::service
