#include "tokenlake/service/membership.h"

#include <algorithm>
#include <cstdio>

#include "absl/strings/str_format.h"
#include "tokenlake/store/cuda/ipc_handle.h"

namespace tokenlake::service {

void Membership::ClearLoad(Member& m) {
  m.load_snapshot = 0;
  m.load_ids.clear();
  m.load_requests = m.load_context_tokens = m.load_prefill_tokens = 0;
  m.max_batch_requests = 0;
  m.routed_work.clear();
}

Membership::Membership(int32_t num_instances, absl::Duration dead_after)
    : num_instances_(num_instances),
      dead_after_(dead_after),
      members_(static_cast<size_t>(num_instances)) {}

std::optional<LiveIncarnation> Membership::FindLive(const std::string& name) const {
  absl::MutexLock lock(&mu_);
  for (int32_t i = 0; i < num_instances_; ++i) {
    const MemberView& m = members_[i].view;
    if (m.registered && m.alive && m.name == name) {
      return LiveIncarnation{.name = m.name,
                             .id = i,
                             .transport_port = m.transport_port,
                             .last_heartbeat = m.last_heartbeat,
                             .host = m.host,
                             .transport_incarnation = m.transport_incarnation};
    }
  }
  return std::nullopt;
}

absl::StatusOr<Membership::Admission> Membership::Register(
    const std::string& name, int32_t preferred_id, int32_t transport_port, absl::Time now,
    const std::string& host, const std::string& transport_incarnation) {
  absl::MutexLock lock(&mu_);
  int32_t id = -1;
  for (int32_t i = 0; i < num_instances_; ++i) {
    if (members_[i].view.registered && members_[i].view.name == name) id = i;
  }
  const bool rejoin = id >= 0;
  if (id < 0) {
    if (preferred_id >= 0 && preferred_id < num_instances_ &&
        !members_[preferred_id].view.registered) {
      id = preferred_id;
    } else {
      for (int32_t i = 0; i < num_instances_ && id < 0; ++i) {
        if (!members_[i].view.registered) id = i;
      }
    }
  }
  if (id < 0) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("the cluster is full (%d instances)", num_instances_));
  }
  MemberView& m = members_[id].view;
  if (rejoin) ++rejoins_;
  m.name = name;
  m.registered = true;
  m.alive = true;
  m.host = host;
  m.transport_port = transport_port;
  m.transport_incarnation = transport_incarnation;
  m.data_port = 0;  // until this incarnation reports its own
  m.arena_handle.clear();
  // A new process numbers its snapshots from 1 and holds none of the requests routed before.
  ClearLoad(members_[id]);
  ++version_;
  m.last_heartbeat = now;
  ++m.incarnations;
  return Admission{.id = id, .rejoin = rejoin};
}

absl::Status Membership::Heartbeat(int32_t id, absl::Time now) {
  absl::MutexLock lock(&mu_);
  if (id < 0 || id >= num_instances_ || !members_[id].view.registered || !members_[id].view.alive) {
    return absl::NotFoundError("unknown instance: register again");
  }
  members_[id].view.last_heartbeat = now;
  return absl::OkStatus();
}

void Membership::Report(int32_t id, const v1::InstanceState& state) {
  absl::MutexLock lock(&mu_);
  if (id < 0 || id >= num_instances_ || !members_[id].view.alive) return;
  Member& member = members_[id];
  MemberView& m = member.view;
  m.used_slots = state.used_slots();
  m.capacity_slots = state.capacity_slots();
  m.slot_bytes = state.slot_bytes();
  if (state.data_port() > 0 && state.data_port() <= 65535 && state.data_port() != m.data_port) {
    m.data_port = state.data_port();
    member.since_version = ++version_;
  }
  if (!state.arena_handle().empty() && state.arena_handle() != m.arena_handle) {
    if (state.arena_handle().size() <= kMaxArenaHandleBytes) {
      m.arena_handle = state.arena_handle();
      member.since_version = ++version_;
    } else {
      std::fprintf(stderr,
                   "tokenlake coordinator: instance %d ('%s') reported an arena handle of %zu "
                   "bytes (at most %zu): ignored\n",
                   id, m.name.c_str(), state.arena_handle().size(), kMaxArenaHandleBytes);
    }
  }
  m.traffic = state.traffic();
  m.cancelled = state.requests_cancelled();
  m.running = state.requests_running();
  if (state.has_load() && state.load().snapshot() > member.load_snapshot) {
    const v1::InstanceLoad& load = state.load();
    member.load_snapshot = load.snapshot();
    member.load_ids.clear();
    for (uint64_t request : load.request_ids()) {
      member.load_ids.insert(request);
      member.routed_work.erase(request);  // counted by the snapshot from now on
    }
    member.load_requests = load.decode_requests() + load.prefill_requests();
    member.load_context_tokens = load.decode_context_tokens() + load.prefill_context_tokens();
    member.load_prefill_tokens = load.prefill_tokens();
    member.max_batch_requests = load.max_batch_requests();
  }
  if (state.transport_error() != m.transport_error) {
    m.transport_error = state.transport_error();
    ++version_;
    std::fprintf(
        stderr, "tokenlake coordinator: instance %d ('%s') %s%s\n", id, m.name.c_str(),
        m.transport_error.empty() ? "is healthy again" : "unhealthy: ", m.transport_error.c_str());
  }
}

Membership::Reaped Membership::Reap(absl::Time now) {
  absl::MutexLock lock(&mu_);
  Reaped out;
  for (int32_t i = 0; i < num_instances_; ++i) {
    MemberView& m = members_[i].view;
    if (m.alive && now - m.last_heartbeat > dead_after_) {
      m.alive = false;
      m.data_port = 0;
      m.arena_handle.clear();
      m.used_slots = 0;
      ClearLoad(members_[i]);
      ++version_;
      ++deaths_;
      out.died.emplace_back(
          i, absl::StrFormat("instance %d ('%s') declared dead: no heartbeat for %s", i, m.name,
                             absl::FormatDuration(dead_after_)));
    }
    if (!m.alive) out.not_alive.push_back(i);
  }
  return out;
}

bool Membership::RoutableLocked(int32_t i) const {
  if (i < 0 || i >= num_instances_) return false;
  const MemberView& m = members_[i].view;
  return m.alive && m.data_port > 0 && m.transport_error.empty();
}

bool Membership::ReadyLocked(int32_t i) const {
  if (!RoutableLocked(i)) return false;
  for (int32_t j = 0; j < num_instances_; ++j) {
    if (RoutableLocked(j) && members_[j].seen_version < members_[i].since_version) return false;
  }
  return true;
}

bool Membership::Alive(int32_t id) const {
  absl::MutexLock lock(&mu_);
  return id >= 0 && id < num_instances_ && members_[id].view.registered && members_[id].view.alive;
}

bool Membership::Routable(int32_t id) const {
  absl::MutexLock lock(&mu_);
  return RoutableLocked(id);
}

bool Membership::Ready(int32_t id) const {
  absl::MutexLock lock(&mu_);
  return ReadyLocked(id);
}

std::vector<bool> Membership::RoutableSet() const {
  absl::MutexLock lock(&mu_);
  std::vector<bool> out(static_cast<size_t>(num_instances_));
  for (int32_t i = 0; i < num_instances_; ++i) out[static_cast<size_t>(i)] = RoutableLocked(i);
  return out;
}

int32_t Membership::ReadyCount() const {
  absl::MutexLock lock(&mu_);
  int32_t n = 0;
  for (int32_t i = 0; i < num_instances_; ++i) n += ReadyLocked(i) ? 1 : 0;
  return n;
}

void Membership::AddPeers(int32_t to, google::protobuf::RepeatedPtrField<v1::Peer>* peers) {
  absl::MutexLock lock(&mu_);
  if (to >= 0 && to < num_instances_) members_[to].seen_version = version_;
  for (int32_t i = 0; i < num_instances_; ++i) {
    if (!RoutableLocked(i)) continue;
    v1::Peer* p = peers->Add();
    p->set_instance_id(i);
    p->set_data_port(members_[i].view.data_port);
    p->set_data_host(members_[i].view.host);
    p->set_arena_handle(members_[i].view.arena_handle);
  }
}

Membership::Load Membership::LoadLocked(int32_t id) const {
  const Member& m = members_[id];
  Load load{.id = id,
            .in_flight = m.view.in_flight,
            .routed = m.view.routed,
            .requests = m.load_requests,
            .context_tokens = m.load_context_tokens,
            .prefill_tokens = m.load_prefill_tokens,
            .max_batch_requests = m.max_batch_requests};
  // AddRouted never keeps a request the snapshot lists (Report drops those), so each counts once.
  for (const auto& [request, work] : m.routed_work) {
    ++load.requests;
    load.context_tokens += work.context_tokens;
    load.prefill_tokens += work.prefill_tokens;
  }
  return load;
}

std::vector<Membership::Load> Membership::ReadyLoads(
    const absl::flat_hash_set<int32_t>& excluded) const {
  absl::MutexLock lock(&mu_);
  std::vector<Load> out;
  for (int32_t i = 0; i < num_instances_; ++i) {
    if (ReadyLocked(i) && !excluded.contains(i)) out.push_back(LoadLocked(i));
  }
  return out;
}

void Membership::AddRouted(int32_t id, RequestId request, RoutedWork work) {
  absl::MutexLock lock(&mu_);
  if (id < 0 || id >= num_instances_) return;
  Member& m = members_[id];
  // Already listed by a snapshot (it arrived before this call): counted there.
  if (m.load_ids.contains(request.value())) return;
  m.routed_work[request.value()] = work;
}

void Membership::BeginRequest(int32_t id) {
  absl::MutexLock lock(&mu_);
  if (id < 0 || id >= num_instances_) return;
  ++members_[id].view.in_flight;
  ++members_[id].view.routed;
}

void Membership::EndRequest(int32_t id, RequestId request) {
  absl::MutexLock lock(&mu_);
  if (id < 0 || id >= num_instances_) return;
  --members_[id].view.in_flight;
  members_[id].routed_work.erase(request.value());
}

std::vector<int32_t> Membership::DeviceDomains() const {
  absl::MutexLock lock(&mu_);
  std::vector<int32_t> domains(static_cast<size_t>(num_instances_));
  std::vector<store::DeviceUuid> gpus;  // domain d < gpus.size(): the GPU gpus[d]
  bool any = false;
  for (int32_t i = 0; i < num_instances_; ++i) {
    const std::string& bytes = members_[i].view.arena_handle;
    any = any || !bytes.empty();
    absl::StatusOr<store::ArenaHandle> h =
        bytes.empty() ? absl::NotFoundError("none") : store::ArenaHandle::Parse(bytes);
    if (!h.ok() || h->origin.device_uuid == store::DeviceUuid{}) {
      domains[i] = -1;  // alone; numbered below
      continue;
    }
    auto it = std::find(gpus.begin(), gpus.end(), h->origin.device_uuid);
    domains[i] = static_cast<int32_t>(it - gpus.begin());
    if (it == gpus.end()) gpus.push_back(h->origin.device_uuid);
  }
  if (!any) return {};
  auto next = static_cast<int32_t>(gpus.size());
  for (int32_t& d : domains) {
    if (d < 0) d = next++;
  }
  return domains;
}

std::vector<MemberView> Membership::Snapshot() const {
  absl::MutexLock lock(&mu_);
  std::vector<MemberView> out;
  out.reserve(members_.size());
  for (int32_t i = 0; i < num_instances_; ++i) {
    out.push_back(members_[i].view);
    out.back().routable = RoutableLocked(i);
    out.back().ready = ReadyLocked(i);
    const Load load = LoadLocked(i);
    out.back().load_requests = load.requests;
    out.back().load_context_tokens = load.context_tokens;
    out.back().load_prefill_tokens = load.prefill_tokens;
    out.back().unreported_routed = static_cast<int64_t>(members_[i].routed_work.size());
  }
  return out;
}

int64_t Membership::deaths() const {
  absl::MutexLock lock(&mu_);
  return deaths_;
}

int64_t Membership::rejoins() const {
  absl::MutexLock lock(&mu_);
  return rejoins_;
}

}  // namespace tokenlake::service
