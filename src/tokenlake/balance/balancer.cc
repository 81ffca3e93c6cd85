#include "tokenlake/balance/balancer.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_format.h"

namespace tokenlake::balance {

const char* ActionKindName(ActionKind kind) {
  switch (kind) {
    case ActionKind::kDrop:
      return "drop";
    case ActionKind::kReplicate:
      return "replicate";
    case ActionKind::kMove:
      return "move";
  }
  return "unknown";
}

std::string ToString(const BalanceAction& a) {
  return absl::StrFormat("%s(segment=%d from=%d to=%d)", ActionKindName(a.kind), a.segment.value(),
                         a.from.value(), a.to.value());
}

absl::StatusOr<std::unique_ptr<Balancer>> Balancer::Create(const BalancerOptions& options) {
  if (!(options.memory_slack >= 0)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("BalancerOptions.memory_slack must be >= 0, got %g", options.memory_slack));
  }
  if (!(options.memory_high_watermark >= 0) || options.memory_high_watermark > 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("BalancerOptions.memory_high_watermark must be in [0, 1], got %g",
                        options.memory_high_watermark));
  }
  if (!(options.load_slack >= 0)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("BalancerOptions.load_slack must be >= 0, got %g", options.load_slack));
  }
  if (!(options.imbalance_threshold >= 0)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "BalancerOptions.imbalance_threshold must be >= 0, got %g", options.imbalance_threshold));
  }
  if (options.max_actions < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("BalancerOptions.max_actions must be >= 1, got %d", options.max_actions));
  }
  return std::unique_ptr<Balancer>(new Balancer(options));
}

namespace {

double Utilisation(const InstanceState& s) {
  return s.capacity_slots > 0 ? static_cast<double>(s.used_slots) / s.capacity_slots : 1.0;
}
bool HasFree(const InstanceState& s) { return s.used_slots < s.capacity_slots; }

}  // namespace

absl::StatusOr<std::optional<InstanceId>> Balancer::PlaceNewSegment(
    InstanceId producer, absl::Span<const InstanceState> instances) const {
  const InstanceState* prod = nullptr;
  double mean_util = 0, mean_load = 0;
  for (const InstanceState& s : instances) {
    if (s.capacity_slots < 0 || s.used_slots < 0 || s.used_slots > s.capacity_slots) {
      return absl::InvalidArgumentError(
          absl::StrFormat("PlaceNewSegment: instance %d has used_slots=%d capacity_slots=%d",
                          s.id.value(), s.used_slots, s.capacity_slots));
    }
    if (s.id == producer) prod = &s;
    mean_util += Utilisation(s);
    mean_load += s.load;
  }
  if (prod == nullptr) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PlaceNewSegment: producer instance %d is not in the pool", producer.value()));
  }
  mean_util /= instances.size();
  mean_load /= instances.size();
  const bool memory_ok = Utilisation(*prod) < options_.memory_high_watermark ||
                         Utilisation(*prod) <= mean_util + options_.memory_slack + 1e-12;
  if (HasFree(*prod) && memory_ok && prod->load <= mean_load * (1 + options_.load_slack) + 1e-12) {
    return std::optional<InstanceId>(producer);
  }
  // Otherwise the instance with a free slot that minimises (utilisation, load share, id).
  const InstanceState* best = nullptr;
  double best_score = std::numeric_limits<double>::infinity();
  for (const InstanceState& s : instances) {
    if (!HasFree(s)) continue;
    const double load_share = mean_load > 0 ? s.load / mean_load : 0.0;
    const double score = Utilisation(s) + 0.5 * load_share * options_.memory_slack;
    if (best == nullptr || score < best_score - 1e-12 ||
        (std::abs(score - best_score) <= 1e-12 && s.id == producer)) {
      best = &s;
      best_score = score;
    }
  }
  if (best == nullptr) return std::optional<InstanceId>();
  return std::optional<InstanceId>(best->id);
}

bool Balancer::PrefersProducer(InstanceId producer,
                               absl::Span<const InstanceState> instances) const {
  const InstanceState* prod = nullptr;
  double mean_util = 0, mean_load = 0;
  for (const InstanceState& s : instances) {
    if (s.capacity_slots < 0 || s.used_slots < 0 || s.used_slots > s.capacity_slots) return false;
    if (s.id == producer) prod = &s;
    mean_util += Utilisation(s);
    mean_load += s.load;
  }
  if (prod == nullptr) return false;
  mean_util /= instances.size();
  mean_load /= instances.size();
  const bool memory_ok = Utilisation(*prod) < options_.memory_high_watermark ||
                         Utilisation(*prod) <= mean_util + options_.memory_slack + 1e-12;
  return memory_ok && prod->load <= mean_load * (1 + options_.load_slack) + 1e-12;
}

std::vector<BalanceAction> Balancer::Rebalance(absl::Span<const SegmentState> segments,
                                               absl::Span<const InstanceState> instances) const {
  std::vector<BalanceAction> actions;
  if (instances.empty()) return actions;
  std::vector<InstanceState> inst(instances.begin(), instances.end());
  absl::flat_hash_map<InstanceId, size_t> index;
  for (size_t i = 0; i < inst.size(); ++i) index[inst[i].id] = i;
  std::vector<SegmentState> segs(segments.begin(), segments.end());
  auto full = [&] { return static_cast<int32_t>(actions.size()) >= options_.max_actions; };

  // Phase 1: drop extra replicas, coolest (lowest load per replica) first.
  std::vector<size_t> order(segs.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const double la = segs[a].load / std::max<size_t>(1, segs[a].replicas.size());
    const double lb = segs[b].load / std::max<size_t>(1, segs[b].replicas.size());
    if (la != lb) return la < lb;
    return segs[a].segment < segs[b].segment;
  });
  for (size_t k : order) {
    SegmentState& s = segs[k];
    const int32_t desired = std::max<int32_t>(1, s.desired_replicas);
    if (s.pinned) continue;
    while (static_cast<int32_t>(s.replicas.size()) > desired && !full()) {
      // Drop from the most loaded holder (ties: most used, then highest id).
      size_t worst = 0;
      for (size_t r = 1; r < s.replicas.size(); ++r) {
        const InstanceState& a = inst[index[s.replicas[r]]];
        const InstanceState& b = inst[index[s.replicas[worst]]];
        if (std::tie(a.load, a.used_slots, a.id) > std::tie(b.load, b.used_slots, b.id)) worst = r;
      }
      const double before = s.load / s.replicas.size();
      const double after = s.load / (s.replicas.size() - 1);
      InstanceState& from = inst[index[s.replicas[worst]]];
      from.load -= before;
      from.used_slots -= 1;
      s.replicas.erase(s.replicas.begin() + worst);
      for (InstanceId r : s.replicas) inst[index[r]].load += after - before;
      actions.push_back({ActionKind::kDrop, s.segment, from.id, InstanceId()});
    }
  }

  // Phase 2: replicate heavy hitters that lack replicas, hottest first.
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    if (segs[a].load != segs[b].load) return segs[a].load > segs[b].load;
    return segs[a].segment < segs[b].segment;
  });
  for (size_t k : order) {
    SegmentState& s = segs[k];
    if (s.replicas.empty()) continue;
    const int32_t desired =
        std::min<int32_t>(std::max<int32_t>(1, s.desired_replicas), inst.size());
    while (static_cast<int32_t>(s.replicas.size()) < desired && !full()) {
      InstanceState* target = nullptr;
      for (InstanceState& c : inst) {
        if (!HasFree(c)) continue;
        if (std::find(s.replicas.begin(), s.replicas.end(), c.id) != s.replicas.end()) continue;
        if (target == nullptr || std::tie(c.load, c.used_slots, c.id) <
                                     std::tie(target->load, target->used_slots, target->id)) {
          target = &c;
        }
      }
      if (target == nullptr) break;
      // Copy from the least loaded current holder.
      InstanceId source = s.replicas[0];
      for (InstanceId r : s.replicas) {
        if (inst[index[r]].load < inst[index[source]].load) source = r;
      }
      const double before = s.load / s.replicas.size();
      const double after = s.load / (s.replicas.size() + 1);
      for (InstanceId r : s.replicas) inst[index[r]].load += after - before;
      target->load += after;
      target->used_slots += 1;
      s.replicas.push_back(target->id);
      actions.push_back({ActionKind::kReplicate, s.segment, source, target->id});
    }
  }

  // Phase 3: moves while the load is imbalanced.
  while (!full()) {
    double mean = 0;
    for (const InstanceState& c : inst) mean += c.load;
    mean /= inst.size();
    InstanceState* hi = &inst[0];
    InstanceState* lo = nullptr;
    for (InstanceState& c : inst) {
      if (std::tie(c.load, c.id) > std::tie(hi->load, hi->id)) hi = &c;
      if (HasFree(c) && (lo == nullptr || std::tie(c.load, c.id) < std::tie(lo->load, lo->id))) {
        lo = &c;
      }
    }
    if (lo == nullptr || lo == hi || mean <= 0) break;
    if (!(hi->load > mean * (1 + options_.imbalance_threshold))) break;
    const double gap = hi->load - lo->load;
    // An unpinned segment moves (hi loses its share, lo gains it); a pinned one, which cannot
    // move while requests read it, is replicated (hi's share shrinks from load/r to
    // load/(r + 1), and lo carries load/(r + 1)).
    SegmentState* best = nullptr;
    bool best_replicates = false;
    double best_dist = std::numeric_limits<double>::infinity();
    for (size_t k : order) {
      SegmentState& s = segs[k];
      if (s.replicas.empty()) continue;
      if (std::find(s.replicas.begin(), s.replicas.end(), hi->id) == s.replicas.end()) continue;
      if (std::find(s.replicas.begin(), s.replicas.end(), lo->id) != s.replicas.end()) continue;
      const double r = static_cast<double>(s.replicas.size());
      const double shed = s.pinned ? s.load / r - s.load / (r + 1) : s.load / r;
      const double gain = s.pinned ? s.load / (r + 1) : shed;
      if (!(shed > 0) || !(gain < gap)) continue;  // must lower the maximum
      const double dist = std::abs(shed - gap / 2);
      if (dist < best_dist) {
        best = &s;
        best_replicates = s.pinned;
        best_dist = dist;
      }
    }
    if (best == nullptr) break;
    const double r = static_cast<double>(best->replicas.size());
    if (best_replicates) {
      for (InstanceId holder : best->replicas) {
        for (InstanceState& c : inst) {
          if (c.id == holder) c.load -= best->load / r - best->load / (r + 1);
        }
      }
      lo->load += best->load / (r + 1);
      lo->used_slots += 1;
      best->replicas.push_back(lo->id);
      actions.push_back({ActionKind::kReplicate, best->segment, hi->id, lo->id});
      continue;
    }
    const double share = best->load / r;
    hi->load -= share;
    hi->used_slots -= 1;
    lo->load += share;
    lo->used_slots += 1;
    std::replace(best->replicas.begin(), best->replicas.end(), hi->id, lo->id);
    actions.push_back({ActionKind::kMove, best->segment, hi->id, lo->id});
  }
  return actions;
}

std::optional<BalanceAction> Balancer::PickExtraReplicaToEvict(
    absl::Span<const SegmentState> segments, absl::Span<const InstanceState> instances,
    InstanceId only_on) const {
  absl::flat_hash_map<InstanceId, const InstanceState*> index;
  for (const InstanceState& s : instances) index[s.id] = &s;
  const SegmentState* best = nullptr;
  double best_share = 0;
  for (const SegmentState& s : segments) {
    if (s.pinned) continue;
    if (static_cast<int32_t>(s.replicas.size()) <= std::max<int32_t>(1, s.desired_replicas)) {
      continue;
    }
    if (only_on.valid() &&
        std::find(s.replicas.begin(), s.replicas.end(), only_on) == s.replicas.end()) {
      continue;
    }
    const double share = s.load / s.replicas.size();
    if (best == nullptr || share < best_share ||
        (share == best_share && s.segment < best->segment)) {
      best = &s;
      best_share = share;
    }
  }
  if (best == nullptr) return std::nullopt;
  InstanceId victim = only_on;
  if (!victim.valid()) {
    const InstanceState* worst = nullptr;
    for (InstanceId r : best->replicas) {
      auto it = index.find(r);
      if (it == index.end()) continue;
      const InstanceState* c = it->second;
      if (worst == nullptr) {
        worst = c;
        continue;
      }
      const double uc = Utilisation(*c), uw = Utilisation(*worst);
      if (std::tie(uc, c->load, c->id) > std::tie(uw, worst->load, worst->id)) worst = c;
    }
    victim = worst != nullptr ? worst->id : best->replicas.back();
  }
  return BalanceAction{ActionKind::kDrop, best->segment, victim, InstanceId()};
}

}  // namespace tokenlake::balance
