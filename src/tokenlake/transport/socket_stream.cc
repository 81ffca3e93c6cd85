#include "tokenlake/transport/socket_stream.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"

namespace tokenlake::transport {
namespace {

std::string SslErrors() {
  std::string out;
  while (unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out.empty() ? "no OpenSSL error recorded" : out;
}

bool IsIpLiteral(const std::string& host) {
  unsigned char buf[16];
  return inet_pton(AF_INET, host.c_str(), buf) == 1 || inet_pton(AF_INET6, host.c_str(), buf) == 1;
}

int PollMs(absl::Time deadline) {
  if (deadline == absl::InfiniteFuture()) return 1000;  // wake now and then (Shutdown, signals)
  const absl::Duration left = deadline - absl::Now();
  if (left <= absl::ZeroDuration()) return 0;
  return static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(left) + 1, 1000));
}

// A socket BIO that writes with send(MSG_NOSIGNAL): OpenSSL's own socket BIO uses write(2),
// which raises SIGPIPE (killing the process) when the peer has gone.
int NoSigpipeWrite(BIO* bio, const char* data, int size) {
  const int fd = static_cast<int>(reinterpret_cast<intptr_t>(BIO_get_data(bio)));
  BIO_clear_retry_flags(bio);
  const ssize_t n = ::send(fd, data, static_cast<size_t>(size), MSG_NOSIGNAL);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
    BIO_set_retry_write(bio);
  }
  return static_cast<int>(n);
}

int NoSigpipeRead(BIO* bio, char* data, int size) {
  const int fd = static_cast<int>(reinterpret_cast<intptr_t>(BIO_get_data(bio)));
  BIO_clear_retry_flags(bio);
  const ssize_t n = ::recv(fd, data, static_cast<size_t>(size), 0);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
    BIO_set_retry_read(bio);
  }
  return static_cast<int>(n);
}

long NoSigpipeCtrl(BIO*, int cmd, long, void*) { return cmd == BIO_CTRL_FLUSH ? 1 : 0; }

int NoSigpipeCreate(BIO* bio) {
  BIO_set_init(bio, 1);
  return 1;
}

const BIO_METHOD* NoSigpipeSocketMethod() {
  static const BIO_METHOD* method = [] {
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "tokenlake socket");
    BIO_meth_set_write(m, NoSigpipeWrite);
    BIO_meth_set_read(m, NoSigpipeRead);
    BIO_meth_set_ctrl(m, NoSigpipeCtrl);
    BIO_meth_set_create(m, NoSigpipeCreate);
    return m;
  }();
  return method;
}

// Loads the identity's PEM text into a context: its certificate and key, the CA as the only
// trust anchor, and the peer's certificate required and verified.
absl::Status Configure(SSL_CTX* ctx, const TlsIdentity& identity, bool server) {
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  BIO* cert_bio =
      BIO_new_mem_buf(identity.cert_pem.data(), static_cast<int>(identity.cert_pem.size()));
  X509* cert = PEM_read_bio_X509(cert_bio, nullptr, nullptr, nullptr);
  BIO_free(cert_bio);
  BIO* key_bio =
      BIO_new_mem_buf(identity.key_pem.data(), static_cast<int>(identity.key_pem.size()));
  EVP_PKEY* key = PEM_read_bio_PrivateKey(key_bio, nullptr, nullptr, nullptr);
  BIO_free(key_bio);
  const bool loaded = cert != nullptr && key != nullptr &&
                      SSL_CTX_use_certificate(ctx, cert) == 1 &&
                      SSL_CTX_use_PrivateKey(ctx, key) == 1 && SSL_CTX_check_private_key(ctx) == 1;
  X509_free(cert);
  EVP_PKEY_free(key);
  if (!loaded) {
    return absl::InvalidArgumentError(absl::StrCat("TLS identity from ", identity.dir,
                                                   ": certificate or key refused: ", SslErrors()));
  }
  X509_STORE* store = SSL_CTX_get_cert_store(ctx);
  BIO* ca_bio = BIO_new_mem_buf(identity.ca_pem.data(), static_cast<int>(identity.ca_pem.size()));
  int cas = 0;
  while (X509* ca = PEM_read_bio_X509(ca_bio, nullptr, nullptr, nullptr)) {
    if (X509_STORE_add_cert(store, ca) == 1) ++cas;
    X509_free(ca);
  }
  BIO_free(ca_bio);
  ERR_clear_error();  // the end of the PEM list reads as an error
  if (cas == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("TLS identity from ", identity.dir, ": no CA certificate in ca.pem"));
  }
  SSL_CTX_set_verify(
      ctx, server ? SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT : SSL_VERIFY_PEER, nullptr);
  return absl::OkStatus();
}

}  // namespace

std::string HostPort::ToString() const {
  if (host.find(':') != std::string::npos) return absl::StrFormat("[%s]:%d", host, port);
  return absl::StrFormat("%s:%d", host, port);
}

absl::StatusOr<HostPort> ParseHostPort(const std::string& text, int32_t default_port) {
  HostPort out;
  std::string port_text;
  if (!text.empty() && text.front() == '[') {
    const size_t close = text.find(']');
    if (close == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat("address '", text, "': no closing ']'"));
    }
    out.host = text.substr(1, close - 1);
    if (close + 1 < text.size()) {
      if (text[close + 1] != ':') {
        return absl::InvalidArgumentError(absl::StrCat("address '", text, "': want [IPV6]:PORT"));
      }
      port_text = text.substr(close + 2);
    }
  } else {
    const size_t colon = text.rfind(':');
    if (colon != std::string::npos && text.find(':') != colon) {
      return absl::InvalidArgumentError(
          absl::StrCat("address '", text, "': put an IPv6 address in brackets: [ADDR]:PORT"));
    }
    out.host = colon == std::string::npos ? text : text.substr(0, colon);
    if (colon != std::string::npos) port_text = text.substr(colon + 1);
  }
  if (out.host.empty())
    return absl::InvalidArgumentError(absl::StrCat("address '", text, "': no host"));
  if (port_text.empty()) {
    if (default_port < 0) {
      return absl::InvalidArgumentError(absl::StrCat("address '", text, "': want HOST:PORT"));
    }
    out.port = default_port;
  } else if (!absl::SimpleAtoi(port_text, &out.port) || out.port < 0 || out.port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("address '", text, "': port '", port_text, "' is not in [0, 65535]"));
  }
  return out;
}

bool IsLoopbackHost(const std::string& host) {
  if (host == "localhost") return true;
  in_addr v4;
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6;
  if (inet_pton(AF_INET6, host.c_str(), &v6) == 1) return IN6_IS_ADDR_LOOPBACK(&v6);
  return false;
}

absl::StatusOr<std::shared_ptr<const TlsContext>> TlsContext::Create(const TlsIdentity& identity) {
  auto ctx = std::shared_ptr<TlsContext>(new TlsContext());
  ctx->server_ = SSL_CTX_new(TLS_server_method());
  ctx->client_ = SSL_CTX_new(TLS_client_method());
  if (ctx->server_ == nullptr || ctx->client_ == nullptr) {
    return absl::InternalError(absl::StrCat("TLS: SSL_CTX_new: ", SslErrors()));
  }
  if (absl::Status s = Configure(ctx->server_, identity, /*server=*/true); !s.ok()) return s;
  if (absl::Status s = Configure(ctx->client_, identity, /*server=*/false); !s.ok()) return s;
  return std::shared_ptr<const TlsContext>(std::move(ctx));
}

TlsContext::~TlsContext() {
  SSL_CTX_free(server_);
  SSL_CTX_free(client_);
}

SocketStream::SocketStream(int fd, std::shared_ptr<const TlsContext> tls)
    : fd_(fd), tls_(std::move(tls)) {
  // Non-blocking: every wait is a poll with a deadline, in the clear and under TLS alike.
  ::fcntl(fd_, F_SETFL, ::fcntl(fd_, F_GETFL, 0) | O_NONBLOCK);
}

SocketStream::~SocketStream() {
  {
    absl::MutexLock lock(&ssl_mu_);
    if (ssl_ != nullptr) SSL_free(ssl_);
    ssl_ = nullptr;
  }
  if (fd_ >= 0) ::close(fd_);
}

void SocketStream::Shutdown() { ::shutdown(fd_, SHUT_RDWR); }

SocketStream::Io SocketStream::WaitFor(short events, absl::Time deadline) {
  while (true) {
    const int ms = PollMs(deadline);
    if (ms == 0 && deadline != absl::InfiniteFuture()) return Io::kTimeout;
    pollfd p{.fd = fd_, .events = events, .revents = 0};
    const int r = ::poll(&p, 1, ms);
    if (r < 0) {
      if (errno == EINTR) continue;
      return Io::kError;
    }
    if (r > 0) return Io::kOk;
  }
}

absl::Status SocketStream::Accept(absl::Time deadline) { return Connect("", deadline); }

absl::Status SocketStream::Connect(const std::string& peer_host, absl::Time deadline) {
  if (tls_ == nullptr) return absl::OkStatus();
  const bool server = peer_host.empty();
  {
    absl::MutexLock lock(&ssl_mu_);
    ssl_ = SSL_new(server ? tls_->server() : tls_->client());
    BIO* bio = BIO_new(NoSigpipeSocketMethod());
    if (ssl_ == nullptr || bio == nullptr) {
      BIO_free(bio);
      return absl::InternalError(absl::StrCat("TLS: SSL_new: ", SslErrors()));
    }
    BIO_set_data(bio, reinterpret_cast<void*>(static_cast<intptr_t>(fd_)));
    SSL_set_bio(ssl_, bio, bio);  // the SSL owns it
    if (!server) {
      // The acceptor's certificate must name the host dialled.
      X509_VERIFY_PARAM* param = SSL_get0_param(ssl_);
      if (IsIpLiteral(peer_host)) {
        X509_VERIFY_PARAM_set1_ip_asc(param, peer_host.c_str());
      } else {
        SSL_set_tlsext_host_name(ssl_, peer_host.c_str());
        SSL_set1_host(ssl_, peer_host.c_str());
      }
    }
  }
  while (true) {
    int err;
    {
      absl::MutexLock lock(&ssl_mu_);
      const int r = server ? SSL_accept(ssl_) : SSL_connect(ssl_);
      if (r == 1) return absl::OkStatus();
      err = SSL_get_error(ssl_, r);
      if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE) {
        const long verify = SSL_get_verify_result(ssl_);
        std::string why = verify != X509_V_OK ? absl::StrCat("certificate refused: ",
                                                             X509_verify_cert_error_string(verify))
                                              : SslErrors();
        if (err == SSL_ERROR_SYSCALL || err == SSL_ERROR_ZERO_RETURN) {
          why = absl::StrCat("the peer closed the connection during the TLS handshake (", why, ")");
        }
        ERR_clear_error();
        return absl::UnauthenticatedError(absl::StrCat("TLS handshake failed: ", why));
      }
    }
    const Io w = WaitFor(err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline);
    if (w == Io::kTimeout) {
      return absl::DeadlineExceededError(
          "TLS handshake did not complete in time (a peer "
          "without TLS?)");
    }
    if (w != Io::kOk) return absl::UnavailableError("TLS handshake: poll failed");
  }
}

SocketStream::Io SocketStream::WaitReadable(absl::Time deadline) {
  if (tls_ != nullptr) {
    absl::MutexLock lock(&ssl_mu_);
    if (ssl_ != nullptr && SSL_pending(ssl_) > 0) return Io::kOk;
  }
  return WaitFor(POLLIN, deadline);
}

SocketStream::Io SocketStream::ReadExact(void* data, size_t size, absl::Time deadline,
                                         size_t* got) {
  auto* p = static_cast<std::byte*>(data);
  *got = 0;
  while (*got < size) {
    if (tls_ == nullptr) {
      const ssize_t n = ::recv(fd_, p + *got, size - *got, 0);
      if (n == 0) return Io::kEof;
      if (n > 0) {
        *got += static_cast<size_t>(n);
        continue;
      }
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) return Io::kError;
      if (const Io w = WaitFor(POLLIN, deadline); w != Io::kOk) return w;
      continue;
    }
    int err;
    {
      absl::MutexLock lock(&ssl_mu_);
      const int chunk = static_cast<int>(std::min<size_t>(size - *got, size_t{1} << 30));
      const int n = SSL_read(ssl_, p + *got, chunk);
      if (n > 0) {
        *got += static_cast<size_t>(n);
        continue;
      }
      err = SSL_get_error(ssl_, n);
      ERR_clear_error();
    }
    if (err == SSL_ERROR_ZERO_RETURN) return Io::kEof;
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
      if (const Io w = WaitFor(err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline);
          w != Io::kOk) {
        return w;
      }
      continue;
    }
    return err == SSL_ERROR_SYSCALL ? Io::kEof : Io::kError;
  }
  return Io::kOk;
}

SocketStream::Io SocketStream::ReadExact(void* data, size_t size, absl::Time deadline) {
  size_t got = 0;
  return ReadExact(data, size, deadline, &got);
}

bool SocketStream::WriteAll(const void* data, size_t size, absl::Duration stall_timeout) {
  const auto* p = static_cast<const std::byte*>(data);
  while (size > 0) {
    short wait_for = POLLOUT;
    if (tls_ == nullptr) {
      const ssize_t n = ::send(fd_, p, size, MSG_NOSIGNAL);
      if (n > 0) {
        p += n;
        size -= static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return false;
    } else {
      absl::MutexLock lock(&ssl_mu_);
      const int chunk = static_cast<int>(std::min<size_t>(size, size_t{1} << 30));
      const int n = SSL_write(ssl_, p, chunk);
      if (n > 0) {
        p += n;
        size -= static_cast<size_t>(n);
        continue;
      }
      const int err = SSL_get_error(ssl_, n);
      ERR_clear_error();
      if (err == SSL_ERROR_WANT_READ) {
        wait_for = POLLIN;
      } else if (err != SSL_ERROR_WANT_WRITE) {
        return false;
      }
    }
    // The lock is released while waiting: the reader keeps draining the other direction.
    if (WaitFor(wait_for, absl::Now() + stall_timeout) != Io::kOk) return false;
  }
  return true;
}

absl::StatusOr<int> ConnectTcp(const HostPort& address, absl::Time deadline, bool* refused) {
  if (refused != nullptr) *refused = false;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string port = std::to_string(address.port);
  if (const int r = ::getaddrinfo(address.host.c_str(), port.c_str(), &hints, &found); r != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot resolve ", address.ToString(), ": ", gai_strerror(r)));
  }
  std::string last_error = "no address";
  int fd = -1;
  int tried = 0, refusals = 0;
  for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {
    const int s = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (s < 0) {
      const int err = errno;
      if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
        ::freeaddrinfo(found);
        errno = err;
        return absl::ResourceExhaustedError(
            absl::StrCat("cannot open a socket to ", address.ToString(), ": ", std::strerror(err)));
      }
      last_error = std::strerror(err);
      continue;
    }
    ++tried;
    if (::connect(s, a->ai_addr, a->ai_addrlen) != 0 && errno != EINPROGRESS) {
      refusals += errno == ECONNREFUSED ? 1 : 0;
      last_error = std::strerror(errno);
      ::close(s);
      continue;
    }
    pollfd p{.fd = s, .events = POLLOUT, .revents = 0};
    int r;
    do {
      r = ::poll(&p, 1, std::max(0, PollMs(deadline)));
    } while ((r < 0 && errno == EINTR) || (r == 0 && absl::Now() < deadline));
    int so_error = 0;
    socklen_t len = sizeof(so_error);
    if (r <= 0) {
      last_error = r == 0 ? "connect timed out" : std::strerror(errno);
      ::close(s);
      continue;
    }
    ::getsockopt(s, SOL_SOCKET, SO_ERROR, &so_error, &len);
    if (so_error != 0) {
      refusals += so_error == ECONNREFUSED ? 1 : 0;
      last_error = std::strerror(so_error);
      ::close(s);
      continue;
    }
    fd = s;
  }
  ::freeaddrinfo(found);
  if (fd < 0) {
    if (refused != nullptr) *refused = tried > 0 && refusals == tried;
    return absl::UnavailableError(
        absl::StrCat("cannot connect to ", address.ToString(), ": ", last_error));
  }
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd;
}

absl::StatusOr<int> ListenTcp(const HostPort& address, int backlog, int32_t* port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | AI_PASSIVE;
  addrinfo* found = nullptr;
  const std::string port_text = std::to_string(address.port);
  if (const int r = ::getaddrinfo(address.host.c_str(), port_text.c_str(), &hints, &found);
      r != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot resolve ", address.ToString(), " to listen on: ", gai_strerror(r)));
  }
  std::string last_error = "no address";
  int fd = -1;
  for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {
    const int s = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, 0);
    if (s < 0) {
      last_error = std::strerror(errno);
      continue;
    }
    const int one = 1;
    ::setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(s, a->ai_addr, a->ai_addrlen) != 0 || ::listen(s, backlog) != 0) {
      last_error = std::strerror(errno);
      ::close(s);
      continue;
    }
    fd = s;
  }
  ::freeaddrinfo(found);
  if (fd < 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", address.ToString(), ": ", last_error));
  }
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
  *port = bound.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                                      : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  return fd;
}

}  // namespace tokenlake::transport
