// Membership: the coordinator's table of instances and their life cycle.
//
// An instance registers under its name and gets an id in [0, num_instances) (the one it prefers
// when free, else the lowest free one; a known name gets its old id back: a new incarnation);
// heartbeats keep it alive; one silent for more than `dead_after` is declared dead by Reap.
// Its reports (registration, heartbeats, replies) carry its data-plane port (and, for an instance
// with a device arena, the arena's CUDA IPC handle, relayed to the peers), its slot counts and
// its transport health:
//   - routable: alive, with a data port, and no transport error reported;
//   - ready (gets requests): routable, and every routable instance has been sent the peers
//     list since this one became routable with its current data port and arena handle
//     (membership versions), so that whoever it sends queries to can answer it (and has mapped
//     its arena when they share a GPU).
// It also counts the requests in flight and routed per instance, and keeps each instance's work
// for routing (router.h): the latest load snapshot it reported (v1::InstanceLoad; an older
// snapshot arriving later is ignored), plus the requests routed to it (AddRouted) that the
// snapshot does not list yet, until one lists them or they end (EndRequest). So a burst of
// requests routed between two reports sees each earlier one of the burst.
//
// The decision whether a registration under a live member's name may take its place
// (incarnation.h) is the caller's: FindLive names the member to check.
//
// Time is passed in (`now`), so that tests drive it.
//
// Thread-safety: thread-safe (one internal mutex, never held while calling out). Callers that
// also lock the lake take the lake's lock first.
#ifndef TOKENLAKE_SERVICE_MEMBERSHIP_H_
#define TOKENLAKE_SERVICE_MEMBERSHIP_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "tokenlake/base/ids.h"
#include "tokenlake/service/incarnation.h"
#include "tokenlake/v1/tokenlake.pb.h"

namespace tokenlake::service {

// One instance as the coordinator sees it.
struct MemberView {
  std::string name;
  bool registered = false;
  bool alive = false;
  // Routable and ready as defined in the file comment.
  bool routable = false;
  bool ready = false;
  // The host its transports are dialled at (its advertised name or address) and the port of
  // its host transport.
  std::string host = "127.0.0.1";
  int32_t transport_port = 0;
  // What its host transport names itself in handshakes (empty when not known).
  std::string transport_incarnation;
  // Data-plane port on `host` (0 until the incarnation reports one).
  int32_t data_port = 0;
  // Its device arena's CUDA IPC handle (empty until the incarnation reports one, or none).
  std::string arena_handle;
  absl::Time last_heartbeat;
  int64_t in_flight = 0;
  int64_t routed = 0;
  int64_t used_slots = 0;
  int64_t capacity_slots = 0;
  int64_t slot_bytes = 0;
  int64_t incarnations = 0;
  // Non-empty while the instance reports that its transport cannot accept or dial.
  std::string transport_error;
  // The instance's own traffic counters (this incarnation).
  v1::InstanceTraffic traffic;
  // Requests cancelled on the instance (this incarnation) and running there, as last reported.
  int64_t cancelled = 0;
  int64_t running = 0;
  // Its work as routing sees it (Membership::Load's fields of the same names), and the requests
  // routed to it that its latest load snapshot does not list yet.
  int64_t load_requests = 0;
  int64_t load_context_tokens = 0;
  int64_t load_prefill_tokens = 0;
  int64_t unreported_routed = 0;
};

class Membership {
 public:
  // REQUIRES: num_instances >= 1, dead_after > 0 (the coordinator's options check them).
  Membership(int32_t num_instances, absl::Duration dead_after);

  int32_t num_instances() const { return num_instances_; }

  // The alive member registered under `name`, if any (to be proven gone before a new
  // registration under its name is admitted; incarnation.h).
  std::optional<LiveIncarnation> FindLive(const std::string& name) const;

  struct Admission {
    int32_t id = -1;
    // The name was registered before: a new incarnation of a known instance.
    bool rejoin = false;
  };
  // Admits an incarnation of `name` listening for transport connections on `transport_port`
  // (whose handshakes name it `transport_incarnation`): alive from `now`, no data port yet, its
  // in-flight count kept (its requests fail over as their waiters learn). Errors:
  // ResourceExhausted when every id is taken by another name.
  absl::StatusOr<Admission> Register(const std::string& name, int32_t preferred_id,
                                     int32_t transport_port, absl::Time now,
                                     const std::string& host = "127.0.0.1",
                                     const std::string& transport_incarnation = "");

  // Records a heartbeat of instance `id` at `now`. Errors: NotFound unless `id` is a registered
  // alive member.
  absl::Status Heartbeat(int32_t id, absl::Time now);

  // Takes an alive instance's report (slots, data port, arena handle, transport health,
  // traffic, load snapshot); ignored for an instance that is not alive. A zero data port or an
  // empty arena handle changes nothing; a handle over kMaxArenaHandleBytes is ignored. A change
  // of data port, arena handle or transport health bumps the membership version (a new data
  // port or handle must reach every peer before the instance is ready).
  void Report(int32_t id, const v1::InstanceState& state);
  static constexpr size_t kMaxArenaHandleBytes = 1024;

  struct Reaped {
    // Members declared dead now, with the reason to fail their requests with.
    std::vector<std::pair<int32_t, std::string>> died;
    // Every id that is not alive (registered or not), after this call.
    std::vector<int32_t> not_alive;
  };
  // Declares dead every alive member whose last heartbeat is older than `now - dead_after`.
  Reaped Reap(absl::Time now);

  // Whether `id` is a registered member not declared dead.
  bool Alive(int32_t id) const;
  bool Routable(int32_t id) const;
  bool Ready(int32_t id) const;
  // Routable(i) for every id, under one hold of the lock.
  std::vector<bool> RoutableSet() const;
  int32_t ReadyCount() const;

  // The peers (routable instances, their hosts, data ports and arena handles) to send to
  // instance `to`; records that `to` has seen the current membership version.
  void AddPeers(int32_t to, google::protobuf::RepeatedPtrField<v1::Peer>* peers);

  struct Load {
    int32_t id = -1;
    int64_t in_flight = 0;
    int64_t routed = 0;
    // The requests it runs or will run (each decodes where it is computed): those of its latest
    // load snapshot, decoding or not, plus those routed to it that the snapshot does not list.
    int64_t requests = 0;
    // Their context once prefilled (decode context tokens), and the prompt tokens still to
    // compute among them.
    int64_t context_tokens = 0;
    int64_t prefill_tokens = 0;
    // The most requests it runs in one iteration, as reported (0: not known).
    int64_t max_batch_requests = 0;
  };
  // The ready instances not in `excluded`, with their load, by id.
  std::vector<Load> ReadyLoads(const absl::flat_hash_set<int32_t>& excluded) const;

  // What a request routed to an instance brings there: one more request, which decodes there
  // with `context_tokens` of context once its `prefill_tokens` are computed.
  struct RoutedWork {
    int64_t context_tokens = 0;
    int64_t prefill_tokens = 0;
  };
  // Request `request` (its lake id) goes to instance `id`: its work counts in the instance's
  // Load until a load snapshot of the instance lists it, or EndRequest(id, request), or the
  // instance dies or registers again. A second call for the same request replaces the first.
  void AddRouted(int32_t id, RequestId request, RoutedWork work);

  // A request was sent to / is finished with instance `id` (in flight and routed counts; the
  // end also drops what AddRouted recorded for `request` there).
  void BeginRequest(int32_t id);
  void EndRequest(int32_t id, RequestId request);

  // Device domains for Lake::SetDeviceDomains (index = id): instances whose arena handles name
  // the same GPU (its UUID) share one, where their processes write each other's slots in place
  // (docs/adr/0018); every other instance (no handle reported, a handle that does not parse or
  // names no UUID) is alone in its own. Empty when no instance has reported a handle (a cluster
  // without GPU instance processes: one domain).
  std::vector<int32_t> DeviceDomains() const;

  // Every id's state (index = id), for metrics and health.
  std::vector<MemberView> Snapshot() const;
  int64_t deaths() const;
  int64_t rejoins() const;

 private:
  bool RoutableLocked(int32_t id) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool ReadyLocked(int32_t id) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Member `id`'s Load (its snapshot plus the routed work the snapshot does not list).
  Load LoadLocked(int32_t id) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  struct Member {
    MemberView view;
    // The latest load snapshot (0: none since it registered): its number, the requests it
    // lists, and its figures (decode + prefill requests, their context, prefill tokens).
    uint64_t load_snapshot = 0;
    absl::flat_hash_set<uint64_t> load_ids;
    int64_t load_requests = 0;
    int64_t load_context_tokens = 0;
    int64_t load_prefill_tokens = 0;
    int64_t max_batch_requests = 0;
    // Requests routed here (AddRouted) that have not ended, by lake request id.
    absl::flat_hash_map<uint64_t, RoutedWork> routed_work;
    // Membership versions: the one at which the member became routable with its current data
    // port, and the latest one it was sent the peers of.
    int64_t since_version = 0;
    int64_t seen_version = 0;
  };
  // Forgets `m`'s load snapshot and routed work (it registered again, or died).
  static void ClearLoad(Member& m);

  const int32_t num_instances_;
  const absl::Duration dead_after_;
  mutable absl::Mutex mu_;
  std::vector<Member> members_ ABSL_GUARDED_BY(mu_);
  // Bumped whenever a data port appears, changes or goes, or transport health changes.
  int64_t version_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t deaths_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t rejoins_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_MEMBERSHIP_H_
