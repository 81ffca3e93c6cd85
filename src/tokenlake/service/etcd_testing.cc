#include "tokenlake/service/etcd_testing.h"

#include <httplib.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"

namespace tokenlake::service {
namespace {

absl::StatusOr<int> FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::InternalError("socket() failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    close(fd);
    return absl::InternalError("no free port on 127.0.0.1");
  }
  const int port = ntohs(addr.sin_port);
  close(fd);
  return port;
}

std::string FindEtcd() {
  if (const char* env = std::getenv("TOKENLAKE_ETCD"); env != nullptr && *env != '\0') return env;
  for (const char* path : {"/usr/bin/etcd", "/usr/local/bin/etcd"}) {
    if (access(path, X_OK) == 0) return path;
  }
  return "";
}

}  // namespace

absl::StatusOr<std::unique_ptr<EtcdTestServer>> EtcdTestServer::Start() {
  auto server = std::unique_ptr<EtcdTestServer>(new EtcdTestServer());
  server->binary_ = FindEtcd();
  if (server->binary_.empty()) {
    return absl::NotFoundError(
        "no etcd binary (/usr/bin/etcd): run scripts/install-deps.sh (Debian package "
        "etcd-server) or set TOKENLAKE_ETCD");
  }
  char dir_template[] = "/tmp/tokenlake-etcd-XXXXXX";
  if (mkdtemp(dir_template) == nullptr) return absl::InternalError("mkdtemp failed");
  server->dir_ = dir_template;
  absl::StatusOr<int> client_port = FreePort();
  if (!client_port.ok()) return client_port.status();
  absl::StatusOr<int> peer_port = FreePort();
  if (!peer_port.ok()) return peer_port.status();
  server->client_port_ = *client_port;
  server->peer_port_ = *peer_port;
  server->endpoint_ = absl::StrFormat("http://127.0.0.1:%d", server->client_port_);
  if (absl::Status s = server->Launch(); !s.ok()) return s;
  return server;
}

absl::Status EtcdTestServer::Launch() {
  const std::string client = absl::StrFormat("http://127.0.0.1:%d", client_port_);
  const std::string peer = absl::StrFormat("http://127.0.0.1:%d", peer_port_);
  const std::string log = dir_ + "/etcd.log";
  absl::StatusOr<std::unique_ptr<ChildProcess>> child =
      ChildProcess::Spawn({binary_, "--name", "test", "--data-dir", dir_ + "/data",
                           "--listen-client-urls", client, "--advertise-client-urls", client,
                           "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                           "--initial-cluster", "test=" + peer, "--log-level", "error"},
                          log);
  if (!child.ok()) return child.status();
  process_ = *std::move(child);
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (absl::Now() < deadline) {
    if (!process_->running()) break;
    httplib::Client probe("127.0.0.1", client_port_);
    probe.set_connection_timeout(0, 200'000);
    probe.set_read_timeout(1, 0);
    if (httplib::Result res = probe.Get("/health");
        res && res->status == 200 && res->body.find("true") != std::string::npos) {
      return absl::OkStatus();
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  std::ifstream in(log);
  std::stringstream text;
  text << in.rdbuf();
  std::string tail = text.str();
  if (tail.size() > 2000) tail = tail.substr(tail.size() - 2000);
  return absl::DeadlineExceededError(absl::StrCat(
      "etcd at ", endpoint_, " did not become healthy in 20 s; its log ends:\n", tail));
}

void EtcdTestServer::Kill() {
  if (process_ != nullptr) {
    process_->Signal(SIGKILL);
    (void)process_->Wait(absl::Seconds(10));
  }
  process_.reset();
}

absl::Status EtcdTestServer::Restart() {
  Kill();
  return Launch();
}

EtcdTestServer::~EtcdTestServer() {
  Kill();
  std::error_code ignored;
  std::filesystem::remove_all(dir_, ignored);
}

}  // namespace tokenlake::service
