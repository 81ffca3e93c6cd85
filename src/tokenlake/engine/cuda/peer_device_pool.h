// PeerDevicePool: the DevicePool (device_pool.h) of one instance process on a GPU that other
// instance processes share (docs/adr/0018). It hosts ONE instance of an N-instance pool: its
// arena (a store::DeviceArena, exported for the peers), its slot allocator, the metadata of
// what it stores, and a server thread that answers the peers' requests. Every other instance
// on the same GPU is reached through its mapped arena (AddPeer: store::PeerArena) and host
// messages over a transport:
//   locate  the arena offsets of segments the peer stores (one message per holder per
//           iteration; the computing instance's kernels then read those slots in place);
//   tail    a tail slot allocated, given back or committed in place on the peer (the computing
//           instance's forward writes the block through the mapping);
//   store   the peer allocates a slot and copies a segment's KV device to device from the
//           sender's mapped arena, then replies;
//   free    the peer frees a slot, unless a later control-plane change placed the segment
//           there again (its placement sequence; as InstancePool::FreeSegment).
// Calls that name this process's own instance run directly on its store (no message).
//
// A peer whose arena is not mapped here (another GPU or host, or one whose process does not
// share its arena: docs/adr/0018 point 5) is reached with bytes through host memory:
//   fetch   the peer copies segments' KV device to host and sends them with their metadata;
//           they land in this process's staging cache (device memory, kept between iterations:
//           the next steps of a decode read the same prefix again; each iteration's fetch names
//           the copies the cache has, and the peer sends only those it has stored since) and
//           the kernels read them there, so a moved query to such a holder is served by a pull;
//   bytes   a store carries the block's bytes (copied device to host here, host to device
//           there), and a rebalance copy from such a peer is a fetch stored here.
// Its tail slots cannot be written from here (AllocateTail fails FailedPrecondition): the lake
// keeps a tail on its computing instance's device (lake::Lake::SetDeviceDomains).
//
// Ordering between processes (store/cuda/peer_arena.h): a store request is sent after this
// process's stream synchronised (the holder copies bytes this process wrote); the holder's copy
// has completed when it replies; a free or a tail given back is sent after the stream that may
// read the slot synchronised. Slots named by a plan stay allocated while the lake pins them, so
// a slot read in place is never rewritten meanwhile.
//
// Endpoints: the server of instance i is endpoint_base + i and the driver of instance c is
// endpoint_base + N + c; the transport must host this instance's two endpoints and reach the
// peers' (a TcpTransport with SetPeer, typically).
//
// A peer's tail slots here are its own: only its driver commits or gives them back, and when
// its process is gone they are given back here (ForgetPeerTails).
//
// Thread-safety: the DevicePool calls come from one driver thread; AddPeer, RemovePeer,
// ForgetPeerTails, ExportHandle and the accessors are thread-safe; the server thread runs
// beside them.
#ifndef TOKENLAKE_ENGINE_CUDA_PEER_DEVICE_POOL_H_
#define TOKENLAKE_ENGINE_CUDA_PEER_DEVICE_POOL_H_

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "tokenlake/engine/cuda/device_buffer.h"
#include "tokenlake/engine/cuda/device_pool.h"
#include "tokenlake/engine/data_rpc.h"
#include "tokenlake/engine/hosted_store.h"
#include "tokenlake/store/cuda/device_arena.h"
#include "tokenlake/store/cuda/peer_arena.h"
#include "tokenlake/transport/transport.h"

namespace tokenlake::engine::cuda {

class PeerDevicePool final : public DevicePool {
 public:
  struct Options {
    // Instances of the whole pool, >= 1.
    int32_t num_instances = 1;
    // The instance this process hosts, in [0, num_instances).
    InstanceId self;
    // Slots of this instance, >= 1 (the arena is slots x layout.SlotBytes(), rounded up to
    // 2 MiB so that CUDA IPC shares exactly it).
    int32_t slots = 1;
    // The slots' layout; must validate and be the same on every instance.
    attention::KvSlotLayout layout;
    // CUDA device ordinal of this process.
    int device = 0;
    // Borrowed, must outlive the pool; hosts endpoint_base + self and endpoint_base + N + self.
    transport::Transport* transport = nullptr;
    // First endpoint of the pool in the transport's endpoint space, >= 0.
    int32_t endpoint_base = 0;
    // How long a request to a peer may take before it fails (DeadlineExceeded).
    absl::Duration reply_timeout = absl::Seconds(10);
    // Changes of the store kept for the instance's reports (HostedStore; 0: numbered only).
    int64_t change_log_entries = 0;
    // Slots of the staging cache of unmapped peers' segments, >= 0 (a batch that reads more
    // grows it to what it reads).
    int32_t staging_slots = 16;
    // Largest fetch reply, in bytes (a holder's segments of one iteration are split into
    // replies of at most this many bytes, at least one slot each; below the transport's payload
    // limit).
    int64_t max_fetch_bytes = int64_t{64} << 20;
  };

  // Allocates the arena and starts the server thread.
  // Errors: InvalidArgument naming a bad option; the arena's errors (ResourceExhausted naming
  // the bytes asked for).
  static absl::StatusOr<std::unique_ptr<PeerDevicePool>> Create(const Options& options);
  // Stops the server, unmaps the peers and frees the arena. REQUIRES: no peer still maps it
  // (peer_arena.h, "Lifetime"), and no work of this process that uses a mapping is pending.
  ~PeerDevicePool() override;
  PeerDevicePool(const PeerDevicePool&) = delete;
  PeerDevicePool& operator=(const PeerDevicePool&) = delete;

  // The handle through which peers map this instance's arena (DeviceArena::ExportHandle).
  absl::StatusOr<store::ArenaHandle> ExportHandle() const;
  // Maps the arena of instance `peer` (on this GPU), replacing an earlier mapping of it.
  // Errors: InvalidArgument (peer out of range or this instance; an arena smaller than the
  // slots need is refused naming both sizes), PeerArena::Open's errors.
  absl::Status AddPeer(InstanceId peer, const store::ArenaHandle& handle);
  // Unmaps `peer`'s arena (a peer that left). REQUIRES: no pending work reads it.
  void RemovePeer(InstanceId peer);
  // Gives back the tail slots that `peer`'s driver took on this instance and has neither
  // committed nor given back: its process is gone (another process took its place), and the
  // coordinator's lake has ended the tails of the requests it computed
  // (lake::Lake::ReleaseTailsComputedOn). Later calls of that driver about those slots are
  // refused. Returns how many were given back. Thread-safe.
  int32_t ForgetPeerTails(InstanceId peer);

  InstanceId self() const { return options_.self; }
  // This instance's slot allocator.
  const store::SegmentStore& store() const { return hosted_->slots(); }
  // This instance's slots with their metadata, generations and change log (what the instance
  // reports to the coordinator, and the frees it decides from those reports).
  HostedStore& hosted() { return *hosted_; }
  // What this instance stores, with the metadata its stores carried.
  std::vector<HeldSegmentInfo> Held() const { return hosted_->Held().segments; }

  // Copies `segment` from peer `from` (on this GPU, read through its mapped arena) into this
  // instance's store (a rebalance replicate or move), with the peer's metadata and the lake's
  // change `sequence` as its placement; the copy has completed when this returns. Returns the
  // bytes copied. Errors: the peer's (NotFound: not stored there), FailedPrecondition (its arena
  // is not mapped), ResourceExhausted (no free slot), CUDA errors.
  absl::StatusOr<int64_t> CopyFromPeer(InstanceId from, SegmentId segment, uint64_t sequence);

  // What this instance's driver asked of its peers so far (calls on its own instance are not
  // counted), for the instance's metrics. Times are host wall time, request to reply.
  struct Traffic {
    // Locate rounds: messages (one per peer holder per iteration), the peers' slots the kernels
    // then read in place and their bytes (every layer's), and the rounds' time (all sent, every
    // reply in).
    int64_t locate_messages = 0;
    int64_t in_place_slots = 0;
    int64_t in_place_bytes = 0;
    absl::Duration locate_time;
    // Stores into a peer (it copies the block device to device before it replies).
    int64_t store_messages = 0;
    int64_t store_bytes = 0;
    absl::Duration store_time;
    // Tail slots allocated, committed in place or given back on a peer.
    int64_t tail_messages = 0;
    absl::Duration tail_time;
    // Frees and rebalance copies asked of a peer.
    int64_t other_messages = 0;
    absl::Duration other_time;
    // Unmapped peers (host staging): fetches, the slots and bytes they brought, the slots the
    // staging cache already had, and their time; stores that carried bytes (also counted in
    // store_*).
    int64_t fetch_messages = 0;
    int64_t fetched_slots = 0;
    int64_t fetched_bytes = 0;
    int64_t staged_hits = 0;
    absl::Duration fetch_time;
    int64_t byte_stores = 0;
  };
  Traffic traffic() const;

  int32_t num_instances() const override { return options_.num_instances; }
  const attention::KvSlotLayout& layout() const override { return options_.layout; }
  absl::Status Resolve(absl::Span<const SlotRef> refs, absl::Span<const std::byte*> out) override;
  absl::StatusOr<DeviceSlot> AllocateTail(InstanceId instance) override;
  absl::Status FreeTail(InstanceId instance, SlotId slot) override;
  absl::Status CommitTail(InstanceId instance, SlotId slot, SegmentId segment,
                          const StoredMeta& meta) override;
  absl::Status Store(InstanceId target, SegmentId segment, const std::byte* source,
                     const StoredMeta& meta, cudaStream_t stream) override;
  absl::Status Free(InstanceId target, SegmentId segment, uint64_t evicted_at,
                    cudaStream_t stream) override;

 private:
  explicit PeerDevicePool(const Options& options);
  InstanceId ServerEndpoint(InstanceId i) const {
    return InstanceId(options_.endpoint_base + i.value());
  }
  // Internal naming `what` unless `i` is in range.
  absl::Status CheckInstance(InstanceId i, const char* what) const;
  // Byte 0 of instance i's arena in this process (its own, or a peer's mapping) and its size.
  // Errors: FailedPrecondition when the peer's arena is not mapped.
  absl::StatusOr<std::pair<std::byte*, size_t>> ArenaOf(InstanceId i) const;
  // One request to `target`'s server and its reply.
  absl::StatusOr<transport::Message> Call(InstanceId target, uint32_t tag,
                                          std::vector<std::byte> payload);
  // Whether instance i's arena is mapped here (its own is).
  bool Mapped(InstanceId i) const;
  // Resolve's part for unmapped holders: refs[at[k]] are read from the staging cache, fetched
  // into it first unless it has them.
  absl::Status ResolveStaged(absl::Span<const SlotRef> refs, absl::Span<const size_t> at,
                             absl::Span<const std::byte*> out);
  // A copy of a peer's segment as its holder stored it: the holder's incarnation (a random
  // token of its pool) and the generation of its copy (HostedStore::GenerationOf).
  struct CopyVersion {
    uint64_t incarnation = 0;
    uint64_t generation = 0;
    bool operator==(const CopyVersion&) const = default;
  };
  // Fetches `segments` from `holder` (replies of at most max_fetch_bytes of KV, all sent before
  // any is awaited). `have[k]` is the version of segment k this process has (zeros: none): the
  // holder sends its KV only when its copy is another. `sink(k, meta, version, kv)` gets every
  // segment; kv is empty when the copy is the one `have[k]` names.
  absl::Status Fetch(InstanceId holder, absl::Span<const SegmentId> segments,
                     absl::Span<const CopyVersion> have,
                     absl::FunctionRef<absl::Status(size_t, const StoredMeta&, const CopyVersion&,
                                                    absl::Span<const std::byte>)>
                         sink);

  // This instance's side of every operation (the server's and the driver's for itself).
  absl::StatusOr<int64_t> LocalOffset(SegmentId segment) const;
  absl::StatusOr<SlotId> LocalAllocateTail();
  absl::Status LocalCommitTail(SlotId slot, SegmentId segment, const StoredMeta& meta);
  absl::Status LocalStoreFrom(SegmentId segment, const StoredMeta& meta, InstanceId source,
                              int64_t offset);
  absl::Status LocalStoreBytes(SegmentId segment, const StoredMeta& meta,
                               absl::Span<const std::byte> kv);
  absl::Status LocalFree(SegmentId segment, uint64_t evicted_at);

  void ServeLoop();
  transport::Message Handle(const transport::Message& request);
  // The instance whose driver sent `request` (its endpoint is endpoint_base + N + instance).
  absl::StatusOr<InstanceId> Requester(const transport::Message& request) const;
  // Takes tail slot `slot` out of `owner`'s tails here, for a commit or a give-back.
  // Errors: FailedPrecondition when it is not one of `owner`'s (forgotten, or never its).
  absl::Status TakePeerTail(InstanceId owner, int32_t slot);

  const Options options_;
  int64_t slot_bytes_ = 0;
  std::unique_ptr<store::DeviceArena> arena_;
  std::unique_ptr<HostedStore> hosted_;
  cudaStream_t copy_stream_ = nullptr;  // the server's copies
  std::unique_ptr<DriverChannel> driver_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<InstanceId, std::unique_ptr<store::PeerArena>> peers_ ABSL_GUARDED_BY(mu_);
  std::atomic<bool> stopping_{false};
  std::thread server_;
  absl::Mutex tails_mu_;
  // Tail slots of this instance that a peer's driver took (slot -> the peer).
  absl::flat_hash_map<int32_t, InstanceId> peer_tails_ ABSL_GUARDED_BY(tails_mu_);
  // The staging cache (driver thread only): slot k of `staging_` holds the KV of
  // staged_[k].segment's copy on staged_[k].holder, last read in Resolve round staged_[k].round.
  // Every round asks the holders whether their copies are still those (one message per holder).
  // (The incarnation below tells a restarted holder's generations from its predecessor's.)
  struct Staged {
    InstanceId holder;
    SegmentId segment;  // invalid: a free slot
    CopyVersion version;
    uint64_t round = 0;
  };
  DeviceBuffer staging_;
  std::vector<Staged> staged_;
  absl::flat_hash_map<std::pair<InstanceId, SegmentId>, int32_t> staged_at_;
  const uint64_t incarnation_;  // this pool's CopyVersion::incarnation
  uint64_t staging_round_ = 0;
  mutable absl::Mutex traffic_mu_;
  Traffic traffic_ ABSL_GUARDED_BY(traffic_mu_);
};

}  // namespace tokenlake::engine::cuda

#endif  // TOKENLAKE_ENGINE_CUDA_PEER_DEVICE_POOL_H_
