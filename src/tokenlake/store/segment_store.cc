#include "tokenlake/store/segment_store.h"

#include <algorithm>
#include <sstream>
#include <string>
#include <utility>

#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"
#include "tokenlake/base/status_macros.h"

namespace tokenlake::store {
namespace {

std::string Str(SegmentId id) {
  std::ostringstream os;
  os << id;
  return os.str();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// SlotPin

SlotPin::SlotPin(SlotPin&& other) noexcept
    : store_(std::exchange(other.store_, nullptr)), segment_(other.segment_), slot_(other.slot_) {}

SlotPin& SlotPin::operator=(SlotPin&& other) noexcept {
  if (this != &other) {
    Reset();
    store_ = std::exchange(other.store_, nullptr);
    segment_ = other.segment_;
    slot_ = other.slot_;
  }
  return *this;
}

absl::Span<std::byte> SlotPin::data() const {
  if (store_ == nullptr) return {};
  return store_->SlotData(slot_);
}

void SlotPin::Reset() {
  if (store_ == nullptr) return;
  std::exchange(store_, nullptr)->Unpin(slot_);
}

// ---------------------------------------------------------------------------------------------
// SegmentStore

absl::StatusOr<std::unique_ptr<SegmentStore>> SegmentStore::Create(const Options& options) {
  if (options.num_slots < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("SegmentStore::Create: num_slots must be >= 0, got %d", options.num_slots));
  }
  int64_t capacity = options.num_slots;
  if (options.arena != nullptr) {
    if (options.slot_bytes == 0) {
      return absl::InvalidArgumentError(
          "SegmentStore::Create: slot_bytes must be > 0 when an arena is given");
    }
    const size_t fit = options.arena_bytes / options.slot_bytes;
    if (fit > static_cast<size_t>(INT32_MAX)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("SegmentStore::Create: %d slots of %d bytes do not fit a 32-bit slot id",
                          fit, options.slot_bytes));
    }
    if (options.num_slots == 0) {
      capacity = static_cast<int64_t>(fit);
    } else if (static_cast<size_t>(options.num_slots) > fit) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "SegmentStore::Create: num_slots %d of %d bytes do not fit an arena of %d bytes",
          options.num_slots, options.slot_bytes, options.arena_bytes));
    }
  }
  if (capacity <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "SegmentStore::Create: the store has no slot (arena_bytes %d, slot_bytes %d, num_slots "
        "%d, arena %s)",
        options.arena_bytes, options.slot_bytes, options.num_slots,
        options.arena == nullptr ? "null" : "set"));
  }
  return std::unique_ptr<SegmentStore>(new SegmentStore(options, static_cast<int32_t>(capacity)));
}

SegmentStore::SegmentStore(const Options& options, int32_t capacity)
    : options_(options), capacity_(capacity) {
  absl::MutexLock lock(&mu_);
  slots_.resize(static_cast<size_t>(capacity));
  free_list_.reserve(static_cast<size_t>(capacity));
  // Hand out low slot numbers first.
  for (int32_t i = capacity - 1; i >= 0; --i) free_list_.push_back(i);
}

SegmentStore::~SegmentStore() {
  absl::MutexLock lock(&mu_);
  TOKENLAKE_CHECK(live_pins_ == 0, "SegmentStore destroyed while SlotPins are alive");
}

absl::StatusOr<SlotId> SegmentStore::Allocate(SegmentId segment) {
  if (!segment.valid()) {
    return absl::InvalidArgumentError("SegmentStore::Allocate: the segment id is invalid");
  }
  absl::MutexLock lock(&mu_);
  if (auto it = by_segment_.find(segment); it != by_segment_.end()) {
    return absl::AlreadyExistsError(
        absl::StrFormat("SegmentStore::Allocate: %s is already stored in slot %d on instance %d",
                        Str(segment), it->second, options_.instance.value()));
  }
  if (free_list_.empty()) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "SegmentStore::Allocate: no free slot for %s on instance %d (%d slots, %d pinned)",
        Str(segment), options_.instance.value(), capacity_, num_pinned_));
  }
  const int32_t slot = free_list_.back();
  free_list_.pop_back();
  slots_[slot].segment = segment;
  slots_[slot].pin_count = 0;
  by_segment_.emplace(segment, slot);
  return SlotId(slot);
}

absl::StatusOr<SlotId> SegmentStore::AllocateTail() {
  absl::MutexLock lock(&mu_);
  if (free_list_.empty()) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "SegmentStore::AllocateTail: no free slot on instance %d (%d slots, %d tail slots, %d "
        "pinned)",
        options_.instance.value(), capacity_, tail_slots_, num_pinned_));
  }
  const int32_t slot = free_list_.back();
  free_list_.pop_back();
  slots_[slot] = SlotState{.segment = SegmentId(), .pin_count = 0, .tail = true};
  ++tail_slots_;
  return SlotId(slot);
}

absl::Status SegmentStore::AssignTail(SlotId slot, SegmentId segment) {
  if (!segment.valid()) {
    return absl::InvalidArgumentError("SegmentStore::AssignTail: the segment id is invalid");
  }
  absl::MutexLock lock(&mu_);
  TOKENLAKE_RETURN_IF_ERROR(CheckTailSlotLocked("AssignTail", slot));
  if (auto it = by_segment_.find(segment); it != by_segment_.end()) {
    return absl::AlreadyExistsError(
        absl::StrFormat("SegmentStore::AssignTail: %s is already stored in slot %d on instance %d",
                        Str(segment), it->second, options_.instance.value()));
  }
  slots_[slot.value()] = SlotState{.segment = segment, .pin_count = 0, .tail = false};
  by_segment_.emplace(segment, slot.value());
  --tail_slots_;
  return absl::OkStatus();
}

absl::Status SegmentStore::FreeTail(SlotId slot) {
  absl::MutexLock lock(&mu_);
  TOKENLAKE_RETURN_IF_ERROR(CheckTailSlotLocked("FreeTail", slot));
  slots_[slot.value()].tail = false;
  free_list_.push_back(slot.value());
  --tail_slots_;
  return absl::OkStatus();
}

absl::Status SegmentStore::CheckTailSlotLocked(const char* call, SlotId slot) const {
  if (slot.valid() && slot.value() >= 0 && slot.value() < capacity_ && slots_[slot.value()].tail) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrFormat("SegmentStore::%s: slot %d on instance %d is not a tail slot", call,
                      slot.valid() ? slot.value() : -1, options_.instance.value()));
}

int32_t SegmentStore::num_tail_slots() const {
  absl::MutexLock lock(&mu_);
  return tail_slots_;
}

std::optional<SlotId> SegmentStore::Find(SegmentId segment) const {
  absl::MutexLock lock(&mu_);
  auto it = by_segment_.find(segment);
  if (it == by_segment_.end()) return std::nullopt;
  return SlotId(it->second);
}

absl::Span<std::byte> SegmentStore::SlotData(SlotId slot) const {
  if (options_.arena == nullptr || !slot.valid() || slot.value() < 0 || slot.value() >= capacity_) {
    return {};
  }
  auto* base = static_cast<std::byte*>(options_.arena);
  return absl::Span<std::byte>(base + static_cast<size_t>(slot.value()) * options_.slot_bytes,
                               options_.slot_bytes);
}

absl::Status SegmentStore::Free(SegmentId segment) {
  absl::MutexLock lock(&mu_);
  auto it = by_segment_.find(segment);
  if (it == by_segment_.end()) {
    return absl::NotFoundError(
        absl::StrFormat("SegmentStore::Free: %s is not stored on instance %d", Str(segment),
                        options_.instance.value()));
  }
  const int32_t slot = it->second;
  SlotState& s = slots_[slot];
  if (s.pin_count > 0) {
    return absl::FailedPreconditionError(
        absl::StrFormat("SegmentStore::Free: %s in slot %d on instance %d is pinned (%d pins)",
                        Str(segment), slot, options_.instance.value(), s.pin_count));
  }
  s.segment = SegmentId();
  by_segment_.erase(it);
  free_list_.push_back(slot);
  return absl::OkStatus();
}

absl::StatusOr<SlotPin> SegmentStore::Pin(SegmentId segment) {
  absl::MutexLock lock(&mu_);
  auto it = by_segment_.find(segment);
  if (it == by_segment_.end()) {
    return absl::NotFoundError(absl::StrFormat("SegmentStore::Pin: %s is not stored on instance %d",
                                               Str(segment), options_.instance.value()));
  }
  const int32_t slot = it->second;
  SlotState& s = slots_[slot];
  if (s.pin_count++ == 0) ++num_pinned_;
  ++live_pins_;
  return SlotPin(this, segment, SlotId(slot));
}

void SegmentStore::Unpin(SlotId slot) {
  absl::MutexLock lock(&mu_);
  SlotState& s = slots_[slot.value()];
  TOKENLAKE_CHECK(s.pin_count > 0, "SlotPin released twice");
  --live_pins_;
  if (--s.pin_count == 0) --num_pinned_;
}

int32_t SegmentStore::PinCount(SegmentId segment) const {
  absl::MutexLock lock(&mu_);
  auto it = by_segment_.find(segment);
  return it == by_segment_.end() ? 0 : slots_[it->second].pin_count;
}

std::vector<SegmentId> SegmentStore::Segments() const {
  absl::MutexLock lock(&mu_);
  std::vector<SegmentId> out;
  out.reserve(by_segment_.size());
  for (const auto& [segment, slot] : by_segment_) out.push_back(segment);
  std::sort(out.begin(), out.end());
  return out;
}

int32_t SegmentStore::used() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int32_t>(by_segment_.size()) + tail_slots_;
}

int32_t SegmentStore::free() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int32_t>(free_list_.size());
}

int32_t SegmentStore::num_pinned() const {
  absl::MutexLock lock(&mu_);
  return num_pinned_;
}

absl::Status SegmentStore::CheckIntegrity() const {
  absl::MutexLock lock(&mu_);
  auto fail = [](const std::string& what) {
    return absl::InternalError("SegmentStore::CheckIntegrity: " + what);
  };
  if (by_segment_.size() + free_list_.size() + static_cast<size_t>(tail_slots_) !=
      static_cast<size_t>(capacity_)) {
    return fail(absl::StrFormat("segments %d + tail slots %d + free %d != capacity %d",
                                by_segment_.size(), tail_slots_, free_list_.size(), capacity_));
  }
  std::vector<char> is_free(slots_.size(), 0);
  for (int32_t slot : free_list_) {
    if (slot < 0 || slot >= capacity_ || is_free[slot]) {
      return fail(absl::StrFormat("free list holds bad or duplicate slot %d", slot));
    }
    is_free[slot] = 1;
    if (slots_[slot].segment.valid() || slots_[slot].tail) {
      return fail(absl::StrFormat("free slot %d is occupied", slot));
    }
  }
  int32_t tails = 0;
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (!slots_[i].tail) continue;
    ++tails;
    if (slots_[i].segment.valid() || slots_[i].pin_count != 0) {
      return fail(absl::StrFormat("tail slot %d holds a segment or a pin", i));
    }
  }
  if (tails != tail_slots_) return fail("tail slot counter is wrong");
  int32_t pinned = 0, pins = 0;
  for (const auto& [segment, slot] : by_segment_) {
    if (slot < 0 || slot >= capacity_ || is_free[slot] || slots_[slot].segment != segment) {
      return fail(Str(segment) + " maps to a slot that does not hold it");
    }
    const SlotState& s = slots_[slot];
    if (s.pin_count < 0) return fail(Str(segment) + " has a negative pin count");
    pins += s.pin_count;
    if (s.pin_count > 0) ++pinned;
  }
  if (pinned != num_pinned_) return fail("num_pinned counter is wrong");
  if (pins != live_pins_) return fail("live pin counter is wrong");
  return absl::OkStatus();
}

}  // namespace tokenlake::store
