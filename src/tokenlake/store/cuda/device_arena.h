// DeviceArena: one cudaMalloc'ed block of GPU memory (never managed memory) that backs a
// store::SegmentStore, so that GPU instances use the same slot allocator as host instances.
//
//   TOKENLAKE_ASSIGN_OR_RETURN(auto arena, DeviceArena::Create({.bytes = 8 << 30}));
//   TOKENLAKE_ASSIGN_OR_RETURN(auto store, store::SegmentStore::Create(
//       arena->StoreOptions(layout.SlotBytes(), instance)));
//   // store->SlotData(slot) is a span of DEVICE memory: pass it to kernels / cudaMemcpy only.
//
// Other processes on the same machine may map the arena (CUDA IPC): ExportHandle here,
// PeerArena::Open there (peer_arena.h, which also says how the two synchronise and how long the
// arena must live).
//
// Thread-safety: immutable after Create; all accessors are thread-safe. The memory itself is not
// synchronised (the SegmentStore's pins say who may read or write a slot).
#ifndef TOKENLAKE_STORE_CUDA_DEVICE_ARENA_H_
#define TOKENLAKE_STORE_CUDA_DEVICE_ARENA_H_

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "tokenlake/base/ids.h"
#include "tokenlake/store/cuda/ipc_handle.h"
#include "tokenlake/store/segment_store.h"

namespace tokenlake::store {

class DeviceArena {
 public:
  struct Options {
    // Bytes to allocate on the device, > 0.
    size_t bytes = 0;
    // CUDA device ordinal, >= 0.
    int device = 0;
  };

  // Allocates the arena with cudaMalloc on options.device (the calling thread's current device
  // is restored afterwards). The memory is uninitialised.
  // Errors: InvalidArgument (bytes == 0, device < 0), FailedPrecondition (no CUDA device, or
  // device >= the number of devices), ResourceExhausted (cudaMalloc out of memory), Internal
  // (another CUDA error).
  static absl::StatusOr<std::unique_ptr<DeviceArena>> Create(const Options& options);

  // Frees the memory. REQUIRES: no work that uses it is still pending on the device.
  ~DeviceArena();
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;

  // Device pointer to the first byte (256-byte aligned, as cudaMalloc guarantees).
  void* data() const { return data_; }
  size_t size_bytes() const { return bytes_; }
  int device() const { return device_; }

  // Options for a SegmentStore whose slots are `slot_bytes`-byte ranges of this arena
  // (num_slots = 0: as many as fit). The arena must outlive that store.
  SegmentStore::Options StoreOptions(size_t slot_bytes, InstanceId instance = InstanceId()) const;

  // The handle through which another process on this machine maps this arena
  // (PeerArena::Open): cudaIpcGetMemHandle of the arena's allocation, its size, the device's
  // ordinal and GPU UUID, and this process's identity. May be called any number of times.
  // REQUIRES (of the caller's protocol): the arena outlives every peer's mapping
  // (peer_arena.h, "Lifetime").
  // cudaMalloc may carve small allocations out of a larger block, and CUDA IPC then shares the
  // whole block with the peer: arenas meant for export should be a multiple of 2 MiB.
  // Errors: FailedPrecondition (CUDA IPC not supported on this device or platform),
  // ResourceExhausted (CUDA out of memory), Internal (another CUDA error).
  absl::StatusOr<ArenaHandle> ExportHandle() const;

 private:
  DeviceArena(void* data, size_t bytes, int device) : data_(data), bytes_(bytes), device_(device) {}

  void* const data_;
  const size_t bytes_;
  const int device_;
};

}  // namespace tokenlake::store

#endif  // TOKENLAKE_STORE_CUDA_DEVICE_ARENA_H_
