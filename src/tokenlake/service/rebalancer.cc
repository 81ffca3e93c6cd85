#include "tokenlake/service/rebalancer.h"

#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/time/clock.h"
#include "tokenlake/service/lake_rpc.h"

namespace tokenlake::service {

Rebalancer::Rebalancer(const Options& options, GuardedLake* lake, Membership* membership,
                       Reconciler* reconciler, SendOrder send)
    : options_(options),
      lake_(lake),
      membership_(membership),
      reconciler_(reconciler),
      send_(std::move(send)) {
  if (options_.interval > absl::ZeroDuration()) thread_ = std::thread([this] { Loop(); });
}

Rebalancer::~Rebalancer() { Stop(); }

void Rebalancer::Stop() {
  stopping_.store(true);
  if (thread_.joinable()) thread_.join();
}

void Rebalancer::Loop() {
  while (!stopping_.load()) {
    const absl::Time next = absl::Now() + options_.interval;
    while (!stopping_.load() && absl::Now() < next) absl::SleepFor(absl::Milliseconds(20));
    if (!stopping_.load()) RebalanceNow().IgnoreError();
  }
}

void Rebalancer::RequestServed() {
  if (options_.every_requests <= 0) return;
  bool due;
  {
    absl::MutexLock lock(&mu_);
    due = ++served_since_ >= options_.every_requests;
    if (due) served_since_ = 0;
  }
  if (due) RebalanceNow().IgnoreError();
}

absl::StatusOr<int64_t> Rebalancer::RebalanceNow() {
  std::map<int32_t, v1::RebalanceOrder> orders;
  absl::StatusOr<int64_t> n = PlanOrders(&orders);
  if (!n.ok()) return n.status();
  // Sent without the locks (a send may wait for a connection).
  for (const auto& [instance, order] : orders) send_(instance, order);
  return *n;
}

absl::StatusOr<int64_t> Rebalancer::PlanOrders(std::map<int32_t, v1::RebalanceOrder>* orders) {
  absl::MutexLock lake_lock(&lake_->mu);
  absl::StatusOr<lake::RebalanceResult> r = lake_->lake->Rebalance();
  if (!r.ok()) return r.status();
  const std::vector<bool> routable_set = membership_->RoutableSet();
  auto routable = [&](int32_t i) {
    return i >= 0 && i < static_cast<int32_t>(routable_set.size()) &&
           routable_set[static_cast<size_t>(i)];
  };
  const absl::Time now = absl::Now();
  absl::flat_hash_set<int32_t> not_routable;
  for (const balance::BalanceAction& a : r->actions) {
    const int32_t from = InstanceToWire(a.from), to = InstanceToWire(a.to);
    v1::RebalanceAction* x = nullptr;
    switch (a.kind) {
      case balance::ActionKind::kDrop:
        actions_.fetch_add(1, std::memory_order_relaxed);
        break;
      case balance::ActionKind::kReplicate:
      case balance::ActionKind::kMove:
        if (!routable(from) || !routable(to)) {
          if (!routable(to)) not_routable.insert(to);
          break;
        }
        x = (*orders)[to].add_actions();
        x->set_kind(a.kind == balance::ActionKind::kReplicate ? v1::REBALANCE_KIND_REPLICATE
                                                              : v1::REBALANCE_KIND_MOVE);
        reconciler_->AddFresh(a.segment.value(), to, from, now);
        break;
    }
    if (x == nullptr) continue;
    x->set_segment(a.segment.value());
    x->set_from(from);
    x->set_to(to);
    x->set_sequence(r->sequence);
    actions_.fetch_add(1, std::memory_order_relaxed);
  }
  // The lake may have placed copies on an instance that is not running: take them back.
  for (int32_t i : not_routable) {
    if (i >= 0 && i < membership_->num_instances()) {
      lake_->lake->DropInstance(InstanceId(i)).IgnoreError();
    }
  }
  return static_cast<int64_t>(r->actions.size());
}

}  // namespace tokenlake::service
