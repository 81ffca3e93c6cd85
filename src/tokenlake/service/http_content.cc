#include "tokenlake/service/http_parser.h"

#include <zlib.h>

#include <algorithm>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"

namespace tokenlake::service {
namespace {

// A line of `buffer` that starts at `from` and ends with '\n' (a preceding '\r' dropped), or
// nullopt-like npos in *end when there is no complete line yet.
std::string_view LineAt(std::string_view buffer, size_t from, size_t* next) {
  const size_t nl = buffer.find('\n', from);
  if (nl == std::string_view::npos) {
    *next = std::string_view::npos;
    return {};
  }
  *next = nl + 1;
  std::string_view line = buffer.substr(from, nl - from);
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  return line;
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

std::string Lower(std::string_view s) {
  return absl::AsciiStrToLower(absl::string_view(s.data(), s.size()));
}

bool IsToken(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s) {
    const bool ok = absl::ascii_isalnum(static_cast<unsigned char>(c)) ||
                    std::string_view("!#$%&'*+-.^_`|~").find(c) != std::string_view::npos;
    if (!ok) return false;
  }
  return true;
}

// Whether the comma-separated header value `value` lists `token` (case-insensitive).
bool ListsToken(std::string_view value, std::string_view token) {
  for (absl::string_view part :
       absl::StrSplit(absl::string_view(value.data(), value.size()), ',')) {
    const std::string_view t = Trim(std::string_view(part.data(), part.size()));
    if (absl::EqualsIgnoreCase(absl::string_view(t.data(), t.size()),
                               absl::string_view(token.data(), token.size()))) {
      return true;
    }
  }
  return false;
}

}  // namespace

HttpRequestParser::State HttpRequestParser::Fail(int status, std::string message) {
  state_ = State::kError;
  error_status_ = status;
  error_message_ = std::move(message);
  phase_ = Phase::kDone;
  return state_;
}

HttpRequestParser::State HttpRequestParser::Parse(std::string_view buffer) {
  while (state_ == State::kIncomplete) {
    switch (phase_) {
      case Phase::kRequestLine: {
        size_t next;
        std::string_view line = LineAt(buffer, pos_, &next);
        if (next == std::string_view::npos) {
          if (buffer.size() - pos_ > limits_.max_request_line) {
            return Fail(414, absl::StrFormat("request line longer than %d bytes",
                                             limits_.max_request_line));
          }
          return state_;
        }
        if (line.size() > limits_.max_request_line) {
          return Fail(414, absl::StrFormat("request line of %d bytes exceeds the limit of %d",
                                           line.size(), limits_.max_request_line));
        }
        pos_ = next;
        if (line.empty()) {
          // Empty lines before a request are tolerated (RFC 9112 2.2), a few of them.
          if (pos_ > 64) return Fail(400, "no request line");
          continue;
        }
        if (ParseRequestLine(line) == State::kError) return state_;
        header_start_ = pos_;
        phase_ = Phase::kHeaders;
        break;
      }
      case Phase::kHeaders: {
        size_t next;
        std::string_view line = LineAt(buffer, pos_, &next);
        const size_t end = next == std::string_view::npos ? buffer.size() : next;
        if (end - header_start_ > limits_.max_header_bytes) {
          return Fail(
              431, absl::StrFormat("header fields longer than %d bytes", limits_.max_header_bytes));
        }
        if (next == std::string_view::npos) return state_;
        pos_ = next;
        if (line.empty()) {
          if (HeadersDone() == State::kError) return state_;
          break;
        }
        if (ParseHeaderLine(line) == State::kError) return state_;
        break;
      }
      case Phase::kBody: {
        const auto need = static_cast<size_t>(content_length_);
        if (buffer.size() - body_start_ < need) return state_;
        request_.body.assign(buffer.substr(body_start_, need));
        request_bytes_ = body_start_ + need;
        phase_ = Phase::kDone;
        state_ = State::kComplete;
        return state_;
      }
      case Phase::kChunkSize:
      case Phase::kChunkData:
      case Phase::kTrailers:
        return ParseChunked(buffer);
      case Phase::kDone:
        return state_;
    }
  }
  return state_;
}

HttpRequestParser::State HttpRequestParser::ParseRequestLine(std::string_view line) {
  std::vector<absl::string_view> parts =
      absl::StrSplit(absl::string_view(line.data(), line.size()), ' ');
  if (parts.size() != 3 || !IsToken(std::string_view(parts[0].data(), parts[0].size())) ||
      parts[1].empty()) {
    return Fail(400, "malformed request line (expected: METHOD /path HTTP/1.1)");
  }
  if (parts[2] == "HTTP/1.1") {
    keep_alive_ = true;
  } else if (parts[2] == "HTTP/1.0") {
    http10_ = true;
    keep_alive_ = false;
  } else {
    return Fail(
        505, absl::StrFormat("HTTP version '%s' is not supported (HTTP/1.1 is)",
                             std::string(parts[2].data(), std::min<size_t>(parts[2].size(), 32))));
  }
  request_.method.assign(parts[0].data(), parts[0].size());
  std::string_view target(parts[1].data(), parts[1].size());
  // The absolute form (a proxy's): keep its path.
  for (std::string_view scheme : {"http://", "https://"}) {
    if (absl::StartsWith(absl::string_view(target.data(), target.size()),
                         absl::string_view(scheme.data(), scheme.size()))) {
      const size_t slash = target.find('/', scheme.size());
      target = slash == std::string_view::npos ? std::string_view("/") : target.substr(slash);
    }
  }
  if (target.front() != '/' && target != "*") return Fail(400, "request target must start with /");
  request_.path = std::string(target.substr(0, target.find('?')));
  return state_;
}

HttpRequestParser::State HttpRequestParser::ParseHeaderLine(std::string_view line) {
  if (line.front() == ' ' || line.front() == '\t') {
    return Fail(400, "folded header lines are not accepted");
  }
  const size_t colon = line.find(':');
  if (colon == std::string_view::npos || !IsToken(line.substr(0, colon))) {
    return Fail(400, "malformed header field (expected: Name: value)");
  }
  if (request_.headers.size() >= limits_.max_headers) {
    return Fail(431, absl::StrFormat("more than %d header fields", limits_.max_headers));
  }
  const std::string name = Lower(line.substr(0, colon));
  const std::string_view value = Trim(line.substr(colon + 1));
  if (name == "content-length") {
    int64_t n = -1;
    const bool digits =
        !value.empty() && value.size() <= 18 &&
        std::all_of(value.begin(), value.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (!digits || !absl::SimpleAtoi(absl::string_view(value.data(), value.size()), &n)) {
      return Fail(400, "Content-Length is not a number of bytes");
    }
    if (content_length_ >= 0 && content_length_ != n) {
      return Fail(400, "conflicting Content-Length fields");
    }
    content_length_ = n;
  } else if (name == "transfer-encoding") {
    if (!absl::EqualsIgnoreCase(absl::string_view(value.data(), value.size()), "chunked")) {
      return Fail(501, absl::StrFormat("Transfer-Encoding '%s' is not supported (chunked is)",
                                       std::string(value.substr(0, 64))));
    }
    chunked_ = true;
  } else if (name == "connection") {
    if (ListsToken(value, "close")) keep_alive_ = false;
    if (http10_ && ListsToken(value, "keep-alive")) keep_alive_ = true;
  } else if (name == "expect") {
    expect_continue_ =
        absl::EqualsIgnoreCase(absl::string_view(value.data(), value.size()), "100-continue");
  } else if (name == "content-encoding") {
    content_encoding_ = Lower(value);
  }
  request_.headers.emplace_back(std::string(line.substr(0, colon)), std::string(value));
  return state_;
}

HttpRequestParser::State HttpRequestParser::HeadersDone() {
  if (chunked_ && content_length_ >= 0) {
    return Fail(400, "both Content-Length and Transfer-Encoding: chunked");
  }
  if (content_length_ > limits_.max_body_bytes) {
    return Fail(413, absl::StrFormat("request body of %d bytes exceeds the limit of %d bytes",
                                     content_length_, limits_.max_body_bytes));
  }
  if (!chunked_ && content_length_ < 0) {
    if (request_.method == "POST" || request_.method == "PUT" || request_.method == "PATCH") {
      return Fail(411, "a request body needs Content-Length or Transfer-Encoding: chunked");
    }
    content_length_ = 0;
  }
  if (!chunked_ && content_length_ == 0) expect_continue_ = false;
  body_start_ = pos_;
  phase_ = chunked_ ? Phase::kChunkSize : Phase::kBody;
  return state_;
}

HttpRequestParser::State HttpRequestParser::ParseChunked(std::string_view buffer) {
  // Chunk framing may not make the raw body more than twice the largest body (tiny chunks).
  const size_t raw_limit =
      2 * static_cast<size_t>(limits_.max_body_bytes) + limits_.max_header_bytes;
  while (state_ == State::kIncomplete) {
    if (buffer.size() - body_start_ > raw_limit) {
      return Fail(413, absl::StrFormat("chunked request body longer than %d bytes with its framing",
                                       raw_limit));
    }
    if (phase_ == Phase::kChunkSize) {
      size_t next;
      std::string_view line = LineAt(buffer, pos_, &next);
      if (next == std::string_view::npos) {
        if (buffer.size() - pos_ > 1024) return Fail(400, "chunk size line too long");
        return state_;
      }
      line = Trim(line.substr(0, line.find(';')));
      const bool hex = std::all_of(line.begin(), line.end(), [](char c) {
        return absl::ascii_isxdigit(static_cast<unsigned char>(c));
      });
      if (line.empty() || !hex) return Fail(400, "malformed chunk size");
      if (line.size() > 15) return Fail(413, "chunk larger than the body limit");
      const int64_t size = static_cast<int64_t>(std::stoull(std::string(line), nullptr, 16));
      if (static_cast<int64_t>(request_.body.size()) + size > limits_.max_body_bytes) {
        return Fail(413, absl::StrFormat("chunked request body exceeds the limit of %d bytes",
                                         limits_.max_body_bytes));
      }
      pos_ = next;
      if (size == 0) {
        phase_ = Phase::kTrailers;
      } else {
        chunk_left_ = size;
        phase_ = Phase::kChunkData;
      }
    } else if (phase_ == Phase::kChunkData) {
      if (chunk_left_ > 0) {
        const size_t take = std::min(buffer.size() - pos_, static_cast<size_t>(chunk_left_));
        request_.body.append(buffer.substr(pos_, take));
        pos_ += take;
        chunk_left_ -= static_cast<int64_t>(take);
        if (chunk_left_ > 0) return state_;
      }
      // The CRLF after the chunk's data.
      if (pos_ >= buffer.size()) return state_;
      if (buffer[pos_] == '\n') {
        pos_ += 1;
      } else if (buffer[pos_] == '\r') {
        if (pos_ + 1 >= buffer.size()) return state_;
        if (buffer[pos_ + 1] != '\n') return Fail(400, "chunk data not followed by CRLF");
        pos_ += 2;
      } else {
        return Fail(400, "chunk data not followed by CRLF");
      }
      phase_ = Phase::kChunkSize;
    } else {  // kTrailers
      size_t next;
      std::string_view line = LineAt(buffer, pos_, &next);
      const size_t end = next == std::string_view::npos ? buffer.size() : next;
      if (trailer_bytes_ + (end - pos_) > limits_.max_header_bytes) {
        return Fail(431, "trailer fields too long");
      }
      if (next == std::string_view::npos) return state_;
      trailer_bytes_ += next - pos_;
      pos_ = next;
      if (line.empty()) {
        request_bytes_ = pos_;
        phase_ = Phase::kDone;
        state_ = State::kComplete;
      }
    }
  }
  return state_;
}

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
