#include "tokenlake/service/reconciler.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"
#include "tokenlake/service/lake_rpc.h"

namespace tokenlake::service {
namespace {

// How long an unconfirmed rebalance copy is remembered.
constexpr absl::Duration kFreshFor = absl::Seconds(10);

store::SegmentChange FromProto(const v1::SegmentChange& c) {
  return store::SegmentChange{.id = SegmentId(c.segment().id()),
                              .stored = !c.freed(),
                              .parent = SegmentId(c.segment().parent()),
                              .num_tokens = c.segment().num_tokens()};
}

}  // namespace

Reconciler::TimedLakeLock::TimedLakeLock(absl::Mutex* mu, Reconciler* reconciler)
    : mu_(mu), reconciler_(reconciler) {
  mu_->Lock();
  start_ = std::chrono::steady_clock::now();
}

Reconciler::TimedLakeLock::~TimedLakeLock() {
  const double held_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  mu_->Unlock();
  reconciler_->lock_holds_.Observe(held_s);
  absl::MutexLock lock(&reconciler_->mu_);
  reconciler_->stats_.longest_lock_hold_s =
      std::max(reconciler_->stats_.longest_lock_hold_s, held_s);
}

Reconciler::Reconciler(GuardedLake* lake, const Options& options) : lake_(lake), options_(options) {
  TOKENLAKE_CHECK(options.num_instances >= 1 && options.batch >= 1);
  for (int32_t i = 0; i < options.num_instances; ++i) {
    instances_.push_back(std::make_unique<Instance>());
  }
}

bool Reconciler::Listed(SegmentId segment, InstanceId instance) const {
  const index::PrefixTree::Node* node = lake_->lake->prefix_tree().Find(segment);
  return node != nullptr && node->HasReplicaOn(instance);
}

void Reconciler::OnLakeChange(SegmentId segment, InstanceId instance, bool added) {
  lake_->mu.AssertHeld();
  if (!instance.valid() || instance.value() < 0 || instance.value() >= options_.num_instances) {
    return;
  }
  Instance& in = *instances_[static_cast<size_t>(instance.value())];
  const bool held = in.held.contains(segment);
  if (added) {
    if (held) {
      in.unlisted.erase(segment);
      in.pending_restore.erase(segment);
    } else {
      in.missing.try_emplace(segment, 0);
    }
  } else if (held) {
    in.unlisted.insert(segment);
  } else {
    in.missing.erase(segment);
  }
}

void Reconciler::ApplyChange(Instance& in, InstanceId id, const store::SegmentChange& change) {
  const bool listed = Listed(change.id, id);
  if (change.stored) {
    in.held[change.id] = Held{.parent = change.parent, .num_tokens = change.num_tokens};
    if (listed) {
      in.missing.erase(change.id);
    } else {
      in.unlisted.insert(change.id);
    }
    return;
  }
  in.held.erase(change.id);
  in.unlisted.erase(change.id);
  in.pending_restore.erase(change.id);
  if (listed) in.missing.try_emplace(change.id, 0);
}

void Reconciler::ApplyChanges(Instance& in, InstanceId id,
                              const std::vector<store::SegmentChange>& changes,
                              uint64_t incarnation, uint64_t seq) {
  const size_t batch = static_cast<size_t>(options_.batch);
  size_t next = 0;
  while (true) {
    TimedLakeLock lake_lock(&lake_->mu, this);
    const size_t end = std::min(changes.size(), next + batch);
    for (; next < end; ++next) ApplyChange(in, id, changes[next]);
    if (next == changes.size()) {
      in.known = true;
      in.incarnation = incarnation;
      in.seq = seq;
      break;
    }
  }
  absl::MutexLock lock(&mu_);
  stats_.changes_applied += static_cast<int64_t>(changes.size());
}

absl::StatusOr<Reconciler::Outcome> Reconciler::Report(int32_t id, const v1::InstanceState& state,
                                                       bool registration, absl::Time now) {
  if (id < 0 || id >= options_.num_instances) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "holdings report of instance %d: not in [0, %d)", id, options_.num_instances));
  }
  Instance& in = *instances_[static_cast<size_t>(id)];
  const InstanceId inst(id);
  absl::MutexLock report_lock(&in.report_mu);
  Outcome out;
  const uint64_t incarnation = state.holdings_incarnation();
  std::vector<store::SegmentChange> changes;
  uint64_t seq = 0;
  // The view is stable while report_mu is held (every writer holds it).
  if (state.has_holdings_changes()) {
    const v1::HoldingsChanges& hc = state.holdings_changes();
    if (registration) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "instance %d registered with holdings changes; a registration carries everything it "
          "holds",
          id));
    }
    if (state.segments_size() > 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("instance %d reported both a segment list and holdings changes", id));
    }
    if (hc.to_seq() < hc.from_seq() ||
        hc.to_seq() - hc.from_seq() != static_cast<uint64_t>(hc.changes_size())) {
      return absl::InvalidArgumentError(
          absl::StrFormat("instance %d: holdings changes (%d, %d] carry %d changes", id,
                          hc.from_seq(), hc.to_seq(), hc.changes_size()));
    }
    if (!in.known || incarnation != in.incarnation || hc.from_seq() > in.seq) {
      absl::MutexLock lock(&mu_);
      ++stats_.gaps;
      out.full_wanted = true;
      return out;
    }
    if (hc.to_seq() < in.seq) {
      absl::MutexLock lock(&mu_);
      ++stats_.late_reports;
      out.acked_seq = in.seq;
      return out;
    }
    for (int k = static_cast<int>(in.seq - hc.from_seq()); k < hc.changes_size(); ++k) {
      changes.push_back(FromProto(hc.changes(k)));
    }
    seq = hc.to_seq();
    absl::MutexLock lock(&mu_);
    ++stats_.change_reports;
  } else {
    if (!registration && in.known && incarnation != 0 && incarnation == in.incarnation &&
        state.holdings_seq() < in.seq) {
      absl::MutexLock lock(&mu_);
      ++stats_.late_reports;
      out.acked_seq = in.seq;
      return out;
    }
    // A full report: its difference from the view, found without the lake's lock.
    absl::flat_hash_map<SegmentId, Held> reported;
    reported.reserve(static_cast<size_t>(state.segments_size()));
    for (const v1::Segment& s : state.segments()) {
      reported[SegmentId(s.id())] =
          Held{.parent = SegmentId(s.parent()), .num_tokens = s.num_tokens()};
    }
    for (const auto& [seg, h] : in.held) {
      if (!reported.contains(seg)) changes.push_back({.id = seg, .stored = false});
    }
    for (const auto& [seg, h] : reported) {
      auto it = in.held.find(seg);
      if (it == in.held.end() || it->second.parent != h.parent ||
          it->second.num_tokens != h.num_tokens) {
        changes.push_back(
            {.id = seg, .stored = true, .parent = h.parent, .num_tokens = h.num_tokens});
      }
    }
    seq = state.holdings_seq();
    absl::MutexLock lock(&mu_);
    ++stats_.full_reports;
  }
  if (registration) {
    // A new incarnation: what its predecessor missed or left to restore is forgotten (the
    // listed copies it does not hold stay missing, counted afresh).
    TimedLakeLock lake_lock(&lake_->mu, this);
    in.known = false;
    in.pending_restore.clear();
    for (auto& [seg, misses] : in.missing) misses = 0;
  }
  ApplyChanges(in, inst, changes, incarnation, seq);
  out.acked_seq = seq;
  if (registration) {
    std::vector<SegmentId> unlisted;
    {
      TimedLakeLock lake_lock(&lake_->mu, this);
      unlisted.assign(in.unlisted.begin(), in.unlisted.end());
    }
    Restore(in, inst, std::move(unlisted), now - options_.started < options_.restore_window,
            &out.to_free);
  } else {
    Reconcile(in, inst, now, &out.to_free);
  }
  absl::MutexLock lock(&mu_);
  stats_.frees += static_cast<int64_t>(out.to_free.size());
  return out;
}

void Reconciler::Restore(Instance& in, InstanceId id, std::vector<SegmentId> segments,
                         bool in_window, std::vector<uint64_t>* to_free) {
  if (segments.empty()) return;
  // Parents first: each segment's depth among `segments` (the chain of its parents there),
  // from the view's parents (stable under report_mu), so that every batch's parents are in the
  // tree or in the batch.
  const absl::flat_hash_set<SegmentId> set(segments.begin(), segments.end());
  absl::flat_hash_map<SegmentId, int32_t> depth;
  std::vector<SegmentId> path;
  for (SegmentId s : segments) {
    path.clear();
    SegmentId cur = s;
    int32_t base = 0;
    while (true) {
      if (auto d = depth.find(cur); d != depth.end()) {
        base = d->second + 1;
        break;
      }
      path.push_back(cur);
      auto h = in.held.find(cur);
      // A cycle of parents (a broken report) ends at the path's length.
      if (h == in.held.end() || !set.contains(h->second.parent) || path.size() > segments.size()) {
        break;
      }
      cur = h->second.parent;
    }
    for (auto it = path.rbegin(); it != path.rend(); ++it) depth.try_emplace(*it, base++);
  }
  std::vector<std::pair<int32_t, SegmentId>> order;
  order.reserve(segments.size());
  for (SegmentId s : segments) order.emplace_back(depth[s], s);
  std::sort(order.begin(), order.end());
  for (size_t i = 0; i < order.size(); ++i) segments[i] = order[i].second;
  const size_t batch = static_cast<size_t>(options_.batch);
  int64_t restored = 0;
  for (size_t next = 0; next < segments.size();) {
    TimedLakeLock lake_lock(&lake_->mu, this);
    std::vector<lake::HeldSegment> held;
    const size_t end = std::min(segments.size(), next + batch);
    for (; next < end; ++next) {
      const SegmentId s = segments[next];
      auto h = in.held.find(s);
      // Listed or freed meanwhile: nothing to restore.
      if (!in.unlisted.contains(s) || h == in.held.end()) continue;
      held.push_back({.id = s, .parent = h->second.parent, .num_tokens = h->second.num_tokens});
    }
    absl::StatusOr<lake::RestoreResult> r = lake_->lake->RestoreReplicas(id, held);
    if (!r.ok()) continue;  // InvalidArgument: an instance outside the lake (checked before)
    restored += r->restored_replicas;
    for (SegmentId s : r->rejected) {
      if (in_window) {
        in.pending_restore.insert(s);  // retried on the next heartbeats
      } else {
        in.pending_restore.erase(s);
        to_free->push_back(s.value());
      }
    }
  }
  absl::MutexLock lock(&mu_);
  stats_.restored += restored;
}

void Reconciler::Reconcile(Instance& in, InstanceId id, absl::Time now,
                           std::vector<uint64_t>* to_free) {
  const bool in_window = now - options_.started < options_.restore_window;
  std::vector<SegmentId> retry, missing;
  {
    TimedLakeLock lake_lock(&lake_->mu, this);
    if (!in_window) in.pending_restore.clear();
    // Rebalance copies: confirmed once the receiver holds the segment (or the lake no longer
    // lists it there); while pending, the source keeps its copy (a move's source is no longer
    // listed, but plans read from it until the copy is confirmed).
    absl::flat_hash_set<SegmentId> protected_sources;
    {
      absl::MutexLock lock(&mu_);
      for (auto it = fresh_.begin(); it != fresh_.end();) {
        auto cur = it++;
        const SegmentId seg(cur->first.first);
        if (now - cur->second.since > kFreshFor) {
          fresh_.erase(cur);
        } else if (cur->first.second == id.value() && (in.held.contains(seg) || !Listed(seg, id))) {
          fresh_.erase(cur);
        } else if (cur->second.source == id.value()) {
          protected_sources.insert(seg);
        }
      }
    }
    // Unlisted copies are freed, but orphans are retried while the restore window lasts.
    for (SegmentId s : in.unlisted) {
      if (protected_sources.contains(s)) continue;
      if (in_window && in.pending_restore.contains(s)) {
        retry.push_back(s);
      } else {
        to_free->push_back(s.value());
      }
    }
    missing.reserve(in.missing.size());
    for (const auto& [s, misses] : in.missing) missing.push_back(s);
  }
  Restore(in, id, std::move(retry), in_window, to_free);
  const size_t batch = static_cast<size_t>(options_.batch);
  int64_t drops = 0;
  std::vector<SegmentId> lose;
  for (size_t next = 0; next < missing.size();) {
    TimedLakeLock lake_lock(&lake_->mu, this);
    const size_t end = std::min(missing.size(), next + batch);
    for (; next < end; ++next) {
      const SegmentId seg = missing[next];
      auto it = in.missing.find(seg);
      if (it == in.missing.end()) continue;  // held or unlisted meanwhile
      // Dropping the replica erases the entry (OnLakeChange).
      const int32_t misses = ++it->second;
      if (misses >= kMissesToDrop && lake_->lake->DropReplica(seg, id).ok()) {
        ++drops;
      } else if (misses >= kMissesToLose) {
        lose.push_back(seg);
      }
    }
  }
  // Losing a last copy walks the tree to find its subtree: one per hold of the lock.
  for (SegmentId seg : lose) {
    TimedLakeLock lake_lock(&lake_->mu, this);
    if (in.missing.contains(seg) && lake_->lake->LoseReplica(seg, id).ok()) ++drops;
  }
  absl::MutexLock lock(&mu_);
  stats_.drops += drops;
}

void Reconciler::AddFresh(uint64_t segment, int32_t to, int32_t from, absl::Time now) {
  absl::MutexLock lock(&mu_);
  fresh_[{segment, to}] = Fresh{.source = from, .since = now};
}

int64_t Reconciler::RedirectUnconfirmed(lake::IterationPlan* plan,
                                        const std::vector<bool>& routable) {
  auto is_routable = [&](int32_t i) {
    return i >= 0 && i < static_cast<int32_t>(routable.size()) && routable[static_cast<size_t>(i)];
  };
  absl::MutexLock lock(&mu_);
  if (fresh_.empty()) return 0;
  int64_t n = 0;
  for (plan::SegmentAssignment& a : plan->segments) {
    auto it = fresh_.find({a.segment.value(), InstanceToWire(a.holder)});
    if (it == fresh_.end() || !is_routable(it->second.source)) continue;
    a.holder = InstanceId(it->second.source);
    if (a.action == plan::HolderAction::kLocal) a.action = plan::HolderAction::kMoveQueries;
    ++n;
  }
  stats_.redirects += n;
  return n;
}

Reconciler::Stats Reconciler::stats() const {
  Stats s;
  {
    absl::MutexLock lock(&mu_);
    s = stats_;
  }
  s.lock_holds = lock_holds_.Read();
  return s;
}

Reconciler::View Reconciler::ViewOf(int32_t id) const {
  View v;
  if (id < 0 || id >= options_.num_instances) return v;
  const Instance& in = *instances_[static_cast<size_t>(id)];
  absl::MutexLock report_lock(&in.report_mu);
  absl::MutexLock lake_lock(&lake_->mu);
  v.known = in.known;
  v.incarnation = in.incarnation;
  v.seq = in.seq;
  for (const auto& [seg, h] : in.held) {
    v.held.push_back({.id = seg, .parent = h.parent, .num_tokens = h.num_tokens});
  }
  std::sort(v.held.begin(), v.held.end(),
            [](const lake::HeldSegment& a, const lake::HeldSegment& b) { return a.id < b.id; });
  v.unlisted.assign(in.unlisted.begin(), in.unlisted.end());
  std::sort(v.unlisted.begin(), v.unlisted.end());
  v.missing.assign(in.missing.begin(), in.missing.end());
  std::sort(v.missing.begin(), v.missing.end());
  return v;
}

}  // namespace tokenlake::service
