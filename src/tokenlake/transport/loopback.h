// LoopbackTransport: the in-process Transport used by tests and by the CPU engine, whose
// instances are threads of one process. One mailbox (a FIFO queue guarded by a mutex) per
// endpoint; Send moves the message into the destination's mailbox, Receive blocks on it.
//
// Capabilities: in_process, ordered (FIFO per destination, hence per sender too), reliable,
// max_payload_bytes configurable.
//
// Counters (messages and payload bytes sent per source endpoint) let tests and benchmarks check
// what moved; they count accepted messages only.
//
// Thread-safety: thread-safe (see transport.h).
#ifndef TOKENLAKE_TRANSPORT_LOOPBACK_H_
#define TOKENLAKE_TRANSPORT_LOOPBACK_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "tokenlake/transport/transport.h"

namespace tokenlake::transport {

class LoopbackTransport final : public Transport {
 public:
  struct Options {
    // Number of endpoints, >= 1.
    int32_t num_endpoints = 1;
    // Largest payload accepted by Send, in bytes, >= 0.
    int64_t max_payload_bytes = int64_t{1} << 32;
  };

  // Errors: InvalidArgument when num_endpoints < 1 or max_payload_bytes < 0.
  static absl::StatusOr<std::unique_ptr<LoopbackTransport>> Create(const Options& options);

  ~LoopbackTransport() override;

  Capabilities capabilities() const override;
  int32_t num_endpoints() const override { return options_.num_endpoints; }
  absl::Status Send(Message message) override;
  absl::StatusOr<Message> Receive(InstanceId self, absl::Duration timeout) override;
  void Shutdown() override;

  // Messages / payload bytes accepted from endpoint `from` since creation (0 if out of range).
  int64_t messages_sent(InstanceId from) const;
  int64_t bytes_sent(InstanceId from) const;
  // Messages currently queued for `to` (0 if out of range).
  int64_t queued(InstanceId to) const;

 private:
  struct Mailbox {
    mutable absl::Mutex mu;
    std::deque<Message> queue ABSL_GUARDED_BY(mu);
    bool shut_down ABSL_GUARDED_BY(mu) = false;
  };
  struct Counters {
    mutable absl::Mutex mu;
    int64_t messages ABSL_GUARDED_BY(mu) = 0;
    int64_t bytes ABSL_GUARDED_BY(mu) = 0;
  };

  explicit LoopbackTransport(const Options& options);
  bool InRange(InstanceId id) const {
    return id.valid() && id.value() >= 0 && id.value() < options_.num_endpoints;
  }

  const Options options_;
  std::vector<std::unique_ptr<Mailbox>> mailboxes_;
  std::vector<std::unique_ptr<Counters>> counters_;
};

}  // namespace tokenlake::transport

#endif  // TOKENLAKE_TRANSPORT_LOOPBACK_H_
