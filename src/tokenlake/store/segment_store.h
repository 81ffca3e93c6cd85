// SegmentStore: one instance's pool of fixed-size segment slots.
//
// The memory is an arena the caller provides (host or device memory; this class never reads or
// writes it, it only hands out byte ranges), cut into `slot_bytes` slots. Any free slot can hold
// any segment, so there is no fragmentation by construction. With a null arena the store is
// metadata-only (the simulator): it does the same accounting over `num_slots` slots and
// SlotData returns empty spans.
//
// Segments in use are pinned by refcounted RAII handles (SlotPin). A pinned segment is never
// freed. The store keeps no eviction order of its own: which segment leaves is the cluster's
// decision (the lake's prefix tree evicts least-recently-used unpinned leaves, pool-wide) and
// arrives here as Free.
//
// Tail slots: a slot may also be held by no segment yet, as part of a running request's KV tail
// (the rows after its pooled prefix, written by the forward before their segment is committed:
// docs/adr/0017). A tail slot counts as used; AssignTail makes it a segment's slot in place (no
// copy), FreeTail gives it back.
//
// Invariants: used() + free() == capacity(); used() == segments + tail slots; each stored segment
// has exactly one slot and each slot at most one segment or one tail.
//
// Errors: all calls validate their input and return an absl::Status; a full store is an expected
// outcome reported as ResourceExhausted (retry after the lake evicted), not a crash.
//
// Thread-safety: thread-safe. One internal mutex guards all metadata, so the data plane may pin
// and release from several threads while the control plane allocates. The slot bytes themselves
// are not synchronised: the caller coordinates readers and writers of a slot's memory (a slot
// is written before its segment is published, and read only under a pin).
#ifndef TOKENLAKE_STORE_SEGMENT_STORE_H_
#define TOKENLAKE_STORE_SEGMENT_STORE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "tokenlake/base/ids.h"

namespace tokenlake::store {

class SegmentStore;

// A pin on one stored segment. Movable, not copyable; releases the pin when destroyed or Reset.
// A default-constructed (or moved-from) SlotPin holds nothing.
// REQUIRES: the SegmentStore outlives every SlotPin it issued.
// Thread-safety: a SlotPin object is not shared between threads; different pins may be released
// concurrently.
class SlotPin {
 public:
  SlotPin() = default;
  ~SlotPin() { Reset(); }
  SlotPin(SlotPin&& other) noexcept;
  SlotPin& operator=(SlotPin&& other) noexcept;
  SlotPin(const SlotPin&) = delete;
  SlotPin& operator=(const SlotPin&) = delete;

  // True while this handle holds a pin.
  bool valid() const { return store_ != nullptr; }
  SegmentId segment() const { return segment_; }
  SlotId slot() const { return slot_; }
  // The slot's bytes (empty in metadata-only mode or when !valid()).
  absl::Span<std::byte> data() const;
  // Releases the pin now (no-op when !valid()).
  void Reset();

 private:
  friend class SegmentStore;
  SlotPin(SegmentStore* store, SegmentId segment, SlotId slot)
      : store_(store), segment_(segment), slot_(slot) {}

  SegmentStore* store_ = nullptr;
  SegmentId segment_;
  SlotId slot_;
};

class SegmentStore {
 public:
  struct Options {
    // The slots' memory, borrowed: it must outlive the store. nullptr = metadata-only.
    void* arena = nullptr;
    // Size of the arena in bytes (ignored when arena is nullptr).
    size_t arena_bytes = 0;
    // Bytes per slot (one segment's KV, all layers). Must be > 0 with an arena; optional (0)
    // in metadata-only mode.
    size_t slot_bytes = 0;
    // Number of slots. Metadata-only: the capacity, must be > 0. With an arena: 0 means
    // arena_bytes / slot_bytes; otherwise it must be <= that.
    int32_t num_slots = 0;
    // The instance this store belongs to (only used in messages).
    InstanceId instance;
  };

  // Errors: InvalidArgument when the options describe no slot or an inconsistent arena
  // (slot_bytes == 0 with an arena, num_slots too large for the arena, capacity 0, ...).
  static absl::StatusOr<std::unique_ptr<SegmentStore>> Create(const Options& options);

  // REQUIRES: no SlotPin issued by this store is still alive (checked).
  ~SegmentStore();
  SegmentStore(const SegmentStore&) = delete;
  SegmentStore& operator=(const SegmentStore&) = delete;

  // Gives `segment` a free slot.
  // Errors: InvalidArgument (invalid id), AlreadyExists (segment already stored; its slot is
  //   unchanged), ResourceExhausted (no free slot: evict first).
  absl::StatusOr<SlotId> Allocate(SegmentId segment);

  // The slot of `segment`, or nullopt if it is not stored.
  std::optional<SlotId> Find(SegmentId segment) const;
  bool Contains(SegmentId segment) const { return Find(segment).has_value(); }

  // The bytes of `slot`; empty in metadata-only mode or when slot is out of range. The store does
  // not track whether the slot is occupied: hold a pin while reading.
  absl::Span<std::byte> SlotData(SlotId slot) const;

  // Frees the slot of `segment`.
  // Errors: NotFound (not stored), FailedPrecondition (pinned).
  absl::Status Free(SegmentId segment);

  // Pins `segment` (refcounted: several pins may coexist).
  // Errors: NotFound (not stored).
  absl::StatusOr<SlotPin> Pin(SegmentId segment);
  // Number of live pins on `segment` (0 if not stored).
  int32_t PinCount(SegmentId segment) const;

  // Takes a free slot for a request's KV tail (held by no segment; counted as used).
  // Errors: ResourceExhausted (no free slot: evict first).
  absl::StatusOr<SlotId> AllocateTail();
  // The tail slot `slot` becomes `segment`'s slot, its bytes unchanged (a tail block committed in
  // place). Errors: InvalidArgument (invalid id, or `slot` is not a tail slot), AlreadyExists
  // (`segment` is stored already; nothing changes).
  absl::Status AssignTail(SlotId slot, SegmentId segment);
  // Gives the tail slot `slot` back. Errors: InvalidArgument (`slot` is not a tail slot).
  absl::Status FreeTail(SlotId slot);
  // Tail slots held now.
  int32_t num_tail_slots() const;

  // All stored segments (a snapshot), sorted by id so that callers are deterministic.
  std::vector<SegmentId> Segments() const;

  int32_t capacity() const { return capacity_; }
  int32_t used() const;
  int32_t free() const;
  int32_t num_pinned() const;
  size_t slot_bytes() const { return options_.slot_bytes; }
  bool metadata_only() const { return options_.arena == nullptr; }
  InstanceId instance() const { return options_.instance; }

  // Verifies the invariants with a full scan; OK or Internal naming the first violation.
  absl::Status CheckIntegrity() const;

 private:
  friend class SlotPin;

  struct SlotState {
    SegmentId segment;  // invalid when the slot is free or a tail slot
    int32_t pin_count = 0;
    bool tail = false;  // held by a request's tail (segment invalid)
  };

  SegmentStore(const Options& options, int32_t capacity);
  void Unpin(SlotId slot);
  // OK if `slot` is a tail slot; else InvalidArgument naming `call`, the slot and the instance.
  absl::Status CheckTailSlotLocked(const char* call, SlotId slot) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Options options_;
  const int32_t capacity_;

  mutable absl::Mutex mu_;
  std::vector<SlotState> slots_ ABSL_GUARDED_BY(mu_);
  std::vector<int32_t> free_list_ ABSL_GUARDED_BY(mu_);  // free slot indexes (stack)
  absl::flat_hash_map<SegmentId, int32_t> by_segment_ ABSL_GUARDED_BY(mu_);
  int32_t num_pinned_ ABSL_GUARDED_BY(mu_) = 0;
  int32_t live_pins_ ABSL_GUARDED_BY(mu_) = 0;   // SlotPin objects alive
  int32_t tail_slots_ ABSL_GUARDED_BY(mu_) = 0;  // slots with tail = true
};

}  // namespace tokenlake::store

#endif  // TOKENLAKE_STORE_SEGMENT_STORE_H_
