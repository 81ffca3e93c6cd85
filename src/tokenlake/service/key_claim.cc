#include "tokenlake/service/key_claim.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace tokenlake::service {

absl::StatusOr<std::unique_ptr<KeyClaim>> KeyClaim::Start(EtcdClient* client,
                                                          const KeyClaimOptions& options,
                                                          OnChange on_change) {
  if (client == nullptr) return absl::InvalidArgumentError("KeyClaim: no etcd client");
  if (options.key.empty()) return absl::InvalidArgumentError("KeyClaim: empty key");
  if (options.ttl < absl::Seconds(1)) {
    return absl::InvalidArgumentError(absl::StrCat("KeyClaim ", options.key, ": ttl ",
                                                   absl::FormatDuration(options.ttl),
                                                   " is under etcd's 1 s minimum"));
  }
  if (options.retry <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("KeyClaim ", options.key, ": retry must be > 0"));
  }
  if (options.margin < absl::ZeroDuration() || options.margin >= options.ttl) {
    return absl::InvalidArgumentError(
        absl::StrCat("KeyClaim ", options.key, ": margin must be in [0, ttl)"));
  }
  auto claim = std::unique_ptr<KeyClaim>(new KeyClaim(client, options, std::move(on_change)));
  claim->thread_ = std::thread([c = claim.get()] { c->Run(); });
  return claim;
}

KeyClaim::KeyClaim(EtcdClient* client, const KeyClaimOptions& options, OnChange on_change)
    : client_(client),
      options_(options),
      clock_(options.clock != nullptr ? options.clock : SystemClock::Default()),
      on_change_(std::move(on_change)) {}

KeyClaim::~KeyClaim() { Release(); }

bool KeyClaim::Held() const {
  absl::MutexLock lock(&mu_);
  return held_ && clock_->NowUs() < lease_deadline_us_ - absl::ToInt64Microseconds(options_.margin);
}

std::optional<std::string> KeyClaim::HolderValue() const {
  absl::MutexLock lock(&mu_);
  return holder_value_;
}

absl::Status KeyClaim::WaitHeld(absl::Duration timeout) const {
  const absl::Time deadline = absl::Now() + timeout;
  while (!Held()) {
    if (absl::Now() >= deadline) {
      std::optional<std::string> holder = HolderValue();
      return absl::DeadlineExceededError(
          absl::StrCat("etcd key ", options_.key, " not held after ", absl::FormatDuration(timeout),
                       "; held by ", holder.has_value() ? "'" + *holder + "'" : "nobody known"));
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  return absl::OkStatus();
}

void KeyClaim::Release() {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  if (thread_.joinable()) thread_.join();
  // Revoking the lease deletes the key at once when it is ours (instead of after the TTL).
  if (lease_ != 0 && !paused_.load()) (void)client_->RevokeLease(lease_);
  lease_ = 0;
  SetHeld(false, 0, 0);
}

void KeyClaim::SetHeld(bool held, int64_t create_revision, int64_t lease_deadline_us) {
  bool changed;
  {
    absl::MutexLock lock(&mu_);
    changed = held_ != held;
    held_ = held;
    create_revision_ = held ? create_revision : 0;
    lease_deadline_us_ = held ? lease_deadline_us : 0;
    if (held) holder_value_ = options_.value;
  }
  if (changed && on_change_) on_change_(held);
}

void KeyClaim::Sleep(absl::Duration d) {
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithTimeout(absl::Condition(&stopping_), d);
}

void KeyClaim::Run() {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
    }
    Sleep(Step());
  }
}

absl::Duration KeyClaim::Step() {
  const absl::Duration renew_every = options_.ttl / 3;
  bool held;
  int64_t create_revision, deadline_us;
  {
    absl::MutexLock lock(&mu_);
    held = held_;
    create_revision = create_revision_;
    deadline_us = lease_deadline_us_;
  }
  const int64_t now_us = clock_->NowUs();
  const int64_t margin_us = absl::ToInt64Microseconds(options_.margin);
  if (held && now_us >= deadline_us - margin_us) {
    // The lease may expire any moment: no longer certain of the key.
    SetHeld(false, 0, 0);
    held = false;
  }
  if (paused_.load()) return options_.retry;

  if (lease_ == 0) {
    const int64_t sent_us = clock_->NowUs();
    absl::StatusOr<EtcdLease> lease = client_->GrantLease(options_.ttl);
    if (!lease.ok()) return options_.retry;
    lease_ = lease->id;
    renewed_us_ = sent_us;
    lease_deadline_us_local_ = sent_us + absl::ToInt64Microseconds(lease->ttl);
  } else if (held || now_us - renewed_us_ >= absl::ToInt64Microseconds(renew_every)) {
    // A claim that waits for the key renews its lease too, so that it is ready to use.
    const int64_t sent_us = clock_->NowUs();
    absl::StatusOr<absl::Duration> ttl = client_->KeepAliveOnce(lease_);
    if (absl::IsNotFound(ttl.status())) {
      // Expired (cut off for longer than the TTL) or revoked: the key, if ours, is gone.
      lease_ = 0;
      if (held) SetHeld(false, 0, 0);
      return absl::ZeroDuration();
    }
    if (!ttl.ok()) return options_.retry;
    renewed_us_ = sent_us;
    lease_deadline_us_local_ = sent_us + absl::ToInt64Microseconds(*ttl);
  }
  deadline_us = lease_deadline_us_local_;

  if (held) {
    // Still ours? (A key deleted by hand, or an operator's takeover, ends the claim.)
    absl::StatusOr<std::optional<EtcdKeyValue>> kv = client_->Get(options_.key);
    if (!kv.ok()) {
      SetHeld(true, create_revision, deadline_us);  // the renewal itself succeeded
      return options_.retry;
    }
    if (!kv->has_value() || (*kv)->lease != lease_ || (*kv)->create_revision != create_revision) {
      absl::MutexLock lock(&mu_);
      holder_value_ = kv->has_value() ? std::optional<std::string>((*kv)->value) : std::nullopt;
    } else {
      SetHeld(true, create_revision, deadline_us);
      return renew_every;
    }
    SetHeld(false, 0, 0);
  }

  EtcdKeyValue current;
  absl::StatusOr<bool> created =
      client_->PutIfAbsent(options_.key, options_.value, lease_, &current);
  if (!created.ok()) return options_.retry;
  if (*created || current.lease == lease_) {
    // (current.lease == lease_: created by this claim earlier, e.g. before a pause.)
    SetHeld(true, current.create_revision, deadline_us);
    return renew_every;
  }
  {
    absl::MutexLock lock(&mu_);
    holder_value_ = current.value;
  }
  return std::min(options_.retry, renew_every);
}

}  // namespace tokenlake::service
