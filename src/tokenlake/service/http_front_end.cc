#include "tokenlake/service/http_front_end.h"

// tcp_info's tcpi_bytes_received (the kernel's count of bytes received on a socket): how the
// watchdog learns that a request has begun on a connection whose bytes libmicrohttpd reads.
#include <linux/tcp.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <deque>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "tokenlake/service/http_content.h"
#include "tokenlake/service/openai_api.h"
#include "tokenlake/transport/socket_stream.h"

namespace tokenlake::service {

std::string HttpRequest::Header(std::string_view name) const {
  for (const auto& [k, v] : headers) {
    if (absl::EqualsIgnoreCase(k, absl::string_view(name.data(), name.size()))) return v;
  }
  return "";
}

namespace {

// An answer given before the request has arrived whole is followed by a lingering close: what
// the client still sends is read and discarded, up to these bounds.
constexpr int64_t kDrainBytes = int64_t{4} << 20;
constexpr absl::Duration kDrainTime = absl::Seconds(2);
// The request target (414 beyond) and the header fields (431 beyond).
constexpr size_t kMaxTargetBytes = 8192;
constexpr size_t kMaxHeaderBytes = 16384;
// libmicrohttpd's buffer per connection: the request line and header fields live in it.
constexpr size_t kConnectionMemory = size_t{64} << 10;
// Bytes a stream may hold unsent before its writer waits for the client.
constexpr size_t kStreamHeldBytes = size_t{1} << 20;
// How often the watchdog looks at the connections' deadlines.
constexpr absl::Duration kWatchPeriod = absl::Milliseconds(25);

absl::StatusCode CodeFor(int http_status) {
  switch (http_status) {
    case 404:
      return absl::StatusCode::kNotFound;
    case 405:
    case 501:
    case 505:
      return absl::StatusCode::kUnimplemented;
    case 408:
      return absl::StatusCode::kDeadlineExceeded;
    case 429:
      return absl::StatusCode::kResourceExhausted;
    case 503:
      return absl::StatusCode::kUnavailable;
    default:
      return http_status < 500 ? absl::StatusCode::kInvalidArgument : absl::StatusCode::kInternal;
  }
}

// OpenAI's error body (openai_api.h) for an answer the front end gives itself, with "code" the
// name of the HTTP status sent ("payload_too_large" for 413), so that the body says what the
// status line says.
std::string ErrorBody(int http_status, std::string_view message) {
  nlohmann::ordered_json j = nlohmann::ordered_json::parse(OpenAiErrorJson(
      absl::Status(CodeFor(http_status), absl::string_view(message.data(), message.size()))));
  j["error"]["type"] = http_status < 500 ? "invalid_request_error" : "server_error";
  j["error"]["code"] = HttpStatusName(http_status);
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

using Headers = std::vector<std::pair<std::string, std::string>>;

Headers RetryAfterFor(int status) {
  if (status == 503 || status == 429) return {{"Retry-After", "1"}};
  return {};
}

// The bytes of a whole error answer that closes the connection, for the answers written while
// libmicrohttpd is still receiving the request (it can queue an answer only once the headers
// or the whole request have arrived).
std::string RawErrorAnswer(int status, std::string_view message) {
  const std::string body = ErrorBody(status, message);
  std::string out = absl::StrFormat(
      "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
      "Connection: close\r\n",
      status, HttpReason(status), body.size());
  for (const auto& [k, v] : RetryAfterFor(status)) absl::StrAppend(&out, k, ": ", v, "\r\n");
  absl::StrAppend(&out, "\r\n", body);
  return out;
}

// Bytes the kernel has received on `fd` since it was accepted (0 when it cannot say).
uint64_t BytesReceived(int fd) {
  tcp_info info{};
  socklen_t len = sizeof(info);
  if (::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0) return 0;
  return info.tcpi_bytes_received;
}

enum MHD_Result CollectHeader(void* cls, enum MHD_ValueKind, const char* key, const char* value) {
  static_cast<Headers*>(cls)->emplace_back(key, value != nullptr ? value : "");
  return MHD_YES;
}

}  // namespace

class HttpFrontEnd::Impl {
 public:
  Impl(const HttpFrontEndOptions& options, std::vector<HttpRoute> routes)
      : options_(options), routes_(std::move(routes)) {}
  ~Impl() { Shutdown(); }

  absl::Status Start();
  void Shutdown();
  int32_t port() const { return port_; }
  Stats stats() const;

 private:
  enum class Phase {
    kIdle,       // between requests
    kReceiving,  // a request has begun to arrive
    kInHand,     // it arrived whole: queued, handled, or its answer is being sent
    kAnswered,   // answered before it arrived whole: draining what the client still sends
    kClosing,    // the socket was shut down; libmicrohttpd closes it
  };
  // One connection (libmicrohttpd's socket context): what the watchdog needs to bound the time
  // a request takes to arrive, which libmicrohttpd does not (it only times out inactivity).
  struct Conn {
    explicit Conn(int socket) : fd(socket) {}
    const int fd;
    // Beyond max_connections when it came: its requests are answered 503.
    bool rejecting = false;
    absl::Mutex mu;
    // libmicrohttpd is closing it: its fd is no longer ours to write to or shut down.
    bool closed ABSL_GUARDED_BY(mu) = false;
    Phase phase ABSL_GUARDED_BY(mu) = Phase::kIdle;
    // When the phase began.
    absl::Time since ABSL_GUARDED_BY(mu);
    bool headers_done ABSL_GUARDED_BY(mu) = false;
    // Bytes received when the connection last became idle.
    uint64_t idle_bytes ABSL_GUARDED_BY(mu) = 0;
    // Bytes discarded since an early answer.
    int64_t drained ABSL_GUARDED_BY(mu) = 0;
  };
  // One request, from its headers until libmicrohttpd is done with it (its request context).
  // Before it is dispatched only its connection's thread touches `request`; then the worker.
  struct Request {
    std::shared_ptr<Conn> conn;
    MHD_Connection* connection = nullptr;         // used only while suspended or on its thread
    const std::atomic<bool>* stopping = nullptr;  // the server's
    HttpRequest request;
    std::string encoding;  // Content-Encoding, lower case
    // Body bytes counted in buffered_bytes_ (released once).
    std::atomic<int64_t> accounted{0};
    absl::Mutex mu;
    bool suspended ABSL_GUARDED_BY(mu) = false;
    bool dispatched ABSL_GUARDED_BY(mu) = false;
    bool done ABSL_GUARDED_BY(mu) = false;   // libmicrohttpd is done with it
    bool ready ABSL_GUARDED_BY(mu) = false;  // `response` holds the answer (or its head)
    HttpResponse response ABSL_GUARDED_BY(mu);
    bool close ABSL_GUARDED_BY(mu) = false;
    bool streaming ABSL_GUARDED_BY(mu) = false;
    // Streamed bytes not yet taken by libmicrohttpd: [taken, size()).
    std::string pending ABSL_GUARDED_BY(mu);
    size_t taken ABSL_GUARDED_BY(mu) = 0;
    bool stream_ended ABSL_GUARDED_BY(mu) = false;
  };
  using RequestPtr = std::shared_ptr<Request>;

  // libmicrohttpd's callbacks.
  static enum MHD_Result OnAccept(void* cls, const sockaddr*, socklen_t);
  static enum MHD_Result OnAccess(void* cls, MHD_Connection* c, const char* url, const char* method,
                                  const char* version, const char* upload_data, size_t* upload_size,
                                  void** req_cls);
  static void OnCompleted(void* cls, MHD_Connection* c, void** req_cls,
                          enum MHD_RequestTerminationCode toe);
  static void OnConnection(void* cls, MHD_Connection* c, void** socket_context,
                           enum MHD_ConnectionNotificationCode code);
  static ssize_t ReadStream(void* cls, uint64_t pos, char* buf, size_t max);
  static void FreeStream(void* cls);
  static void OnLog(void* cls, const char* format, va_list args);

  enum MHD_Result FirstCall(MHD_Connection* c, const char* url, const char* method, void** req_cls);
  enum MHD_Result OnBody(Request& r, const char* data, size_t size);
  enum MHD_Result OnArrived(const RequestPtr& r);
  // Answers `status` before the request has arrived whole: in libmicrohttpd's way when no body
  // is to come, else by writing it on the socket and draining (AnswerEarly).
  enum MHD_Result Refuse(Request& r, int status, std::string_view message, bool body_follows);
  // Writes a closing error answer on the socket while the request is still arriving and shuts
  // the socket for writing. False when the connection was closed or answered meanwhile.
  bool AnswerEarly(Conn& conn, int status, std::string_view message)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(conn.mu);
  enum MHD_Result Queue(MHD_Connection* c, int status, std::string_view content_type,
                        const std::string& body, const Headers& headers, bool close);
  enum MHD_Result QueueError(MHD_Connection* c, int status, std::string_view message, bool close);
  // Queues `r`'s answer (`owner` is `r`, kept alive by a streamed answer's callback).
  enum MHD_Result QueueReady(const RequestPtr& owner, Request& r)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(r.mu);
  // Resumes `r`'s connection when it is suspended.
  static void ResumeLocked(Request& r) ABSL_EXCLUSIVE_LOCKS_REQUIRED(r.mu);
  void Release(Request& r) { buffered_bytes_.fetch_sub(r.accounted.exchange(0)); }

  void WorkerLoop();
  void Serve(const RequestPtr& r);
  bool Write(Request& r, std::string_view piece);
  void WatchLoop();
  void CountRejected(int status) {
    absl::MutexLock lock(&stats_mu_);
    ++rejected_[status];
  }

  const HttpFrontEndOptions options_;
  const std::vector<HttpRoute> routes_;
  std::string endpoints_;
  int32_t port_ = 0;
  MHD_Daemon* daemon_ = nullptr;
  std::atomic<bool> stopping_{false};
  std::vector<std::thread> workers_;
  std::thread watchdog_;

  std::atomic<int64_t> buffered_bytes_{0};
  std::atomic<int64_t> open_connections_{0};
  std::atomic<int64_t> refused_connections_{0};

  absl::Mutex queue_mu_;
  std::deque<RequestPtr> jobs_ ABSL_GUARDED_BY(queue_mu_);
  bool workers_stop_ ABSL_GUARDED_BY(queue_mu_) = false;

  absl::Mutex conns_mu_;
  absl::flat_hash_map<Conn*, std::shared_ptr<Conn>> conns_ ABSL_GUARDED_BY(conns_mu_);
  bool watch_stop_ ABSL_GUARDED_BY(conns_mu_) = false;

  absl::Mutex live_mu_;
  absl::flat_hash_map<Request*, RequestPtr> live_ ABSL_GUARDED_BY(live_mu_);

  mutable absl::Mutex stats_mu_;
  std::map<int, int64_t> rejected_ ABSL_GUARDED_BY(stats_mu_);
};

absl::Status HttpFrontEnd::Impl::Start() {
  std::vector<std::string> names;
  for (const HttpRoute& r : routes_) {
    if (r.path.empty() || r.path.front() != '/' || r.method.empty() || !r.handler) {
      return absl::InvalidArgumentError(
          absl::StrFormat("HttpFrontEnd: route '%s %s' needs a method, a path starting with / "
                          "and a handler",
                          r.method, r.path));
    }
    names.push_back(absl::StrCat(r.method, " ", r.path));
  }
  endpoints_ = absl::StrJoin(names, ", ");
  const int64_t overflow = options_.max_connections / 4 + 16;
  // Every connection is a descriptor: make room for the ones this server may hold.
  rlimit lim{};
  const auto wanted = static_cast<rlim_t>(options_.max_connections + overflow + 256);
  if (::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < wanted &&
      lim.rlim_cur < lim.rlim_max) {
    lim.rlim_cur = std::min(wanted, lim.rlim_max);
    ::setrlimit(RLIMIT_NOFILE, &lim);
  }
  const transport::HostPort address{.host = options_.host, .port = options_.port};
  absl::StatusOr<int> listening = transport::ListenTcp(address, options_.listen_backlog, &port_);
  if (!listening.ok()) {
    return absl::UnavailableError(absl::StrFormat("HttpFrontEnd: cannot serve HTTP on %s (%s)",
                                                  address.ToString(),
                                                  listening.status().message()));
  }
  sockaddr_storage bound{};
  socklen_t bound_len = sizeof(bound);
  ::getsockname(*listening, reinterpret_cast<sockaddr*>(&bound), &bound_len);
  // The error log carries the one sign of the answers libmicrohttpd gives itself (OnLog).
  unsigned int flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME |
                       MHD_USE_ERROR_LOG;
  if (bound.ss_family == AF_INET6) flags |= MHD_USE_IPv6;
  // libmicrohttpd's own timeout is a backstop for inactivity in any phase (a client that does
  // not read its answer); the watchdog enforces the idle, header and request deadlines.
  const absl::Duration backstop =
      std::max({options_.idle_timeout, options_.read_timeout, options_.write_timeout});
  const auto backstop_s = static_cast<unsigned int>(
      std::max<int64_t>(1, absl::ToInt64Seconds(absl::Ceil(backstop, absl::Seconds(1)))));
  // Its limit: ours (checked in OnAccept, which counts refusals) plus slack, as it splits the
  // limit among its threads.
  const auto limit = static_cast<unsigned int>(options_.max_connections + overflow +
                                               int64_t{4} * options_.io_threads);
  daemon_ = MHD_start_daemon(
      flags, 0, &Impl::OnAccept, this, &Impl::OnAccess, this, MHD_OPTION_EXTERNAL_LOGGER,
      &Impl::OnLog, this, MHD_OPTION_LISTEN_SOCKET, *listening, MHD_OPTION_THREAD_POOL_SIZE,
      static_cast<unsigned int>(options_.io_threads), MHD_OPTION_CONNECTION_LIMIT, limit,
      MHD_OPTION_PER_IP_CONNECTION_LIMIT,
      static_cast<unsigned int>(options_.max_connections_per_ip), MHD_OPTION_CONNECTION_TIMEOUT,
      backstop_s, MHD_OPTION_CONNECTION_MEMORY_LIMIT, kConnectionMemory,
      MHD_OPTION_NOTIFY_COMPLETED, &Impl::OnCompleted, this, MHD_OPTION_NOTIFY_CONNECTION,
      &Impl::OnConnection, this, MHD_OPTION_END);
  if (daemon_ == nullptr) {
    ::close(*listening);
    return absl::UnavailableError(absl::StrFormat(
        "HttpFrontEnd: libmicrohttpd could not start serving on %s", address.ToString()));
  }
  for (int32_t i = 0; i < options_.threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
  watchdog_ = std::thread([this] { WatchLoop(); });
  return absl::OkStatus();
}

void HttpFrontEnd::Impl::Shutdown() {
  if (stopping_.exchange(true)) return;
  {
    absl::MutexLock lock(&queue_mu_);
    workers_stop_ = true;
    jobs_.clear();  // their connections are suspended: resumed below, answered 503
  }
  {
    absl::MutexLock lock(&conns_mu_);
    watch_stop_ = true;
  }
  // libmicrohttpd must not be stopped with a connection suspended. None is suspended from now
  // on (stopping_ and workers_stop_ are seen under each request's lock); resume the ones that
  // are, which also wakes writers waiting for a slow client.
  auto resume_all = [this] {
    std::vector<RequestPtr> live;
    {
      absl::MutexLock lock(&live_mu_);
      for (const auto& [p, r] : live_) live.push_back(r);
    }
    for (const RequestPtr& r : live) {
      absl::MutexLock lock(&r->mu);
      ResumeLocked(*r);
    }
  };
  if (daemon_ != nullptr) resume_all();
  for (std::thread& t : workers_) t.join();
  workers_.clear();
  if (watchdog_.joinable()) watchdog_.join();
  if (daemon_ == nullptr) return;
  resume_all();
  MHD_stop_daemon(daemon_);
  daemon_ = nullptr;
}

HttpFrontEnd::Stats HttpFrontEnd::Impl::stats() const {
  Stats s;
  s.connections = open_connections_.load();
  s.connections_refused = refused_connections_.load();
  absl::MutexLock lock(&stats_mu_);
  s.rejected = rejected_;
  return s;
}

enum MHD_Result HttpFrontEnd::Impl::OnAccept(void* cls, const sockaddr*, socklen_t) {
  auto* self = static_cast<Impl*>(cls);
  const int64_t overflow = self->options_.max_connections / 4 + 16;
  if (self->open_connections_.load() >= self->options_.max_connections + overflow) {
    self->refused_connections_.fetch_add(1);
    return MHD_NO;
  }
  return MHD_YES;
}

void HttpFrontEnd::Impl::OnConnection(void* cls, MHD_Connection* c, void** socket_context,
                                      enum MHD_ConnectionNotificationCode code) {
  auto* self = static_cast<Impl*>(cls);
  if (code == MHD_CONNECTION_NOTIFY_STARTED) {
    const MHD_ConnectionInfo* info = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    auto conn = std::make_shared<Conn>(info != nullptr ? info->connect_fd : -1);
    conn->rejecting = self->open_connections_.fetch_add(1) >= self->options_.max_connections;
    {
      absl::MutexLock lock(&conn->mu);
      conn->since = absl::Now();
    }
    *socket_context = new std::shared_ptr<Conn>(conn);
    absl::MutexLock lock(&self->conns_mu_);
    self->conns_[conn.get()] = conn;
    return;
  }
  auto* holder = static_cast<std::shared_ptr<Conn>*>(*socket_context);
  if (holder == nullptr) return;
  std::shared_ptr<Conn> conn = std::move(*holder);
  delete holder;
  *socket_context = nullptr;
  {
    absl::MutexLock lock(&conn->mu);
    conn->closed = true;  // before libmicrohttpd closes the fd
  }
  {
    absl::MutexLock lock(&self->conns_mu_);
    self->conns_.erase(conn.get());
  }
  self->open_connections_.fetch_sub(1);
}

enum MHD_Result HttpFrontEnd::Impl::OnAccess(void* cls, MHD_Connection* c, const char* url,
                                             const char* method, const char*,
                                             const char* upload_data, size_t* upload_size,
                                             void** req_cls) {
  auto* self = static_cast<Impl*>(cls);
  if (*req_cls == nullptr) return self->FirstCall(c, url, method, req_cls);
  const RequestPtr& r = *static_cast<RequestPtr*>(*req_cls);
  if (*upload_size > 0) {
    const size_t n = *upload_size;
    *upload_size = 0;
    return self->OnBody(*r, upload_data, n);
  }
  return self->OnArrived(r);
}

enum MHD_Result HttpFrontEnd::Impl::FirstCall(MHD_Connection* c, const char* url,
                                              const char* method, void** req_cls) {
  const MHD_ConnectionInfo* info = MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
  if (info == nullptr || info->socket_context == nullptr) return MHD_NO;
  std::shared_ptr<Conn> conn = *static_cast<std::shared_ptr<Conn>*>(info->socket_context);
  {
    absl::MutexLock lock(&conn->mu);
    // Answered (408) while its headers arrived: close.
    if (conn->phase == Phase::kAnswered || conn->phase == Phase::kClosing) return MHD_NO;
    if (conn->phase != Phase::kReceiving) {
      conn->phase = Phase::kReceiving;
      conn->since = absl::Now();
    }
    conn->headers_done = true;
  }
  auto r = std::make_shared<Request>();
  r->conn = conn;
  r->connection = c;
  r->stopping = &stopping_;
  r->request.method = method;
  r->request.path = url;
  MHD_get_connection_values(c, MHD_HEADER_KIND, &CollectHeader, &r->request.headers);
  r->encoding =
      absl::AsciiStrToLower(absl::StripAsciiWhitespace(r->request.Header("Content-Encoding")));
  *req_cls = new RequestPtr(r);
  {
    absl::MutexLock lock(&live_mu_);
    live_[r.get()] = r;
  }
  const std::string length = r->request.Header("Content-Length");
  const std::string transfer =
      absl::AsciiStrToLower(absl::StripAsciiWhitespace(r->request.Header("Transfer-Encoding")));
  const bool body_follows = !transfer.empty() || (!length.empty() && length != "0");
  if (conn->rejecting) {
    return Refuse(*r, 503, "too many connections; retry later", body_follows);
  }
  if (r->request.path.size() > kMaxTargetBytes) {
    return Refuse(*r, 414,
                  absl::StrFormat("request target of %d bytes exceeds the limit of %d",
                                  r->request.path.size(), kMaxTargetBytes),
                  body_follows);
  }
  size_t header_bytes = 0;
  for (const auto& [k, v] : r->request.headers) header_bytes += k.size() + v.size() + 4;
  if (header_bytes > kMaxHeaderBytes) {
    return Refuse(*r, 431,
                  absl::StrFormat("header fields of %d bytes exceed the limit of %d", header_bytes,
                                  kMaxHeaderBytes),
                  body_follows);
  }
  if (!transfer.empty() && transfer != "chunked") {
    return Refuse(*r, 501,
                  absl::StrFormat("Transfer-Encoding '%s' is not supported (chunked is)",
                                  transfer.substr(0, 64)),
                  body_follows);
  }
  if (!transfer.empty() && !length.empty()) {
    return Refuse(*r, 400, "both Content-Length and Transfer-Encoding", body_follows);
  }
  if (transfer.empty() && length.empty() &&
      (r->request.method == "POST" || r->request.method == "PUT")) {
    return Refuse(*r, 411, "a request body needs Content-Length or chunked framing", false);
  }
  int64_t announced = 0;
  if (!length.empty() && (!absl::SimpleAtoi(length, &announced) || announced < 0)) {
    return Refuse(*r, 400, "Content-Length is not a number", body_follows);
  }
  if (announced > options_.max_body_bytes) {
    return Refuse(*r, 413,
                  absl::StrFormat("request body of %d bytes exceeds the limit of %d bytes",
                                  announced, options_.max_body_bytes),
                  body_follows);
  }
  return MHD_YES;
}

enum MHD_Result HttpFrontEnd::Impl::Refuse(Request& r, int status, std::string_view message,
                                           bool body_follows) {
  if (!body_follows) {
    CountRejected(status);
    return QueueError(r.connection, status, message, /*close=*/true);
  }
  absl::MutexLock lock(&r.conn->mu);
  AnswerEarly(*r.conn, status, message);
  return MHD_YES;
}

bool HttpFrontEnd::Impl::AnswerEarly(Conn& conn, int status, std::string_view message) {
  if (conn.closed || conn.phase == Phase::kAnswered || conn.phase == Phase::kClosing ||
      conn.phase == Phase::kInHand) {
    return false;
  }
  CountRejected(status);
  // A short answer into a socket that has sent nothing of this request: one send.
  const std::string out = RawErrorAnswer(status, message);
  (void)!::send(conn.fd, out.data(), out.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
  ::shutdown(conn.fd, SHUT_WR);
  conn.phase = Phase::kAnswered;
  conn.since = absl::Now();
  conn.drained = 0;
  return true;
}

enum MHD_Result HttpFrontEnd::Impl::OnBody(Request& r, const char* data, size_t size) {
  Conn& conn = *r.conn;
  {
    absl::MutexLock lock(&conn.mu);
    if (conn.phase == Phase::kAnswered || conn.phase == Phase::kClosing) {
      conn.drained += static_cast<int64_t>(size);
      return conn.drained > kDrainBytes ? MHD_NO : MHD_YES;
    }
  }
  // libmicrohttpd passes the body transfer-decoded: a chunked one is checked as it arrives.
  const auto have = static_cast<int64_t>(r.request.body.size());
  const auto n = static_cast<int64_t>(size);
  int status = 0;
  std::string why;
  if (have + n > options_.max_body_bytes) {
    status = 413;
    why = absl::StrFormat("request body exceeds the limit of %d bytes", options_.max_body_bytes);
  } else if (buffered_bytes_.load() + n > options_.max_buffered_bytes) {
    status = 503;
    why = "the server holds too much request data now; retry later";
  }
  if (status != 0) {
    Release(r);
    r.request.body.clear();
    r.request.body.shrink_to_fit();
    absl::MutexLock lock(&conn.mu);
    AnswerEarly(conn, status, why);
    conn.drained = n;
    return MHD_YES;
  }
  r.request.body.append(data, size);
  r.accounted.fetch_add(n);
  buffered_bytes_.fetch_add(n);
  return MHD_YES;
}

enum MHD_Result HttpFrontEnd::Impl::OnArrived(const RequestPtr& r) {
  {
    absl::MutexLock lock(&r->conn->mu);
    if (r->conn->phase == Phase::kAnswered || r->conn->phase == Phase::kClosing) return MHD_NO;
    r->conn->phase = Phase::kInHand;
  }
  Request& req = *r;
  absl::MutexLock lock(&req.mu);
  if (req.ready) return QueueReady(r, req);
  if (req.dispatched) {
    // Resumed without an answer: the server is shutting down.
    CountRejected(503);
    return QueueError(req.connection, 503, "the server is shutting down; retry later", true);
  }
  req.dispatched = true;
  bool queued = false;
  {
    absl::MutexLock queue_lock(&queue_mu_);
    if (!workers_stop_ && static_cast<int32_t>(jobs_.size()) < options_.max_queued_requests) {
      jobs_.push_back(r);
      queued = true;
    }
  }
  if (!queued) {
    Release(*r);
    CountRejected(503);
    return QueueError(r->connection, 503,
                      "the server is busy (its request queue is full); retry later", true);
  }
  // Suspended before the lock is let go: the worker resumes it only once suspended.
  req.suspended = true;
  MHD_suspend_connection(req.connection);
  return MHD_YES;
}

enum MHD_Result HttpFrontEnd::Impl::Queue(MHD_Connection* c, int status,
                                          std::string_view content_type, const std::string& body,
                                          const Headers& headers, bool close) {
  MHD_Response* response = MHD_create_response_from_buffer(
      body.size(), const_cast<char*>(body.data()), MHD_RESPMEM_MUST_COPY);
  if (response == nullptr) return MHD_NO;
  if (!content_type.empty()) {
    MHD_add_response_header(response, "Content-Type", std::string(content_type).c_str());
  }
  for (const auto& [k, v] : headers) MHD_add_response_header(response, k.c_str(), v.c_str());
  if (close) MHD_add_response_header(response, "Connection", "close");
  const enum MHD_Result queued = MHD_queue_response(c, static_cast<unsigned int>(status), response);
  MHD_destroy_response(response);
  return queued;
}

enum MHD_Result HttpFrontEnd::Impl::QueueError(MHD_Connection* c, int status,
                                               std::string_view message, bool close) {
  return Queue(c, status, "application/json", ErrorBody(status, message), RetryAfterFor(status),
               close);
}

enum MHD_Result HttpFrontEnd::Impl::QueueReady(const RequestPtr& owner, Request& r) {
  if (!r.streaming) {
    return Queue(r.connection, r.response.status, r.response.content_type, r.response.body,
                 r.response.headers, r.close);
  }
  MHD_Response* response = MHD_create_response_from_callback(
      MHD_SIZE_UNKNOWN, 16 << 10, &Impl::ReadStream, new RequestPtr(owner), &Impl::FreeStream);
  if (response == nullptr) return MHD_NO;
  if (!r.response.content_type.empty()) {
    MHD_add_response_header(response, "Content-Type", r.response.content_type.c_str());
  }
  for (const auto& [k, v] : r.response.headers) {
    MHD_add_response_header(response, k.c_str(), v.c_str());
  }
  const enum MHD_Result queued =
      MHD_queue_response(r.connection, static_cast<unsigned int>(r.response.status), response);
  MHD_destroy_response(response);
  return queued;
}

ssize_t HttpFrontEnd::Impl::ReadStream(void* cls, uint64_t, char* buf, size_t max) {
  Request& r = **static_cast<RequestPtr*>(cls);
  absl::MutexLock lock(&r.mu);
  if (r.taken < r.pending.size()) {
    const size_t n = std::min(max, r.pending.size() - r.taken);
    std::copy_n(r.pending.data() + r.taken, n, buf);
    r.taken += n;
    if (r.taken == r.pending.size()) {
      r.pending.clear();
      r.taken = 0;
    } else if (r.taken > r.pending.size() / 2) {
      r.pending.erase(0, r.taken);
      r.taken = 0;
    }
    return static_cast<ssize_t>(n);
  }
  if (r.stream_ended) return MHD_CONTENT_READER_END_OF_STREAM;
  // A server shutting down suspends nothing more (it must resume every connection).
  if (r.done || r.stopping->load()) return MHD_CONTENT_READER_END_WITH_ERROR;
  // Nothing to send yet: wait suspended (no busy loop) until the writer resumes it.
  r.suspended = true;
  MHD_suspend_connection(r.connection);
  return 0;
}

void HttpFrontEnd::Impl::FreeStream(void* cls) { delete static_cast<RequestPtr*>(cls); }

// libmicrohttpd answers some malformed requests itself, from inside its parser, before any
// callback of ours sees them (a bad request line 400, an HTTP version it does not speak 505, a
// request line or header block past its 64 KiB buffer 414 / 431, a malformed header line 400),
// with HTML bodies it has no hook to replace. Its one report of each is this log line, whose
// first argument is the status sent: that is what is counted. Every other message is dropped
// (the server logged nothing before either).
void HttpFrontEnd::Impl::OnLog(void* cls, const char* format, va_list args) {
  constexpr std::string_view kOwnAnswer = "Error processing request (HTTP response code is %u";
  if (format == nullptr || std::string_view(format).substr(0, kOwnAnswer.size()) != kOwnAnswer) {
    return;
  }
  va_list copy;
  va_copy(copy, args);
  const unsigned int status = va_arg(copy, unsigned int);
  va_end(copy);
  if (status >= 400 && status < 600) {
    static_cast<Impl*>(cls)->CountRejected(static_cast<int>(status));
  }
}

void HttpFrontEnd::Impl::ResumeLocked(Request& r) {
  if (!r.suspended || r.done) return;
  r.suspended = false;
  MHD_resume_connection(r.connection);
}

void HttpFrontEnd::Impl::OnCompleted(void* cls, MHD_Connection*, void** req_cls,
                                     enum MHD_RequestTerminationCode) {
  auto* self = static_cast<Impl*>(cls);
  auto* holder = static_cast<RequestPtr*>(*req_cls);
  if (holder == nullptr) return;
  RequestPtr r = std::move(*holder);
  delete holder;
  *req_cls = nullptr;
  {
    absl::MutexLock lock(&r->mu);
    r->done = true;  // a writer still streaming learns that the client is gone
  }
  self->Release(*r);
  {
    absl::MutexLock lock(&self->live_mu_);
    self->live_.erase(r.get());
  }
  absl::MutexLock lock(&r->conn->mu);
  if (r->conn->phase == Phase::kReceiving || r->conn->phase == Phase::kInHand) {
    r->conn->phase = Phase::kIdle;
    r->conn->since = absl::Now();
    r->conn->headers_done = false;
    r->conn->idle_bytes = BytesReceived(r->conn->fd);
  }
}

void HttpFrontEnd::Impl::WorkerLoop() {
  while (true) {
    RequestPtr r;
    {
      absl::MutexLock lock(&queue_mu_);
      queue_mu_.Await(absl::Condition(
          +[](Impl* self) ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->queue_mu_) {
            return self->workers_stop_ || !self->jobs_.empty();
          },
          this));
      if (workers_stop_) return;
      r = std::move(jobs_.front());
      jobs_.pop_front();
    }
    Serve(r);
  }
}

void HttpFrontEnd::Impl::Serve(const RequestPtr& r) {
  HttpResponse res;
  bool close = false;
  auto error = [&](int status, std::string_view message, Headers headers) {
    CountRejected(status);
    res.status = status;
    res.content_type = "application/json";
    res.body = ErrorBody(status, message);
    res.headers = std::move(headers);
  };
  absl::StatusOr<std::string> body =
      DecodeContentEncoding(std::move(r->request.body), r->encoding, options_.max_body_bytes);
  if (!body.ok()) {
    const int status = body.status().code() == absl::StatusCode::kResourceExhausted ? 413
                       : body.status().code() == absl::StatusCode::kUnimplemented   ? 415
                                                                                    : 400;
    const absl::string_view why = body.status().message();
    error(status, std::string_view(why.data(), why.size()), {});
    close = true;
  } else {
    r->request.body = *std::move(body);
    const HttpRoute* route = nullptr;
    std::vector<std::string> allowed;
    for (const HttpRoute& candidate : routes_) {
      if (candidate.path != r->request.path) continue;
      allowed.push_back(candidate.method);
      if (candidate.method == r->request.method) route = &candidate;
    }
    if (route != nullptr) {
      route->handler(r->request, &res);
    } else if (allowed.empty()) {
      error(404, absl::StrCat("no such endpoint (", endpoints_, ")"), {});
    } else {
      error(405,
            absl::StrFormat("%s %s is not served (%s)", r->request.method, r->request.path,
                            endpoints_),
            {{"Allow", absl::StrJoin(allowed, ", ")}});
    }
  }
  Release(*r);
  r->request.body.clear();
  std::function<void(const std::function<bool(std::string_view)>&)> stream = std::move(res.stream);
  res.stream = nullptr;
  {
    absl::MutexLock lock(&r->mu);
    r->response = std::move(res);
    r->close = close;
    r->streaming = stream != nullptr;
    r->ready = true;
    ResumeLocked(*r);
  }
  if (!stream) return;
  // The stream runs even when the client is already gone (its first write fails), so that what
  // it holds (a request on an instance, a key's in-flight count) is let go.
  stream([this, &r](std::string_view piece) { return Write(*r, piece); });
  absl::MutexLock lock(&r->mu);
  r->stream_ended = true;
  ResumeLocked(*r);
}

bool HttpFrontEnd::Impl::Write(Request& r, std::string_view piece) {
  absl::MutexLock lock(&r.mu);
  auto room = [this, &r]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(r.mu) {
    return r.pending.size() - r.taken < kStreamHeldBytes || r.done || stopping_.load();
  };
  // A client that does not read what it was sent is dropped after write_timeout.
  if (!r.mu.AwaitWithTimeout(absl::Condition(&room), options_.write_timeout)) return false;
  if (r.done || stopping_.load()) return false;
  if (piece.empty()) return true;
  r.pending.append(piece.data(), piece.size());
  ResumeLocked(r);
  return true;
}

void HttpFrontEnd::Impl::WatchLoop() {
  while (true) {
    std::vector<std::shared_ptr<Conn>> conns;
    {
      absl::MutexLock lock(&conns_mu_);
      conns_mu_.AwaitWithTimeout(absl::Condition(&watch_stop_), kWatchPeriod);
      if (watch_stop_) return;
      conns.reserve(conns_.size());
      for (const auto& [p, c] : conns_) conns.push_back(c);
    }
    const absl::Time now = absl::Now();
    for (const std::shared_ptr<Conn>& c : conns) {
      absl::MutexLock lock(&c->mu);
      if (c->closed) continue;
      switch (c->phase) {
        case Phase::kIdle:
          if (BytesReceived(c->fd) > c->idle_bytes) {
            c->phase = Phase::kReceiving;  // a request has begun
            c->since = now;
            c->headers_done = false;
          } else if (now - c->since > options_.idle_timeout) {
            // libmicrohttpd reads the end and closes the connection.
            ::shutdown(c->fd, SHUT_RDWR);
            c->phase = Phase::kClosing;
          }
          break;
        case Phase::kReceiving:
          if (!c->headers_done && now - c->since > options_.header_timeout) {
            AnswerEarly(*c, 408,
                        absl::StrCat("request headers not received within ",
                                     absl::FormatDuration(options_.header_timeout)));
          } else if (now - c->since > options_.read_timeout) {
            AnswerEarly(*c, 408,
                        absl::StrCat("request not received within ",
                                     absl::FormatDuration(options_.read_timeout)));
          }
          break;
        case Phase::kAnswered:
          if (now - c->since > kDrainTime) {
            ::shutdown(c->fd, SHUT_RDWR);
            c->phase = Phase::kClosing;
          }
          break;
        case Phase::kInHand:
        case Phase::kClosing:
          break;
      }
    }
  }
}

absl::StatusOr<std::unique_ptr<HttpFrontEnd>> HttpFrontEnd::Start(
    const HttpFrontEndOptions& options, std::vector<HttpRoute> routes) {
  auto bad = [](const std::string& m) { return absl::InvalidArgumentError("HttpFrontEnd: " + m); };
  if (options.port < 0 || options.port > 65535) return bad("port outside [0, 65535]");
  if (options.max_body_bytes < 64) return bad("max_body_bytes must be >= 64");
  if (options.header_timeout <= absl::ZeroDuration() ||
      options.read_timeout <= absl::ZeroDuration() ||
      options.idle_timeout <= absl::ZeroDuration() ||
      options.write_timeout <= absl::ZeroDuration()) {
    return bad("header_timeout, read_timeout, idle_timeout and write_timeout must be > 0");
  }
  if (options.threads < 1) return bad("threads must be >= 1");
  if (options.io_threads < 1) return bad("io_threads must be >= 1");
  if (options.max_queued_requests < 1) return bad("max_queued_requests must be >= 1");
  if (options.max_connections < 1) return bad("max_connections must be >= 1");
  if (options.max_connections_per_ip < 0) return bad("max_connections_per_ip must be >= 0");
  if (options.max_buffered_bytes < options.max_body_bytes) {
    return bad("max_buffered_bytes must be >= max_body_bytes");
  }
  if (options.listen_backlog < 1) return bad("listen_backlog must be >= 1");
  auto impl = std::make_unique<Impl>(options, std::move(routes));
  if (absl::Status s = impl->Start(); !s.ok()) return s;
  return std::unique_ptr<HttpFrontEnd>(new HttpFrontEnd(std::move(impl)));
}

HttpFrontEnd::HttpFrontEnd(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
HttpFrontEnd::~HttpFrontEnd() { Shutdown(); }
int32_t HttpFrontEnd::port() const { return impl_->port(); }
HttpFrontEnd::Stats HttpFrontEnd::stats() const { return impl_->stats(); }
void HttpFrontEnd::Shutdown() { impl_->Shutdown(); }

}  // namespace tokenlake::service
