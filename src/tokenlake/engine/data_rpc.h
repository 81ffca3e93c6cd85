// The data plane's request/reply convention over a transport::Transport, shared by the host pool
// (instance_pool.h) and the GPU pools (cuda/peer_device_pool.h): a server answers each request
// with one reply carrying the request's correlation id, or with an error reply
// (kErrorReplyTag) carrying the absl::Status; a driver endpoint may have several requests
// outstanding and takes their replies in any order (DriverChannel).
//
// Thread-safety: ErrorReply / DecodeError are pure; DriverChannel is thread-safe, but only one
// thread at a time may Await on one channel (they share its endpoint's queue).
#ifndef TOKENLAKE_ENGINE_DATA_RPC_H_
#define TOKENLAKE_ENGINE_DATA_RPC_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "tokenlake/base/ids.h"
#include "tokenlake/transport/transport.h"

namespace tokenlake::engine {

// The tag of an error reply (no request or reply of the data plane uses it).
inline constexpr uint32_t kErrorReplyTag = 99;

// The error reply to `request`: its status code and message.
transport::Message ErrorReply(const transport::Message& request, const absl::Status& status);

// The status an error reply carries, its message prefixed with "instance K: " where K is the
// replying endpoint minus `endpoint_base`. DataLoss for a malformed error reply.
absl::Status DecodeError(const transport::Message& reply, int32_t endpoint_base);

// One driver endpoint's requests and their replies.
class DriverChannel {
 public:
  // `transport` is borrowed; `endpoint` is hosted by it; servers are endpoint_base + instance.
  DriverChannel(transport::Transport* transport, InstanceId endpoint, int32_t endpoint_base)
      : transport_(transport), endpoint_(endpoint), endpoint_base_(endpoint_base) {}

  // Sends a request to endpoint `to`; returns its ticket (the correlation id) for Await.
  // Errors: the transport's.
  absl::StatusOr<uint64_t> Send(InstanceId to, uint32_t tag, std::vector<std::byte> payload);
  // The reply to `ticket` (replies to other tickets that arrive meanwhile are kept for their
  // Await), waiting at most `timeout`. Errors: the error reply's status (DecodeError),
  // DeadlineExceeded, Cancelled (the transport shut down).
  absl::StatusOr<transport::Message> Await(uint64_t ticket, absl::Duration timeout);

 private:
  transport::Transport* const transport_;
  const InstanceId endpoint_;
  const int32_t endpoint_base_;
  absl::Mutex mu_;
  uint64_t next_ticket_ ABSL_GUARDED_BY(mu_) = 1;
  // Replies that arrived while waiting for another ticket.
  absl::flat_hash_map<uint64_t, transport::Message> stash_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tokenlake::engine

#endif  // TOKENLAKE_ENGINE_DATA_RPC_H_
