// Whether a registration under the name of a live cluster member may take its place.
//
// A restarted instance registers under its old name, possibly before the coordinator has
// declared the old process dead. Taking every such registration as a restart would let any
// caller with the name (and, where calls are authenticated, the secret) capture the member's
// requests; so the coordinator first asks for proof that the old incarnation is gone:
//   - its heartbeat lease expired (no heartbeat for `lease`), or
//   - the new incarnation listens on the old one's host and transport port (only one process
//     can), or
//   - the old transport address no longer completes a connection and its TLS and
//     authentication handshakes (TcpTransport::Probe; a killed process's port refuses at once).
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
};

// OK when `old` is proven gone (see the file comment); AlreadyExists naming the member
// otherwise. Blocks for at most `probe_timeout` (call it without locks held).
// `tls` (may be null) is the cluster's, for the probe.
absl::Status CheckIncarnationGone(const LiveIncarnation& old, int32_t new_transport_port,
                                  absl::Duration lease, const std::string& secret, absl::Time now,
                                  absl::Duration probe_timeout = absl::Milliseconds(300),
                                  const std::string& new_host = "127.0.0.1",
                                  std::shared_ptr<const transport::TlsContext> tls = nullptr);

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_INCARNATION_H_
