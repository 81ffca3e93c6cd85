#include "tokenlake/store/cuda/ipc_handle.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <random>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/status_macros.h"

namespace tokenlake::store {
namespace {

constexpr uint16_t kVersion = 1;
constexpr std::string_view kArenaMagic = "TLAH";
constexpr std::string_view kEventMagic = "TLEH";
// Offsets of the fields shared by both handles (the layout in ipc_handle.h).
constexpr size_t kVersionOffset = 4;
constexpr size_t kReservedOffset = 6;
constexpr size_t kDeviceOffset = 8;
constexpr size_t kPidOffset = 12;
constexpr size_t kTokenOffset = 16;
constexpr size_t kUuidOffset = 24;
constexpr size_t kIpcOffset = 40;
constexpr size_t kCommonBytes = kIpcOffset + kCudaIpcHandleBytes;  // 104
constexpr size_t kArenaSizeOffset = kCommonBytes;
static_assert(ArenaHandle::kSerializedBytes == kArenaSizeOffset + 8);
static_assert(EventHandle::kSerializedBytes == kCommonBytes);

void PutLe(std::string& out, size_t offset, uint64_t value, size_t bytes) {
  for (size_t i = 0; i < bytes; ++i) out[offset + i] = static_cast<char>((value >> (8 * i)) & 0xff);
}

uint64_t GetLe(std::string_view in, size_t offset, size_t bytes) {
  uint64_t value = 0;
  for (size_t i = 0; i < bytes; ++i) {
    value |= uint64_t{static_cast<uint8_t>(in[offset + i])} << (8 * i);
  }
  return value;
}

// Writes the magic and the fields every handle has; the caller adds its own.
std::string SerializeCommon(std::string_view magic, size_t total_bytes, const IpcOrigin& origin,
                            const CudaIpcHandleBytes& ipc_handle) {
  std::string out(total_bytes, '\0');
  std::memcpy(out.data(), magic.data(), magic.size());
  PutLe(out, kVersionOffset, kVersion, 2);
  PutLe(out, kReservedOffset, 0, 2);
  PutLe(out, kDeviceOffset, static_cast<uint32_t>(origin.device), 4);
  PutLe(out, kPidOffset, origin.pid, 4);
  PutLe(out, kTokenOffset, origin.process_token, 8);
  std::memcpy(out.data() + kUuidOffset, origin.device_uuid.data(), origin.device_uuid.size());
  std::memcpy(out.data() + kIpcOffset, ipc_handle.data(), ipc_handle.size());
  return out;
}

// A printable rendering of up to 4 magic bytes for error messages.
std::string ShowMagic(std::string_view bytes) {
  return absl::StrFormat("\"%s\"", absl::CHexEscape(std::string(bytes.substr(0, 4))));
}

// Checks the magic, version, length and the common fields of `bytes` as a handle of kind `what`
// (`magic`, `total_bytes`); fills `origin` and `ipc_handle`.
absl::Status ParseCommon(std::string_view what, std::string_view magic, size_t total_bytes,
                         std::string_view bytes, IpcOrigin& origin,
                         CudaIpcHandleBytes& ipc_handle) {
  // Magic and version first: a handle of another kind or of a newer format is named as such
  // rather than reported as a wrong length.
  if (bytes.size() < kDeviceOffset) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: %d bytes, expected %d (format version %d)", what, bytes.size(),
                        total_bytes, kVersion));
  }
  if (bytes.substr(0, 4) != magic) {
    const std::string_view other = magic == kArenaMagic ? kEventMagic : kArenaMagic;
    const std::string_view other_what =
        magic == kArenaMagic ? "an event handle" : "an arena handle";
    if (bytes.substr(0, 4) == other) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: bytes 0-3 are the magic %s of %s, expected %s", what,
                          ShowMagic(bytes), other_what, ShowMagic(magic)));
    }
    return absl::InvalidArgumentError(absl::StrFormat("%s: bytes 0-3 are %s, expected the magic %s",
                                                      what, ShowMagic(bytes), ShowMagic(magic)));
  }
  const uint64_t version = GetLe(bytes, kVersionOffset, 2);
  if (version != kVersion) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: format version %d (bytes 4-5), this build reads version %d", what, version, kVersion));
  }
  if (bytes.size() != total_bytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: %d bytes, expected %d (format version %d)", what, bytes.size(),
                        total_bytes, kVersion));
  }
  const uint64_t reserved = GetLe(bytes, kReservedOffset, 2);
  if (reserved != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: reserved bytes 6-7 are 0x%04x, expected 0", what, reserved));
  }
  const auto device = static_cast<int32_t>(static_cast<uint32_t>(GetLe(bytes, kDeviceOffset, 4)));
  if (device < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: device %d (bytes 8-11) is negative", what, device));
  }
  const uint64_t pid = GetLe(bytes, kPidOffset, 4);
  if (pid == 0 || pid > 0x7fffffffu) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: pid %d (bytes 12-15) is not a process id", what, pid));
  }
  const uint64_t token = GetLe(bytes, kTokenOffset, 8);
  if (token == 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: process token (bytes 16-23) is 0", what));
  }
  std::memcpy(ipc_handle.data(), bytes.data() + kIpcOffset, ipc_handle.size());
  if (std::all_of(ipc_handle.begin(), ipc_handle.end(), [](uint8_t b) { return b == 0; })) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: the CUDA IPC handle (bytes %d-%d) is all zeros", what, kIpcOffset, kCommonBytes - 1));
  }
  origin.device = device;
  origin.pid = static_cast<uint32_t>(pid);
  origin.process_token = token;
  std::memcpy(origin.device_uuid.data(), bytes.data() + kUuidOffset, origin.device_uuid.size());
  return absl::OkStatus();
}

}  // namespace

uint64_t ThisProcessToken() {
  // Drawn once per process image: a child started with exec draws its own.
  static const uint64_t token = [] {
    std::random_device device;
    uint64_t value = 0;
    while (value == 0) value = (uint64_t{device()} << 32) ^ device();
    return value;
  }();
  return token;
}

IpcOrigin IpcOrigin::ThisProcess(int32_t device, const DeviceUuid& device_uuid) {
  IpcOrigin origin;
  origin.device = device;
  origin.device_uuid = device_uuid;
  origin.pid = static_cast<uint32_t>(::getpid());
  origin.process_token = ThisProcessToken();
  return origin;
}

bool IpcOrigin::IsThisProcess() const {
  return pid == static_cast<uint32_t>(::getpid()) && process_token == ThisProcessToken();
}

std::string IpcOrigin::ToString() const {
  const bool known =
      std::any_of(device_uuid.begin(), device_uuid.end(), [](uint8_t b) { return b != 0; });
  return absl::StrFormat("process %d, device %d (%s)", pid, device,
                         known ? FormatDeviceUuid(device_uuid) : "GPU UUID unknown");
}

std::string FormatDeviceUuid(const DeviceUuid& uuid) {
  std::string out = "GPU-";
  for (size_t i = 0; i < uuid.size(); ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out += '-';
    out += absl::StrFormat("%02x", uuid[i]);
  }
  return out;
}

std::string ArenaHandle::Serialize() const {
  std::string out = SerializeCommon(kArenaMagic, kSerializedBytes, origin, ipc_handle);
  PutLe(out, kArenaSizeOffset, size_bytes, 8);
  return out;
}

absl::StatusOr<ArenaHandle> ArenaHandle::Parse(std::string_view bytes) {
  ArenaHandle handle;
  TOKENLAKE_RETURN_IF_ERROR(ParseCommon("ArenaHandle", kArenaMagic, kSerializedBytes, bytes,
                                        handle.origin, handle.ipc_handle));
  handle.size_bytes = GetLe(bytes, kArenaSizeOffset, 8);
  if (handle.size_bytes == 0) {
    return absl::InvalidArgumentError(absl::StrFormat("ArenaHandle: size_bytes (bytes %d-%d) is 0",
                                                      kArenaSizeOffset, kArenaSizeOffset + 7));
  }
  return handle;
}

std::string EventHandle::Serialize() const {
  return SerializeCommon(kEventMagic, kSerializedBytes, origin, ipc_handle);
}

absl::StatusOr<EventHandle> EventHandle::Parse(std::string_view bytes) {
  EventHandle handle;
  TOKENLAKE_RETURN_IF_ERROR(ParseCommon("EventHandle", kEventMagic, kSerializedBytes, bytes,
                                        handle.origin, handle.ipc_handle));
  return handle;
}

}  // namespace tokenlake::store
