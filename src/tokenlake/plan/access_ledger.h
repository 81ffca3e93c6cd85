// AccessLedger: the cache access of the plans in force, per instance.
//
// The paper balances each instance's cache access: the cached tokens attended there per
// iteration. A plan's access is, for every holder of every request, the cached tokens it serves
// (HolderPlan::cached_tokens); a pulled holder's tokens are attended on the computing instance.
// A plan is in force from the moment it is made until the request's next plan replaces it or
// the request ends (Erase): a decode's plan serves every one of its iterations. The planner
// reads the ledger's per-instance sums (balance::InstanceState::access_tokens) to spread the
// reads of segments with several replicas, which a call that plans one request at a time
// could not do from that call's own work alone.
//
// Invariants (checked by CheckIntegrity): per instance, the sum equals the sum of the
// entries' shares there; every share is > 0; each request has at most one entry.
//
// Thread-safety: not thread-safe (the Lake holds it under its mutex).
#ifndef TOKENLAKE_PLAN_ACCESS_LEDGER_H_
#define TOKENLAKE_PLAN_ACCESS_LEDGER_H_

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/types/span.h"
#include "tokenlake/base/ids.h"
#include "tokenlake/plan/plan_types.h"

namespace tokenlake::plan {

class AccessLedger {
 public:
  // (instance, tokens attended there per iteration) of one request's plan.
  using Shares = absl::InlinedVector<std::pair<InstanceId, int64_t>, 4>;

  // REQUIRES: num_instances >= 1.
  explicit AccessLedger(int32_t num_instances);

  // The access of `plan` (file comment): its holders' tokens, a pulled holder's counted on the
  // computing instance, several holders on one instance summed.
  static Shares SharesOf(const RequestPlan& plan);

  // Replaces the request's entry with `shares` (instances in [0, num_instances), tokens >= 0;
  // zero shares are dropped; an instance may repeat, its shares add up). Empty = Erase.
  // Errors: InvalidArgument for an instance outside the pool or negative tokens (nothing
  // changes).
  absl::Status Set(RequestId request, absl::Span<const std::pair<InstanceId, int64_t>> shares);
  // Forgets the request's entry (nothing when it has none).
  void Erase(RequestId request);
  // Forgets every entry whose request `keep` rejects.
  template <typename Pred>
  void EraseUnless(Pred keep) {
    std::vector<RequestId> gone;
    for (const auto& [request, shares] : entries_) {
      if (!keep(request)) gone.push_back(request);
    }
    for (RequestId r : gone) Erase(r);
  }
  // Drops every share on `instance` (it left the pool: nothing is read there any more).
  void DropInstance(InstanceId instance);

  // Tokens attended per iteration on `instance` by the plans in force (0 outside the pool).
  int64_t tokens(InstanceId instance) const;
  // The request's share on `instance` (0 when none).
  int64_t Share(RequestId request, InstanceId instance) const;
  int64_t num_requests() const { return static_cast<int64_t>(entries_.size()); }
  int32_t num_instances() const { return static_cast<int32_t>(per_instance_.size()); }

  // Internal (recomputes the sums from the entries).
  absl::Status CheckIntegrity() const;

 private:
  bool InPool(InstanceId instance) const {
    return instance.valid() && instance.value() >= 0 && instance.value() < num_instances();
  }

  std::vector<int64_t> per_instance_;
  absl::flat_hash_map<RequestId, Shares> entries_;
};

}  // namespace tokenlake::plan

#endif  // TOKENLAKE_PLAN_ACCESS_LEDGER_H_
