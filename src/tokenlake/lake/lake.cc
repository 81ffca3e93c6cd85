#include "tokenlake/lake/lake.h"

#include <algorithm>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"
#include "tokenlake/base/status_macros.h"

namespace tokenlake::lake {

namespace {

absl::Status Invalid(const std::string& message) { return absl::InvalidArgumentError(message); }

}  // namespace

absl::StatusOr<std::unique_ptr<Lake>> Lake::Create(const LakeOptions& options, Clock* clock) {
  if (clock == nullptr) return Invalid("LakeOptions: clock is null");
  if (options.num_instances < 1) {
    return Invalid(
        absl::StrFormat("LakeOptions.num_instances must be >= 1, got %d", options.num_instances));
  }
  if (options.segment_tokens < 1) {
    return Invalid(
        absl::StrFormat("LakeOptions.segment_tokens must be >= 1, got %d", options.segment_tokens));
  }
  if (options.instance_slots.empty()) {
    if (options.slots_per_instance < 1) {
      return Invalid(absl::StrFormat("LakeOptions.slots_per_instance must be >= 1, got %d",
                                     options.slots_per_instance));
    }
  } else {
    if (static_cast<int32_t>(options.instance_slots.size()) != options.num_instances) {
      return Invalid(
          absl::StrFormat("LakeOptions.instance_slots has %d entries, num_instances is %d",
                          options.instance_slots.size(), options.num_instances));
    }
    for (size_t i = 0; i < options.instance_slots.size(); ++i) {
      if (options.instance_slots[i] < 1) {
        return Invalid(absl::StrFormat("LakeOptions.instance_slots[%d] must be >= 1, got %d", i,
                                       options.instance_slots[i]));
      }
    }
  }
  if (!(options.local_eviction_min_age_ratio >= 0)) {
    return Invalid(absl::StrFormat("LakeOptions.local_eviction_min_age_ratio must be >= 0, got %g",
                                   options.local_eviction_min_age_ratio));
  }
  const HotRunOptions& hot = options.hot_runs;
  if (!(hot.access_margin >= 0)) {
    return Invalid(absl::StrFormat("LakeOptions.hot_runs.access_margin must be >= 0, got %g",
                                   hot.access_margin));
  }
  if (!(hot.min_access_share > 0 && hot.min_access_share <= 1)) {
    return Invalid(absl::StrFormat(
        "LakeOptions.hot_runs.min_access_share must be in (0, 1], got %g", hot.min_access_share));
  }
  if (!(hot.max_instance_share > 0 && hot.max_instance_share <= 1)) {
    return Invalid(
        absl::StrFormat("LakeOptions.hot_runs.max_instance_share must be in (0, 1], got %g",
                        hot.max_instance_share));
  }
  if (options.reserve_segments < 0) {
    return Invalid(absl::StrFormat("LakeOptions.reserve_segments must be >= 0, got %d",
                                   options.reserve_segments));
  }
  if (absl::Status s = options.model.Validate(); !s.ok()) {
    return Invalid(absl::StrFormat("LakeOptions.model: %s", s.message()));
  }
  std::unique_ptr<Lake> lake(new Lake(options, clock));
  // Nobody else sees the lake yet; the lock only tells the thread-safety analysis so.
  absl::MutexLock lock(&lake->mu_);

  index::PrefixTree::Options tree_options;
  tree_options.segment_tokens = options.segment_tokens;
  tree_options.num_instances = options.num_instances;
  tree_options.reserve_segments = options.reserve_segments;
  TOKENLAKE_ASSIGN_OR_RETURN(lake->tree_, index::PrefixTree::Create(tree_options));
  // Every change of the tree's copies runs under mu_ (the tree is only changed by the lake's
  // methods, which hold it).
  lake->tree_->SetReplicaObserver([l = lake.get()](SegmentId seg, InstanceId x, bool added) {
    l->mu_.AssertHeld();
    l->OnTreeReplicaChangeLocked(seg, x, added);
  });

  const int64_t slot_bytes = plan::KvBytes(options.model, options.segment_tokens);
  for (int32_t i = 0; i < options.num_instances; ++i) {
    store::SegmentStore::Options so;
    so.num_slots =
        options.instance_slots.empty() ? options.slots_per_instance : options.instance_slots[i];
    so.slot_bytes = static_cast<size_t>(slot_bytes);
    so.instance = InstanceId(i);
    TOKENLAKE_ASSIGN_OR_RETURN(auto store, store::SegmentStore::Create(so));
    lake->stores_.push_back(std::move(store));
    lake->total_slots_ += so.num_slots;
    lake->instance_load_.emplace_back(
        options.heavy_hitter.half_life_us > 0 ? options.heavy_hitter.half_life_us : 1);
  }
  balance::HeavyHitterOptions hh = options.heavy_hitter;
  hh.num_instances = options.num_instances;
  TOKENLAKE_ASSIGN_OR_RETURN(lake->tracker_, balance::HeavyHitterTracker::Create(hh, clock));
  TOKENLAKE_ASSIGN_OR_RETURN(lake->balancer_, balance::Balancer::Create(options.balancer));
  plan::PlannerOptions po = options.planner;
  po.shape = options.model;
  po.segment_tokens = options.segment_tokens;
  TOKENLAKE_ASSIGN_OR_RETURN(lake->planner_, plan::Planner::Create(po, lake->balancer_.get()));
  return lake;
}

Lake::Lake(const LakeOptions& options, Clock* clock)
    : options_(options), clock_(clock), access_(options.num_instances) {}

Lake::~Lake() = default;

// ---------------------------------------------------------------------------------------------
// Validation and views

absl::Status Lake::ValidateKeys(absl::Span<const index::SegmentKey> keys) const {
  for (size_t i = 0; i < keys.size(); ++i) {
    if (!keys[i].id.valid()) return Invalid(absl::StrFormat("key %d has an invalid segment id", i));
    if (keys[i].num_tokens < 1 || keys[i].num_tokens > options_.segment_tokens) {
      return Invalid(absl::StrFormat("key %d has num_tokens %d, not in [1, %d]", i,
                                     keys[i].num_tokens, options_.segment_tokens));
    }
    if (keys[i].num_tokens < options_.segment_tokens && i + 1 != keys.size()) {
      return Invalid(
          absl::StrFormat("key %d is a part-segment (%d tokens) but is not the last of %d keys", i,
                          keys[i].num_tokens, keys.size()));
    }
  }
  return absl::OkStatus();
}

absl::Status Lake::ValidateRequest(const LakeRequest& r) const {
  if (absl::Status s = ValidateKeys(r.keys); !s.ok()) {
    return Invalid(absl::StrFormat("request %d: %s", r.id.value(), s.message()));
  }
  if (r.new_tokens < 0) {
    return Invalid(
        absl::StrFormat("request %d: new_tokens must be >= 0, got %d", r.id.value(), r.new_tokens));
  }
  if (r.preferred_instance.valid() &&
      (r.preferred_instance.value() < 0 || r.preferred_instance.value() >= num_instances())) {
    return Invalid(absl::StrFormat("request %d: unknown preferred instance %d (pool has %d)",
                                   r.id.value(), r.preferred_instance.value(), num_instances()));
  }
  if (r.extra_slots < 0) {
    return Invalid(absl::StrFormat("request %d: extra_slots must be >= 0, got %d", r.id.value(),
                                   r.extra_slots));
  }
  if (r.tail_end_tokens < 0 ||
      (r.tail_end_tokens > 0 && (!r.tail_instance.valid() || r.tail_instance.value() < 0 ||
                                 r.tail_instance.value() >= num_instances()))) {
    return Invalid(absl::StrFormat(
        "request %d: tail_end_tokens %d must be >= 0, and a tail needs an instance of the pool "
        "(got %d, pool has %d)",
        r.id.value(), r.tail_end_tokens, r.tail_instance.valid() ? r.tail_instance.value() : -1,
        num_instances()));
  }
  return absl::OkStatus();
}

index::MatchResult Lake::Match(absl::Span<const index::SegmentKey> keys) const {
  absl::MutexLock lock(&mu_);
  return VisibleMatchLocked(keys);
}

const std::vector<balance::InstanceState>& Lake::InstanceStatesCache::Get() {
  if (!built_) {
    states_ = lake_->InstanceStatesLocked();
    seen_ = evicted_->size();
    built_ = true;
  }
  for (; seen_ < evicted_->size(); ++seen_) {
    states_[(*evicted_)[seen_].instance.value()].used_slots -= 1;
  }
  return states_;
}

void Lake::InstanceStatesCache::Allocated(InstanceId instance) {
  if (built_) states_[instance.value()].used_slots += 1;
}

void Lake::InstanceStatesCache::Freed(InstanceId instance) {
  if (built_) states_[instance.value()].used_slots -= 1;
}

std::vector<balance::InstanceState> Lake::InstanceStatesLocked() const {
  const int64_t now = clock_->NowUs();
  std::vector<balance::InstanceState> out;
  out.reserve(stores_.size());
  for (size_t i = 0; i < stores_.size(); ++i) {
    const InstanceId id(static_cast<int32_t>(i));
    out.push_back(balance::InstanceState{id, stores_[i]->capacity(), stores_[i]->used(),
                                         instance_load_[i].Value(now),
                                         static_cast<double>(access_.tokens(id))});
  }
  return out;
}

plan::PlanRequest Lake::ToPlanRequestLocked(const LakeRequest& r) const {
  plan::PlanRequest p;
  p.request = r.id;
  p.new_tokens = r.new_tokens;
  p.preferred_instance = r.preferred_instance;
  // Match first: it prefetches the chain's nodes, so the Find calls below hit the cache.
  const size_t n = static_cast<size_t>(VisibleMatchLocked(r.keys).matched_segments);
  p.cached.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const index::PrefixTree::Node* node = tree_->Find(r.keys[i].id);
    plan::CachedSegment& seg = p.cached[i];
    seg.segment = node->id;
    seg.num_tokens = node->num_tokens;
    if (node->replicas.size() == 1) {
      seg.replicas.push_back(node->replicas[0]);  // the common case, without the generic assign
    } else {
      seg.replicas.assign(node->replicas.begin(), node->replicas.end());
      // A visible segment may also have a pending copy (restored elsewhere): never a holder.
      if (auto it = pending_.find(node->id); it != pending_.end()) {
        const InstanceId gone = it->second.instance;
        seg.replicas.erase(std::remove(seg.replicas.begin(), seg.replicas.end(), gone),
                           seg.replicas.end());
      }
    }
  }
  p.new_segments.assign(r.keys.begin() + n, r.keys.end());
  return p;
}

absl::StatusOr<std::vector<plan::InstanceCacheLoad>> Lake::GetCacheLoad(
    absl::Span<const LakeRequest> requests) const {
  for (const LakeRequest& r : requests) TOKENLAKE_RETURN_IF_ERROR(ValidateRequest(r));
  absl::MutexLock lock(&mu_);
  std::vector<plan::PlanRequest> prs;
  prs.reserve(requests.size());
  for (const LakeRequest& r : requests) prs.push_back(ToPlanRequestLocked(r));
  return planner_->GetCacheLoad(prs, InstanceStatesLocked());
}

absl::StatusOr<double> Lake::GetCacheLoad(absl::Span<const LakeRequest> requests,
                                          const plan::InstanceRoofline& roofline,
                                          double batch_seconds) const {
  if (!(roofline.kv_bytes_per_s > 0) || !(roofline.attention_flops_per_s > 0)) {
    return Invalid(absl::StrFormat(
        "GetCacheLoad: roofline kv_bytes_per_s (%g) and attention_flops_per_s (%g) must be > 0",
        roofline.kv_bytes_per_s, roofline.attention_flops_per_s));
  }
  if (!(batch_seconds > 0)) {
    return Invalid(
        absl::StrFormat("GetCacheLoad: batch_seconds must be > 0, got %g", batch_seconds));
  }
  for (const LakeRequest& r : requests) TOKENLAKE_RETURN_IF_ERROR(ValidateRequest(r));
  absl::MutexLock lock(&mu_);
  plan::CacheAccess total;
  for (const LakeRequest& r : requests) {
    total += plan::CacheAccessOf(options_.model, VisibleMatchLocked(r.keys).matched_tokens,
                                 r.new_tokens);
  }
  return plan::CacheLoad(total, num_instances(), roofline, batch_seconds);
}

absl::StatusOr<std::vector<plan::BatchPlan>> Lake::GenPlans(absl::Span<const Batch> batches) {
  for (size_t b = 0; b < batches.size(); ++b) {
    if (batches[b].dop < 1 || batches[b].dop > num_instances()) {
      return Invalid(
          absl::StrFormat("batch %d: dop %d is outside [1, %d] (more instances than the pool has?)",
                          b, batches[b].dop, num_instances()));
    }
    for (const LakeRequest& r : batches[b].requests) {
      if (absl::Status s = ValidateRequest(r); !s.ok()) {
        return Invalid(absl::StrFormat("batch %d: %s", b, s.message()));
      }
    }
  }
  absl::MutexLock lock(&mu_);
  std::vector<plan::PlanBatch> pbs(batches.size());
  for (size_t b = 0; b < batches.size(); ++b) {
    pbs[b].dop = batches[b].dop;
    pbs[b].candidates = batches[b].candidates;
    pbs[b].requests.reserve(batches[b].requests.size());
    for (const LakeRequest& r : batches[b].requests) {
      pbs[b].requests.push_back(ToPlanRequestLocked(r));
    }
  }
  TOKENLAKE_ASSIGN_OR_RETURN(std::vector<plan::BatchPlan> plans,
                             planner_->GenPlans(pbs, PlanningStatesLocked(batches)));
  PlansInForceLocked(plans);
  for (const plan::BatchPlan& p : plans) {
    counters_.plan_query_bytes += p.transfer.query_bytes;
    counters_.plan_kv_pull_bytes += p.transfer.kv_pull_bytes;
    counters_.plan_new_segment_bytes += p.transfer.new_segment_bytes;
    counters_.plan_total_bytes += p.transfer.total_bytes;
  }
  return plans;
}

// ---------------------------------------------------------------------------------------------
// Request lifecycle

absl::StatusOr<AdmitResult> Lake::Admit(const LakeRequest& request) {
  if (!request.id.valid()) return Invalid("Admit: invalid request id");
  TOKENLAKE_RETURN_IF_ERROR(ValidateRequest(request));
  absl::MutexLock lock(&mu_);
  if (active_.contains(request.id)) {
    return absl::AlreadyExistsError(
        absl::StrFormat("Admit: request %d is already active", request.id.value()));
  }
  if (request.tail_end_tokens > 0) {
    // The tail's new blocks need slots that are neither pinned nor another tail's: refuse now
    // rather than stop half-way (evictions made for a refused admission would be lost).
    const index::MatchResult match = VisibleMatchLocked(request.keys);
    const int64_t growth = TailGrowthLocked(request, match.matched_tokens);
    const int64_t room = total_slots_ - pinned_replicas_ - tail_slots_ -
                         NewlyPinnedLocked(request.keys, match.matched_segments);
    if (growth > room) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "Admit: request %d: its KV tail needs %d more slots; %d of the pool's %d are neither "
          "pinned nor other requests' tails",
          request.id.value(), growth, room, total_slots_));
    }
    if (const int64_t domain_room = DomainRoomLocked(
            request.tail_instance,
            absl::MakeConstSpan(request.keys).first(static_cast<size_t>(match.matched_segments)),
            growth);
        growth > domain_room) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "Admit: request %d: its KV tail needs %d more slots on the device of instance %d; %d "
          "there are free or hold a copy that can go",
          request.id.value(), growth, request.tail_instance.value(), domain_room));
    }
  }
  return AdmitLocked(request, /*reserve_slots=*/0);
}

absl::StatusOr<std::optional<AdmitResult>> Lake::TryAdmit(const LakeRequest& request) {
  if (!request.id.valid()) return Invalid("TryAdmit: invalid request id");
  TOKENLAKE_RETURN_IF_ERROR(ValidateRequest(request));
  absl::MutexLock lock(&mu_);
  if (active_.contains(request.id)) {
    return absl::AlreadyExistsError(
        absl::StrFormat("TryAdmit: request %d is already active", request.id.value()));
  }
  const index::MatchResult match = VisibleMatchLocked(request.keys);
  const auto n = static_cast<size_t>(match.matched_segments);
  const bool tail = request.tail_end_tokens > 0;
  // A tail request's new segments are its tail's blocks: it counts the tail's growth instead.
  const int64_t new_segments =
      (tail ? 0 : static_cast<int64_t>(request.keys.size() - n)) + request.extra_slots;
  const int64_t tail_growth = tail ? TailGrowthLocked(request, match.matched_tokens) : 0;
  // Matched segments not pinned yet stop being evictable once this request pins them.
  const int64_t newly_pinned = NewlyPinnedLocked(request.keys, match.matched_segments);
  if (new_segments + tail_growth + newly_pinned > AvailableSlotsLocked() ||
      (tail_growth > 0 &&
       tail_growth > DomainRoomLocked(request.tail_instance,
                                      absl::MakeConstSpan(request.keys).first(n), tail_growth))) {
    counters_.admissions_deferred += 1;
    return std::optional<AdmitResult>();
  }
  TOKENLAKE_ASSIGN_OR_RETURN(AdmitResult result, AdmitLocked(request, new_segments));
  return std::optional<AdmitResult>(result);
}

absl::StatusOr<AdmitResult> Lake::AdmitLocked(const LakeRequest& request, int64_t reserve_slots) {
  const size_t n = static_cast<size_t>(VisibleMatchLocked(request.keys).matched_segments);
  Active a;
  a.new_tokens = request.new_tokens;
  a.matched.assign(request.keys.begin(), request.keys.begin() + n);
  a.pinned.reserve(n);
  AdmitResult result;
  result.matched_segments = static_cast<int32_t>(n);
  for (const index::SegmentKey& k : a.matched) {
    a.pinned.push_back(k.id);
    result.matched_tokens += k.num_tokens;
    PinOneLocked(k.id);
  }
  a.reserved_slots = reserve_slots;
  reserved_slots_ += reserve_slots;
  result.reserved_slots = reserve_slots;
  if (request.tail_end_tokens > 0) {
    // Checked by the callers (Admit, TryAdmit): there is room for the tail's growth.
    absl::Status tail = SetTailLocked(request.id, result.matched_tokens, request.tail_end_tokens,
                                      request.tail_instance, &result);
    if (!tail.ok()) {
      return absl::InternalError(
          absl::StrFormat("Admit: request %d: %s (the admission check found room)",
                          request.id.value(), tail.message()));
    }
  }
  if (request.count_hits) {
    counters_.admitted_requests += 1;
    for (const index::SegmentKey& k : request.keys) counters_.prompt_tokens += k.num_tokens;
    counters_.hit_tokens += result.matched_tokens;
  }
  active_.emplace(request.id, std::move(a));
  return result;
}

int64_t Lake::AvailableSlots() const {
  absl::MutexLock lock(&mu_);
  return AvailableSlotsLocked();
}

int64_t Lake::AvailableSlotsLocked() const {
  return total_slots_ - pinned_replicas_ - reserved_slots_ - tail_slots_;
}

int64_t Lake::NewlyPinnedLocked(absl::Span<const index::SegmentKey> keys,
                                int32_t matched_segments) const {
  int64_t newly_pinned = 0;
  for (int32_t i = 0; i < matched_segments; ++i) {
    const index::PrefixTree::Node* node = tree_->Find(keys[static_cast<size_t>(i)].id);
    if (!node->is_pinned()) newly_pinned += static_cast<int64_t>(node->replicas.size());
  }
  return newly_pinned;
}

void Lake::PinOneLocked(SegmentId segment) {
  TOKENLAKE_CHECK_OK(tree_->Pin({segment}));
  const index::PrefixTree::Node* node = tree_->Find(segment);
  if (node->pin_count == 1) pinned_replicas_ += static_cast<int64_t>(node->replicas.size());
}

void Lake::UnpinOneLocked(SegmentId segment) {
  TOKENLAKE_CHECK_OK(tree_->Unpin({segment}));
  const index::PrefixTree::Node* node = tree_->Find(segment);
  if (node->pin_count == 0) pinned_replicas_ -= static_cast<int64_t>(node->replicas.size());
}

int64_t Lake::CountPinnedReplicasLocked() const {
  int64_t count = 0;
  tree_->ForEachNode([&](const index::PrefixTree::Node& node) {
    if (node.is_pinned()) count += static_cast<int64_t>(node.replicas.size());
  });
  return count;
}

void Lake::RefreshReplicatedLocked(SegmentId segment) {
  const index::PrefixTree::Node* node = tree_->Find(segment);
  if (node != nullptr && node->replicas.size() >= 2) {
    replicated_.insert(segment);
  } else {
    replicated_.erase(segment);
  }
}

void Lake::OnReplicasFreedLocked(SegmentId segment, bool node_erased,
                                 absl::Span<const InstanceId> freed_on,
                                 std::vector<StoredReplica>* evicted) {
  for (InstanceId i : freed_on) {
    TOKENLAKE_CHECK_OK(stores_[i.value()]->Free(segment));
    if (evicted != nullptr) {
      evicted->push_back({segment, i});
      counters_.evicted_replicas += 1;
    }
  }
  if (node_erased) {
    tracker_->Forget(segment);
    replicated_.erase(segment);
    if (evicted != nullptr) counters_.evicted_segments += 1;
  } else {
    RefreshReplicatedLocked(segment);
  }
}

std::vector<balance::SegmentState> Lake::ReplicatedStatesLocked() const {
  std::vector<balance::SegmentState> out;
  out.reserve(replicated_.size());
  for (SegmentId s : replicated_) {
    const index::PrefixTree::Node* node = tree_->Find(s);
    if (node == nullptr || pending_.contains(s)) continue;  // a pending copy is not movable
    balance::SegmentState st;
    st.segment = s;
    st.load = tracker_->Load(s);
    st.desired_replicas = tracker_->DesiredReplicas(s, num_instances());
    st.replicas.assign(node->replicas.begin(), node->replicas.end());
    st.pinned = node->is_pinned();
    out.push_back(std::move(st));
  }
  // Deterministic order regardless of hash-set iteration.
  std::sort(out.begin(), out.end(),
            [](const auto& a, const auto& b) { return a.segment < b.segment; });
  return out;
}

bool Lake::EvictOneLocked(absl::Span<const balance::InstanceState> states,
                          std::vector<StoredReplica>* evicted) {
  const std::vector<balance::SegmentState> replicated = ReplicatedStatesLocked();
  if (!replicated.empty()) {
    const std::optional<balance::BalanceAction> pick =
        balancer_->PickExtraReplicaToEvict(replicated, states);
    if (pick.has_value()) {
      absl::StatusOr<index::EvictResult> r = tree_->RemoveReplica(pick->segment, pick->from);
      TOKENLAKE_CHECK_OK(r.status());
      OnReplicasFreedLocked(pick->segment, r->node_erased, r->freed_on, evicted);
      return true;
    }
  }
  const std::optional<SegmentId> leaf = tree_->LruEvictableLeaf();
  if (!leaf.has_value()) return false;
  absl::StatusOr<index::EvictResult> r = tree_->Evict(*leaf);
  TOKENLAKE_CHECK_OK(r.status());
  OnReplicasFreedLocked(*leaf, r->node_erased, r->freed_on, evicted);
  return true;
}

std::optional<SegmentId> Lake::DisplaceableLeafOnLocked(InstanceId instance) const {
  if (options_.local_eviction_min_age_ratio > 1) return std::nullopt;
  const std::optional<SegmentId> local = tree_->LruLastCopyLeafOn(instance);
  const std::optional<SegmentId> global = tree_->LruEvictableLeaf();
  if (!local.has_value() || !global.has_value()) return std::nullopt;
  if (*local == *global) return local;
  const int64_t now = clock_->NowUs();
  const auto local_age = static_cast<double>(now - tree_->Find(*local)->last_access_us);
  const auto global_age = static_cast<double>(now - tree_->Find(*global)->last_access_us);
  if (local_age < options_.local_eviction_min_age_ratio * global_age) return std::nullopt;
  return local;
}

bool Lake::EvictOnProducerLocked(InstanceId producer,
                                 absl::Span<const balance::InstanceState> states,
                                 std::vector<StoredReplica>* evicted) {
  if (options_.local_eviction_min_age_ratio > 1) return false;
  if (!balancer_->PrefersProducer(producer, states)) return false;
  // 1. A cooled heavy hitter's extra replica on the producer.
  const std::vector<balance::SegmentState> replicated = ReplicatedStatesLocked();
  if (!replicated.empty()) {
    const std::optional<balance::BalanceAction> pick =
        balancer_->PickExtraReplicaToEvict(replicated, states, producer);
    if (pick.has_value()) {
      absl::StatusOr<index::EvictResult> r = tree_->RemoveReplica(pick->segment, pick->from);
      TOKENLAKE_CHECK_OK(r.status());
      OnReplicasFreedLocked(pick->segment, r->node_erased, r->freed_on, evicted);
      return stores_[producer.value()]->free() > 0;
    }
  }
  // 2. The producer's LRU last-copy leaf, unless it is much more recent than the global one.
  const std::optional<SegmentId> local = DisplaceableLeafOnLocked(producer);
  if (!local.has_value()) return false;
  absl::StatusOr<index::EvictResult> r = tree_->Evict(*local);
  TOKENLAKE_CHECK_OK(r.status());
  OnReplicasFreedLocked(*local, r->node_erased, r->freed_on, evicted);
  return stores_[producer.value()]->free() > 0;
}

InstanceId Lake::PlaceLocked(InstanceId target, SegmentId must_stay, InstanceStatesCache& states,
                             std::vector<StoredReplica>* evicted) {
  if (stores_[target.value()]->free() > 0) return target;
  while (true) {
    absl::StatusOr<std::optional<InstanceId>> placed =
        balancer_->PlaceNewSegment(target, states.Get());
    TOKENLAKE_CHECK_OK(placed.status());
    if (placed->has_value()) return **placed;
    if (EvictOnProducerLocked(target, states.Get(), evicted)) {
      counters_.local_evictions += 1;
      return target;
    }
    if (!EvictOneLocked(states.Get(), evicted)) return {};
    // A new segment's parent may have been an unpinned leaf that just went.
    if (must_stay.valid() && !tree_->Contains(must_stay)) return {};
  }
}

absl::Status Lake::ValidatePlacements(RequestId request,
                                      absl::Span<const plan::NewSegmentPlacement> placements,
                                      const char* call) const {
  for (size_t i = 0; i < placements.size(); ++i) {
    const plan::NewSegmentPlacement& p = placements[i];
    if (p.request != request) {
      return Invalid(absl::StrFormat("%s: placement %d is for request %d, not %d", call, i,
                                     p.request.value(), request.value()));
    }
    if (!p.segment.valid()) {
      return Invalid(absl::StrFormat("%s: placement %d: invalid id", call, i));
    }
    if (p.num_tokens < 1 || p.num_tokens > options_.segment_tokens) {
      return Invalid(absl::StrFormat("%s: placement %d: num_tokens %d not in [1, %d]", call, i,
                                     p.num_tokens, options_.segment_tokens));
    }
    for (InstanceId inst : {p.source, p.target}) {
      if (!inst.valid() || inst.value() < 0 || inst.value() >= num_instances()) {
        return Invalid(absl::StrFormat("%s: placement %d: unknown instance %d (pool has %d)", call,
                                       i, inst.value(), num_instances()));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<CommitResult> Lake::Commit(RequestId request,
                                          absl::Span<const plan::NewSegmentPlacement> placements) {
  TOKENLAKE_RETURN_IF_ERROR(ValidatePlacements(request, placements, "Commit"));
  absl::MutexLock lock(&mu_);
  return CommitLocked(request, placements, /*pending=*/false);
}

absl::StatusOr<CommitResult> Lake::CommitKeys(RequestId request,
                                              absl::Span<const index::SegmentKey> keys,
                                              InstanceId producer) {
  if (!producer.valid() || producer.value() < 0 || producer.value() >= num_instances()) {
    return Invalid(absl::StrFormat("CommitKeys: unknown producer instance %d (pool has %d)",
                                   producer.value(), num_instances()));
  }
  if (absl::Status s = ValidateKeys(keys); !s.ok()) {
    return Invalid(absl::StrFormat("CommitKeys: %s", s.message()));
  }
  absl::MutexLock lock(&mu_);
  if (!active_.contains(request)) {
    return absl::NotFoundError(
        absl::StrFormat("CommitKeys: request %d is not active", request.value()));
  }
  const size_t n = static_cast<size_t>(VisibleMatchLocked(keys).matched_segments);
  std::vector<balance::InstanceState> states = InstanceStatesLocked();
  std::vector<plan::NewSegmentPlacement> placements;
  SegmentId parent = n > 0 ? keys[n - 1].id : SegmentId();
  for (size_t i = n; i < keys.size(); ++i) {
    TOKENLAKE_ASSIGN_OR_RETURN(std::optional<InstanceId> placed,
                               balancer_->PlaceNewSegment(producer, states));
    const InstanceId target = placed.value_or(producer);
    auto& st = states[target.value()];
    if (st.used_slots < st.capacity_slots) st.used_slots += 1;
    placements.push_back({request, keys[i].id, parent, keys[i].num_tokens, producer, target});
    parent = keys[i].id;
  }
  return CommitLocked(request, placements, /*pending=*/false);
}

absl::StatusOr<CommitResult> Lake::CommitLocked(
    RequestId request, absl::Span<const plan::NewSegmentPlacement> placements, bool pending) {
  auto it = active_.find(request);
  if (it == active_.end()) {
    return absl::NotFoundError(
        absl::StrFormat("Commit: request %d is not active", request.value()));
  }
  Active& active = it->second;
  access_.Erase(request);  // the iteration ran: its plan is no longer in force
  CommitResult result;
  result.sequence = ++sequence_;
  const int64_t now = clock_->NowUs();
  // The instances' states for placement and eviction, built once per call (every instance's
  // used slots and decayed load) and kept current: a commit of a long prompt into a full pool
  // places and evicts hundreds of segments, and rebuilding the states for each decision was
  // most of its cost. Loads do not change within the call (the clock does not move), used
  // slots change only by this call's allocations and the evictions it reports.
  InstanceStatesCache states(this, &result.evicted);
  // A tail request's placements take their rows from its tail's blocks, in order, as long as
  // the run stays contiguous (lake.h, "Tails in the pool").
  auto tail_it = tails_.find(request);
  Tail* tail = tail_it != tails_.end() ? &tail_it->second : nullptr;
  bool tail_run = tail != nullptr;
  // A stored copy: pinned for the request, pending until confirmed when asked, and counted.
  auto record_stored = [&](const plan::NewSegmentPlacement& placed, InstanceId where) {
    mu_.AssertHeld();  // held by this function; tells the analysis inside the lambda
    PinOneLocked(placed.segment);
    active.pinned.push_back(placed.segment);
    if (pending) {
      pending_[placed.segment] = PendingCopy{request, where};
      active.pending.push_back(placed.segment);
    }
    result.stored.push_back({placed.segment, where});
    if (where != placed.source) {
      const int64_t bytes = plan::KvBytes(options_.model, placed.num_tokens);
      result.moved_bytes += bytes;
      counters_.commit_moved_bytes += bytes;
    }
  };
  for (const plan::NewSegmentPlacement& p : placements) {
    const bool from_tail = tail_run && !tail->blocks.empty();
    if (tail != nullptr && !tail_run) {
      // After a segment that stays in the tail, the rest stay too.
      result.not_stored.push_back(p.segment);
      counters_.not_stored_segments += 1;
      continue;
    }
    // Each placement consumes one reserved slot (TryAdmit): from here on the segment is either
    // pinned (stored or deduplicated) or not stored. A tail's blocks reserved nothing.
    if (!from_tail && active.reserved_slots > 0) {
      active.reserved_slots -= 1;
      reserved_slots_ -= 1;
    }
    if (const index::PrefixTree::Node* node = tree_->Find(p.segment); node != nullptr) {
      if (node->parent == p.parent && node->num_tokens == p.num_tokens && !VisibleLocked(*node)) {
        // Placed by a request whose store is not confirmed: neither another copy nor a read.
        result.pending_elsewhere.push_back(p.segment);
        counters_.pending_elsewhere_segments += 1;
        if (from_tail) tail_run = false;
      } else if (node->parent == p.parent && node->num_tokens == p.num_tokens) {
        PinOneLocked(p.segment);
        active.pinned.push_back(p.segment);
        result.deduplicated.push_back(p.segment);
        counters_.deduplicated_segments += 1;
        if (from_tail) PopTailBlockLocked(*tail, &states);  // the pool has these rows
      } else {
        result.not_stored.push_back(p.segment);
        counters_.not_stored_segments += 1;
        if (from_tail) tail_run = false;
      }
      continue;
    }
    if (p.parent.valid()) {
      // The parent must be stored, and visible, or (pending) a copy this very request placed.
      const index::PrefixTree::Node* parent = tree_->Find(p.parent);
      bool ok = parent != nullptr && VisibleLocked(*parent);
      if (parent != nullptr && !ok && pending) {
        auto own = pending_.find(p.parent);
        ok = own != pending_.end() && own->second.owner == request;
      }
      if (!ok) {
        result.not_stored.push_back(p.segment);
        counters_.not_stored_segments += 1;
        if (from_tail) tail_run = false;
        continue;
      }
    }
    if (from_tail) {
      // The segment's rows are the tail's first block: in place when the plan wants it there,
      // or when its target is full (no eviction for a copy of data that has a slot already).
      const TailBlock block = tail->blocks.front();
      const bool in_place = p.target == block.instance || stores_[p.target.value()]->free() == 0;
      const InstanceId where = in_place ? block.instance : p.target;
      absl::StatusOr<index::InsertResult> ins =
          tree_->Insert(p.parent, index::SegmentKey{p.segment, p.num_tokens}, where, now);
      if (!ins.ok()) {
        result.not_stored.push_back(p.segment);
        counters_.not_stored_segments += 1;
        tail_run = false;
        continue;
      }
      if (in_place) {
        TOKENLAKE_CHECK_OK(stores_[where.value()]->AssignTail(block.slot, p.segment));
        tail_slots_ -= 1;  // the slot is the segment's now
        DropFirstTailBlockLocked(*tail);
        result.in_place.push_back(p.segment);
        counters_.in_place_commits += 1;
      } else {
        TOKENLAKE_CHECK_OK(stores_[where.value()]->Allocate(p.segment).status());
        states.Allocated(where);
        PopTailBlockLocked(*tail, &states);
      }
      record_stored(p, where);
      continue;
    }
    // Where: the plan's target if it has room, else where the balancer says, else evict.
    const InstanceId where = PlaceLocked(p.target, p.parent, states, &result.evicted);
    if (!where.valid() || (p.parent.valid() && !tree_->Contains(p.parent))) {
      result.not_stored.push_back(p.segment);
      counters_.not_stored_segments += 1;
      continue;
    }
    absl::StatusOr<index::InsertResult> ins =
        tree_->Insert(p.parent, index::SegmentKey{p.segment, p.num_tokens}, where, now);
    if (!ins.ok()) {  // e.g. the parent is a part-segment
      result.not_stored.push_back(p.segment);
      counters_.not_stored_segments += 1;
      continue;
    }
    TOKENLAKE_CHECK_OK(stores_[where.value()]->Allocate(p.segment).status());
    states.Allocated(where);
    record_stored(p, where);
  }
  if (tail != nullptr && tail->blocks.empty()) tails_.erase(request);
  return result;
}

absl::Status Lake::Release(RequestId request) {
  absl::MutexLock lock(&mu_);
  auto it = active_.find(request);
  if (it == active_.end()) {
    return absl::NotFoundError(
        absl::StrFormat("Release: request %d is not active", request.value()));
  }
  Active& a = it->second;
  const int64_t now = clock_->NowUs();
  // Pins of segments lost with an instance (DropInstance) are gone with them.
  std::vector<SegmentId> live;
  live.reserve(a.pinned.size());
  for (SegmentId s : a.pinned) {
    if (tree_->Contains(s)) live.push_back(s);
  }
  for (SegmentId seg : live) UnpinOneLocked(seg);
  tree_->Touch(live, now);
  reserved_slots_ -= a.reserved_slots;
  a.reserved_slots = 0;
  for (const index::SegmentKey& k : a.matched) {
    const double load = static_cast<double>(a.new_tokens) * k.num_tokens;
    if (!(load > 0)) continue;
    RecordSegmentLoadLocked(k.id, tree_->Find(k.id), load, now);
  }
  DropPendingLocked(request, a);
  active_.erase(it);
  access_.Erase(request);
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Introspection

LakeStats Lake::Stats(bool scan_heavy_hitters) const {
  absl::MutexLock lock(&mu_);
  LakeStats s = counters_;
  s.segments = tree_->num_segments();
  s.replicas = tree_->num_replicas();
  s.redundancy = s.segments > 0 ? static_cast<double>(s.replicas) / s.segments : 0.0;
  s.stored_tokens = tree_->num_tokens();
  s.pinned_segments = tree_->num_pinned();
  s.hit_rate = s.prompt_tokens > 0 ? static_cast<double>(s.hit_tokens) / s.prompt_tokens : 0.0;
  s.active_requests = static_cast<int64_t>(active_.size());
  s.pinned_replicas = pinned_replicas_;
  s.reserved_slots = reserved_slots_;
  s.available_slots = AvailableSlotsLocked();
  s.pending_copies = static_cast<int64_t>(pending_.size());
  s.tail_slots = tail_slots_;
  s.heavy_hitters = scan_heavy_hitters ? tracker_->CountHeavy() : rebalance_heavy_;
  for (const balance::InstanceState& st : InstanceStatesLocked()) {
    s.instances.push_back(InstanceStats{.instance = st.id,
                                        .capacity_slots = st.capacity_slots,
                                        .used_slots = st.used_slots,
                                        .free_slots = st.capacity_slots - st.used_slots,
                                        .tokens = tree_->TokensOn(st.id),
                                        .load = st.load,
                                        .access_tokens = access_.tokens(st.id)});
  }
  return s;
}

void Lake::SetReplicaObserver(index::PrefixTree::ReplicaObserver observer) {
  absl::MutexLock lock(&mu_);
  observer_ = std::move(observer);
}

absl::Status Lake::CheckIntegrity() const {
  absl::MutexLock lock(&mu_);
  TOKENLAKE_RETURN_IF_ERROR(tree_->CheckIntegrity());
  TOKENLAKE_RETURN_IF_ERROR(access_.CheckIntegrity());
  for (size_t i = 0; i < stores_.size(); ++i) {
    TOKENLAKE_RETURN_IF_ERROR(stores_[i]->CheckIntegrity());
    const InstanceId inst(static_cast<int32_t>(i));
    const int64_t segments = stores_[i]->used() - stores_[i]->num_tail_slots();
    if (segments != tree_->SegmentsOn(inst)) {
      return absl::InternalError(
          absl::StrFormat("Lake: instance %d store holds %d segments, tree says %d", i, segments,
                          tree_->SegmentsOn(inst)));
    }
    for (SegmentId seg : stores_[i]->Segments()) {
      const index::PrefixTree::Node* node = tree_->Find(seg);
      if (node == nullptr || !node->HasReplicaOn(inst)) {
        return absl::InternalError(absl::StrFormat(
            "Lake: instance %d stores segment %d, which the tree does not place there", i,
            seg.value()));
      }
    }
  }
  absl::Status status = absl::OkStatus();
  int64_t multi = 0;
  tree_->ForEachNode([&](const index::PrefixTree::Node& node) {
    mu_.AssertHeld();  // held by this function; tells the analysis inside the callback
    if (node.replicas.size() >= 2) {
      ++multi;
      if (!replicated_.contains(node.id) && status.ok()) {
        status = absl::InternalError(
            absl::StrFormat("Lake: segment %d has %d replicas but is not tracked as replicated",
                            node.id.value(), node.replicas.size()));
      }
    }
  });
  TOKENLAKE_RETURN_IF_ERROR(status);
  if (multi != static_cast<int64_t>(replicated_.size())) {
    return absl::InternalError(absl::StrFormat(
        "Lake: %d replicated segments tracked, %d in the tree", replicated_.size(), multi));
  }
  if (const int64_t pinned = CountPinnedReplicasLocked(); pinned != pinned_replicas_) {
    return absl::InternalError(
        absl::StrFormat("Lake: %d replicas of pinned segments, %d counted for admission", pinned,
                        pinned_replicas_));
  }
  int64_t reserved = 0;
  for (const auto& [id, a] : active_) reserved += a.reserved_slots;
  if (reserved != reserved_slots_) {
    return absl::InternalError(
        absl::StrFormat("Lake: requests reserve %d slots, %d counted", reserved, reserved_slots_));
  }
  for (const auto& [id, a] : active_) {
    for (SegmentId seg : a.pinned) {
      const index::PrefixTree::Node* node = tree_->Find(seg);
      if (node != nullptr && !node->is_pinned()) {
        return absl::InternalError(absl::StrFormat(
            "Lake: request %d pins segment %d, which is not pinned", id.value(), seg.value()));
      }
    }
  }
  TOKENLAKE_RETURN_IF_ERROR(CheckTailsLocked());
  for (const auto& [seg, copy] : pending_) {
    const index::PrefixTree::Node* node = tree_->Find(seg);
    if (node == nullptr || !node->HasReplicaOn(copy.instance)) {
      return absl::InternalError(absl::StrFormat(
          "Lake: segment %d is pending on instance %d, which the tree does not place there",
          seg.value(), copy.instance.value()));
    }
    if (!node->is_pinned()) {
      return absl::InternalError(
          absl::StrFormat("Lake: pending segment %d is not pinned", seg.value()));
    }
    auto owner = active_.find(copy.owner);
    if (owner == active_.end() ||
        std::find(owner->second.pending.begin(), owner->second.pending.end(), seg) ==
            owner->second.pending.end()) {
      return absl::InternalError(
          absl::StrFormat("Lake: segment %d is pending for request %d, which does not list it",
                          seg.value(), copy.owner.value()));
    }
  }
  return absl::OkStatus();
}

}  // namespace tokenlake::lake
