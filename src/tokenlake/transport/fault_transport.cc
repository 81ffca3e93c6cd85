#include "tokenlake/transport/fault_transport.h"

#include <utility>

#include "absl/strings/str_format.h"

namespace tokenlake::transport {
namespace {

absl::Status CheckProbability(double p) {
  if (!(p >= 0.0 && p <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("FaultTransport: drop_probability must be in [0, 1], got %g", p));
  }
  return absl::OkStatus();
}

absl::Status CheckDelay(absl::Duration d) {
  if (d < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("FaultTransport: delay must be >= 0, got %s", absl::FormatDuration(d)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<FaultTransport>> FaultTransport::Create(Transport* inner,
                                                                       const Options& options) {
  if (inner == nullptr) return absl::InvalidArgumentError("FaultTransport: inner is null");
  if (absl::Status s = CheckProbability(options.drop_probability); !s.ok()) return s;
  if (absl::Status s = CheckDelay(options.delay); !s.ok()) return s;
  std::unique_ptr<FaultTransport> t(new FaultTransport(inner, options));
  t->delayer_ = std::thread([p = t.get()] { p->DelayLoop(); });
  return t;
}

FaultTransport::FaultTransport(Transport* inner, const Options& options)
    : inner_(inner), options_(options), rng_(options.seed) {}

FaultTransport::~FaultTransport() { Shutdown(); }

absl::Status FaultTransport::SetDropProbability(double p) {
  if (absl::Status s = CheckProbability(p); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  options_.drop_probability = p;
  return absl::OkStatus();
}

absl::Status FaultTransport::SetDelay(absl::Duration delay) {
  if (absl::Status s = CheckDelay(delay); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  options_.delay = delay;
  return absl::OkStatus();
}

void FaultTransport::CutPeer(InstanceId endpoint) {
  absl::MutexLock lock(&mu_);
  cut_.insert(endpoint.value());
}

void FaultTransport::RestorePeer(InstanceId endpoint) {
  absl::MutexLock lock(&mu_);
  cut_.erase(endpoint.value());
}

bool FaultTransport::IsCut(InstanceId id) const { return cut_.contains(id.value()); }

Capabilities FaultTransport::capabilities() const {
  Capabilities c = inner_->capabilities();
  c.name = "fault(" + c.name + ")";
  c.reliable = false;
  return c;
}

absl::Status FaultTransport::Send(Message message) {
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return absl::UnavailableError("FaultTransport::Send: shut down");
    if (IsCut(message.from) || IsCut(message.to)) {
      refused_.fetch_add(1);
      return absl::UnavailableError(absl::StrFormat(
          "FaultTransport::Send: link %d -> %d cut by fault injection",
          static_cast<int64_t>(message.from.value()), static_cast<int64_t>(message.to.value())));
    }
    if (options_.drop_probability > 0 &&
        std::uniform_real_distribution<double>(0.0, 1.0)(rng_) < options_.drop_probability) {
      dropped_.fetch_add(1);
      return absl::OkStatus();
    }
    if (options_.delay > absl::ZeroDuration()) {
      delayed_.fetch_add(1);
      pending_.push(Pending{absl::Now() + options_.delay, next_seq_++, std::move(message)});
      return absl::OkStatus();
    }
  }
  return inner_->Send(std::move(message));
}

void FaultTransport::DelayLoop() {
  absl::MutexLock lock(&mu_);
  while (!shut_down_) {
    if (pending_.empty()) {
      auto wake = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return shut_down_ || !pending_.empty();
      };
      mu_.Await(absl::Condition(&wake));
      continue;
    }
    const absl::Time at = pending_.top().at;
    if (absl::Now() < at) {
      auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return shut_down_; };
      mu_.AwaitWithDeadline(absl::Condition(&stop), at);
      continue;
    }
    Message m = std::move(const_cast<Pending&>(pending_.top()).message);
    pending_.pop();
    mu_.Unlock();
    inner_->Send(std::move(m)).IgnoreError();  // a lossy link: a failed delivery is a drop
    mu_.Lock();
  }
}

absl::StatusOr<Message> FaultTransport::Receive(InstanceId self, absl::Duration timeout) {
  const absl::Time deadline =
      timeout == absl::InfiniteDuration() ? absl::InfiniteFuture() : absl::Now() + timeout;
  while (true) {
    const absl::Duration left = deadline == absl::InfiniteFuture()
                                    ? absl::InfiniteDuration()
                                    : std::max(absl::ZeroDuration(), deadline - absl::Now());
    absl::StatusOr<Message> m = inner_->Receive(self, left);
    if (!m.ok()) return m;
    bool cut;
    {
      absl::MutexLock lock(&mu_);
      cut = IsCut(m->from);
    }
    if (!cut) return m;
    dropped_.fetch_add(1);
  }
}

void FaultTransport::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  if (delayer_.joinable()) delayer_.join();
  inner_->Shutdown();
}

}  // namespace tokenlake::transport
