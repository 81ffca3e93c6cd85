// BlockCache: one instance's KV block pool with automatic prefix caching, as vLLM does it
// (the baselines' per-instance cache; TokenLake's pool is lake::Lake, not this).
//
// The pool has `capacity_blocks` blocks. A block is either free, private to a running request
// (not shareable), or cached under its chained block id with a reference count. Cached blocks
// with no reference sit in an LRU list and are evicted (oldest first) when an allocation
// needs room; referenced blocks are never evicted.
//
// Invariants (checked by CheckInvariants):
//   free + private + cached == capacity; evictable == cached blocks with refcount 0.
//
// Thread-safety: not thread-safe (the simulator is single-threaded).
#ifndef TOKENLAKE_SIM_BLOCK_CACHE_H_
#define TOKENLAKE_SIM_BLOCK_CACHE_H_

#include <cstdint>
#include <list>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/types/span.h"

namespace tokenlake::sim {

// Counts, over several caches, how many of them hold each block id (pool statistics: stored
// copies / distinct blocks) as the caches change, so a statistic costs O(1) instead of a pass
// over every cache. Not thread-safe.
class IdCopyCounter {
 public:
  void Add(uint64_t id) { ++counts_[id]; }
  // REQUIRES: `id` was added more often than removed.
  void Remove(uint64_t id);
  int64_t distinct() const { return static_cast<int64_t>(counts_.size()); }

 private:
  absl::flat_hash_map<uint64_t, int32_t> counts_;
};

class BlockCache {
 public:
  // REQUIRES: capacity_blocks >= 0.
  explicit BlockCache(int64_t capacity_blocks);

  // Number of leading ids of `ids` that are cached (referenced or not). No side effect.
  int64_t Match(absl::Span<const uint64_t> ids) const;

  // Takes a reference on the first `n` ids (REQUIRES: all cached, i.e. n <= Match(ids)), moving
  // them out of the LRU list.
  void Acquire(absl::Span<const uint64_t> ids, int64_t n);

  // Drops one reference on each id that is cached (REQUIRES: the caller holds one). A block
  // whose count reaches 0 becomes evictable, most recently used; like vLLM, the blocks of one
  // release are queued tail first, so a sequence's last blocks are evicted before its prefix.
  void Release(absl::Span<const uint64_t> ids);

  // Reserves `n` private blocks, evicting LRU unreferenced cached blocks as needed. Returns
  // false (and changes nothing) when even evicting every evictable block leaves too little.
  bool AllocatePrivate(int64_t n);
  // Returns `n` private blocks to the free pool. REQUIRES: n <= private_blocks().
  void FreePrivate(int64_t n);

  // Turns one private block into the cached block `id` with one reference (the caller keeps
  // using it). If `id` is already cached, the private block stays private and false returns.
  bool Promote(uint64_t id);

  // Blocks that AllocatePrivate could obtain now.
  int64_t Obtainable() const { return free_ + static_cast<int64_t>(lru_.size()); }

  int64_t capacity() const { return capacity_; }
  int64_t free_blocks() const { return free_; }
  int64_t private_blocks() const { return private_; }
  int64_t cached_blocks() const { return static_cast<int64_t>(map_.size()); }
  int64_t evictable_blocks() const { return static_cast<int64_t>(lru_.size()); }
  int64_t evictions() const { return evictions_; }
  bool Contains(uint64_t id) const { return map_.contains(id); }
  // Ids of all cached blocks (any order).
  std::vector<uint64_t> CachedIds() const;
  // From now on every id this cache starts or stops holding is added to / removed from
  // `counter` (the ids it holds now are added at once). REQUIRES: no counter set yet;
  // `counter` outlives every later change to this cache.
  void AttachCopyCounter(IdCopyCounter* counter);

  absl::Status CheckInvariants() const;

 private:
  struct Entry {
    int64_t refs = 0;
    std::list<uint64_t>::iterator lru_pos;  // valid when refs == 0
  };
  int64_t capacity_;
  int64_t free_;
  int64_t private_ = 0;
  int64_t evictions_ = 0;
  IdCopyCounter* counter_ = nullptr;  // not owned; may be null
  absl::flat_hash_map<uint64_t, Entry> map_;
  std::list<uint64_t> lru_;  // front = least recently used
};

}  // namespace tokenlake::sim

#endif  // TOKENLAKE_SIM_BLOCK_CACHE_H_
