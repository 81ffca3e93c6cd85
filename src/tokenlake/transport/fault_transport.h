// FaultTransport: a decorator that injects faults into another Transport, so that timeouts,
// retries and failover are tested without a real network failing.
//
// Faults (each can be changed at any time, from any thread):
//   - drop: each Send is silently discarded with probability drop_probability (Send still
//     returns OK, as a lossy network would);
//   - delay: each Send is delivered `delay` later (by a timer thread; order between delayed
//     messages of one sender is kept because the delay is constant);
//   - cut a peer: Sends to or from a cut endpoint fail with Unavailable ("cut by fault
//     injection"), and messages from it that are already in flight are discarded on Receive.
// Randomness is injected (seed); time for the delay is the real clock (absl::Now), since the
// point is to exercise the callers' real deadlines.
//
// Counters say what was dropped, delayed and refused.
//
// Thread-safety: thread-safe (see transport.h). The inner transport is borrowed and must outlive
// this decorator.
#ifndef TOKENLAKE_TRANSPORT_FAULT_TRANSPORT_H_
#define TOKENLAKE_TRANSPORT_FAULT_TRANSPORT_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <queue>
#include <random>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "tokenlake/transport/transport.h"

namespace tokenlake::transport {

class FaultTransport final : public Transport {
 public:
  struct Options {
    // Probability in [0, 1] that a Send is silently dropped.
    double drop_probability = 0;
    // Delay added to every delivered message, >= 0.
    absl::Duration delay = absl::ZeroDuration();
    // Seed of the drop decisions.
    uint64_t seed = 1;
  };

  // `inner` is borrowed. Errors: InvalidArgument for a probability outside [0, 1] or a
  // negative delay.
  static absl::StatusOr<std::unique_ptr<FaultTransport>> Create(Transport* inner,
                                                                const Options& options);
  ~FaultTransport() override;

  // Change the faults. Errors as Create.
  absl::Status SetDropProbability(double p);
  absl::Status SetDelay(absl::Duration delay);
  // Cut / restore every link of `endpoint`.
  void CutPeer(InstanceId endpoint);
  void RestorePeer(InstanceId endpoint);

  Capabilities capabilities() const override;
  int32_t num_endpoints() const override { return inner_->num_endpoints(); }
  absl::Status Send(Message message) override;
  absl::StatusOr<Message> Receive(InstanceId self, absl::Duration timeout) override;
  // Shuts the delay thread down (delayed messages not yet delivered are lost) and the inner
  // transport.
  void Shutdown() override;

  int64_t dropped() const { return dropped_.load(); }
  int64_t delayed() const { return delayed_.load(); }
  int64_t refused() const { return refused_.load(); }

 private:
  struct Pending {
    absl::Time at;
    uint64_t seq;
    Message message;
    bool operator>(const Pending& o) const { return at != o.at ? at > o.at : seq > o.seq; }
  };
  FaultTransport(Transport* inner, const Options& options);
  bool IsCut(InstanceId id) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DelayLoop();

  Transport* const inner_;
  mutable absl::Mutex mu_;
  Options options_ ABSL_GUARDED_BY(mu_);
  std::mt19937_64 rng_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<int32_t> cut_ ABSL_GUARDED_BY(mu_);
  std::priority_queue<Pending, std::vector<Pending>, std::greater<>> pending_ ABSL_GUARDED_BY(mu_);
  uint64_t next_seq_ ABSL_GUARDED_BY(mu_) = 0;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  std::thread delayer_;
  std::atomic<int64_t> dropped_{0};
  std::atomic<int64_t> delayed_{0};
  std::atomic<int64_t> refused_{0};
};

}  // namespace tokenlake::transport

#endif  // TOKENLAKE_TRANSPORT_FAULT_TRANSPORT_H_
