// InstanceBackend: what an instance process (instance_server.h) serves with once it knows its
// instance id and the lake's size: the part of the pool it hosts (its store, reached by the
// other instances through the data-plane transport) and the engine that computes its requests
// over that store and the coordinator's lake. The server builds one per registration and uses
// it only through this interface, so that the CPU engine over a host pool (HostBackend below)
// and an engine over a device pool (docs/adr/0018) serve, report and rebalance the same way.
//
// Thread-safety: the engine calls (Submit .. max_batch_requests) come from the server's worker
// thread only; the pool calls (holdings .. CopyForRebalance) from any thread.
#ifndef TOKENLAKE_SERVICE_INSTANCE_BACKEND_H_
#define TOKENLAKE_SERVICE_INSTANCE_BACKEND_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tokenlake/attention/attention.h"
#include "tokenlake/base/ids.h"
#include "tokenlake/engine/engine.h"
#include "tokenlake/engine/hosted_store.h"
#include "tokenlake/engine/iteration_loop.h"
#include "tokenlake/engine/llama_model.h"
#include "tokenlake/lake/control_plane.h"
#include "tokenlake/service/holdings_report.h"
#include "tokenlake/transport/transport.h"

namespace tokenlake::service {

// Data-plane work of a backend that no one request owns (a GPU instance's messages to the
// peers on its GPU: docs/adr/0018), totals since the backend was built; times are host wall
// time, request to reply.
struct DataPlaneTraffic {
  // Locate rounds (one message per peer holder per iteration) and the bytes of the peers' slots
  // then read in place (every layer's).
  int64_t locate_messages = 0;
  int64_t in_place_read_bytes = 0;
  absl::Duration locate_time;
  // Stores into a peer (the peer copies the block) and tail slots kept on a peer.
  int64_t store_messages = 0;
  absl::Duration store_time;
  int64_t tail_messages = 0;
  absl::Duration tail_time;
  // Peers reached through host staging: fetches, the KV bytes they brought, their time.
  int64_t fetch_messages = 0;
  int64_t fetched_bytes = 0;
  absl::Duration fetch_time;
};

class InstanceBackend {
 public:
  virtual ~InstanceBackend() = default;

  // ---- The engine (the worker thread). As engine::Engine's calls of the same names. ----
  virtual absl::Status Submit(const engine::GenerateRequest& request) = 0;
  virtual std::vector<std::pair<RequestId, absl::StatusOr<engine::GenerateResult>>> Step() = 0;
  virtual absl::Status Cancel(RequestId request) = 0;
  virtual std::optional<engine::Engine::Progress> ProgressOf(RequestId request) const = 0;
  virtual bool idle() const = 0;
  virtual engine::LoopLoad Load() const = 0;
  virtual int32_t max_batch_requests() const = 0;

  // ---- The hosted part of the pool (any thread). ----
  // What the store holds and how it changed, for the holdings reports (holdings_report.h);
  // lives as long as the backend.
  virtual HoldingsSource* holdings() = 0;
  // Slots in use (segments and KV tails).
  virtual int64_t used_slots() const = 0;
  // Frees `segment` if its copy was stored at or before store generation `generation` (the
  // coordinator found it unlisted in its view at that generation). Errors: NotFound,
  // FailedPrecondition (stored again since, or pinned).
  virtual absl::Status FreeIfUnchangedSince(SegmentId segment, uint64_t generation) = 0;
  // Frees `segment` (a rebalance drop). Errors: NotFound, FailedPrecondition (pinned).
  virtual absl::Status Drop(SegmentId segment) = 0;
  // Copies `segment` from instance `from` into this store (a rebalance replicate or move),
  // placed by the lake's change `sequence`; returns the bytes copied.
  virtual absl::StatusOr<int64_t> CopyForRebalance(InstanceId from, SegmentId segment,
                                                   uint64_t sequence) = 0;

  // ---- Device arenas (docs/adr/0018; a host pool has none). ----
  // The handle of this instance's device arena that the server reports to the coordinator
  // (store::ArenaHandle's wire format), empty for none.
  virtual std::string arena_handle() const { return {}; }
  // The live peers' arena handles (instance id -> handle; peers without one are absent), as
  // the coordinator's latest peer list has them: a backend maps those on its GPU and unmaps
  // those gone. Called by the server's control thread whenever the set changes.
  virtual void SetPeerArenas(const absl::flat_hash_map<int32_t, std::string>& /*handles*/) {}
  // This backend's data-plane totals beyond its requests' own counters (none for a host pool,
  // whose every message belongs to a request). Any thread.
  virtual DataPlaneTraffic data_plane_traffic() const { return {}; }
};

// What a hosted store holds and how it changed, for the holdings reports (holdings_report.h).
class HostedStoreHoldings final : public HoldingsSource {
 public:
  // `hosted` is borrowed and outlives this.
  explicit HostedStoreHoldings(engine::HostedStore* hosted) : hosted_(hosted) {}
  uint64_t Snapshot(std::vector<lake::HeldSegment>* held) const override;
  std::optional<std::vector<store::SegmentChange>> ChangesSince(uint64_t from) const override {
    return hosted_->ChangesSince(from);
  }
  void Forget(uint64_t through) override { hosted_->ForgetChanges(through); }

 private:
  engine::HostedStore* const hosted_;
};

// Unacknowledged changes of the store an instance keeps for its reports (beyond, it reports in
// full): far more than a heartbeat period's.
inline constexpr int64_t kInstanceChangeLogEntries = int64_t{1} << 16;

// What a backend is built over, by the server, at each registration.
struct BackendContext {
  // This instance and the lake's size.
  InstanceId self;
  int32_t lake_instances = 0;
  // The data-plane transport (borrowed; outlives the backend): endpoints 0 .. 2N - 1, the
  // server of instance i is endpoint i and the driver of instance c is endpoint N + c; it hosts
  // this instance's two, and reaches the peers' (the server routes them as the coordinator's
  // peer lists say).
  transport::Transport* data_transport = nullptr;
  // The coordinator's lake (borrowed; outlives the backend).
  lake::ControlPlane* control = nullptr;
};

using BackendFactory =
    std::function<absl::StatusOr<std::unique_ptr<InstanceBackend>>(const BackendContext&)>;

// The CPU engine (engine::Engine::CreateOverPool, computing every request here) over an
// engine::InstancePool that hosts only this instance: a host arena of `slots` slots of
// `layout`, its server answering the peers' attend / pull / store / free messages.
struct HostBackendOptions {
  const engine::LlamaModel* model = nullptr;  // borrowed; outlives the backends
  attention::KvSlotLayout layout;
  int32_t slots = 1;
  int32_t segment_tokens = 16;
  std::string namespace_name = "tokenlake";
  // How long the engine waits for another instance's data-plane reply.
  absl::Duration data_timeout = absl::Seconds(2);
  // Tokens computed per iteration (engine::EngineOptions::max_batch_tokens), >= 1.
  int64_t max_batch_tokens = 2048;
};
BackendFactory HostBackendFactory(const HostBackendOptions& options);

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_INSTANCE_BACKEND_H_
