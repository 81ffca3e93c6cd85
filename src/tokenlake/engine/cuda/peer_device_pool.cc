#include "tokenlake/engine/cuda/peer_device_pool.h"

#include <algorithm>
#include <array>
#include <string>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/random/random.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/cuda/device_buffer.h"
#include "tokenlake/engine/wire.h"

namespace tokenlake::engine::cuda {
namespace {

// Requests (and their replies, tag + 1). Distinct from InstancePool's, so that both may share
// one transport's endpoint space.
enum Tag : uint32_t {
  kLocate = 41,
  kAllocateTail = 43,
  kFreeTail = 45,
  kCommitTail = 47,
  kStoreFrom = 49,
  kFree = 51,
  kCopyTo = 53,
  kFetch = 55,
  kStoreBytes = 57,
};

// CUDA IPC shares whole allocation blocks: an exported arena is a multiple of 2 MiB.
constexpr size_t kArenaGranularity = size_t{2} << 20;

void PutMeta(WireWriter& w, const StoredMeta& meta) {
  w.Put<uint64_t>(meta.parent.valid() ? meta.parent.value() : 0);
  w.Put<int32_t>(meta.num_tokens);
  w.Put<uint64_t>(meta.placement_sequence);
}

absl::Status GetMeta(WireReader& r, StoredMeta* meta) {
  uint64_t parent = 0;
  TOKENLAKE_RETURN_IF_ERROR(r.Get(&parent, "parent"));
  TOKENLAKE_RETURN_IF_ERROR(r.Get(&meta->num_tokens, "token count"));
  TOKENLAKE_RETURN_IF_ERROR(r.Get(&meta->placement_sequence, "placement sequence"));
  meta->parent = parent == 0 ? SegmentId() : SegmentId(parent);
  return absl::OkStatus();
}

}  // namespace

PeerDevicePool::PeerDevicePool(const Options& options)
    : options_(options), incarnation_(absl::Uniform<uint64_t>(absl::BitGen(), 1, UINT64_MAX)) {}

absl::StatusOr<std::unique_ptr<PeerDevicePool>> PeerDevicePool::Create(const Options& options) {
  if (options.num_instances < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PeerDevicePool: num_instances must be >= 1, got %d", options.num_instances));
  }
  if (!options.self.valid() || options.self.value() >= options.num_instances) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PeerDevicePool: self must be in [0, %d), got %d", options.num_instances,
                        options.self.valid() ? options.self.value() : -1));
  }
  if (options.slots < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PeerDevicePool: slots must be >= 1, got %d", options.slots));
  }
  if (options.transport == nullptr) {
    return absl::InvalidArgumentError("PeerDevicePool: transport is null");
  }
  if (options.endpoint_base < 0 ||
      options.transport->num_endpoints() < options.endpoint_base + 2 * options.num_instances) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PeerDevicePool: the transport has %d endpoints; endpoint_base %d and %d instances need "
        "%d",
        options.transport->num_endpoints(), options.endpoint_base, options.num_instances,
        options.endpoint_base + 2 * options.num_instances));
  }
  if (options.staging_slots < 0 || options.max_fetch_bytes < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PeerDevicePool: staging_slots must be >= 0 and max_fetch_bytes >= 1, got %d and %d",
        options.staging_slots, options.max_fetch_bytes));
  }
  TOKENLAKE_RETURN_IF_ERROR(options.layout.Validate());
  std::unique_ptr<PeerDevicePool> pool(new PeerDevicePool(options));
  pool->slot_bytes_ = options.layout.SlotBytes();
  const size_t bytes = static_cast<size_t>(pool->slot_bytes_) * static_cast<size_t>(options.slots);
  TOKENLAKE_ASSIGN_OR_RETURN(
      pool->arena_, store::DeviceArena::Create({.bytes = (bytes + kArenaGranularity - 1) /
                                                         kArenaGranularity * kArenaGranularity,
                                                .device = options.device}));
  store::SegmentStore::Options so =
      pool->arena_->StoreOptions(static_cast<size_t>(pool->slot_bytes_), options.self);
  so.num_slots = options.slots;
  TOKENLAKE_ASSIGN_OR_RETURN(std::unique_ptr<store::SegmentStore> st,
                             store::SegmentStore::Create(so));
  pool->hosted_ = std::make_unique<HostedStore>(std::move(st), options.change_log_entries);
  int current = 0;
  TOKENLAKE_RETURN_IF_ERROR(CudaStatus(cudaGetDevice(&current), "cudaGetDevice"));
  TOKENLAKE_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(options.device), "cudaSetDevice"));
  const absl::Status stream = CudaStatus(
      cudaStreamCreateWithFlags(&pool->copy_stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  cudaSetDevice(current);
  TOKENLAKE_RETURN_IF_ERROR(stream);
  pool->driver_ = std::make_unique<DriverChannel>(
      options.transport,
      InstanceId(options.endpoint_base + options.num_instances + options.self.value()),
      options.endpoint_base);
  pool->server_ = std::thread([p = pool.get()] { p->ServeLoop(); });
  return pool;
}

PeerDevicePool::~PeerDevicePool() {
  stopping_.store(true);
  if (server_.joinable()) server_.join();
  if (copy_stream_ != nullptr) {
    cudaStreamSynchronize(copy_stream_);
    cudaStreamDestroy(copy_stream_);
  }
  absl::MutexLock lock(&mu_);
  peers_.clear();
}

absl::StatusOr<store::ArenaHandle> PeerDevicePool::ExportHandle() const {
  return arena_->ExportHandle();
}

absl::Status PeerDevicePool::AddPeer(InstanceId peer, const store::ArenaHandle& handle) {
  if (!peer.valid() || peer.value() >= options_.num_instances || peer == options_.self) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PeerDevicePool::AddPeer: instance %d is not a peer of instance %d (pool of %d)",
        peer.valid() ? peer.value() : -1, options_.self.value(), options_.num_instances));
  }
  TOKENLAKE_ASSIGN_OR_RETURN(std::unique_ptr<store::PeerArena> mapped,
                             store::PeerArena::Open(handle));
  const size_t need = static_cast<size_t>(slot_bytes_) * static_cast<size_t>(options_.slots);
  if (mapped->size_bytes() < need) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PeerDevicePool::AddPeer: instance %d's arena has %d bytes, %d slots of %d bytes need %d",
        peer.value(), mapped->size_bytes(), options_.slots, slot_bytes_, need));
  }
  absl::MutexLock lock(&mu_);
  peers_[peer] = std::move(mapped);
  return absl::OkStatus();
}

void PeerDevicePool::RemovePeer(InstanceId peer) {
  absl::MutexLock lock(&mu_);
  peers_.erase(peer);
}

int32_t PeerDevicePool::ForgetPeerTails(InstanceId peer) {
  std::vector<int32_t> slots;
  {
    absl::MutexLock lock(&tails_mu_);
    for (auto it = peer_tails_.begin(); it != peer_tails_.end();) {
      if (it->second == peer) {
        slots.push_back(it->first);
        peer_tails_.erase(it++);
      } else {
        ++it;
      }
    }
  }
  int32_t freed = 0;
  for (int32_t slot : slots) freed += hosted_->slots().FreeTail(SlotId(slot)).ok() ? 1 : 0;
  return freed;
}

absl::StatusOr<InstanceId> PeerDevicePool::Requester(const transport::Message& request) const {
  const int32_t c = request.from.value() - options_.endpoint_base - options_.num_instances;
  if (c < 0 || c >= options_.num_instances || c == options_.self.value()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "a tail request from endpoint %d, which is no peer's driver", request.from.value()));
  }
  return InstanceId(c);
}

absl::Status PeerDevicePool::TakePeerTail(InstanceId owner, int32_t slot) {
  absl::MutexLock lock(&tails_mu_);
  auto it = peer_tails_.find(slot);
  if (it == peer_tails_.end() || it->second != owner) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "tail slot %d of instance %d is not instance %d's (given back when another process "
        "took its place, or never its)",
        slot, options_.self.value(), owner.value()));
  }
  peer_tails_.erase(it);
  return absl::OkStatus();
}

absl::Status PeerDevicePool::CheckInstance(InstanceId i, const char* what) const {
  if (!i.valid() || i.value() >= options_.num_instances) {
    return absl::InternalError(absl::StrFormat("PeerDevicePool: %s on instance %d of %d", what,
                                               i.valid() ? i.value() : -1, options_.num_instances));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::pair<std::byte*, size_t>> PeerDevicePool::ArenaOf(InstanceId i) const {
  if (i == options_.self) {
    return std::make_pair(static_cast<std::byte*>(arena_->data()), arena_->size_bytes());
  }
  absl::MutexLock lock(&mu_);
  auto it = peers_.find(i);
  if (it == peers_.end()) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "PeerDevicePool: instance %d's arena is not mapped in instance %d (not on this GPU, or "
        "not announced yet)",
        i.value(), options_.self.value()));
  }
  return std::make_pair(static_cast<std::byte*>(it->second->data()), it->second->size_bytes());
}

absl::StatusOr<transport::Message> PeerDevicePool::Call(InstanceId target, uint32_t tag,
                                                        std::vector<std::byte> payload) {
  const absl::Time start = absl::Now();
  TOKENLAKE_ASSIGN_OR_RETURN(uint64_t ticket,
                             driver_->Send(ServerEndpoint(target), tag, std::move(payload)));
  absl::StatusOr<transport::Message> reply = driver_->Await(ticket, options_.reply_timeout);
  const absl::Duration took = absl::Now() - start;
  absl::MutexLock lock(&traffic_mu_);
  switch (tag) {
    case kStoreFrom:
    case kStoreBytes:
      ++traffic_.store_messages;
      traffic_.store_bytes += slot_bytes_;
      traffic_.store_time += took;
      traffic_.byte_stores += tag == kStoreBytes ? 1 : 0;
      break;
    case kAllocateTail:
    case kFreeTail:
    case kCommitTail:
      ++traffic_.tail_messages;
      traffic_.tail_time += took;
      break;
    default:
      ++traffic_.other_messages;
      traffic_.other_time += took;
  }
  return reply;
}

bool PeerDevicePool::Mapped(InstanceId i) const {
  if (i == options_.self) return true;
  absl::MutexLock lock(&mu_);
  return peers_.contains(i);
}

PeerDevicePool::Traffic PeerDevicePool::traffic() const {
  absl::MutexLock lock(&traffic_mu_);
  return traffic_;
}

// ---- This instance's side. ----

absl::StatusOr<int64_t> PeerDevicePool::LocalOffset(SegmentId segment) const {
  const std::optional<SlotId> slot = hosted_->slots().Find(segment);
  if (!slot.has_value()) {
    return absl::NotFoundError(
        absl::StrFormat("segment %016x is not stored on instance %d (data plane out of step with "
                        "the lake)",
                        segment.value(), options_.self.value()));
  }
  return int64_t{slot->value()} * slot_bytes_;
}

absl::StatusOr<SlotId> PeerDevicePool::LocalAllocateTail() {
  absl::StatusOr<SlotId> slot = hosted_->slots().AllocateTail();
  if (!slot.ok()) {
    return absl::InternalError(absl::StrFormat(
        "no slot on instance %d for a tail block the lake placed there (data plane out of step "
        "with the lake): %s",
        options_.self.value(), slot.status().message()));
  }
  return slot;
}

absl::Status PeerDevicePool::LocalCommitTail(SlotId slot, SegmentId segment,
                                             const StoredMeta& meta) {
  return hosted_->CommitTail(slot, segment, meta);
}

absl::Status PeerDevicePool::LocalStoreFrom(SegmentId segment, const StoredMeta& meta,
                                            InstanceId source, int64_t offset) {
  TOKENLAKE_ASSIGN_OR_RETURN(auto from, ArenaOf(source));
  if (offset < 0 || static_cast<size_t>(offset + slot_bytes_) > from.second) {
    return absl::InvalidArgumentError(
        absl::StrFormat("a store from bytes [%d, %d) of instance %d's arena of %d bytes", offset,
                        offset + slot_bytes_, source.value(), from.second));
  }
  // A copy of the segment already here is overwritten (as InstancePool's store); the copy has
  // completed when the store returns.
  return hosted_->Store(segment, meta, [&](absl::Span<std::byte> slot) {
    absl::Status copied = CudaStatus(
        cudaMemcpyAsync(slot.data(), from.first + offset, static_cast<size_t>(slot_bytes_),
                        cudaMemcpyDeviceToDevice, copy_stream_),
        "store copy");
    if (copied.ok()) copied = CudaStatus(cudaStreamSynchronize(copy_stream_), "store copy");
    return copied;
  });
}

absl::Status PeerDevicePool::LocalStoreBytes(SegmentId segment, const StoredMeta& meta,
                                             absl::Span<const std::byte> kv) {
  if (kv.size() != static_cast<size_t>(slot_bytes_)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("a store of segment %016x with %d bytes of KV; a slot holds %d",
                        segment.value(), kv.size(), slot_bytes_));
  }
  return hosted_->Store(segment, meta, [&](absl::Span<std::byte> slot) {
    absl::Status copied = CudaStatus(
        cudaMemcpyAsync(slot.data(), kv.data(), kv.size(), cudaMemcpyHostToDevice, copy_stream_),
        "store copy");
    if (copied.ok()) copied = CudaStatus(cudaStreamSynchronize(copy_stream_), "store copy");
    return copied;
  });
}

absl::Status PeerDevicePool::LocalFree(SegmentId segment, uint64_t evicted_at) {
  return hosted_->Free(segment, evicted_at);
}

// ---- The driver's calls. ----

absl::Status PeerDevicePool::Resolve(absl::Span<const SlotRef> refs,
                                     absl::Span<const std::byte*> out) {
  TOKENLAKE_CHECK(refs.size() == out.size());
  // The peers' segments: one locate per holder, all sent before any reply is awaited.
  struct Ask {
    InstanceId holder;
    std::vector<size_t> at;  // indices into refs
    uint64_t ticket = 0;
  };
  std::vector<Ask> asks;
  std::vector<size_t> staged;  // refs of unmapped holders
  for (size_t i = 0; i < refs.size(); ++i) {
    TOKENLAKE_RETURN_IF_ERROR(CheckInstance(refs[i].holder, "a read"));
    if (refs[i].holder == options_.self) {
      absl::StatusOr<int64_t> offset = LocalOffset(refs[i].segment);
      if (!offset.ok()) return absl::InternalError(offset.status().message());
      out[i] = static_cast<const std::byte*>(arena_->data()) + *offset;
      continue;
    }
    if (!Mapped(refs[i].holder)) {
      staged.push_back(i);
      continue;
    }
    auto it = std::find_if(asks.begin(), asks.end(),
                           [&](const Ask& a) { return a.holder == refs[i].holder; });
    if (it == asks.end()) {
      asks.push_back({refs[i].holder, {}, 0});
      it = asks.end() - 1;
    }
    it->at.push_back(i);
  }
  // The staged segments first: their fetches complete before the locates are sent (a locate's
  // offsets stay valid until the next plan, so the order does not matter for correctness).
  if (!staged.empty()) TOKENLAKE_RETURN_IF_ERROR(ResolveStaged(refs, staged, out));
  absl::Status status = absl::OkStatus();
  const absl::Time start = absl::Now();
  for (Ask& a : asks) {
    std::vector<uint64_t> ids;
    ids.reserve(a.at.size());
    for (size_t i : a.at) ids.push_back(refs[i].segment.value());
    WireWriter w;
    w.PutArray<uint64_t>(ids);
    absl::StatusOr<uint64_t> ticket = driver_->Send(ServerEndpoint(a.holder), kLocate, w.Take());
    if (!ticket.ok()) {
      status = ticket.status();
      break;
    }
    a.ticket = *ticket;
  }
  for (Ask& a : asks) {
    if (a.ticket == 0) continue;  // not sent (an earlier send failed)
    // Every reply is taken, even after an error, so that none is left for a later call.
    absl::StatusOr<transport::Message> reply = driver_->Await(a.ticket, options_.reply_timeout);
    if (!status.ok()) continue;
    if (!reply.ok()) {
      status = reply.status().code() == absl::StatusCode::kNotFound
                   ? absl::InternalError(reply.status().message())
                   : reply.status();
      continue;
    }
    WireReader r(reply->payload);
    std::vector<int64_t> offsets;
    status = r.GetArray(&offsets, "slot offsets");
    if (status.ok() && offsets.size() != a.at.size()) {
      status = absl::DataLossError(absl::StrFormat("locate: %d offsets for %d segments from %d",
                                                   offsets.size(), a.at.size(), a.holder.value()));
    }
    if (!status.ok()) continue;
    absl::StatusOr<std::pair<std::byte*, size_t>> arena = ArenaOf(a.holder);
    if (!arena.ok()) {
      status = arena.status();
      continue;
    }
    for (size_t k = 0; k < a.at.size(); ++k) {
      if (offsets[k] < 0 || static_cast<size_t>(offsets[k] + slot_bytes_) > arena->second) {
        status = absl::DataLossError(
            absl::StrFormat("locate: offset %d from instance %d is outside its arena of %d bytes",
                            offsets[k], a.holder.value(), arena->second));
        break;
      }
      out[a.at[k]] = arena->first + offsets[k];
    }
  }
  if (!asks.empty()) {
    const absl::Duration took = absl::Now() - start;
    int64_t slots = 0;
    for (const Ask& a : asks) slots += static_cast<int64_t>(a.at.size());
    absl::MutexLock lock(&traffic_mu_);
    traffic_.locate_messages += static_cast<int64_t>(asks.size());
    traffic_.in_place_slots += slots;
    traffic_.in_place_bytes += slots * slot_bytes_;
    traffic_.locate_time += took;
  }
  return status;
}

absl::Status PeerDevicePool::Fetch(
    InstanceId holder, absl::Span<const SegmentId> segments, absl::Span<const CopyVersion> have,
    absl::FunctionRef<absl::Status(size_t, const StoredMeta&, const CopyVersion&,
                                   absl::Span<const std::byte>)>
        sink) {
  TOKENLAKE_CHECK(have.size() == segments.size());
  const size_t per_reply =
      std::max<size_t>(1, static_cast<size_t>(options_.max_fetch_bytes / slot_bytes_));
  struct Part {
    size_t first = 0, count = 0;
    uint64_t ticket = 0;
  };
  std::vector<Part> parts;
  for (size_t at = 0; at < segments.size(); at += per_reply) {
    parts.push_back({at, std::min(per_reply, segments.size() - at), 0});
  }
  const absl::Time start = absl::Now();
  absl::Status status = absl::OkStatus();
  for (Part& part : parts) {
    WireWriter w;
    w.Put<uint64_t>(part.count);
    for (size_t k = part.first; k < part.first + part.count; ++k) {
      w.Put<uint64_t>(segments[k].value());
      w.Put<uint64_t>(have[k].incarnation);
      w.Put<uint64_t>(have[k].generation);
    }
    absl::StatusOr<uint64_t> ticket = driver_->Send(ServerEndpoint(holder), kFetch, w.Take());
    if (!ticket.ok()) {
      status = ticket.status();
      break;
    }
    part.ticket = *ticket;
  }
  int64_t fetched = 0;
  for (Part& part : parts) {
    if (part.ticket == 0) continue;  // not sent (an earlier send failed)
    // Every reply is taken, even after an error, so that none is left for a later call.
    absl::StatusOr<transport::Message> reply = driver_->Await(part.ticket, options_.reply_timeout);
    if (!status.ok()) continue;
    if (!reply.ok()) {
      status = reply.status().code() == absl::StatusCode::kNotFound
                   ? absl::InternalError(reply.status().message())
                   : reply.status();
      continue;
    }
    WireReader r(reply->payload);
    uint64_t incarnation = 0, count = 0;
    status = r.Get(&incarnation, "incarnation");
    if (status.ok()) status = r.Get(&count, "segment count");
    if (status.ok() && count != part.count) {
      status = absl::DataLossError(absl::StrFormat("fetch: %d segments for %d from instance %d",
                                                   count, part.count, holder.value()));
    }
    std::vector<StoredMeta> metas(status.ok() ? part.count : 0);
    std::vector<uint64_t> generations(metas.size());
    std::vector<uint8_t> sent(metas.size());
    size_t with_kv = 0;
    for (size_t k = 0; status.ok() && k < metas.size(); ++k) {
      status = GetMeta(r, &metas[k]);
      if (status.ok()) status = r.Get(&generations[k], "generation");
      if (status.ok()) status = r.Get(&sent[k], "sent");
      with_kv += sent[k] != 0 ? 1 : 0;
    }
    if (status.ok() && r.rest().size() != with_kv * static_cast<size_t>(slot_bytes_)) {
      status = absl::DataLossError(
          absl::StrFormat("fetch: %d bytes of KV for %d slots of %d bytes from instance %d",
                          r.rest().size(), with_kv, slot_bytes_, holder.value()));
    }
    size_t next = 0;
    for (size_t k = 0; status.ok() && k < metas.size(); ++k) {
      const CopyVersion version{incarnation, generations[k]};
      absl::Span<const std::byte> kv;
      if (sent[k] != 0) {
        kv = r.rest().subspan(next++ * static_cast<size_t>(slot_bytes_),
                              static_cast<size_t>(slot_bytes_));
        ++fetched;
      } else if (!(version == have[part.first + k])) {
        status = absl::DataLossError(absl::StrFormat(
            "fetch: instance %d sent no KV for segment %016x, whose copy this process lacks",
            holder.value(), segments[part.first + k].value()));
        break;
      }
      status = sink(part.first + k, metas[k], version, kv);
    }
  }
  const absl::Duration took = absl::Now() - start;
  absl::MutexLock lock(&traffic_mu_);
  traffic_.fetch_messages += static_cast<int64_t>(parts.size());
  traffic_.fetched_slots += fetched;
  traffic_.fetched_bytes += fetched * slot_bytes_;
  traffic_.fetch_time += took;
  return status;
}

absl::Status PeerDevicePool::ResolveStaged(absl::Span<const SlotRef> refs,
                                           absl::Span<const size_t> at,
                                           absl::Span<const std::byte*> out) {
  const uint64_t round = ++staging_round_;
  // This round's copies, by holder, with the version the cache has of each (if any).
  struct Ask {
    InstanceId holder;
    std::vector<SegmentId> segments;
    std::vector<CopyVersion> have;
  };
  std::vector<Ask> asks;
  absl::flat_hash_set<std::pair<InstanceId, SegmentId>> seen;
  for (size_t i : at) {
    const std::pair<InstanceId, SegmentId> key{refs[i].holder, refs[i].segment};
    if (!seen.insert(key).second) continue;
    auto a = std::find_if(asks.begin(), asks.end(),
                          [&](const Ask& x) { return x.holder == refs[i].holder; });
    if (a == asks.end()) {
      asks.push_back({refs[i].holder, {}, {}});
      a = asks.end() - 1;
    }
    a->segments.push_back(refs[i].segment);
    CopyVersion have;
    if (auto it = staged_at_.find(key); it != staged_at_.end()) {
      Staged& e = staged_[static_cast<size_t>(it->second)];
      e.round = round;  // kept for this round
      have = e.version;
    }
    a->have.push_back(have);
  }
  // Room: a batch that reads more than the cache holds grows it (the copies it has move along).
  const size_t capacity =
      std::max({seen.size(), static_cast<size_t>(options_.staging_slots), staged_.size()});
  if (capacity > staged_.size()) {
    DeviceBuffer grown;
    TOKENLAKE_RETURN_IF_ERROR(grown.Allocate(capacity * static_cast<size_t>(slot_bytes_)));
    if (!staged_.empty()) {
      TOKENLAKE_RETURN_IF_ERROR(CudaStatus(
          cudaMemcpy(grown.get(), staging_.get(), staged_.size() * static_cast<size_t>(slot_bytes_),
                     cudaMemcpyDeviceToDevice),
          "staging cache growth"));
    }
    staging_ = std::move(grown);
    staged_.resize(capacity);
  }
  auto base = [&](int32_t k) {
    return staging_.as<std::byte>() + static_cast<int64_t>(k) * slot_bytes_;
  };
  // A slot for a new copy: a free one, else the least recently read one not read this round
  // (one exists: the capacity covers this round's copies).
  auto take = [&]() {
    int32_t pick = -1;
    for (size_t k = 0; k < staged_.size(); ++k) {
      if (!staged_[k].segment.valid()) return static_cast<int32_t>(k);
      if (staged_[k].round != round &&
          (pick < 0 || staged_[k].round < staged_[static_cast<size_t>(pick)].round)) {
        pick = static_cast<int32_t>(k);
      }
    }
    TOKENLAKE_CHECK(pick >= 0);
    Staged& e = staged_[static_cast<size_t>(pick)];
    staged_at_.erase({e.holder, e.segment});
    e = Staged{};
    return pick;
  };
  int64_t hits = 0;
  for (const Ask& a : asks) {
    TOKENLAKE_RETURN_IF_ERROR(
        Fetch(a.holder, a.segments, a.have,
              [&](size_t k, const StoredMeta&, const CopyVersion& version,
                  absl::Span<const std::byte> kv) -> absl::Status {
                const std::pair<InstanceId, SegmentId> key{a.holder, a.segments[k]};
                if (kv.empty()) {
                  ++hits;  // the cache's copy is the holder's
                  return absl::OkStatus();
                }
                int32_t slot = -1;
                if (auto it = staged_at_.find(key); it != staged_at_.end()) {
                  slot = it->second;  // stored again on the holder: replaced in place
                } else {
                  slot = take();
                }
                TOKENLAKE_RETURN_IF_ERROR(
                    CudaStatus(cudaMemcpy(base(slot), kv.data(), kv.size(), cudaMemcpyHostToDevice),
                               "staging copy"));
                staged_[static_cast<size_t>(slot)] = {a.holder, a.segments[k], version, round};
                staged_at_[key] = slot;
                return absl::OkStatus();
              }));
  }
  for (size_t i : at) out[i] = base(staged_at_.at({refs[i].holder, refs[i].segment}));
  absl::MutexLock lock(&traffic_mu_);
  traffic_.staged_hits += hits;
  return absl::OkStatus();
}

absl::StatusOr<DeviceSlot> PeerDevicePool::AllocateTail(InstanceId instance) {
  TOKENLAKE_RETURN_IF_ERROR(CheckInstance(instance, "a tail slot"));
  TOKENLAKE_ASSIGN_OR_RETURN(auto arena, ArenaOf(instance));
  if (instance == options_.self) {
    TOKENLAKE_ASSIGN_OR_RETURN(SlotId slot, LocalAllocateTail());
    return DeviceSlot{slot, arena.first + int64_t{slot.value()} * slot_bytes_};
  }
  TOKENLAKE_ASSIGN_OR_RETURN(transport::Message reply, Call(instance, kAllocateTail, {}));
  WireReader r(reply.payload);
  int32_t slot = -1;
  TOKENLAKE_RETURN_IF_ERROR(r.Get(&slot, "tail slot"));
  if (slot < 0 || static_cast<size_t>((int64_t{slot} + 1) * slot_bytes_) > arena.second) {
    return absl::DataLossError(absl::StrFormat("tail slot %d from instance %d is outside its arena",
                                               slot, instance.value()));
  }
  return DeviceSlot{SlotId(slot), arena.first + int64_t{slot} * slot_bytes_};
}

absl::Status PeerDevicePool::FreeTail(InstanceId instance, SlotId slot) {
  TOKENLAKE_RETURN_IF_ERROR(CheckInstance(instance, "giving a tail slot back"));
  if (instance == options_.self) return hosted_->slots().FreeTail(slot);
  WireWriter w;
  w.Put<int32_t>(slot.value());
  return Call(instance, kFreeTail, w.Take()).status();
}

absl::Status PeerDevicePool::CommitTail(InstanceId instance, SlotId slot, SegmentId segment,
                                        const StoredMeta& meta) {
  TOKENLAKE_RETURN_IF_ERROR(CheckInstance(instance, "a commit in place"));
  if (instance == options_.self) return LocalCommitTail(slot, segment, meta);
  WireWriter w;
  w.Put<int32_t>(slot.value());
  w.Put<uint64_t>(segment.value());
  PutMeta(w, meta);
  return Call(instance, kCommitTail, w.Take()).status();
}

absl::Status PeerDevicePool::Store(InstanceId target, SegmentId segment, const std::byte* source,
                                   const StoredMeta& meta, cudaStream_t stream) {
  TOKENLAKE_RETURN_IF_ERROR(CheckInstance(target, "a store"));
  // The source is a block of one of the pool's arenas (a tail block): which, and where.
  InstanceId from;
  int64_t offset = -1;
  for (int32_t i = 0; i < options_.num_instances && !from.valid(); ++i) {
    absl::StatusOr<std::pair<std::byte*, size_t>> arena = ArenaOf(InstanceId(i));
    if (arena.ok() && source >= arena->first && source < arena->first + arena->second) {
      from = InstanceId(i);
      offset = source - arena->first;
    }
  }
  if (!from.valid()) {
    return absl::InternalError(
        absl::StrFormat("PeerDevicePool: the source of a store of segment %016x is in no arena of "
                        "the pool",
                        segment.value()));
  }
  // The holder copies bytes this process wrote: they must have landed first.
  TOKENLAKE_RETURN_IF_ERROR(
      CudaStatus(cudaStreamSynchronize(stream), "synchronize before a store"));
  if (target == options_.self) return LocalStoreFrom(segment, meta, from, offset);
  if (!Mapped(target)) {
    // Another GPU or host: the block's bytes travel in the message.
    WireWriter w;
    w.Put<uint64_t>(segment.value());
    PutMeta(w, meta);
    absl::Span<std::byte> kv = w.Extend(static_cast<size_t>(slot_bytes_));
    TOKENLAKE_RETURN_IF_ERROR(CudaStatus(
        cudaMemcpy(kv.data(), source, kv.size(), cudaMemcpyDeviceToHost), "store staging copy"));
    return Call(target, kStoreBytes, w.Take()).status();
  }
  WireWriter w;
  w.Put<uint64_t>(segment.value());
  PutMeta(w, meta);
  w.Put<int32_t>(from.value());
  w.Put<int64_t>(offset);
  return Call(target, kStoreFrom, w.Take()).status();
}

absl::Status PeerDevicePool::Free(InstanceId target, SegmentId segment, uint64_t evicted_at,
                                  cudaStream_t stream) {
  TOKENLAKE_RETURN_IF_ERROR(CheckInstance(target, "a free"));
  // Queued work may still read the slot.
  TOKENLAKE_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "synchronize before a free"));
  if (target == options_.self) return LocalFree(segment, evicted_at);
  WireWriter w;
  w.Put<uint64_t>(segment.value());
  w.Put<uint64_t>(evicted_at);
  return Call(target, kFree, w.Take()).status();
}

absl::StatusOr<int64_t> PeerDevicePool::CopyFromPeer(InstanceId from, SegmentId segment,
                                                     uint64_t sequence) {
  if (!from.valid() || from.value() >= options_.num_instances || from == options_.self) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PeerDevicePool::CopyFromPeer: instance %d is not a peer of instance %d",
                        from.valid() ? from.value() : -1, options_.self.value()));
  }
  if (!Mapped(from)) {
    // Another GPU or host: fetched through host memory, then stored here.
    const CopyVersion none;
    TOKENLAKE_RETURN_IF_ERROR(Fetch(
        from, {&segment, 1}, {&none, 1},
        [&](size_t, const StoredMeta& meta, const CopyVersion&, absl::Span<const std::byte> kv) {
          StoredMeta placed = meta;
          placed.placement_sequence = sequence;
          return LocalStoreBytes(segment, placed, kv);
        }));
    return slot_bytes_;
  }
  // A slot here first; the holder writes it through its mapping of this arena while it pins its
  // own copy (so the bytes cannot change under the copy), then the slot becomes the segment's.
  TOKENLAKE_ASSIGN_OR_RETURN(SlotId slot, hosted_->slots().AllocateTail());
  WireWriter w;
  w.Put<uint64_t>(segment.value());
  w.Put<int32_t>(options_.self.value());
  w.Put<int64_t>(int64_t{slot.value()} * slot_bytes_);
  absl::StatusOr<transport::Message> copied = Call(from, kCopyTo, w.Take());
  StoredMeta meta;
  absl::Status s = copied.status();
  if (s.ok()) {
    WireReader r(copied->payload);
    s = GetMeta(r, &meta);
  }
  if (s.ok()) {
    meta.placement_sequence = sequence;
    s = hosted_->CommitTail(slot, segment, meta);
  }
  if (!s.ok()) {
    (void)hosted_->slots().FreeTail(slot);
    return s;
  }
  return slot_bytes_;
}

// ---- The server. ----

void PeerDevicePool::ServeLoop() {
  if (cudaSetDevice(options_.device) != cudaSuccess) cudaGetLastError();
  while (!stopping_.load()) {
    absl::StatusOr<transport::Message> m =
        options_.transport->Receive(ServerEndpoint(options_.self), absl::Milliseconds(100));
    if (!m.ok()) {
      if (m.status().code() == absl::StatusCode::kDeadlineExceeded) continue;
      return;  // Cancelled: the transport shut down.
    }
    // A failed reply send means the transport is shutting down; nothing else to do.
    (void)options_.transport->Send(Handle(*m));
  }
}

transport::Message PeerDevicePool::Handle(const transport::Message& request) {
  WireReader r(request.payload);
  WireWriter w;
  absl::Status s = absl::OkStatus();
  switch (request.tag) {
    case kLocate: {
      std::vector<uint64_t> ids;
      s = r.GetArray(&ids, "segment ids");
      std::vector<int64_t> offsets;
      offsets.reserve(ids.size());
      for (size_t i = 0; s.ok() && i < ids.size(); ++i) {
        absl::StatusOr<int64_t> offset = LocalOffset(SegmentId(ids[i]));
        if (offset.ok()) {
          offsets.push_back(*offset);
        } else {
          s = offset.status();
        }
      }
      if (s.ok()) w.PutArray<int64_t>(offsets);
      break;
    }
    case kAllocateTail: {
      absl::StatusOr<InstanceId> owner = Requester(request);
      s = owner.status();
      if (s.ok()) {
        // Taken and recorded at once, so that a ForgetPeerTails meanwhile cannot miss it.
        absl::MutexLock lock(&tails_mu_);
        absl::StatusOr<SlotId> slot = LocalAllocateTail();
        s = slot.status();
        if (s.ok()) {
          peer_tails_[slot->value()] = *owner;
          w.Put<int32_t>(slot->value());
        }
      }
      break;
    }
    case kFreeTail: {
      int32_t slot = -1;
      absl::StatusOr<InstanceId> owner = Requester(request);
      s = owner.status();
      if (s.ok()) s = r.Get(&slot, "tail slot");
      if (s.ok()) s = TakePeerTail(*owner, slot);
      if (s.ok()) s = hosted_->slots().FreeTail(SlotId(slot));
      break;
    }
    case kCommitTail: {
      int32_t slot = -1;
      uint64_t id = 0;
      StoredMeta meta;
      absl::StatusOr<InstanceId> owner = Requester(request);
      s = owner.status();
      if (s.ok()) s = r.Get(&slot, "tail slot");
      if (s.ok()) s = r.Get(&id, "segment id");
      if (s.ok()) s = GetMeta(r, &meta);
      if (s.ok()) s = TakePeerTail(*owner, slot);
      if (s.ok()) {
        s = LocalCommitTail(SlotId(slot), SegmentId(id), meta);
        if (!s.ok()) {
          // Still the peer's tail slot: its driver gives it back.
          absl::MutexLock lock(&tails_mu_);
          peer_tails_[slot] = *owner;
        }
      }
      break;
    }
    case kStoreFrom: {
      uint64_t id = 0;
      StoredMeta meta;
      int32_t source = -1;
      int64_t offset = -1;
      s = r.Get(&id, "segment id");
      if (s.ok()) s = GetMeta(r, &meta);
      if (s.ok()) s = r.Get(&source, "source instance");
      if (s.ok()) s = r.Get(&offset, "source offset");
      if (s.ok() && (source < 0 || source >= options_.num_instances)) {
        s = absl::InvalidArgumentError(absl::StrFormat("store from instance %d", source));
      }
      if (s.ok()) s = LocalStoreFrom(SegmentId(id), meta, InstanceId(source), offset);
      break;
    }
    case kFree: {
      uint64_t id = 0;
      uint64_t evicted_at = 0;
      s = r.Get(&id, "segment id");
      if (s.ok()) s = r.Get(&evicted_at, "evicted at");
      if (s.ok()) s = LocalFree(SegmentId(id), evicted_at);
      break;
    }
    case kCopyTo: {
      // A peer copies one of this instance's segments (a rebalance): written into its slot
      // through the mapping of its arena while this copy is pinned; its metadata back.
      uint64_t id = 0;
      int32_t target = -1;
      int64_t offset = -1;
      s = r.Get(&id, "segment id");
      if (s.ok()) s = r.Get(&target, "target instance");
      if (s.ok()) s = r.Get(&offset, "target offset");
      absl::StatusOr<std::pair<std::byte*, size_t>> to =
          s.ok() ? ArenaOf(InstanceId(target)) : absl::StatusOr<std::pair<std::byte*, size_t>>(s);
      s = to.status();
      if (s.ok() && (target == options_.self.value() || offset < 0 ||
                     static_cast<size_t>(offset + slot_bytes_) > to->second)) {
        s = absl::InvalidArgumentError(
            absl::StrFormat("a copy into bytes [%d, %d) of instance %d's arena", offset,
                            offset + slot_bytes_, target));
      }
      absl::StatusOr<store::SlotPin> pin =
          s.ok() ? hosted_->slots().Pin(SegmentId(id)) : absl::StatusOr<store::SlotPin>(s);
      s = pin.status();
      if (s.ok()) {
        s = CudaStatus(cudaMemcpyAsync(to->first + offset, pin->data().data(),
                                       static_cast<size_t>(slot_bytes_), cudaMemcpyDeviceToDevice,
                                       copy_stream_),
                       "rebalance copy");
        if (s.ok()) s = CudaStatus(cudaStreamSynchronize(copy_stream_), "rebalance copy");
      }
      if (s.ok()) PutMeta(w, hosted_->MetaOf(SegmentId(id)));
      break;
    }
    case kFetch: {
      // A peer on another GPU or host reads segments: the metadata and generation of each copy,
      // and the KV (copied device to host while the copy is pinned) of those whose copy is not
      // the one the peer has.
      uint64_t count = 0;
      s = r.Get(&count, "segment count");
      // Per segment: its id and the incarnation and generation of the copy the peer has.
      std::vector<std::array<uint64_t, 3>> asked;
      for (uint64_t k = 0; s.ok() && k < count; ++k) {
        std::array<uint64_t, 3> a{};
        s = r.Get(&a[0], "segment id");
        if (s.ok()) s = r.Get(&a[1], "incarnation");
        if (s.ok()) s = r.Get(&a[2], "generation");
        if (!s.ok()) break;
        if (hosted_->GenerationOf(SegmentId(a[0])) == 0) {
          s = absl::NotFoundError(absl::StrFormat(
              "segment %016x is not stored on instance %d (data plane out of step with the lake)",
              a[0], options_.self.value()));
          break;
        }
        asked.push_back(a);
      }
      if (!s.ok()) break;
      w.Put<uint64_t>(incarnation_);
      w.Put<uint64_t>(asked.size());
      std::vector<store::SlotPin> pins;
      std::vector<bool> send;
      for (size_t k = 0; s.ok() && k < asked.size(); ++k) {
        const SegmentId id(asked[k][0]);
        // Pinned before the generation is read, and whether to send decided from that
        // generation: the bytes sent, or the peer's copy kept, are the pinned copy's (a copy
        // replaced between the checks above and the pin is sent whole).
        absl::StatusOr<store::SlotPin> pin = hosted_->slots().Pin(id);
        s = pin.status();
        if (!s.ok()) break;
        pins.push_back(*std::move(pin));
        const uint64_t generation = hosted_->GenerationOf(id);
        send.push_back(asked[k][1] != incarnation_ || asked[k][2] != generation);
        PutMeta(w, hosted_->MetaOf(id));
        w.Put<uint64_t>(generation);
        w.Put<uint8_t>(send[k] ? 1 : 0);
      }
      for (size_t k = 0; s.ok() && k < pins.size(); ++k) {
        if (!send[k]) continue;
        absl::Span<std::byte> kv = w.Extend(static_cast<size_t>(slot_bytes_));
        s = CudaStatus(
            cudaMemcpy(kv.data(), pins[k].data().data(), kv.size(), cudaMemcpyDeviceToHost),
            "fetch copy");
      }
      break;
    }
    case kStoreBytes: {
      uint64_t id = 0;
      StoredMeta meta;
      s = r.Get(&id, "segment id");
      if (s.ok()) s = GetMeta(r, &meta);
      if (s.ok()) s = LocalStoreBytes(SegmentId(id), meta, r.rest());
      break;
    }
    default:
      s = absl::InvalidArgumentError(absl::StrFormat("unknown request tag %d", request.tag));
  }
  if (!s.ok()) return ErrorReply(request, s);
  return transport::Message{.from = request.to,
                            .to = request.from,
                            .tag = request.tag + 1,
                            .correlation_id = request.correlation_id,
                            .payload = w.Take()};
}

}  // namespace tokenlake::engine::cuda
