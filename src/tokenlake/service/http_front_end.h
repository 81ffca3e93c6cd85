// The HTTP front end: an HTTP/1.1 server (on the address its options name) that hands each
// request to the handler of its route, and bounds what any client can hold. The connections,
// the parsing of requests and the framing of answers are libmicrohttpd's
// (docs/adr/0014-http-front-end-on-libmicrohttpd.md says why and what is still ours).
//
// Routes are (method, exact path, handler); the table is given at start (the coordinator's is in
// coordinator.cc, Coordinator::Impl::Routes). A handler gets the request with its body (content
// decoded; the Content-Type is not looked at) and fills a response: a whole body, or a `stream`
// function that writes the body in pieces (sent with chunked transfer encoding, e.g. server-sent
// events). A request for no route gets 404, a known path with another method 405, with OpenAI's
// error body naming the endpoints.
//
// How clients are bounded:
//   - libmicrohttpd's `io_threads` read every connection (epoll); a request goes to one of the
//     `threads` workers only once it has arrived whole (its connection is suspended meanwhile),
//     so slow or idle clients hold no worker;
//   - the header block must arrive within `header_timeout` of the request's first byte and the
//     whole request within `read_timeout` (else 408); a keep-alive connection idle for
//     `idle_timeout` between requests is closed;
//   - requests waiting for a worker: at most `max_queued_requests`, beyond that 503 with
//     Retry-After; connections: beyond `max_connections` a new connection's request is answered
//     503 with Retry-After (up to a quarter more of them; beyond even that new connections wait
//     in the listen backlog, `listen_backlog`, capped by the kernel's somaxconn); request bytes
//     held by all connections at most `max_buffered_bytes` (503 beyond); per client address at
//     most `max_connections_per_ip` connections when set;
//   - sizes: each connection's request line and header fields live in libmicrohttpd's buffer of
//     64 KiB; the request target at most 8 KiB (414), the header fields 16 KiB (431), the body
//     `max_body_bytes` by Content-Length, chunked, or after gzip/deflate decoding (413,
//     http_content.h); a POST or PUT without Content-Length or chunked framing gets 411;
//   - an error answer given before the request has arrived whole closes the connection after
//     draining what the client still sends (for up to 2 s or 4 MiB), so that the client reads
//     the answer instead of a reset.
// The front end's own answers carry OpenAI's error body (openai_api.h) with "code" the name of
// the HTTP status sent (http_content.h's HttpStatusName: "payload_too_large" for 413), except
// those libmicrohttpd's parser gives itself (a bad request line, an HTTP version it does not
// speak, a request line or header block past its 64 KiB buffer, a malformed header line: its
// HTML bodies, ADR 0014). Every answer of either kind is counted in Stats::rejected.
//
// Thread-safety: thread-safe; handlers run on the worker threads, several at once.
#ifndef TOKENLAKE_SERVICE_HTTP_FRONT_END_H_
#define TOKENLAKE_SERVICE_HTTP_FRONT_END_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace tokenlake::service {

struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string path;    // without the query string
  // Header fields as received (names compared without regard to case by Header()).
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;
  // The caller's tenant, set by the coordinator from the API key (never from the wire); empty:
  // none.
  std::string tenant;
  // The caller's budget of tokens in flight, set by the coordinator from the API key
  // (api_keys.h; never from the wire); null: none. Takes `tokens` (a request's prompt tokens +
  // max new tokens) until this request's answer is complete (a streamed one: until its stream
  // ends). Errors (nothing taken): ResourceExhausted when the budget cannot take them now,
  // InvalidArgument when it never can.
  std::function<absl::Status(int64_t tokens)> reserve_tokens;
  // The value of header `name` (case-insensitive), empty when absent.
  std::string Header(std::string_view name) const;
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  // More header fields (e.g. Retry-After).
  std::vector<std::pair<std::string, std::string>> headers;
  // When set, `body` is ignored and the body is streamed: `stream` is called once (always,
  // even when the client is already gone), on the handler's thread after the handler returned,
  // with a `write` that sends one piece and returns false once the client is gone (then
  // `stream` should return soon).
  std::function<void(const std::function<bool(std::string_view)>& write)> stream;
};

using HttpHandler = std::function<void(const HttpRequest& request, HttpResponse* response)>;

struct HttpRoute {
  std::string method;  // "GET", "POST"
  std::string path;    // exact, e.g. "/v1/completions"
  HttpHandler handler;
};

struct HttpFrontEndOptions {
  // Address to listen on: a host name or IPv4 / IPv6 literal ("0.0.0.0" / "::" for every
  // interface) and a port (0 = any free port).
  std::string host = "127.0.0.1";
  int32_t port = 0;
  // Largest request body after transfer and content decoding (413 beyond), >= 64.
  int64_t max_body_bytes = int64_t{1} << 20;
  // From a request's first byte: its header block within header_timeout, all of it within
  // read_timeout (408 otherwise). > 0.
  absl::Duration header_timeout = absl::Seconds(2);
  absl::Duration read_timeout = absl::Seconds(10);
  // A keep-alive connection with no request for this long is closed. > 0.
  absl::Duration idle_timeout = absl::Seconds(5);
  // Writing a response (a client that does not read it is dropped). > 0.
  absl::Duration write_timeout = absl::Seconds(10);
  // Worker threads running handlers, >= 1.
  int32_t threads = 32;
  // libmicrohttpd's threads reading and writing the connections (each with its epoll), >= 1.
  int32_t io_threads = 4;
  // Complete requests waiting for a worker (503 beyond), >= 1.
  int32_t max_queued_requests = 256;
  // Open connections served normally (see the file comment), >= 1.
  int32_t max_connections = 1024;
  // Request bytes held by all connections together (503 beyond), >= max_body_bytes.
  int64_t max_buffered_bytes = int64_t{64} << 20;
  // The listen socket's backlog, >= 1.
  int32_t listen_backlog = 4096;
  // Connections from one client address at once, beyond which new ones are closed at once;
  // 0: no such limit (on loopback every client has the same address).
  int32_t max_connections_per_ip = 0;
};

class HttpFrontEnd {
 public:
  // Binds and starts serving. Errors: InvalidArgument naming a bad option or route;
  // Unavailable when the port cannot be bound.
  static absl::StatusOr<std::unique_ptr<HttpFrontEnd>> Start(const HttpFrontEndOptions& options,
                                                             std::vector<HttpRoute> routes);
  ~HttpFrontEnd();
  HttpFrontEnd(const HttpFrontEnd&) = delete;
  HttpFrontEnd& operator=(const HttpFrontEnd&) = delete;

  int32_t port() const;

  struct Stats {
    // Connections open now.
    int64_t connections = 0;
    // Answers the front end gave itself (before or instead of a handler), by HTTP status:
    // 400, 404, 405, 408, 411, 413, 414, 415, 431, 501, 503, 505.
    std::map<int, int64_t> rejected;
    // Connections closed at once because even the overflow allowance was used up.
    int64_t connections_refused = 0;
  };
  Stats stats() const;

  // Stops accepting, closes every connection and joins the threads (a handler running now
  // finishes first; requests still queued are dropped). Idempotent.
  void Shutdown();

  class Impl;

 private:
  explicit HttpFrontEnd(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_HTTP_FRONT_END_H_
