#include "tokenlake/service/http_front_end.h"

#include <httplib.h>

#include <chrono>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "tokenlake/service/openai_api.h"
#include "tokenlake/transport/socket_stream.h"

namespace tokenlake::service {

std::string HttpRequest::Header(std::string_view name) const {
  for (const auto& [k, v] : headers) {
    if (absl::EqualsIgnoreCase(k, absl::string_view(name.data(), name.size()))) return v;
  }
  return "";
}

class HttpFrontEnd::Impl {
 public:
  Impl(const HttpFrontEndOptions& options, std::vector<HttpRoute> routes)
      : options_(options), routes_(std::move(routes)) {}
  ~Impl() { Shutdown(); }

  absl::Status Start() {
    std::vector<std::string> names;
    for (const HttpRoute& r : routes_) names.push_back(absl::StrCat(r.method, " ", r.path));
    endpoints_ = absl::StrJoin(names, ", ");
    const size_t threads = static_cast<size_t>(options_.threads);
    server_.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
    server_.set_payload_max_length(static_cast<size_t>(options_.max_body_bytes));
    server_.set_read_timeout(absl::ToChronoSeconds(options_.read_timeout) +
                             std::chrono::duration_cast<std::chrono::microseconds>(
                                 absl::ToChronoMicroseconds(options_.read_timeout) -
                                 absl::ToChronoSeconds(options_.read_timeout)));
    server_.set_write_timeout(std::chrono::seconds(5));
    for (const HttpRoute& route : routes_) {
      const HttpHandler* handler = &route.handler;
      auto serve = [handler, method = route.method](const httplib::Request& req,
                                                    httplib::Response& res) {
        HttpRequest in;
        in.method = method;
        in.path = req.path;
        for (const auto& [k, v] : req.headers) in.headers.emplace_back(k, v);
        in.body = req.body;
        HttpResponse out;
        (*handler)(in, &out);
        res.status = out.status;
        for (const auto& [k, v] : out.headers) res.set_header(k, v);
        if (out.stream) {
          auto stream = std::move(out.stream);
          res.set_chunked_content_provider(
              out.content_type, [stream](size_t, httplib::DataSink& sink) {
                stream([&sink](std::string_view piece) {
                  return sink.is_writable() && sink.write(piece.data(), piece.size());
                });
                sink.done();
                return true;
              });
        } else {
          res.set_content(out.body, out.content_type);
        }
      };
      if (route.method == "GET") {
        server_.Get(route.path, serve);
      } else if (route.method == "POST") {
        server_.Post(route.path, serve);
      } else {
        return absl::InvalidArgumentError(absl::StrFormat(
            "HttpFrontEnd: route %s %s: method not supported", route.method, route.path));
      }
    }
    server_.set_error_handler([this](const httplib::Request&, httplib::Response& res) {
      if (!res.body.empty()) return;
      absl::Status s;
      if (res.status == 404) {
        s = absl::NotFoundError(absl::StrCat("no such endpoint (", endpoints_, ")"));
      } else if (res.status == 413) {
        s = absl::InvalidArgumentError("request body too large");
      } else {
        s = absl::InvalidArgumentError(absl::StrFormat("HTTP error %d", res.status));
      }
      res.set_content(OpenAiErrorJson(s), "application/json");
    });
    if (options_.port == 0) {
      port_ = server_.bind_to_any_port(options_.host);
    } else if (server_.bind_to_port(options_.host, options_.port)) {
      port_ = options_.port;
    }
    if (port_ <= 0) {
      return absl::UnavailableError(absl::StrFormat(
          "HttpFrontEnd: cannot serve HTTP on %s",
          transport::HostPort{.host = options_.host, .port = options_.port}.ToString()));
    }
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    return absl::OkStatus();
  }

  void Shutdown() {
    server_.stop();
    if (thread_.joinable()) thread_.join();
  }

  int32_t port() const { return port_; }

 private:
  const HttpFrontEndOptions options_;
  const std::vector<HttpRoute> routes_;
  std::string endpoints_;
  httplib::Server server_;
  int32_t port_ = 0;
  std::thread thread_;
};

absl::StatusOr<std::unique_ptr<HttpFrontEnd>> HttpFrontEnd::Start(
    const HttpFrontEndOptions& options, std::vector<HttpRoute> routes) {
  if (options.max_body_bytes < 64) {
    return absl::InvalidArgumentError("HttpFrontEnd: max_body_bytes must be >= 64");
  }
  if (options.threads < 1) return absl::InvalidArgumentError("HttpFrontEnd: threads must be >= 1");
  auto impl = std::make_unique<Impl>(options, std::move(routes));
  if (absl::Status s = impl->Start(); !s.ok()) return s;
  return std::unique_ptr<HttpFrontEnd>(new HttpFrontEnd(std::move(impl)));
}

HttpFrontEnd::HttpFrontEnd(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
HttpFrontEnd::~HttpFrontEnd() { Shutdown(); }
int32_t HttpFrontEnd::port() const { return impl_->port(); }
void HttpFrontEnd::Shutdown() { impl_->Shutdown(); }

}  // namespace tokenlake::service
