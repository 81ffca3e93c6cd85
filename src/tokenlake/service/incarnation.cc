#include "tokenlake/service/incarnation.h"

#include "absl/strings/str_format.h"
#include "tokenlake/transport/tcp_transport.h"

namespace tokenlake::service {

absl::Status CheckIncarnationGone(const LiveIncarnation& old, int32_t new_transport_port,
                                  absl::Duration lease, const std::string& secret, absl::Time now,
                                  absl::Duration probe_timeout) {
  if (now - old.last_heartbeat > lease) return absl::OkStatus();
  if (old.transport_port == new_transport_port) return absl::OkStatus();
  if (!transport::TcpTransport::Probe(old.transport_port, secret, probe_timeout).ok()) {
    return absl::OkStatus();
  }
  return absl::AlreadyExistsError(absl::StrFormat(
      "instance %d ('%s') is alive (heartbeat %s ago, its transport on 127.0.0.1:%d answers): "
      "a new incarnation may register once it has stopped",
      old.id, old.name, absl::FormatDuration(now - old.last_heartbeat), old.transport_port));
}

}  // namespace tokenlake::service
