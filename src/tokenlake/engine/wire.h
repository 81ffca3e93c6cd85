// Byte encoding of the engine's data-plane messages (little-endian host order: the loopback
// transport never leaves the process; a network transport would fix the byte order here).
//
// WireWriter appends trivially copyable values and arrays; WireReader reads them back with bounds
// checks, returning DataLoss naming the field on a short or malformed payload.
//
// Thread-safety: value types, not shared.
#ifndef TOKENLAKE_ENGINE_WIRE_H_
#define TOKENLAKE_ENGINE_WIRE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "absl/types/span.h"

namespace tokenlake::engine {

class WireWriter {
 public:
  template <typename T>
  void Put(const T& value) {
    static_assert(std::is_trivially_copyable_v<T>);
    const size_t at = bytes_.size();
    bytes_.resize(at + sizeof(T));
    std::memcpy(bytes_.data() + at, &value, sizeof(T));
  }
  // Writes the element count (uint64) and then the elements.
  template <typename T>
  void PutArray(absl::Span<const T> values) {
    static_assert(std::is_trivially_copyable_v<T>);
    Put<uint64_t>(values.size());
    const size_t at = bytes_.size();
    bytes_.resize(at + values.size() * sizeof(T));
    if (!values.empty()) std::memcpy(bytes_.data() + at, values.data(), values.size() * sizeof(T));
  }
  // Appends n bytes for the caller to fill (e.g. a device-to-host copy straight into the
  // message); the span is valid until the next Put, PutArray, Extend or Take.
  absl::Span<std::byte> Extend(size_t n) {
    const size_t at = bytes_.size();
    bytes_.resize(at + n);
    return absl::MakeSpan(bytes_).subspan(at, n);
  }
  std::vector<std::byte> Take() { return std::move(bytes_); }

 private:
  std::vector<std::byte> bytes_;
};

class WireReader {
 public:
  explicit WireReader(absl::Span<const std::byte> bytes) : bytes_(bytes) {}

  template <typename T>
  absl::Status Get(T* value, const char* field) {
    static_assert(std::is_trivially_copyable_v<T>);
    if (bytes_.size() - pos_ < sizeof(T)) return Short(field);
    std::memcpy(value, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return absl::OkStatus();
  }
  template <typename T>
  absl::Status GetArray(std::vector<T>* values, const char* field) {
    uint64_t n = 0;
    if (absl::Status s = Get(&n, field); !s.ok()) return s;
    if (n > (bytes_.size() - pos_) / sizeof(T)) return Short(field);
    values->resize(n);
    if (n > 0) std::memcpy(values->data(), bytes_.data() + pos_, n * sizeof(T));
    pos_ += n * sizeof(T);
    return absl::OkStatus();
  }
  bool done() const { return pos_ == bytes_.size(); }
  // The bytes not read yet (raw data after the fields).
  absl::Span<const std::byte> rest() const { return bytes_.subspan(pos_); }

 private:
  absl::Status Short(const char* field) const {
    return absl::DataLossError(absl::StrFormat(
        "message too short for field '%s' (at byte %d of %d)", field, pos_, bytes_.size()));
  }
  absl::Span<const std::byte> bytes_;
  size_t pos_ = 0;
};

}  // namespace tokenlake::engine

#endif  // TOKENLAKE_ENGINE_WIRE_H_
