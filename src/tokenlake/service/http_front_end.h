// The HTTP front end: a server on 127.0.0.1 that hands each request to the handler of its route.
//
// Routes are (method, exact path, handler); the table is given at start (the coordinator's is in
// coordinator.cc, Coordinator::Impl::Routes). A handler gets the request with its body and
// fills a response: a whole body, or a `stream` function that writes the body in pieces (sent
// with chunked transfer encoding, e.g. server-sent events). A request for no route gets 404
// with OpenAI's error body naming the endpoints (openai_api.h's OpenAiErrorJson).
//
// Thread-safety: thread-safe; handlers run on the server's worker threads, several at once.
#ifndef TOKENLAKE_SERVICE_HTTP_FRONT_END_H_
#define TOKENLAKE_SERVICE_HTTP_FRONT_END_H_

#include <cstdint>
#include <functional>
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
  // The value of header `name` (case-insensitive), empty when absent.
  std::string Header(std::string_view name) const;
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  // More header fields (e.g. Retry-After).
  std::vector<std::pair<std::string, std::string>> headers;
  // When set, `body` is ignored and the body is streamed: `stream` is called once, on the
  // handler's thread after the handler returned, with a `write` that sends one piece and returns
  // false once the client is gone (then `stream` should return soon).
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
  // Largest request body (413 beyond), >= 64.
  int64_t max_body_bytes = int64_t{1} << 20;
  // How long a request may take to arrive.
  absl::Duration read_timeout = absl::Seconds(2);
  // Worker threads (each slow client holds one until read_timeout), >= 1.
  int32_t threads = 32;
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
  // Stops accepting and waits for the workers. Idempotent.
  void Shutdown();

  class Impl;

 private:
  explicit HttpFrontEnd(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_HTTP_FRONT_END_H_
