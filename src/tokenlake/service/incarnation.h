// Whether a registration under the name of a live cluster member may take its place.
//
// A restarted instance registers under its old name, possibly before the coordinator has
// declared the old process dead. Taking every such registration as a restart would let any
// caller with the name (and, where calls are authenticated, the secret) capture the member's
// requests; so the coordinator first asks for proof that the old incarnation is gone:
//   - its heartbeat lease expired (no heartbeat for `lease`), or
//   - its transport address gives a definite answer that the old incarnation no longer listens
//     there (TcpTransport::Probe): the connection is refused (nothing listens; a killed
//     process's port refuses at once), the listener answers the handshake as no member would,
//     or a member answers that names another incarnation (a port has one listener: the new
//     incarnation on the old port, say). Without a cluster secret listeners are not named, and
//     a new incarnation that says it listens on the old address is believed.
// No answer in time, or a connection closed before its handshake completed, proves nothing:
// a flood of connections can make a live member's transport look like that.
//
// Thread-safety: thread-safe (no state).
#ifndef TOKENLAKE_SERVICE_INCARNATION_H_
#define TOKENLAKE_SERVICE_INCARNATION_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "tokenlake/transport/socket_stream.h"

namespace tokenlake::service {

struct LiveIncarnation {
  std::string name;
  int32_t id = -1;
  int32_t transport_port = 0;
  absl::Time last_heartbeat;
  std::string host = "127.0.0.1";
  // What its transport names itself in handshakes (TcpTransport::incarnation); empty: unknown.
  std::string transport_incarnation;
};

// OK when `old` is proven gone (see the file comment); AlreadyExists naming the member and
// what was seen otherwise. `new_address` is where the new incarnation says its transport
// listens. Blocks for at most `probe_timeout` (call it without locks held). `tls` (may be
// null) is the cluster's, for the probe.
absl::Status CheckIncarnationGone(const LiveIncarnation& old,
                                  const transport::HostPort& new_address, absl::Duration lease,
                                  const std::string& secret, absl::Time now,
                                  absl::Duration probe_timeout = absl::Milliseconds(300),
                                  std::shared_ptr<const transport::TlsContext> tls = nullptr);

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_INCARNATION_H_
