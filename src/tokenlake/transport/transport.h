// Transport: moves tagged byte messages between TokenLake instances (the data plane's tensor
// traffic: query tensors out to segment holders, partial outputs and log-sum-exps back, segment
// KV for pulls and stores).
//
// The interface is deliberately small: Send a Message to an endpoint, Receive the next message
// addressed to an endpoint (blocking, with a timeout), Shutdown. Endpoints are dense ids
// [0, num_endpoints()): instance servers and clients (e.g. an engine's driver thread) are both
// endpoints. Implementations: LoopbackTransport (in-process queues, loopback.h); a host/network
// transport and a fault-injecting decorator come later and keep this contract.
//
// Delivery contract (what callers may rely on; each implementation states its capabilities):
//   - a message Send returns OK for is delivered to `to`'s Receive at most once, whole and
//     unmodified (when capabilities().reliable, exactly once unless the transport shuts down);
//   - messages from one sender to one endpoint arrive in the order sent when
//     capabilities().ordered;
//   - no ordering between different senders.
//
// Thread-safety: every method of every implementation is thread-safe. Several threads may Send to
// the same endpoint; Receive on one endpoint should be called by one thread at a time (several
// receivers each get distinct messages, in no defined order).
#ifndef TOKENLAKE_TRANSPORT_TRANSPORT_H_
#define TOKENLAKE_TRANSPORT_TRANSPORT_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tokenlake/base/ids.h"

namespace tokenlake::transport {

// One message. The transport does not interpret tag, correlation_id or payload.
struct Message {
  // Sending endpoint (so that the receiver can reply). Set by the caller.
  InstanceId from;
  // Destination endpoint.
  InstanceId to;
  // Application-defined kind of message (e.g. "attend request", "attend reply").
  uint32_t tag = 0;
  // Application-defined id that pairs a reply with its request (0 = none).
  uint64_t correlation_id = 0;
  // The bytes.
  std::vector<std::byte> payload;
};

// What an implementation guarantees and how it behaves (callers and decorators may adapt).
struct Capabilities {
  // Implementation name, e.g. "loopback".
  std::string name;
  // Sender and receiver share one address space (payloads are moved, never serialised).
  bool in_process = false;
  // Messages from one sender to one endpoint arrive in the order sent.
  bool ordered = false;
  // A message accepted by Send is delivered unless the transport is shut down.
  bool reliable = false;
  // Largest payload accepted by Send, in bytes.
  int64_t max_payload_bytes = 0;
};

class Transport {
 public:
  virtual ~Transport() = default;

  virtual Capabilities capabilities() const = 0;

  // Number of endpoints; valid ids are [0, num_endpoints()).
  virtual int32_t num_endpoints() const = 0;

  // Queues `message` for message.to. Returns OK when accepted.
  // Errors: InvalidArgument (from or to out of range; the message names the field and value),
  //   ResourceExhausted (payload larger than max_payload_bytes), Unavailable (shut down).
  virtual absl::Status Send(Message message) = 0;

  // Returns the next message addressed to `self`, waiting at most `timeout`
  // (absl::InfiniteDuration() waits forever; a zero timeout polls).
  // Errors: InvalidArgument (self out of range), DeadlineExceeded (nothing arrived in time),
  //   Cancelled (the transport was shut down and no message for `self` remains queued).
  virtual absl::StatusOr<Message> Receive(InstanceId self, absl::Duration timeout) = 0;

  // Stops accepting messages and wakes every blocked Receive (which then drains what is queued
  // and returns Cancelled). Idempotent.
  virtual void Shutdown() = 0;
};

}  // namespace tokenlake::transport

#endif  // TOKENLAKE_TRANSPORT_TRANSPORT_H_
