#include "tokenlake/sim/block_cache.h"

#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"

namespace tokenlake::sim {

BlockCache::BlockCache(int64_t capacity_blocks)
    : capacity_(capacity_blocks), free_(capacity_blocks) {
  TOKENLAKE_CHECK(capacity_blocks >= 0);
}

int64_t BlockCache::Match(absl::Span<const uint64_t> ids) const {
  int64_t n = 0;
  while (n < static_cast<int64_t>(ids.size()) && map_.contains(ids[n])) ++n;
  return n;
}

void BlockCache::Acquire(absl::Span<const uint64_t> ids, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    auto it = map_.find(ids[i]);
    TOKENLAKE_CHECK(it != map_.end(), "Acquire of a block that is not cached");
    if (it->second.refs++ == 0) lru_.erase(it->second.lru_pos);
  }
}

void BlockCache::Release(absl::Span<const uint64_t> ids) {
  for (size_t k = ids.size(); k-- > 0;) {
    auto it = map_.find(ids[k]);
    if (it == map_.end()) continue;
    TOKENLAKE_CHECK(it->second.refs > 0, "Release of an unreferenced block");
    if (--it->second.refs == 0) it->second.lru_pos = lru_.insert(lru_.end(), ids[k]);
  }
}

bool BlockCache::AllocatePrivate(int64_t n) {
  if (n > Obtainable()) return false;
  while (free_ < n) {
    const uint64_t victim = lru_.front();
    lru_.pop_front();
    map_.erase(victim);
    ++free_;
    ++evictions_;
    if (counter_ != nullptr) counter_->Remove(victim);
  }
  free_ -= n;
  private_ += n;
  return true;
}

void BlockCache::FreePrivate(int64_t n) {
  TOKENLAKE_CHECK(n >= 0 && n <= private_);
  private_ -= n;
  free_ += n;
}

bool BlockCache::Promote(uint64_t id) {
  TOKENLAKE_CHECK(private_ > 0);
  auto [it, inserted] = map_.try_emplace(id);
  if (!inserted) return false;
  it->second.refs = 1;
  --private_;
  if (counter_ != nullptr) counter_->Add(id);
  return true;
}

void IdCopyCounter::Remove(uint64_t id) {
  auto it = counts_.find(id);
  TOKENLAKE_CHECK(it != counts_.end() && it->second > 0, "Remove of an id never added");
  if (--it->second == 0) counts_.erase(it);
}

void BlockCache::AttachCopyCounter(IdCopyCounter* counter) {
  TOKENLAKE_CHECK(counter_ == nullptr && counter != nullptr);
  counter_ = counter;
  for (const auto& [id, e] : map_) counter_->Add(id);
}

std::vector<uint64_t> BlockCache::CachedIds() const {
  std::vector<uint64_t> ids;
  ids.reserve(map_.size());
  for (const auto& [id, e] : map_) ids.push_back(id);
  return ids;
}

absl::Status BlockCache::CheckInvariants() const {
  int64_t unreferenced = 0;
  for (const auto& [id, e] : map_) {
    if (e.refs < 0) return absl::InternalError("negative refcount");
    if (e.refs == 0) ++unreferenced;
  }
  if (unreferenced != static_cast<int64_t>(lru_.size())) {
    return absl::InternalError(absl::StrFormat("%d unreferenced blocks but %d in the LRU list",
                                               unreferenced, lru_.size()));
  }
  if (free_ < 0 || free_ + private_ + static_cast<int64_t>(map_.size()) != capacity_) {
    return absl::InternalError(absl::StrFormat("free %d + private %d + cached %d != capacity %d",
                                               free_, private_, map_.size(), capacity_));
  }
  return absl::OkStatus();
}

}  // namespace tokenlake::sim
