#include "tokenlake/plan/access_ledger.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"

namespace tokenlake::plan {
namespace {

// Adds `tokens` to `where`'s share, appending it when it has none.
void AddShare(AccessLedger::Shares& shares, InstanceId where, int64_t tokens) {
  auto it =
      std::find_if(shares.begin(), shares.end(), [&](const auto& s) { return s.first == where; });
  if (it == shares.end()) {
    shares.emplace_back(where, tokens);
  } else {
    it->second += tokens;
  }
}

}  // namespace

AccessLedger::AccessLedger(int32_t num_instances) {
  TOKENLAKE_CHECK(num_instances >= 1);
  per_instance_.assign(static_cast<size_t>(num_instances), 0);
}

AccessLedger::Shares AccessLedger::SharesOf(const RequestPlan& plan) {
  Shares shares;
  for (const HolderPlan& h : plan.holders) {
    if (h.cached_tokens <= 0) continue;
    AddShare(shares, h.action == HolderAction::kPullKv ? plan.compute_instance : h.holder,
             h.cached_tokens);
  }
  return shares;
}

absl::Status AccessLedger::Set(RequestId request,
                               absl::Span<const std::pair<InstanceId, int64_t>> shares) {
  Shares merged;
  for (const std::pair<InstanceId, int64_t>& share : shares) {
    const InstanceId instance = share.first;
    const int64_t tokens = share.second;
    if (!InPool(instance)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("AccessLedger::Set: request %d names instance %d outside [0, %d)",
                          request.value(), instance.value(), num_instances()));
    }
    if (tokens < 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("AccessLedger::Set: request %d has %d tokens on instance %d",
                          request.value(), tokens, instance.value()));
    }
    if (tokens > 0) AddShare(merged, instance, tokens);
  }
  Erase(request);
  if (merged.empty()) return absl::OkStatus();
  for (const auto& [instance, tokens] : merged) per_instance_[instance.value()] += tokens;
  entries_.emplace(request, std::move(merged));
  return absl::OkStatus();
}

void AccessLedger::Erase(RequestId request) {
  auto it = entries_.find(request);
  if (it == entries_.end()) return;
  for (const auto& [instance, tokens] : it->second) per_instance_[instance.value()] -= tokens;
  entries_.erase(it);
}

void AccessLedger::DropInstance(InstanceId instance) {
  if (!InPool(instance)) return;
  std::vector<RequestId> emptied;
  for (auto& [request, shares] : entries_) {
    shares.erase(std::remove_if(shares.begin(), shares.end(),
                                [&](const auto& s) { return s.first == instance; }),
                 shares.end());
    if (shares.empty()) emptied.push_back(request);
  }
  for (RequestId r : emptied) entries_.erase(r);
  per_instance_[instance.value()] = 0;
}

int64_t AccessLedger::tokens(InstanceId instance) const {
  if (!InPool(instance)) return 0;
  return per_instance_[instance.value()];
}

int64_t AccessLedger::Share(RequestId request, InstanceId instance) const {
  auto it = entries_.find(request);
  if (it == entries_.end()) return 0;
  for (const auto& [where, tokens] : it->second) {
    if (where == instance) return tokens;
  }
  return 0;
}

absl::Status AccessLedger::CheckIntegrity() const {
  std::vector<int64_t> sums(per_instance_.size(), 0);
  for (const auto& [request, shares] : entries_) {
    if (shares.empty()) {
      return absl::InternalError(
          absl::StrFormat("AccessLedger: request %d has an empty entry", request.value()));
    }
    for (size_t i = 0; i < shares.size(); ++i) {
      const auto& [instance, tokens] = shares[i];
      if (tokens <= 0) {
        return absl::InternalError(
            absl::StrFormat("AccessLedger: request %d has %d tokens on instance %d",
                            request.value(), tokens, instance.value()));
      }
      for (size_t j = 0; j < i; ++j) {
        if (shares[j].first == instance) {
          return absl::InternalError(
              absl::StrFormat("AccessLedger: request %d lists instance %d twice", request.value(),
                              instance.value()));
        }
      }
      sums[instance.value()] += tokens;
    }
  }
  for (size_t i = 0; i < sums.size(); ++i) {
    if (sums[i] != per_instance_[i]) {
      return absl::InternalError(absl::StrFormat(
          "AccessLedger: instance %d sums to %d, entries say %d", i, per_instance_[i], sums[i]));
    }
  }
  return absl::OkStatus();
}

}  // namespace tokenlake::plan
