// KeyClaim: holding one etcd key under a lease, for as long as this process is alive and can
// reach etcd. The one mechanism behind both uses of etcd in a cluster:
//   - leader election: every coordinator claims "<cluster>/leader" with its address; the one
//     that creates the key leads, the others wait and take over once the leader's lease expires
//     (the leader died or lost etcd) or it releases the key;
//   - membership: an instance claims "<cluster>/members/<name>" with its addresses; while an old
//     incarnation's lease is alive the name is taken, so a second process under a live member's
//     name waits (proof that the old one is gone = its lease expired) instead of taking over.
//
// A background thread grants a lease, creates the key if it is absent (a transaction on
// create_revision == 0), renews the lease every ttl / 3, and while it does not hold the key
// re-reads it every `retry` to learn the current holder.
//
// Held() is true only while the claim is certain: the key was created by this claim and the
// lease's last renewal was *sent* less than ttl - margin ago (etcd starts the TTL when it
// receives the renewal, later than that, so a process cut off from etcd stops calling itself
// the holder before etcd gives the key to someone else, as long as clocks run at the same rate).
//
// Thread-safety: thread-safe. The destructor releases the claim (revokes the lease).
#ifndef TOKENLAKE_SERVICE_KEY_CLAIM_H_
#define TOKENLAKE_SERVICE_KEY_CLAIM_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/service/etcd_client.h"

namespace tokenlake::service {

struct KeyClaimOptions {
  // The key to hold (non-empty) and the value to hold it with.
  std::string key;
  std::string value;
  // The lease's TTL (whole seconds, >= 1 s): how long the key outlives this process.
  absl::Duration ttl = absl::Seconds(3);
  // How often a claim that does not hold the key re-reads it and tries again (> 0), and how
  // long after a failed call to etcd the next one is made.
  absl::Duration retry = absl::Milliseconds(200);
  // Held() turns false this long before the lease could expire (>= 0, < ttl).
  absl::Duration margin = absl::Milliseconds(500);
  // Time source for the lease deadline (default: the system clock).
  Clock* clock = nullptr;
};

class KeyClaim {
 public:
  // Called from the claim's thread whenever Held() changes (true: this claim now holds the
  // key; false: it lost it or released it). Must not call back into the claim's Release.
  using OnChange = std::function<void(bool held)>;

  // Starts claiming. Does not wait for etcd (an unreachable etcd is retried every `retry`).
  // Errors: InvalidArgument naming a bad option.
  static absl::StatusOr<std::unique_ptr<KeyClaim>> Start(EtcdClient* client,
                                                         const KeyClaimOptions& options,
                                                         OnChange on_change = nullptr);
  ~KeyClaim();
  KeyClaim(const KeyClaim&) = delete;
  KeyClaim& operator=(const KeyClaim&) = delete;

  // Whether this claim holds the key now, with its lease surely alive (see the file comment).
  bool Held() const;
  // The value of the key's holder as last read (this claim's value while held); nullopt when
  // the key was absent or never read.
  std::optional<std::string> HolderValue() const;
  // Waits until Held() or `timeout`. Errors: DeadlineExceeded naming the key and its holder.
  absl::Status WaitHeld(absl::Duration timeout) const;
  // Stops claiming and, when held, revokes the lease so that the key goes at once. Idempotent.
  void Release();

  // Tests: while paused the claim makes no call to etcd (as if cut off from it); its lease then
  // expires unless resumed in time.
  void SetPausedForTesting(bool paused) { paused_.store(paused); }

 private:
  KeyClaim(EtcdClient* client, const KeyClaimOptions& options, OnChange on_change);
  void Run();
  // One round of the claim loop; returns how long to sleep before the next.
  absl::Duration Step();
  void SetHeld(bool held, int64_t create_revision, int64_t lease_deadline_us)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Sleeps up to `d` or until Release.
  void Sleep(absl::Duration d);

  EtcdClient* const client_;
  const KeyClaimOptions options_;
  Clock* const clock_;
  const OnChange on_change_;
  std::atomic<bool> paused_{false};

  mutable absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool held_ ABSL_GUARDED_BY(mu_) = false;
  // When held: the key's create_revision and the time (clock_) before which the lease is alive.
  int64_t create_revision_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t lease_deadline_us_ ABSL_GUARDED_BY(mu_) = 0;
  std::optional<std::string> holder_value_ ABSL_GUARDED_BY(mu_);

  // The loop's own state (only its thread touches it).
  int64_t lease_ = 0;
  // When the lease was last granted or renewed (the request's send time), and the time before
  // which it is surely alive.
  int64_t renewed_us_ = 0;
  int64_t lease_deadline_us_local_ = 0;

  std::thread thread_;
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_KEY_CLAIM_H_
