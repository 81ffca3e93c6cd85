// Rebalancing: runs Lake::Rebalance and has its actions carried out by the instances.
//
// Every `interval` (and/or after every `every_requests` served requests) the lake rebalances;
// each replicate / move becomes an action in one RebalanceOrder per receiving instance (which
// pulls the KV from the source over the data plane and stores it), recorded as an unconfirmed
// ("fresh") copy in the Reconciler so that plans read from the source until the receiver reports
// it. A drop needs no order: the copy is no longer listed, so the instance's next heartbeat frees
// it (guarded by its store generation, so a copy placed there again meanwhile stays; an order
// queued behind a long request could not tell). An action whose source or receiver is not
// routable is not sent; copies the lake placed on a receiver that is not routable are taken back
// (Lake::DropInstance). A lost order is repaired by heartbeat reconciliation.
//
// Thread-safety: thread-safe. RebalanceNow takes the lake's lock (then Membership's) and sends
// the orders after releasing it.
#ifndef TOKENLAKE_SERVICE_REBALANCER_H_
#define TOKENLAKE_SERVICE_REBALANCER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "tokenlake/service/guarded_lake.h"
#include "tokenlake/service/membership.h"
#include "tokenlake/service/reconciler.h"
#include "tokenlake/v1/tokenlake.pb.h"

namespace tokenlake::service {

class Rebalancer {
 public:
  struct Options {
    // Rebalance every this often (zero = never) and/or after every this many served requests
    // (0 = never).
    absl::Duration interval = absl::Seconds(1);
    int32_t every_requests = 0;
  };
  // Delivers an order to an instance (best effort: a lost order is repaired by reconciliation).
  using SendOrder = std::function<void(int32_t instance, const v1::RebalanceOrder& order)>;

  // The pointers are borrowed and outlive this. Starts the periodic thread when interval > 0.
  Rebalancer(const Options& options, GuardedLake* lake, Membership* membership,
             Reconciler* reconciler, SendOrder send);
  ~Rebalancer();
  Rebalancer(const Rebalancer&) = delete;
  Rebalancer& operator=(const Rebalancer&) = delete;

  // Runs Lake::Rebalance now and sends the orders. Returns the number of the lake's actions.
  // Errors: the lake's.
  absl::StatusOr<int64_t> RebalanceNow();

  // Counts a served request; rebalances when every_requests have been served since the last.
  void RequestServed();

  // Stops the periodic thread. Idempotent.
  void Stop();

  // Actions counted (replicate and move orders sent, drops), since the start.
  int64_t actions() const { return actions_.load(std::memory_order_relaxed); }

 private:
  // Lake::Rebalance's actions as one order per receiving instance.
  absl::StatusOr<int64_t> PlanOrders(std::map<int32_t, v1::RebalanceOrder>* orders);
  void Loop();

  const Options options_;
  GuardedLake* const lake_;
  Membership* const membership_;
  Reconciler* const reconciler_;
  const SendOrder send_;
  std::atomic<bool> stopping_{false};
  std::atomic<int64_t> actions_{0};
  absl::Mutex mu_;
  int32_t served_since_ ABSL_GUARDED_BY(mu_) = 0;
  std::thread thread_;
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_REBALANCER_H_
