#include "tokenlake/service/incarnation.h"

#include <utility>

#include "absl/strings/str_format.h"
#include "tokenlake/transport/tcp_transport.h"

namespace tokenlake::service {

absl::Status CheckIncarnationGone(const LiveIncarnation& old,
                                  const transport::HostPort& new_address, absl::Duration lease,
                                  const std::string& secret, absl::Time now,
                                  absl::Duration probe_timeout,
                                  std::shared_ptr<const transport::TlsContext> tls) {
  if (now - old.last_heartbeat > lease) return absl::OkStatus();
  const transport::HostPort address{.host = old.host, .port = old.transport_port};
  using Kind = transport::TcpTransport::ProbeResult::Kind;
  const transport::TcpTransport::ProbeResult probe =
      transport::TcpTransport::Probe(address, secret, std::move(tls), probe_timeout);
  if (probe.kind == Kind::kNoMember) return absl::OkStatus();
  if (probe.kind == Kind::kMember) {
    if (probe.incarnation.empty()) {
      // No secret, so the listener is not named: only one process can listen there.
      if (new_address == address) return absl::OkStatus();
    } else if (!old.transport_incarnation.empty() &&
               probe.incarnation != old.transport_incarnation) {
      return absl::OkStatus();
    }
  }
  return absl::AlreadyExistsError(absl::StrFormat(
      "instance %d ('%s') is alive (heartbeat %s ago; its transport on %s %s): a new "
      "incarnation may register once it has stopped",
      old.id, old.name, absl::FormatDuration(now - old.last_heartbeat), address.ToString(),
      probe.kind == Kind::kMember ? "answers"
                                  : absl::StrFormat("gave no definite answer: %s", probe.detail)));
}

}  // namespace tokenlake::service
