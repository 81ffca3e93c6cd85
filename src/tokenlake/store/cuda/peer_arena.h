// Another process's device arena mapped into this one (CUDA IPC), and interprocess events to
// order GPU work between the two: the same-GPU data plane between instance processes, where
// queries, partial outputs and KV move device to device with no host staging.
//
//   // Exporter (the process that owns the arena):
//   TOKENLAKE_ASSIGN_OR_RETURN(ArenaHandle handle, arena->ExportHandle());
//   send(peer, handle.Serialize());                   // over the cluster's control channel
//   // Peer:
//   TOKENLAKE_ASSIGN_OR_RETURN(ArenaHandle handle, ArenaHandle::Parse(received));
//   TOKENLAKE_ASSIGN_OR_RETURN(auto mapped, PeerArena::Open(handle));
//   cudaMemcpyAsync(my_buffer, static_cast<std::byte*>(mapped->data()) + offset, n,
//                   cudaMemcpyDeviceToDevice, stream);  // after synchronising, see below
//
// Lifetime. REQUIRES: the exporter keeps its DeviceArena alive (and the process running) until
// every peer has destroyed its PeerArena. Freeing an arena that a peer still has open is
// undefined behaviour in CUDA: the peer may read or overwrite whatever the exporter allocates
// there next, or fault. The two sides therefore need a protocol (the peer closes, then tells the
// exporter; the exporter frees only after every peer has said so or has exited). If the exporter
// dies, a peer must stop using the mapping and destroy its PeerArena. Opening the same handle
// twice in one process gives the same mapping, reference-counted by CUDA: each PeerArena closes
// its own reference.
//
// Synchronisation. The mapped memory is the same device memory in both processes, but CUDA
// orders nothing between processes: bytes that one process writes are visible to the other only
// after the writer's GPU work has completed, and the reader must start its reads after that.
// Two ways to do it, both with a message on the host channel that tells the reader the data is
// there:
//   1. the writer synchronises its stream (cudaStreamSynchronize) and then sends the message;
//      the reader's work issued after receiving it sees the bytes;
//   2. without blocking the writer's host thread: the writer enqueues its writes, records an
//      IpcEvent on the same stream (IpcEvent::Record), then sends the message; the reader calls
//      IpcEvent::StreamWait on its stream and enqueues its reads after it.
// The message is needed in 2. because a wait on an event whose record has not been issued yet
// does not wait (an event never recorded counts as complete). The same holds the other way:
// before the writer overwrites bytes that a reader may still be reading, the reader must say it
// is done (its own event or a host message). A wait on an event orders after the event's latest
// record issued before the wait call, so re-recording one event for each message is safe.
//
// Thread-safety: PeerArena is immutable after Open; all its methods are thread-safe. The memory
// is not synchronised (see above). IpcEvent's methods are thread-safe as CUDA's event calls are;
// Open and Create may run on any thread (the calling thread's current device is restored).
#ifndef TOKENLAKE_STORE_CUDA_PEER_ARENA_H_
#define TOKENLAKE_STORE_CUDA_PEER_ARENA_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "tokenlake/store/cuda/ipc_handle.h"

namespace tokenlake::store {

class PeerArena {
 public:
  // Maps the arena that `handle` names (DeviceArena::ExportHandle in another process) with
  // cudaIpcOpenMemHandle(..., cudaIpcMemLazyEnablePeerAccess) on the same physical GPU: the
  // device of this process with the handle's GPU UUID (for a handle without a UUID, the
  // handle's ordinal). The calling thread's current device is restored.
  // Errors, each naming the exporter, the device and the size:
  //   InvalidArgument: a malformed handle (as ArenaHandle::Parse); the arena was exported by
  //     this process ("use it directly": CUDA cannot open a process's own handle); CUDA refused
  //     the handle while its exporter runs (not a live allocation of it), with CUDA's error;
  //     the handle's size exceeds the allocation that CUDA mapped.
  //   FailedPrecondition: no CUDA device; the handle's GPU is not visible in this process, or
  //     its ordinal is out of range; this process cannot use that device (e.g. the GPU is in
  //     exclusive-process compute mode); CUDA IPC not supported here, or peer access impossible.
  //   Unavailable: the exporting process has exited (its arena is gone), with CUDA's error.
  //   ResourceExhausted: CUDA out of memory while mapping.
  static absl::StatusOr<std::unique_ptr<PeerArena>> Open(const ArenaHandle& handle);

  // Closes this reference to the mapping (cudaIpcCloseMemHandle).
  // REQUIRES: no work of this process that uses the memory is still pending on the device.
  ~PeerArena();
  PeerArena(const PeerArena&) = delete;
  PeerArena& operator=(const PeerArena&) = delete;

  // Device pointer, in this process, to byte 0 of the exporter's arena. The bytes
  // [0, size_bytes()) may be read and written by this process's GPU work on device().
  void* data() const { return data_; }
  size_t size_bytes() const { return size_bytes_; }
  // This process's ordinal of the GPU (may differ from origin().device).
  int device() const { return device_; }
  const IpcOrigin& origin() const { return origin_; }

 private:
  PeerArena(void* data, size_t size_bytes, int device, const IpcOrigin& origin)
      : data_(data), size_bytes_(size_bytes), device_(device), origin_(origin) {}

  void* const data_;
  const size_t size_bytes_;
  const int device_;
  const IpcOrigin origin_;
};

// A CUDA event shared between processes (cudaEventInterprocess | cudaEventDisableTiming): one
// process creates and exports it, others open it; any of them may record it on their streams
// and wait on it (see "Synchronisation" above).
// Lifetime. REQUIRES: the creating process keeps its IpcEvent alive until every process that
// opened it has destroyed its own (using an opened event after the creator destroyed it is
// undefined behaviour in CUDA). If a process that records the event may die, waiting on it may
// never end: wait with a deadline (poll Query) rather than cudaEventSynchronize.
class IpcEvent {
 public:
  // Creates an interprocess event on `device` of this process.
  // Errors: InvalidArgument (device < 0), FailedPrecondition (no CUDA device; device out of
  // range), Internal (another CUDA error).
  static absl::StatusOr<std::unique_ptr<IpcEvent>> Create(int device);

  // Opens the event that `handle` names (IpcEvent::ExportHandle in another process), on this
  // process's device with the handle's GPU UUID (as PeerArena::Open).
  // Errors: as PeerArena::Open (InvalidArgument for this process's own event, a malformed
  // handle, or one CUDA refuses while its exporter runs; FailedPrecondition for the device;
  // Unavailable when the exporter has exited).
  static absl::StatusOr<std::unique_ptr<IpcEvent>> Open(const EventHandle& handle);

  // Destroys this process's event object (cudaEventDestroy).
  ~IpcEvent();
  IpcEvent(const IpcEvent&) = delete;
  IpcEvent& operator=(const IpcEvent&) = delete;

  // The handle that other processes open. Errors: FailedPrecondition (this event was opened
  // from another process's handle: export the creator's), Internal (a CUDA error).
  absl::StatusOr<EventHandle> ExportHandle() const;

  // cudaEventRecord on `stream`: the event completes when the stream's work issued so far has.
  // REQUIRES: `stream` belongs to device(). Errors: Internal with CUDA's error.
  absl::Status Record(cudaStream_t stream);
  // cudaStreamWaitEvent: work issued to `stream` after this call starts only once the event's
  // latest record (issued before this call, in any process) has completed.
  // REQUIRES: `stream` belongs to device(). Errors: Internal with CUDA's error.
  absl::Status StreamWait(cudaStream_t stream);
  // True once the event's latest record has completed (or it was never recorded).
  // Errors: Internal with CUDA's error.
  absl::StatusOr<bool> Query() const;

  cudaEvent_t get() const { return event_; }
  // This process's ordinal of the event's GPU.
  int device() const { return device_; }
  // True if this event was opened from another process's handle, false if created here.
  bool opened() const { return opened_; }

 private:
  IpcEvent(cudaEvent_t event, int device, bool opened)
      : event_(event), device_(device), opened_(opened) {}

  cudaEvent_t event_;  // owned: destroyed with this object
  const int device_;
  const bool opened_;
};

}  // namespace tokenlake::store

#endif  // TOKENLAKE_STORE_CUDA_PEER_ARENA_H_
