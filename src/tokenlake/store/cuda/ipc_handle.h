// Handles through which another process on the same machine maps this process's GPU memory or
// waits on its GPU events (CUDA IPC), as bytes that travel over any channel: a control message,
// a file, an environment variable.
//
// An ArenaHandle names one DeviceArena (device_arena.h: DeviceArena::ExportHandle makes it,
// peer_arena.h: PeerArena::Open maps it); an EventHandle names one interprocess event
// (peer_arena.h: IpcEvent). Both carry an IpcOrigin, which process exported them on which GPU,
// so that an opener refuses its own handles (CUDA cannot open them), finds the same physical GPU
// whatever its own device numbering (CUDA_VISIBLE_DEVICES may differ between processes), and
// tells "the exporter has exited" from "a bad handle".
//
// This file has no CUDA dependency (the CUDA handle is kept as its 64 opaque bytes), so the
// formats are tested and fuzzed without a GPU. A handle is a capability: whoever holds it may map
// the memory (read and write). Send it only over the cluster's authenticated channels.
//
// Wire format, version 1 (integers little-endian; Serialize writes it, Parse reads it):
//   offset size  field
//   0      4     magic: "TLAH" (arena handle) or "TLEH" (event handle)
//   4      2     version, 1
//   6      2     reserved, 0
//   8      4     device: the exporter's CUDA device ordinal (its own numbering), int32 >= 0
//   12     4     pid: the exporter's process id, in [1, 2^31)
//   16     8     process_token: random per process, != 0 (tells apart processes whose pids are
//                equal, e.g. in different pid namespaces)
//   24     16    device_uuid: the GPU's UUID as CUDA reports it; all zeros = unknown (open by
//                ordinal)
//   40     64    the CUDA IPC handle (cudaIpcMemHandle_t or cudaIpcEventHandle_t), not all zeros
//   104    8     arena handles only: size_bytes, > 0
// That is 104 bytes for an event handle and 112 for an arena handle. Parse accepts exactly these
// layouts, so Serialize(Parse(b)) == b for every b that Parse accepts.
//
// Thread-safety: plain values; every function is thread-safe.
#ifndef TOKENLAKE_STORE_CUDA_IPC_HANDLE_H_
#define TOKENLAKE_STORE_CUDA_IPC_HANDLE_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace tokenlake::store {

// CUDA_IPC_HANDLE_SIZE of cuda_runtime_api.h (checked against it in peer_arena.cc).
inline constexpr size_t kCudaIpcHandleBytes = 64;
using CudaIpcHandleBytes = std::array<uint8_t, kCudaIpcHandleBytes>;
using DeviceUuid = std::array<uint8_t, 16>;

// Which process exported a handle, and on which GPU.
struct IpcOrigin {
  // The exporter's CUDA device ordinal, in the exporter's numbering.
  int32_t device = 0;
  // The GPU's UUID (cudaDeviceProp::uuid), the same in every process; all zeros = unknown.
  DeviceUuid device_uuid{};
  // The exporter's process id.
  uint32_t pid = 0;
  // A random number drawn once per process (ThisProcessToken).
  uint64_t process_token = 0;

  // The origin for a handle this process exports on `device` (pid and token of this process).
  static IpcOrigin ThisProcess(int32_t device, const DeviceUuid& device_uuid);
  // True if this process exported the handle (same pid and same process token).
  bool IsThisProcess() const;
  // "process 1234, device 0 (GPU-8c1f...)" for error messages.
  std::string ToString() const;

  bool operator==(const IpcOrigin&) const = default;
};

// The random, non-zero token of this process, drawn on first use.
uint64_t ThisProcessToken();

// "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", as nvidia-smi prints a GPU's UUID.
std::string FormatDeviceUuid(const DeviceUuid& uuid);

// One exported DeviceArena: what PeerArena::Open needs to map it in another process.
struct ArenaHandle {
  static constexpr size_t kSerializedBytes = 112;

  // cudaIpcMemHandle_t of the arena's allocation (its base pointer).
  CudaIpcHandleBytes ipc_handle{};
  // The arena's size: the peer may use bytes [0, size_bytes) of the mapping.
  uint64_t size_bytes = 0;
  IpcOrigin origin;

  // The wire format above (kSerializedBytes bytes). Writes the fields as they are: only a handle
  // that Parse would accept is meaningful to a peer.
  std::string Serialize() const;
  // Reads the wire format. Never crashes, whatever the bytes.
  // Errors: InvalidArgument naming what is wrong and where: the length, the magic (an event
  // handle's magic is named as such), the version, the reserved bytes, a negative device, a pid
  // or process token of 0 (or a pid >= 2^31), an all-zero CUDA handle, a size of 0.
  static absl::StatusOr<ArenaHandle> Parse(std::string_view bytes);

  bool operator==(const ArenaHandle&) const = default;
};

// One exported interprocess event (IpcEvent::ExportHandle): what IpcEvent::Open needs.
struct EventHandle {
  static constexpr size_t kSerializedBytes = 104;

  // cudaIpcEventHandle_t of the event.
  CudaIpcHandleBytes ipc_handle{};
  IpcOrigin origin;

  // As ArenaHandle::Serialize / Parse, without the size field and with magic "TLEH".
  std::string Serialize() const;
  static absl::StatusOr<EventHandle> Parse(std::string_view bytes);

  bool operator==(const EventHandle&) const = default;
};

}  // namespace tokenlake::store

#endif  // TOKENLAKE_STORE_CUDA_IPC_HANDLE_H_
