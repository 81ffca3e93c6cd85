// HostedStore: one hosted instance's segment store with what the data plane keeps beside the
// slots: each stored segment's metadata (parent, token count, the control-plane change that
// placed the copy) and the numbered log of its stores and frees (its store generations:
// store/segment_change_log.h), so that the instance reports what it holds, and what changed, in
// a form the control plane rebuilds its prefix tree from, and so that a free decided from an
// older view never drops a copy stored since. The host pool (instance_pool.h) and the device
// pools (cuda/peer_device_pool.h) keep their slots' bookkeeping here; only where the bytes live
// differs (the slot writer they pass to Store).
//
// Thread-safety: thread-safe (one mutex, held while a store writes its slot, so that a free
// never drops a slot being written).
#ifndef TOKENLAKE_ENGINE_HOSTED_STORE_H_
#define TOKENLAKE_ENGINE_HOSTED_STORE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "tokenlake/base/ids.h"
#include "tokenlake/store/segment_change_log.h"
#include "tokenlake/store/segment_store.h"

namespace tokenlake::engine {

// What a store message says about the segment besides its KV: its parent in the chain
// (invalid for a root child), its token count (0 = unknown) and the control plane's change
// sequence number of the call that placed this copy (lake::CommitResult::sequence; 0 =
// unknown).
struct StoredMeta {
  SegmentId parent;
  int32_t num_tokens = 0;
  uint64_t placement_sequence = 0;
};

// One segment a hosted instance stores, with its metadata.
struct HeldSegmentInfo {
  SegmentId id;
  StoredMeta meta;
};

class HostedStore {
 public:
  // `store` is owned. Changes are kept for ChangesSince up to `change_log_entries` (0: numbered,
  // none kept).
  HostedStore(std::unique_ptr<store::SegmentStore> store, int64_t change_log_entries)
      : store_(std::move(store)), changes_(change_log_entries) {}

  // The slot allocator (its own calls are thread-safe; writes to slots go through Store).
  store::SegmentStore& slots() const { return *store_; }

  // Writes `segment` with `write` (given its slot's bytes), allocating a slot unless the segment
  // has one (then overwritten), and records it with `meta`. A failed write frees a slot it
  // allocated. Errors: the store's (ResourceExhausted: no free slot), `write`'s.
  absl::Status Store(SegmentId segment, const StoredMeta& meta,
                     const std::function<absl::Status(absl::Span<std::byte>)>& write);
  // The tail slot `slot` becomes `segment`'s slot (its bytes unchanged), recorded with `meta`.
  // Errors: as SegmentStore::AssignTail.
  absl::Status CommitTail(SlotId slot, SegmentId segment, const StoredMeta& meta);
  // Frees `segment`. With `evicted_at` > 0, a copy placed by a later change (placement
  // sequence > evicted_at) is kept: FailedPrecondition. Errors: NotFound, FailedPrecondition
  // (pinned).
  absl::Status Free(SegmentId segment, uint64_t evicted_at);
  // Frees `segment` only if its copy was stored at or before `generation`.
  // Errors: NotFound, FailedPrecondition (stored again since, or pinned).
  absl::Status FreeIfUnchangedSince(SegmentId segment, uint64_t generation);

  // What it holds, with the generation that state reflects, taken together.
  struct HeldReport {
    uint64_t generation = 0;
    std::vector<HeldSegmentInfo> segments;
  };
  HeldReport Held() const;
  // The latest generation given.
  uint64_t Generation() const;
  // The changes after generation `from`, or nullopt when they are not all kept.
  std::optional<std::vector<store::SegmentChange>> ChangesSince(uint64_t from) const;
  // Changes up to `through` were reported and acknowledged.
  void ForgetChanges(uint64_t through);
  // The metadata of `segment` (zeros when not stored or stored without).
  StoredMeta MetaOf(SegmentId segment) const;
  // The generation of `segment`'s copy (the change that stored it; 0 when not stored): a copy
  // stored again gets a new one.
  uint64_t GenerationOf(SegmentId segment) const;

 private:
  struct Entry {
    StoredMeta meta;
    uint64_t generation = 0;
  };
  const std::unique_ptr<store::SegmentStore> store_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<SegmentId, Entry> meta_ ABSL_GUARDED_BY(mu_);
  store::SegmentChangeLog changes_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tokenlake::engine

#endif  // TOKENLAKE_ENGINE_HOSTED_STORE_H_
