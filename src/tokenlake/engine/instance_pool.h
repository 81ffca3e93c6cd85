// InstancePool: the data plane of N TokenLake instances inside one process. Each instance is a
// server thread with its own SegmentStore over a real host arena (slots laid out as in
// attention.h: [layer][kv][token][kv_head][head_dim]); instances talk only through a Transport
// (the in-process LoopbackTransport). Endpoints: instance i's server is endpoint i; the driver of
// a computing instance c (the thread that runs the model for requests computed on c) is
// endpoint N + c.
//
// Server operations (each a request message answered by one reply, or by an error reply carrying
// the absl::Status):
//   attend  partial attention (causal = false) of the sent queries over the named local segments
//           of one layer -> (out, lse) (the query-movement path, TOKENLAKE.md 4.4/4.5); one
//           message carries the queries of every request of a batch that this holder serves;
//   pull    the KV bytes of one local segment (the pull-KV path);
//   store   write a new segment's KV into a slot (allocating it unless the control plane
//           already did);
//   free    drop a segment's slot (eviction).
// The driver-side calls below send those messages and wait for the replies. When the target
// instance is the caller's own instance, the work is done directly on its store (no message).
//
// Hosting a subset (the multi-process cluster): with Options::external_transport (e.g. a
// TcpTransport shared with other processes) the pool creates no loopback, hosts only the
// instances in Options::hosted (their stores, server threads and driver endpoints) and treats
// every other instance as a remote endpoint reached through the transport. Endpoints are then
// offset by Options::endpoint_base (server of i = base + i, driver of c = base + N + c), so
// that the pool can share a transport with other traffic. Driver calls may only name a hosted
// computing instance; store(i) only a hosted instance.
//
// Segment metadata: each hosted instance remembers, for every segment it stores, its parent
// in the chain and its token count (sent with the store message), so that it can report what
// it holds in a form the control plane can rebuild its prefix tree from (Held()). Every store
// and free on a hosted instance is numbered (store/segment_change_log.h; the numbers are its
// store generations), and with Options::change_log_entries the changes are kept until the
// instance's reports have carried them (ChangesSince, ForgetChanges), so that it reports what
// changed rather than everything it holds.
//
// Thread-safety: thread-safe. Each driver endpoint (computing instance) must be used by one
// thread at a time; different computing instances may drive concurrently.
#ifndef TOKENLAKE_ENGINE_INSTANCE_POOL_H_
#define TOKENLAKE_ENGINE_INSTANCE_POOL_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "tokenlake/attention/attention.h"
#include "tokenlake/base/check.h"
#include "tokenlake/base/ids.h"
#include "tokenlake/engine/data_rpc.h"
#include "tokenlake/engine/hosted_store.h"
#include "tokenlake/store/segment_change_log.h"
#include "tokenlake/store/segment_store.h"
#include "tokenlake/transport/loopback.h"

namespace tokenlake::engine {

// A segment named in an attend call: its id and how many of its token rows are used.
struct SegmentRef {
  SegmentId id;
  int32_t num_tokens = 0;
};

// One request's part of a batched attend call: its queries [num_q][num_heads][head_dim] and the
// segments (held by the call's holder) they read.
struct AttendGroup {
  absl::Span<const SegmentRef> segments;
  int32_t num_q = 0;
  absl::Span<const float> q;
};

class InstancePool {
 public:
  // Wraps the pool's own loopback transport in another Transport over the same endpoints (e.g.
  // transport::FaultTransport, to test deadlines and faults). `inner` outlives the result.
  using TransportWrapper =
      std::function<absl::StatusOr<std::unique_ptr<transport::Transport>>(transport::Transport*)>;

  struct Options {
    // Number of instances N, >= 1.
    int32_t num_instances = 1;
    // Slot geometry (layers, segment tokens, KV heads, head dim, KV dtype); must validate.
    attention::KvSlotLayout layout;
    // Query heads (for the attention calls); a multiple of layout.num_kv_heads.
    int32_t num_heads = 1;
    // Slots in each instance's store, >= 1 (arena = slots x slot bytes, allocated up front).
    int32_t slots_per_instance = 256;
    // How long a driver waits for a reply before giving up (DeadlineExceeded).
    absl::Duration reply_timeout = absl::Seconds(60);
    // Optional: every message goes through the transport this returns (empty = the loopback
    // itself). Ignored with external_transport.
    TransportWrapper wrap_transport;
    // Optional (borrowed, must outlive the pool): use this transport instead of an own
    // loopback. Its endpoint space must hold endpoint_base + 2 N endpoints and it must host
    // (receive for) the server and driver endpoints of every instance in `hosted`.
    transport::Transport* external_transport = nullptr;
    // Instances hosted by this pool (stores, servers, drivers); empty = all N. Only with
    // external_transport may this be a strict subset.
    std::vector<InstanceId> hosted;
    // First endpoint of the pool in the transport's endpoint space, >= 0.
    int32_t endpoint_base = 0;
    // Changes of each hosted store kept for ChangesSince until ForgetChanges (beyond, they are
    // all forgotten and the reader reports in full; segment_change_log.h). 0: changes are
    // numbered, none kept. >= 0.
    int64_t change_log_entries = 0;
  };

  // Allocates the arenas, creates the stores and the transport, starts the server threads.
  // Errors: InvalidArgument naming a bad option.
  static absl::StatusOr<std::unique_ptr<InstancePool>> Create(const Options& options);

  // Shuts the transport down and joins the servers.
  ~InstancePool();
  InstancePool(const InstancePool&) = delete;
  InstancePool& operator=(const InstancePool&) = delete;

  int32_t num_instances() const { return options_.num_instances; }
  const attention::KvSlotLayout& layout() const { return options_.layout; }
  // Whether instance `i` is hosted by this pool.
  bool hosts(InstanceId i) const {
    return InRange(i) && instances_[static_cast<size_t>(i.value())] != nullptr;
  }
  // The store of instance `i`. REQUIRES: hosts(i).
  store::SegmentStore& store(InstanceId i) const;
  // Its slots with their metadata, generations and change log. REQUIRES: hosts(i).
  HostedStore& hosted(InstanceId i) const;
  // The segments hosted instance `i` stores, with their metadata (parent, tokens; zero when a
  // store message did not carry them). REQUIRES: hosts(i).
  std::vector<HeldSegmentInfo> Held(InstanceId i) const;
  // Held(i) and the store generation it reflects, taken together.
  using HeldReport = HostedStore::HeldReport;
  HeldReport HeldWithGeneration(InstanceId i) const;
  // Store generations of hosted instance `i`: every store (new or overwrite) and every free of
  // a segment takes the next one (its change number); a stored copy is stamped with its store's.
  // StoreGeneration returns the latest one given; FreeIfUnchangedSince frees `segment` only if
  // its copy was stored at or before `generation` (so that a free decided from an older report
  // of what `i` held never drops a copy stored since). Errors: NotFound (not stored),
  // FailedPrecondition (stored again since, or pinned). REQUIRES: hosts(i).
  uint64_t StoreGeneration(InstanceId i) const;
  absl::Status FreeIfUnchangedSince(InstanceId i, SegmentId segment, uint64_t generation);
  // The changes of hosted instance `i` after generation `from` (generations from + 1 ..
  // StoreGeneration(i), in order), or nullopt when they are not all kept (forgotten, or
  // change_log_entries exceeded: report in full). ForgetChanges drops those up to `through`
  // (reported and acknowledged). REQUIRES: hosts(i).
  std::optional<std::vector<store::SegmentChange>> ChangesSince(InstanceId i, uint64_t from) const;
  void ForgetChanges(InstanceId i, uint64_t through);

  // The loopback under any wrapper (for its traffic counters: what reached it).
  // REQUIRES: no external_transport.
  const transport::LoopbackTransport& transport() const {
    TOKENLAKE_CHECK(loopback_ != nullptr);
    return *loopback_;
  }
  // Endpoint of the server of instance `i` and of the driver of computing instance `c`.
  InstanceId ServerEndpoint(InstanceId i) const {
    return InstanceId(options_.endpoint_base + i.value());
  }
  InstanceId DriverEndpoint(InstanceId c) const {
    return InstanceId(options_.endpoint_base + num_instances() + c.value());
  }

  // ---- Driver side. `compute` is the calling driver's computing instance. ----

  // Starts the partial attention of q [num_q][num_heads][head_dim] over `segments` (all held by
  // `holder`, read at layer `layer`, causal = false). Returns a ticket for AwaitAttend.
  // Errors: InvalidArgument (instance out of range, empty segments, q size), transport errors.
  absl::StatusOr<uint64_t> StartAttend(InstanceId compute, InstanceId holder, int32_t layer,
                                       absl::Span<const SegmentRef> segments, int32_t num_q,
                                       absl::Span<const float> q);
  // Waits for the reply of `ticket` and writes out [num_q][num_heads][head_dim] and
  // lse [num_q][num_heads]. Errors: the holder's error (e.g. NotFound for a segment it does not
  // store), DeadlineExceeded, DataLoss for a malformed reply.
  absl::Status AwaitAttend(InstanceId compute, uint64_t ticket, absl::Span<float> out,
                           absl::Span<float> lse);

  // The queries of several requests (a batch's, at one layer) to one holder in ONE message;
  // one reply carries every group's partial. StartAttend / AwaitAttend are the batch of one.
  // Errors: as StartAttend / AwaitAttend, naming the group; the first group's error fails the
  // whole call.
  absl::StatusOr<uint64_t> StartAttendBatch(InstanceId compute, InstanceId holder, int32_t layer,
                                            absl::Span<const AttendGroup> groups);
  // outs[g] [num_q_g][num_heads][head_dim] and lses[g] [num_q_g][num_heads], per group.
  absl::Status AwaitAttendBatch(InstanceId compute, uint64_t ticket,
                                absl::Span<const absl::Span<float>> outs,
                                absl::Span<const absl::Span<float>> lses);

  // The same computation on `holder`'s own store, in the calling thread (the kLocal path and
  // the server's implementation). Pins the segments for the duration of the call.
  absl::Status LocalAttend(InstanceId holder, int32_t layer, absl::Span<const SegmentRef> segments,
                           int32_t num_q, absl::Span<const float> q, absl::Span<float> out,
                           absl::Span<float> lse) const;

  // Copies the whole slot of `segment` from `holder` (slot_bytes bytes).
  // Errors: NotFound (not stored there), transport errors.
  // With `meta`, also returns the holder's metadata of the segment.
  absl::StatusOr<std::vector<std::byte>> PullSegment(InstanceId compute, InstanceId holder,
                                                     SegmentId segment, StoredMeta* meta = nullptr);

  // Writes `slot_bytes` (exactly layout().SlotBytes()) as the KV of `segment` on `target`,
  // allocating a slot unless `segment` already has one there.
  // Errors: InvalidArgument (size), ResourceExhausted (no free slot on target), transport errors.
  // `meta` is remembered by the target with the segment (see Held()).
  absl::Status StoreSegment(InstanceId compute, InstanceId target, SegmentId segment,
                            absl::Span<const std::byte> slot_bytes, StoredMeta meta = {});

  // Frees `segment`'s slot on `target`. With `evicted_at` > 0 (the change sequence number of
  // the call that evicted the copy), a copy placed by a later call (placement_sequence >
  // evicted_at: the same segment placed there again meanwhile) is kept.
  // Errors: NotFound, FailedPrecondition (pinned, or placed again since).
  absl::Status FreeSegment(InstanceId compute, InstanceId target, SegmentId segment,
                           uint64_t evicted_at = 0);

  // Executes a rebalancing copy (replicate, or the copy half of a move) as its receiving
  // instance `to` drives it: pulls `segment` from `from` and stores it on `to` with its
  // parent and token count, placed by the lake's change `sequence` (RebalanceResult::sequence;
  // FreeSegment's guard). The CPU engine and the cluster's instances both run their lake's
  // rebalance actions through it. Returns the bytes copied. Errors: as PullSegment and
  // StoreSegment.
  absl::StatusOr<int64_t> CopyForRebalance(InstanceId to, InstanceId from, SegmentId segment,
                                           uint64_t sequence);

 private:
  struct Instance {
    std::vector<std::byte> arena;
    // The slots over `arena`, their metadata and numbered changes.
    std::unique_ptr<HostedStore> hosted;
    std::thread server;
  };

  explicit InstancePool(const Options& options) : options_(options) {}
  bool InRange(InstanceId i) const {
    return i.valid() && i.value() >= 0 && i.value() < options_.num_instances;
  }
  void ServeLoop(InstanceId self);
  transport::Message Handle(const transport::Message& request);
  absl::Status LocalStore(InstanceId target, SegmentId segment,
                          absl::Span<const std::byte> slot_bytes, StoredMeta meta) const;
  absl::Status LocalFree(InstanceId target, SegmentId segment, uint64_t evicted_at) const;
  StoredMeta MetaOf(InstanceId holder, SegmentId segment) const;
  absl::Status CheckDriver(InstanceId compute, InstanceId other, const char* what) const;
  absl::StatusOr<uint64_t> Send(InstanceId compute, InstanceId target, uint32_t tag,
                                std::vector<std::byte> payload);
  // Waits for the reply to `ticket`; converts error replies into their status.
  absl::StatusOr<transport::Message> AwaitReply(InstanceId compute, uint64_t ticket);

  const Options options_;
  std::unique_ptr<transport::LoopbackTransport> loopback_;
  std::unique_ptr<transport::Transport> wrapper_;        // null without wrap_transport
  transport::Transport* transport_ = nullptr;            // wrapper_ or loopback_
  std::vector<std::unique_ptr<Instance>> instances_;     // null for an instance not hosted here
  std::vector<std::unique_ptr<DriverChannel>> drivers_;  // null for an instance not hosted here
  std::atomic<bool> stopping_{false};
};

}  // namespace tokenlake::engine

#endif  // TOKENLAKE_ENGINE_INSTANCE_POOL_H_
