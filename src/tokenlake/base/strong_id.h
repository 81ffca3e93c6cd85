// StrongId: a typed wrapper around an integer id, so that a SegmentId cannot be passed where an
// InstanceId is expected. Trivially copyable, hashable (absl and std), ordered, printable.
//
// Thread-safety: a value type; safe to copy between threads.
#ifndef TOKENLAKE_BASE_STRONG_ID_H_
#define TOKENLAKE_BASE_STRONG_ID_H_

#include <compare>
#include <cstdint>
#include <functional>
#include <limits>
#include <ostream>
#include <utility>

namespace tokenlake {

template <typename Tag, typename Rep>
class StrongId {
 public:
  using ValueType = Rep;

  // The default-constructed id is the invalid sentinel (all bits set).
  constexpr StrongId() = default;
  constexpr explicit StrongId(Rep value) : value_(value) {}

  static constexpr StrongId Invalid() { return StrongId(); }

  constexpr Rep value() const { return value_; }
  constexpr bool valid() const { return value_ != kInvalidValue; }

  friend constexpr auto operator<=>(StrongId a, StrongId b) = default;
  friend constexpr bool operator==(StrongId a, StrongId b) = default;

  template <typename H>
  friend H AbslHashValue(H h, StrongId id) {
    return H::combine(std::move(h), id.value_);
  }

  friend std::ostream& operator<<(std::ostream& os, StrongId id) {
    if (!id.valid()) return os << Tag::kName << "(invalid)";
    return os << Tag::kName << "(" << id.value_ << ")";
  }

 private:
  static constexpr Rep kInvalidValue = std::numeric_limits<Rep>::max();
  Rep value_ = kInvalidValue;
};

}  // namespace tokenlake

template <typename Tag, typename Rep>
struct std::hash<tokenlake::StrongId<Tag, Rep>> {
  size_t operator()(tokenlake::StrongId<Tag, Rep> id) const noexcept {
    return std::hash<Rep>{}(id.value());
  }
};

#endif  // TOKENLAKE_BASE_STRONG_ID_H_
