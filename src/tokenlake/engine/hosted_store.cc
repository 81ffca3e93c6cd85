#include "tokenlake/engine/hosted_store.h"

#include <utility>

#include "absl/strings/str_format.h"
#include "tokenlake/base/status_macros.h"

namespace tokenlake::engine {

absl::Status HostedStore::Store(SegmentId segment, const StoredMeta& meta,
                                const std::function<absl::Status(absl::Span<std::byte>)>& write) {
  absl::MutexLock lock(&mu_);
  std::optional<SlotId> slot = store_->Find(segment);
  const bool fresh = !slot.has_value();
  if (fresh) {
    TOKENLAKE_ASSIGN_OR_RETURN(SlotId allocated, store_->Allocate(segment));
    slot = allocated;
  }
  if (absl::Status s = write(store_->SlotData(*slot)); !s.ok()) {
    if (fresh) (void)store_->Free(segment);
    return s;
  }
  const uint64_t generation = changes_.Record(
      {.id = segment, .stored = true, .parent = meta.parent, .num_tokens = meta.num_tokens});
  meta_[segment] = Entry{.meta = meta, .generation = generation};
  return absl::OkStatus();
}

absl::Status HostedStore::CommitTail(SlotId slot, SegmentId segment, const StoredMeta& meta) {
  absl::MutexLock lock(&mu_);
  TOKENLAKE_RETURN_IF_ERROR(store_->AssignTail(slot, segment));
  const uint64_t generation = changes_.Record(
      {.id = segment, .stored = true, .parent = meta.parent, .num_tokens = meta.num_tokens});
  meta_[segment] = Entry{.meta = meta, .generation = generation};
  return absl::OkStatus();
}

absl::Status HostedStore::Free(SegmentId segment, uint64_t evicted_at) {
  absl::MutexLock lock(&mu_);
  auto it = meta_.find(segment);
  if (evicted_at > 0 && it != meta_.end() && it->second.meta.placement_sequence > evicted_at) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "free: segment %d on instance %d was placed again (change %d) after its eviction (%d)",
        segment.value(), store_->instance().value(), it->second.meta.placement_sequence,
        evicted_at));
  }
  TOKENLAKE_RETURN_IF_ERROR(store_->Free(segment));
  if (it != meta_.end()) meta_.erase(it);
  changes_.Record({.id = segment, .stored = false});
  return absl::OkStatus();
}

absl::Status HostedStore::FreeIfUnchangedSince(SegmentId segment, uint64_t generation) {
  absl::MutexLock lock(&mu_);
  auto it = meta_.find(segment);
  if (it != meta_.end() && it->second.generation > generation) {
    return absl::FailedPreconditionError(
        absl::StrFormat("free: segment %d was stored again on instance %d since generation %d",
                        segment.value(), store_->instance().value(), generation));
  }
  TOKENLAKE_RETURN_IF_ERROR(store_->Free(segment));
  if (it != meta_.end()) meta_.erase(it);
  changes_.Record({.id = segment, .stored = false});
  return absl::OkStatus();
}

HostedStore::HeldReport HostedStore::Held() const {
  HeldReport out;
  absl::MutexLock lock(&mu_);
  out.generation = changes_.last();
  for (SegmentId id : store_->Segments()) {
    auto it = meta_.find(id);
    out.segments.push_back({id, it == meta_.end() ? StoredMeta{} : it->second.meta});
  }
  return out;
}

uint64_t HostedStore::Generation() const {
  absl::MutexLock lock(&mu_);
  return changes_.last();
}

std::optional<std::vector<store::SegmentChange>> HostedStore::ChangesSince(uint64_t from) const {
  absl::MutexLock lock(&mu_);
  return changes_.Since(from);
}

void HostedStore::ForgetChanges(uint64_t through) {
  absl::MutexLock lock(&mu_);
  changes_.Trim(through);
}

StoredMeta HostedStore::MetaOf(SegmentId segment) const {
  absl::MutexLock lock(&mu_);
  auto it = meta_.find(segment);
  return it == meta_.end() ? StoredMeta{} : it->second.meta;
}

uint64_t HostedStore::GenerationOf(SegmentId segment) const {
  absl::MutexLock lock(&mu_);
  auto it = meta_.find(segment);
  return it == meta_.end() ? 0 : it->second.generation;
}

}  // namespace tokenlake::engine
