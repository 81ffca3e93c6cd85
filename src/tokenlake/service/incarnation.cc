#include "tokenlake/service/incarnation.h"

#include <utility>

#include "absl/strings/str_format.h"
#include "tokenlake/transport/tcp_transport.h"

namespace tokenlake::service {

absl::Status CheckIncarnationGone(const LiveIncarnation& old, int32_t new_transport_port,
                                  absl::Duration lease, const std::string& secret, absl::Time now,
                                  absl::Duration probe_timeout, const std::string& new_host,
                                  std::shared_ptr<const transport::TlsContext> tls) {
  if (now - old.last_heartbeat > lease) return absl::OkStatus();
  if (old.transport_port == new_transport_port && old.host == new_host) return absl::OkStatus();
  const transport::HostPort address{.host = old.host, .port = old.transport_port};
  if (!transport::TcpTransport::Probe(address, secret, std::move(tls), probe_timeout).ok()) {
    return absl::OkStatus();
  }
  return absl::AlreadyExistsError(absl::StrFormat(
      "instance %d ('%s') is alive (heartbeat %s ago, its transport on %s answers): "
      "a new incarnation may register once it has stopped",
      old.id, old.name, absl::FormatDuration(now - old.last_heartbeat), address.ToString()));
}

}  // namespace tokenlake::service
