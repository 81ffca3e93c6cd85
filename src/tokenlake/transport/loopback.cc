#include "tokenlake/transport/loopback.h"

#include <utility>

#include "absl/strings/str_format.h"

namespace tokenlake::transport {

absl::StatusOr<std::unique_ptr<LoopbackTransport>> LoopbackTransport::Create(
    const Options& options) {
  if (options.num_endpoints < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "LoopbackTransport: num_endpoints must be >= 1, got %d", options.num_endpoints));
  }
  if (options.max_payload_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "LoopbackTransport: max_payload_bytes must be >= 0, got %d", options.max_payload_bytes));
  }
  return std::unique_ptr<LoopbackTransport>(new LoopbackTransport(options));
}

LoopbackTransport::LoopbackTransport(const Options& options) : options_(options) {
  for (int32_t i = 0; i < options.num_endpoints; ++i) {
    mailboxes_.push_back(std::make_unique<Mailbox>());
    counters_.push_back(std::make_unique<Counters>());
  }
}

LoopbackTransport::~LoopbackTransport() { Shutdown(); }

Capabilities LoopbackTransport::capabilities() const {
  return Capabilities{.name = "loopback",
                      .in_process = true,
                      .ordered = true,
                      .reliable = true,
                      .max_payload_bytes = options_.max_payload_bytes};
}

absl::Status LoopbackTransport::Send(Message message) {
  if (!InRange(message.from)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("LoopbackTransport::Send: from endpoint %d out of range [0, %d)",
                        static_cast<int64_t>(message.from.value()), options_.num_endpoints));
  }
  if (!InRange(message.to)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("LoopbackTransport::Send: to endpoint %d out of range [0, %d)",
                        static_cast<int64_t>(message.to.value()), options_.num_endpoints));
  }
  const int64_t bytes = static_cast<int64_t>(message.payload.size());
  if (bytes > options_.max_payload_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("LoopbackTransport::Send: payload of %d bytes exceeds the limit of %d",
                        bytes, options_.max_payload_bytes));
  }
  const int32_t from = message.from.value();
  Mailbox& box = *mailboxes_[message.to.value()];
  {
    absl::MutexLock lock(&box.mu);
    if (box.shut_down) return absl::UnavailableError("LoopbackTransport::Send: shut down");
    box.queue.push_back(std::move(message));
  }
  Counters& c = *counters_[from];
  absl::MutexLock lock(&c.mu);
  ++c.messages;
  c.bytes += bytes;
  return absl::OkStatus();
}

absl::StatusOr<Message> LoopbackTransport::Receive(InstanceId self, absl::Duration timeout) {
  if (!InRange(self)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("LoopbackTransport::Receive: endpoint %d out of range [0, %d)",
                        static_cast<int64_t>(self.value()), options_.num_endpoints));
  }
  Mailbox& box = *mailboxes_[self.value()];
  absl::MutexLock lock(&box.mu);
  auto ready = [&box]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(box.mu) {
    return !box.queue.empty() || box.shut_down;
  };
  box.mu.AwaitWithTimeout(absl::Condition(&ready), timeout);
  if (!box.queue.empty()) {
    Message message = std::move(box.queue.front());
    box.queue.pop_front();
    return message;
  }
  if (box.shut_down) return absl::CancelledError("LoopbackTransport::Receive: shut down");
  return absl::DeadlineExceededError(
      absl::StrFormat("LoopbackTransport::Receive: nothing for endpoint %d within %s",
                      static_cast<int64_t>(self.value()), absl::FormatDuration(timeout)));
}

void LoopbackTransport::Shutdown() {
  for (auto& box : mailboxes_) {
    absl::MutexLock lock(&box->mu);
    box->shut_down = true;
  }
}

int64_t LoopbackTransport::messages_sent(InstanceId from) const {
  if (!InRange(from)) return 0;
  absl::MutexLock lock(&counters_[from.value()]->mu);
  return counters_[from.value()]->messages;
}

int64_t LoopbackTransport::bytes_sent(InstanceId from) const {
  if (!InRange(from)) return 0;
  absl::MutexLock lock(&counters_[from.value()]->mu);
  return counters_[from.value()]->bytes;
}

int64_t LoopbackTransport::queued(InstanceId to) const {
  if (!InRange(to)) return 0;
  absl::MutexLock lock(&mailboxes_[to.value()]->mu);
  return static_cast<int64_t>(mailboxes_[to.value()]->queue.size());
}

}  // namespace tokenlake::transport
