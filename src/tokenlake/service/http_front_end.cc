#include "tokenlake/service/http_front_end.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "tokenlake/service/http_parser.h"
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

// Bytes a lingering close discards, and for how long, before closing.
constexpr int64_t kDrainBytes = int64_t{4} << 20;
constexpr absl::Duration kDrainTime = absl::Seconds(2);

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

std::string Head(int status, std::string_view content_type, int64_t content_length, bool keep_alive,
                 const std::vector<std::pair<std::string, std::string>>& extra) {
  std::string h = absl::StrFormat("HTTP/1.1 %d %s\r\n", status, HttpReason(status));
  if (!content_type.empty()) {
    absl::StrAppend(&h, "Content-Type: ", std::string(content_type), "\r\n");
  }
  if (content_length >= 0) {
    absl::StrAppend(&h, "Content-Length: ", content_length, "\r\n");
  } else {
    absl::StrAppend(&h, "Transfer-Encoding: chunked\r\n");
  }
  absl::StrAppend(&h, "Connection: ", keep_alive ? "keep-alive" : "close", "\r\n");
  for (const auto& [k, v] : extra) absl::StrAppend(&h, k, ": ", v, "\r\n");
  absl::StrAppend(&h, "\r\n");
  return h;
}

// Sends all of `data` on non-blocking `fd`, waiting for the socket to drain until `deadline`.
bool WriteAll(int fd, std::string_view data, absl::Time deadline) {
  while (!data.empty()) {
    const ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n > 0) {
      data.remove_prefix(static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
      if (ms <= 0) return false;
      pollfd p{fd, POLLOUT, 0};
      if (::poll(&p, 1, static_cast<int>(std::min<int64_t>(ms, 1000))) < 0 && errno != EINTR) {
        return false;
      }
      continue;
    }
    return false;
  }
  return true;
}

}  // namespace

class HttpFrontEnd::Impl {
 public:
  Impl(const HttpFrontEndOptions& options, std::vector<HttpRoute> routes)
      : options_(options),
        routes_(std::move(routes)),
        limits_{.max_body_bytes = options.max_body_bytes} {}
  ~Impl() { Shutdown(); }

  absl::Status Start();
  void Shutdown();
  int32_t port() const { return port_; }
  Stats stats() const;

 private:
  enum class Phase { kIdle, kReading, kBusy, kDraining };
  // One connection. Owned by the I/O thread's table; while kBusy a worker uses it alone (it is
  // out of the epoll set) and hands it back through returned_.
  struct Conn {
    int fd = -1;
    Phase phase = Phase::kIdle;
    std::string buf;  // bytes received and not yet part of a dispatched request
    std::unique_ptr<HttpRequestParser> parser;
    int64_t accounted = 0;  // this connection's share of buffered_bytes_
    absl::Time idle_since;
    absl::Time request_started;
    absl::Time drain_deadline;
    int64_t drained = 0;
    bool rejecting = false;  // admitted beyond max_connections: answered 503
    bool sent_continue = false;
  };
  struct Job {
    Conn* conn = nullptr;
    HttpRequest request;
    std::string encoding;
    bool keep_alive = false;
    int64_t accounted = 0;
  };

  void IoLoop();
  void WorkerLoop();
  void Accept();
  void OnEvent(Conn* c);
  void TryParse(Conn* c);
  void Reject(Conn* c, int status, std::string_view message);
  void Close(Conn* c);
  void Account(Conn* c);
  void CheckDeadlines(absl::Time now);
  void ProcessReturned();
  // Runs one request on a worker; false when the connection must close.
  bool Serve(Job& job);
  void CountRejected(int status) {
    absl::MutexLock lock(&stats_mu_);
    ++rejected_[status];
  }

  const HttpFrontEndOptions options_;
  const std::vector<HttpRoute> routes_;
  const HttpLimits limits_;
  std::string endpoints_;
  int listen_fd_ = -1;
  int epoll_fd_ = -1;
  int wake_fd_ = -1;
  int32_t port_ = 0;
  std::atomic<bool> stopping_{false};
  std::thread io_thread_;
  std::vector<std::thread> workers_;

  // I/O thread only.
  absl::flat_hash_map<int, std::unique_ptr<Conn>> conns_;
  absl::Time accept_resume_ = absl::InfinitePast();
  absl::Duration accept_backoff_ = absl::Milliseconds(10);
  bool accept_paused_ = false;
  absl::Time last_deadline_check_ = absl::InfinitePast();

  std::atomic<int64_t> buffered_bytes_{0};
  std::atomic<int64_t> open_connections_{0};
  std::atomic<int64_t> refused_connections_{0};

  absl::Mutex queue_mu_;
  std::deque<Job> jobs_ ABSL_GUARDED_BY(queue_mu_);
  bool workers_stop_ ABSL_GUARDED_BY(queue_mu_) = false;

  absl::Mutex returned_mu_;
  std::vector<std::pair<Conn*, bool>> returned_ ABSL_GUARDED_BY(returned_mu_);

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
  // Every connection is a descriptor: make room for the ones this server may hold.
  rlimit lim{};
  const rlim_t wanted = static_cast<rlim_t>(options_.max_connections) * 5 / 4 + 256;
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
  listen_fd_ = *listening;
  // Non-blocking: the I/O thread accepts until EAGAIN.
  ::fcntl(listen_fd_, F_SETFL, ::fcntl(listen_fd_, F_GETFL) | O_NONBLOCK);
  epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
  wake_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (epoll_fd_ < 0 || wake_fd_ < 0) {
    return absl::UnavailableError(absl::StrCat("epoll/eventfd: ", std::strerror(errno)));
  }
  for (int fd : {listen_fd_, wake_fd_}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    ::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev);
  }
  for (int32_t i = 0; i < options_.threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
  io_thread_ = std::thread([this] { IoLoop(); });
  return absl::OkStatus();
}

void HttpFrontEnd::Impl::Shutdown() {
  if (stopping_.exchange(true)) return;
  if (wake_fd_ >= 0) {
    const uint64_t one = 1;
    (void)!::write(wake_fd_, &one, sizeof(one));
  }
  if (io_thread_.joinable()) io_thread_.join();
  {
    absl::MutexLock lock(&queue_mu_);
    workers_stop_ = true;
    jobs_.clear();
  }
  for (std::thread& t : workers_) t.join();
  workers_.clear();
  for (auto& [fd, c] : conns_) ::close(fd);
  conns_.clear();
  for (int* fd : {&listen_fd_, &epoll_fd_, &wake_fd_}) {
    if (*fd >= 0) ::close(*fd);
    *fd = -1;
  }
}

HttpFrontEnd::Stats HttpFrontEnd::Impl::stats() const {
  Stats s;
  s.connections = open_connections_.load();
  s.connections_refused = refused_connections_.load();
  absl::MutexLock lock(&stats_mu_);
  s.rejected = rejected_;
  return s;
}

void HttpFrontEnd::Impl::IoLoop() {
  epoll_event events[256];
  while (!stopping_.load()) {
    const int n = ::epoll_wait(epoll_fd_, events, 256, 50);
    for (int i = 0; i < n; ++i) {
      const int fd = events[i].data.fd;
      if (fd == listen_fd_) {
        Accept();
      } else if (fd == wake_fd_) {
        uint64_t v;
        while (::read(wake_fd_, &v, sizeof(v)) > 0) {
        }
        ProcessReturned();
      } else if (auto it = conns_.find(fd); it != conns_.end()) {
        OnEvent(it->second.get());
      }
    }
    const absl::Time now = absl::Now();
    if (accept_paused_ && now >= accept_resume_) {
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.fd = listen_fd_;
      ::epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, listen_fd_, &ev);
      accept_paused_ = false;
    }
    if (now - last_deadline_check_ >= absl::Milliseconds(50)) {
      last_deadline_check_ = now;
      CheckDeadlines(now);
    }
  }
}

void HttpFrontEnd::Impl::Accept() {
  const size_t overflow = static_cast<size_t>(options_.max_connections) / 4 + 16;
  while (true) {
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR) continue;
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        // Out of descriptors or memory: stop accepting for a while instead of spinning.
        epoll_event ev{};
        ev.data.fd = listen_fd_;
        ::epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, listen_fd_, &ev);
        accept_paused_ = true;
        accept_resume_ = absl::Now() + accept_backoff_;
        accept_backoff_ = std::min(accept_backoff_ * 2, absl::Seconds(1));
      }
      return;
    }
    accept_backoff_ = absl::Milliseconds(10);
    if (conns_.size() >= static_cast<size_t>(options_.max_connections) + overflow) {
      refused_connections_.fetch_add(1);
      ::close(fd);
      continue;
    }
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    auto c = std::make_unique<Conn>();
    c->fd = fd;
    c->parser = std::make_unique<HttpRequestParser>(limits_);
    c->idle_since = absl::Now();
    c->rejecting = conns_.size() >= static_cast<size_t>(options_.max_connections);
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.fd = fd;
    ::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev);
    conns_[fd] = std::move(c);
    open_connections_.fetch_add(1);
  }
}

void HttpFrontEnd::Impl::OnEvent(Conn* c) {
  char buf[64 * 1024];
  // At most 16 reads per wake-up, parsed as they come, so that a fast sender neither starves
  // the other connections nor piles up bytes past the limits before they are checked (epoll is
  // level-triggered: the rest is read on the next round).
  for (int round = 0; round < 16; ++round) {
    const ssize_t n = ::recv(c->fd, buf, sizeof(buf), 0);
    if (n > 0) {
      if (c->phase == Phase::kDraining) {
        c->drained += n;
        if (c->drained > kDrainBytes) return Close(c);
        continue;
      }
      if (buffered_bytes_.load() + n > options_.max_buffered_bytes) {
        return Reject(c, 503, "the server holds too much request data now; retry later");
      }
      if (c->phase == Phase::kIdle) {
        c->phase = Phase::kReading;
        c->request_started = absl::Now();
      }
      c->buf.append(buf, static_cast<size_t>(n));
      Account(c);
      TryParse(c);
      if (c->phase != Phase::kReading) return;  // dispatched, or answered and draining
      continue;
    }
    // The peer is gone or half-closed: no request in progress can complete (a complete one
    // was dispatched above, and its answer is still sent).
    if (n == 0) return Close(c);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return;
    return Close(c);  // reset by the peer
  }
}

void HttpFrontEnd::Impl::Account(Conn* c) {
  const auto now = static_cast<int64_t>(c->buf.size() + c->parser->held_bytes());
  buffered_bytes_.fetch_add(now - c->accounted);
  c->accounted = now;
}

void HttpFrontEnd::Impl::TryParse(Conn* c) {
  const HttpRequestParser::State state = c->parser->Parse(c->buf);
  Account(c);
  if (state == HttpRequestParser::State::kIncomplete) {
    if (c->parser->headers_done() && c->parser->expects_continue() && !c->sent_continue) {
      c->sent_continue = true;
      if (c->rejecting) return Reject(c, 503, "too many connections; retry later");
      constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
      ::send(c->fd, kContinue.data(), kContinue.size(), MSG_NOSIGNAL);
    }
    return;
  }
  if (state == HttpRequestParser::State::kError) {
    return Reject(c, c->parser->error_status(), c->parser->error_message());
  }
  if (c->rejecting) return Reject(c, 503, "too many connections; retry later");
  Job job;
  job.conn = c;
  job.request = std::move(c->parser->request());
  job.encoding = c->parser->content_encoding();
  job.keep_alive = c->parser->keep_alive();
  // Bytes after the request (a pipelined next one) stay for after the answer.
  c->buf.erase(0, c->parser->request_bytes());
  c->parser = std::make_unique<HttpRequestParser>(limits_);
  const auto accounted = static_cast<int64_t>(job.request.body.size());
  job.accounted = accounted;
  buffered_bytes_.fetch_add(accounted);
  Account(c);
  bool queued = false;
  {
    absl::MutexLock lock(&queue_mu_);
    if (static_cast<int32_t>(jobs_.size()) < options_.max_queued_requests) {
      c->phase = Phase::kBusy;
      ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, c->fd, nullptr);
      jobs_.push_back(std::move(job));
      queued = true;
    }
  }
  if (!queued) {
    buffered_bytes_.fetch_sub(accounted);
    Reject(c, 503, "the server is busy (its request queue is full); retry later");
  }
}

void HttpFrontEnd::Impl::Reject(Conn* c, int status, std::string_view message) {
  CountRejected(status);
  std::vector<std::pair<std::string, std::string>> extra;
  if (status == 503 || status == 429) extra.emplace_back("Retry-After", "1");
  const std::string body = ErrorBody(status, message);
  const std::string out =
      Head(status, "application/json", static_cast<int64_t>(body.size()), false, extra) + body;
  // A short answer into an idle socket buffer: one send, without waiting.
  ::send(c->fd, out.data(), out.size(), MSG_NOSIGNAL);
  ::shutdown(c->fd, SHUT_WR);
  // Lingering close: keep reading (and discarding) what the client still sends, so that the
  // kernel does not answer it with a reset before the client has read the answer.
  c->phase = Phase::kDraining;
  c->drain_deadline = absl::Now() + kDrainTime;
  c->buf.clear();
  c->buf.shrink_to_fit();
  c->parser = std::make_unique<HttpRequestParser>(limits_);
  Account(c);
}

void HttpFrontEnd::Impl::Close(Conn* c) {
  const int fd = c->fd;
  ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, fd, nullptr);
  buffered_bytes_.fetch_sub(c->accounted);
  ::close(fd);
  conns_.erase(fd);
  open_connections_.fetch_sub(1);
}

void HttpFrontEnd::Impl::CheckDeadlines(absl::Time now) {
  std::vector<Conn*> idle, slow_headers, slow_request, drained;
  for (auto& [fd, c] : conns_) {
    switch (c->phase) {
      case Phase::kIdle:
        if (now - c->idle_since > options_.idle_timeout) idle.push_back(c.get());
        break;
      case Phase::kReading:
        if (!c->parser->headers_done() && now - c->request_started > options_.header_timeout) {
          slow_headers.push_back(c.get());
        } else if (now - c->request_started > options_.read_timeout) {
          slow_request.push_back(c.get());
        }
        break;
      case Phase::kDraining:
        if (now > c->drain_deadline) drained.push_back(c.get());
        break;
      case Phase::kBusy:
        break;
    }
  }
  for (Conn* c : idle) Close(c);
  for (Conn* c : drained) Close(c);
  for (Conn* c : slow_headers) {
    Reject(c, 408,
           absl::StrCat("request headers not received within ",
                        absl::FormatDuration(options_.header_timeout)));
  }
  for (Conn* c : slow_request) {
    Reject(
        c, 408,
        absl::StrCat("request not received within ", absl::FormatDuration(options_.read_timeout)));
  }
}

void HttpFrontEnd::Impl::ProcessReturned() {
  std::vector<std::pair<Conn*, bool>> back;
  {
    absl::MutexLock lock(&returned_mu_);
    back.swap(returned_);
  }
  const absl::Time now = absl::Now();
  for (auto [c, keep] : back) {
    if (!keep) {
      Close(c);
      continue;
    }
    c->phase = Phase::kIdle;
    c->idle_since = now;
    c->sent_continue = false;
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.fd = c->fd;
    ::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, c->fd, &ev);
    if (!c->buf.empty()) {
      c->phase = Phase::kReading;
      c->request_started = now;
      TryParse(c);
    }
  }
}

void HttpFrontEnd::Impl::WorkerLoop() {
  while (true) {
    Job job;
    {
      absl::MutexLock lock(&queue_mu_);
      queue_mu_.Await(absl::Condition(
          +[](Impl* self) ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->queue_mu_) {
            return self->workers_stop_ || !self->jobs_.empty();
          },
          this));
      if (workers_stop_) return;
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    const bool keep = Serve(job) && job.keep_alive;
    buffered_bytes_.fetch_sub(job.accounted);
    {
      absl::MutexLock lock(&returned_mu_);
      returned_.emplace_back(job.conn, keep);
    }
    const uint64_t one = 1;
    (void)!::write(wake_fd_, &one, sizeof(one));
  }
}

bool HttpFrontEnd::Impl::Serve(Job& job) {
  const int fd = job.conn->fd;
  const absl::Time deadline = absl::Now() + options_.write_timeout;
  auto answer_error = [&](int status, std::string_view message, bool keep,
                          const std::vector<std::pair<std::string, std::string>>& extra = {}) {
    CountRejected(status);
    const std::string body = ErrorBody(status, message);
    return WriteAll(
               fd,
               Head(status, "application/json", static_cast<int64_t>(body.size()), keep, extra) +
                   body,
               deadline) &&
           keep;
  };
  absl::StatusOr<std::string> body =
      DecodeContentEncoding(std::move(job.request.body), job.encoding, options_.max_body_bytes);
  if (!body.ok()) {
    const int status = body.status().code() == absl::StatusCode::kResourceExhausted ? 413
                       : body.status().code() == absl::StatusCode::kUnimplemented   ? 415
                                                                                    : 400;
    const absl::string_view why = body.status().message();
    return answer_error(status, std::string_view(why.data(), why.size()), false);
  }
  job.request.body = std::move(*body);
  const HttpRoute* route = nullptr;
  std::vector<std::string> allowed;
  for (const HttpRoute& r : routes_) {
    if (r.path != job.request.path) continue;
    allowed.push_back(r.method);
    if (r.method == job.request.method) route = &r;
  }
  if (route == nullptr) {
    if (allowed.empty()) {
      return answer_error(404, absl::StrCat("no such endpoint (", endpoints_, ")"), job.keep_alive);
    }
    return answer_error(405,
                        absl::StrFormat("%s %s is not served (%s)", job.request.method,
                                        job.request.path, endpoints_),
                        job.keep_alive, {{"Allow", absl::StrJoin(allowed, ", ")}});
  }
  HttpResponse res;
  route->handler(job.request, &res);
  if (!res.stream) {
    return WriteAll(fd,
                    Head(res.status, res.content_type, static_cast<int64_t>(res.body.size()),
                         job.keep_alive, res.headers) +
                        res.body,
                    deadline);
  }
  // The stream runs even when the head could not be sent (its first write fails at once), so
  // that what it holds (a request on an instance, a key's in-flight count) is let go.
  bool ok =
      WriteAll(fd, Head(res.status, res.content_type, -1, job.keep_alive, res.headers), deadline);
  res.stream([&](std::string_view piece) {
    if (!ok) return false;
    if (piece.empty()) return true;  // an empty chunk would end the body
    ok = WriteAll(fd, absl::StrFormat("%x\r\n", piece.size()),
                  absl::Now() + options_.write_timeout) &&
         WriteAll(fd, piece, absl::Now() + options_.write_timeout) &&
         WriteAll(fd, "\r\n", absl::Now() + options_.write_timeout);
    return ok;
  });
  return ok && WriteAll(fd, "0\r\n\r\n", absl::Now() + options_.write_timeout);
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
  if (options.max_queued_requests < 1) return bad("max_queued_requests must be >= 1");
  if (options.max_connections < 1) return bad("max_connections must be >= 1");
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
