#include "tokenlake/engine/instance_pool.h"

#include <cstring>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "tokenlake/base/check.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/data_rpc.h"
#include "tokenlake/engine/wire.h"

namespace tokenlake::engine {
namespace {

enum Tag : uint32_t {
  kAttendRequest = 1,
  kAttendReply = 2,
  kPullRequest = 3,
  kPullReply = 4,
  kStoreRequest = 5,
  kStoreReply = 6,
  kFreeRequest = 7,
  kFreeReply = 8,
};

}  // namespace

absl::StatusOr<std::unique_ptr<InstancePool>> InstancePool::Create(const Options& options) {
  if (options.num_instances < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("InstancePool: num_instances must be >= 1, got %d", options.num_instances));
  }
  TOKENLAKE_RETURN_IF_ERROR(options.layout.Validate());
  if (options.num_heads < 1 || options.num_heads % options.layout.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("InstancePool: num_heads %d is not a positive multiple of num_kv_heads %d",
                        options.num_heads, options.layout.num_kv_heads));
  }
  if (options.slots_per_instance < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "InstancePool: slots_per_instance must be >= 1, got %d", options.slots_per_instance));
  }
  if (options.endpoint_base < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("InstancePool: endpoint_base must be >= 0, got %d", options.endpoint_base));
  }
  if (options.change_log_entries < 0) {
    return absl::InvalidArgumentError("InstancePool: change_log_entries must be >= 0");
  }
  std::vector<bool> hosted(static_cast<size_t>(options.num_instances), options.hosted.empty());
  for (InstanceId h : options.hosted) {
    if (!h.valid() || h.value() < 0 || h.value() >= options.num_instances ||
        hosted[static_cast<size_t>(h.value())]) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "InstancePool: hosted instance %d is out of range or listed twice", h.value()));
    }
    hosted[static_cast<size_t>(h.value())] = true;
  }
  if (options.external_transport == nullptr &&
      (!options.hosted.empty() &&
       static_cast<int32_t>(options.hosted.size()) != options.num_instances)) {
    return absl::InvalidArgumentError(
        "InstancePool: hosting a subset of the instances needs an external_transport");
  }
  const int64_t endpoints_needed = int64_t{options.endpoint_base} + 2 * options.num_instances;
  std::unique_ptr<InstancePool> pool(new InstancePool(options));
  if (options.external_transport != nullptr) {
    if (options.external_transport->num_endpoints() < endpoints_needed) {
      return absl::InvalidArgumentError(
          absl::StrFormat("InstancePool: external transport has %d endpoints, the pool needs %d",
                          options.external_transport->num_endpoints(), endpoints_needed));
    }
    pool->transport_ = options.external_transport;
  } else {
    TOKENLAKE_ASSIGN_OR_RETURN(pool->loopback_,
                               transport::LoopbackTransport::Create(
                                   {.num_endpoints = static_cast<int32_t>(endpoints_needed)}));
    pool->transport_ = pool->loopback_.get();
  }
  if (options.external_transport == nullptr && options.wrap_transport) {
    TOKENLAKE_ASSIGN_OR_RETURN(pool->wrapper_, options.wrap_transport(pool->loopback_.get()));
    if (pool->wrapper_ == nullptr ||
        pool->wrapper_->num_endpoints() != pool->loopback_->num_endpoints()) {
      return absl::InvalidArgumentError(
          "InstancePool: wrap_transport returned no transport or one with other endpoints");
    }
    pool->transport_ = pool->wrapper_.get();
  }
  const size_t slot_bytes = static_cast<size_t>(options.layout.SlotBytes());
  for (int32_t i = 0; i < options.num_instances; ++i) {
    if (!hosted[static_cast<size_t>(i)]) {
      pool->instances_.push_back(nullptr);
      pool->drivers_.push_back(nullptr);
      continue;
    }
    auto inst = std::make_unique<Instance>();
    inst->arena.resize(slot_bytes * static_cast<size_t>(options.slots_per_instance));
    TOKENLAKE_ASSIGN_OR_RETURN(std::unique_ptr<store::SegmentStore> st,
                               store::SegmentStore::Create({.arena = inst->arena.data(),
                                                            .arena_bytes = inst->arena.size(),
                                                            .slot_bytes = slot_bytes,
                                                            .num_slots = options.slots_per_instance,
                                                            .instance = InstanceId(i)}));
    inst->hosted = std::make_unique<HostedStore>(std::move(st), options.change_log_entries);
    pool->instances_.push_back(std::move(inst));
    pool->drivers_.push_back(std::make_unique<DriverChannel>(
        pool->transport_, pool->DriverEndpoint(InstanceId(i)), options.endpoint_base));
  }
  for (int32_t i = 0; i < options.num_instances; ++i) {
    if (!hosted[static_cast<size_t>(i)]) continue;
    pool->instances_[static_cast<size_t>(i)]->server =
        std::thread([p = pool.get(), i] { p->ServeLoop(InstanceId(i)); });
  }
  return pool;
}

InstancePool::~InstancePool() {
  stopping_.store(true);
  // An external transport belongs to the caller: the servers notice stopping_ within their
  // receive timeout instead.
  if (options_.external_transport == nullptr) {
    if (transport_ != nullptr) transport_->Shutdown();
    if (loopback_ != nullptr) loopback_->Shutdown();
  }
  for (auto& inst : instances_) {
    if (inst != nullptr && inst->server.joinable()) inst->server.join();
  }
}

store::SegmentStore& InstancePool::store(InstanceId i) const {
  TOKENLAKE_CHECK(hosts(i));
  return instances_[static_cast<size_t>(i.value())]->hosted->slots();
}

HostedStore& InstancePool::hosted(InstanceId i) const {
  TOKENLAKE_CHECK(hosts(i));
  return *instances_[static_cast<size_t>(i.value())]->hosted;
}

std::vector<HeldSegmentInfo> InstancePool::Held(InstanceId i) const {
  return HeldWithGeneration(i).segments;
}

InstancePool::HeldReport InstancePool::HeldWithGeneration(InstanceId i) const {
  TOKENLAKE_CHECK(hosts(i));
  return instances_[static_cast<size_t>(i.value())]->hosted->Held();
}

uint64_t InstancePool::StoreGeneration(InstanceId i) const {
  TOKENLAKE_CHECK(hosts(i));
  return instances_[static_cast<size_t>(i.value())]->hosted->Generation();
}

std::optional<std::vector<store::SegmentChange>> InstancePool::ChangesSince(InstanceId i,
                                                                            uint64_t from) const {
  TOKENLAKE_CHECK(hosts(i));
  return instances_[static_cast<size_t>(i.value())]->hosted->ChangesSince(from);
}

void InstancePool::ForgetChanges(InstanceId i, uint64_t through) {
  TOKENLAKE_CHECK(hosts(i));
  instances_[static_cast<size_t>(i.value())]->hosted->ForgetChanges(through);
}

absl::Status InstancePool::FreeIfUnchangedSince(InstanceId i, SegmentId segment,
                                                uint64_t generation) {
  TOKENLAKE_CHECK(hosts(i));
  return instances_[static_cast<size_t>(i.value())]->hosted->FreeIfUnchangedSince(segment,
                                                                                  generation);
}

StoredMeta InstancePool::MetaOf(InstanceId holder, SegmentId segment) const {
  return instances_[static_cast<size_t>(holder.value())]->hosted->MetaOf(segment);
}

absl::Status InstancePool::CheckDriver(InstanceId compute, InstanceId other,
                                       const char* what) const {
  if (!hosts(compute) || !InRange(other)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: instance out of range or computing instance %d not hosted here", what,
                        compute.valid() ? compute.value() : -1));
  }
  return absl::OkStatus();
}

void InstancePool::ServeLoop(InstanceId self) {
  const bool external = options_.external_transport != nullptr;
  while (!stopping_.load()) {
    absl::StatusOr<transport::Message> m = transport_->Receive(
        ServerEndpoint(self), external ? absl::Milliseconds(100) : absl::InfiniteDuration());
    if (!m.ok()) {
      if (m.status().code() == absl::StatusCode::kDeadlineExceeded) continue;
      return;  // Cancelled: shut down.
    }
    transport::Message reply = Handle(*m);
    // A failed reply send means the pool is shutting down; nothing else to do.
    (void)transport_->Send(std::move(reply));
  }
}

transport::Message InstancePool::Handle(const transport::Message& request) {
  const InstanceId self(request.to.value() - options_.endpoint_base);
  WireReader r(request.payload);
  WireWriter w;
  auto reply = [&](uint32_t tag) {
    return transport::Message{.from = request.to,
                              .to = request.from,
                              .tag = tag,
                              .correlation_id = request.correlation_id,
                              .payload = w.Take()};
  };
  switch (request.tag) {
    case kAttendRequest: {
      // The queries of one or more requests (a batch) at one layer; one reply for all.
      int32_t layer = 0;
      uint32_t num_groups = 0;
      absl::Status s = r.Get(&layer, "layer");
      if (s.ok()) s = r.Get(&num_groups, "groups");
      for (uint32_t g = 0; s.ok() && g < num_groups; ++g) {
        int32_t num_q = 0;
        std::vector<uint64_t> ids;
        std::vector<int32_t> tokens;
        std::vector<float> q;
        s = r.Get(&num_q, "num_q");
        if (s.ok()) s = r.GetArray(&ids, "segment ids");
        if (s.ok()) s = r.GetArray(&tokens, "segment tokens");
        if (s.ok()) s = r.GetArray(&q, "queries");
        if (s.ok() && ids.size() != tokens.size()) {
          s = absl::DataLossError("attend: segment ids and token counts differ in length");
        }
        if (s.ok() &&
            (num_q < 0 || q.size() != static_cast<size_t>(num_q) * options_.num_heads *
                                          static_cast<size_t>(options_.layout.head_dim))) {
          s = absl::DataLossError(
              absl::StrFormat("attend: %d query floats for %d tokens", q.size(), num_q));
        }
        if (!s.ok()) break;
        std::vector<SegmentRef> segs(ids.size());
        for (size_t i = 0; i < ids.size(); ++i) segs[i] = {SegmentId(ids[i]), tokens[i]};
        const size_t rows = static_cast<size_t>(num_q) * options_.num_heads;
        std::vector<float> out(rows * static_cast<size_t>(options_.layout.head_dim)), lse(rows);
        s = LocalAttend(self, layer, segs, num_q, q, absl::MakeSpan(out), absl::MakeSpan(lse));
        if (!s.ok()) break;
        w.PutArray<float>(out);
        w.PutArray<float>(lse);
      }
      if (!s.ok()) return ErrorReply(request, s);
      return reply(kAttendReply);
    }
    case kPullRequest: {
      uint64_t id = 0;
      if (absl::Status s = r.Get(&id, "segment id"); !s.ok()) return ErrorReply(request, s);
      absl::StatusOr<store::SlotPin> pin = store(self).Pin(SegmentId(id));
      if (!pin.ok()) return ErrorReply(request, pin.status());
      const absl::Span<std::byte> data = pin->data();
      w.PutArray<std::byte>(data);
      const StoredMeta meta = MetaOf(self, SegmentId(id));
      w.Put<uint64_t>(meta.parent.value());
      w.Put<int32_t>(meta.num_tokens);
      w.Put<uint64_t>(meta.placement_sequence);
      return reply(kPullReply);
    }
    case kStoreRequest: {
      uint64_t id = 0, parent = 0, sequence = 0;
      int32_t tokens = 0;
      std::vector<std::byte> bytes;
      absl::Status s = r.Get(&id, "segment id");
      if (s.ok()) s = r.GetArray(&bytes, "slot bytes");
      if (s.ok()) s = r.Get(&parent, "parent id");
      if (s.ok()) s = r.Get(&tokens, "segment tokens");
      if (s.ok()) s = r.Get(&sequence, "placement sequence");
      if (s.ok()) {
        s = LocalStore(self, SegmentId(id), bytes, StoredMeta{SegmentId(parent), tokens, sequence});
      }
      if (!s.ok()) return ErrorReply(request, s);
      return reply(kStoreReply);
    }
    case kFreeRequest: {
      uint64_t id = 0, evicted_at = 0;
      absl::Status s = r.Get(&id, "segment id");
      if (s.ok()) s = r.Get(&evicted_at, "evicted at");
      if (s.ok()) s = LocalFree(self, SegmentId(id), evicted_at);
      if (!s.ok()) return ErrorReply(request, s);
      return reply(kFreeReply);
    }
    default:
      return ErrorReply(
          request, absl::InvalidArgumentError(absl::StrCat("unknown message tag ", request.tag)));
  }
}

absl::Status InstancePool::LocalAttend(InstanceId holder, int32_t layer,
                                       absl::Span<const SegmentRef> segments, int32_t num_q,
                                       absl::Span<const float> q, absl::Span<float> out,
                                       absl::Span<float> lse) const {
  if (!hosts(holder)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("attend: holder %d out of range", static_cast<int64_t>(holder.value())));
  }
  store::SegmentStore& st = store(holder);
  std::vector<store::SlotPin> pins;
  std::vector<attention::KvBlock> blocks;
  pins.reserve(segments.size());
  for (const SegmentRef& seg : segments) {
    absl::StatusOr<store::SlotPin> pin = st.Pin(seg.id);
    if (!pin.ok()) {
      return absl::Status(pin.status().code(), absl::StrCat("attend on instance ", holder.value(),
                                                            ": ", pin.status().message()));
    }
    TOKENLAKE_ASSIGN_OR_RETURN(
        attention::KvBlock block,
        attention::SlotLayerBlock(options_.layout, pin->data().data(), layer, seg.num_tokens));
    blocks.push_back(block);
    pins.push_back(*std::move(pin));
  }
  const attention::AttentionParams params{.num_heads = options_.num_heads,
                                          .num_kv_heads = options_.layout.num_kv_heads,
                                          .head_dim = options_.layout.head_dim,
                                          .kv_dtype = options_.layout.dtype,
                                          .causal = false};
  return attention::PartialAttention(params, num_q, q, blocks, out, lse);
}

absl::Status InstancePool::LocalFree(InstanceId target, SegmentId segment,
                                     uint64_t evicted_at) const {
  return instances_[static_cast<size_t>(target.value())]->hosted->Free(segment, evicted_at);
}

absl::Status InstancePool::LocalStore(InstanceId target, SegmentId segment,
                                      absl::Span<const std::byte> slot_bytes,
                                      StoredMeta meta) const {
  if (!hosts(target)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("store: instance %d out of range", static_cast<int64_t>(target.value())));
  }
  if (static_cast<int64_t>(slot_bytes.size()) != options_.layout.SlotBytes()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("store: %d bytes for segment %d, a slot holds %d", slot_bytes.size(),
                        segment.value(), options_.layout.SlotBytes()));
  }
  return instances_[static_cast<size_t>(target.value())]->hosted->Store(
      segment, meta, [&](absl::Span<std::byte> data) {
        TOKENLAKE_CHECK(data.size() == slot_bytes.size());
        std::memcpy(data.data(), slot_bytes.data(), slot_bytes.size());
        return absl::OkStatus();
      });
}

absl::StatusOr<uint64_t> InstancePool::Send(InstanceId compute, InstanceId target, uint32_t tag,
                                            std::vector<std::byte> payload) {
  return drivers_[static_cast<size_t>(compute.value())]->Send(ServerEndpoint(target), tag,
                                                              std::move(payload));
}

absl::StatusOr<transport::Message> InstancePool::AwaitReply(InstanceId compute, uint64_t ticket) {
  return drivers_[static_cast<size_t>(compute.value())]->Await(ticket, options_.reply_timeout);
}

absl::StatusOr<uint64_t> InstancePool::StartAttend(InstanceId compute, InstanceId holder,
                                                   int32_t layer,
                                                   absl::Span<const SegmentRef> segments,
                                                   int32_t num_q, absl::Span<const float> q) {
  const AttendGroup group{.segments = segments, .num_q = num_q, .q = q};
  return StartAttendBatch(compute, holder, layer, absl::MakeConstSpan(&group, 1));
}

absl::Status InstancePool::AwaitAttend(InstanceId compute, uint64_t ticket, absl::Span<float> out,
                                       absl::Span<float> lse) {
  return AwaitAttendBatch(compute, ticket, absl::MakeConstSpan(&out, 1),
                          absl::MakeConstSpan(&lse, 1));
}

absl::StatusOr<uint64_t> InstancePool::StartAttendBatch(InstanceId compute, InstanceId holder,
                                                        int32_t layer,
                                                        absl::Span<const AttendGroup> groups) {
  TOKENLAKE_RETURN_IF_ERROR(CheckDriver(compute, holder, "StartAttend"));
  if (groups.empty()) return absl::InvalidArgumentError("StartAttend: no groups");
  WireWriter w;
  w.Put<int32_t>(layer);
  w.Put<uint32_t>(static_cast<uint32_t>(groups.size()));
  for (size_t g = 0; g < groups.size(); ++g) {
    const AttendGroup& group = groups[g];
    if (group.segments.empty()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("StartAttend: group %d has no segments", g));
    }
    if (group.num_q < 0 || group.q.size() != static_cast<size_t>(group.num_q) * options_.num_heads *
                                                 static_cast<size_t>(options_.layout.head_dim)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "StartAttend: group %d: %d query floats for %d tokens", g, group.q.size(), group.num_q));
    }
    w.Put<int32_t>(group.num_q);
    std::vector<uint64_t> ids;
    std::vector<int32_t> tokens;
    for (const SegmentRef& s : group.segments) {
      ids.push_back(s.id.value());
      tokens.push_back(s.num_tokens);
    }
    w.PutArray<uint64_t>(ids);
    w.PutArray<int32_t>(tokens);
    w.PutArray<float>(group.q);
  }
  return Send(compute, holder, kAttendRequest, w.Take());
}

absl::Status InstancePool::AwaitAttendBatch(InstanceId compute, uint64_t ticket,
                                            absl::Span<const absl::Span<float>> outs,
                                            absl::Span<const absl::Span<float>> lses) {
  TOKENLAKE_ASSIGN_OR_RETURN(transport::Message m, AwaitReply(compute, ticket));
  if (outs.size() != lses.size()) {
    return absl::InvalidArgumentError("AwaitAttend: as many lse as out buffers are needed");
  }
  WireReader r(m.payload);
  std::vector<float> o, l;
  for (size_t g = 0; g < outs.size(); ++g) {
    TOKENLAKE_RETURN_IF_ERROR(r.GetArray(&o, "out"));
    TOKENLAKE_RETURN_IF_ERROR(r.GetArray(&l, "lse"));
    if (o.size() != outs[g].size() || l.size() != lses[g].size()) {
      return absl::DataLossError(
          absl::StrFormat("attend reply from instance %d, group %d: %d/%d floats, expected %d/%d",
                          static_cast<int64_t>(m.from.value()), g, o.size(), l.size(),
                          outs[g].size(), lses[g].size()));
    }
    std::copy(o.begin(), o.end(), outs[g].begin());
    std::copy(l.begin(), l.end(), lses[g].begin());
  }
  if (!r.done()) {
    return absl::DataLossError(absl::StrFormat("attend reply from instance %d: trailing bytes",
                                               static_cast<int64_t>(m.from.value())));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::byte>> InstancePool::PullSegment(InstanceId compute,
                                                                 InstanceId holder,
                                                                 SegmentId segment,
                                                                 StoredMeta* meta) {
  TOKENLAKE_RETURN_IF_ERROR(CheckDriver(compute, holder, "PullSegment"));
  if (compute == holder) {
    TOKENLAKE_ASSIGN_OR_RETURN(store::SlotPin pin, store(holder).Pin(segment));
    const absl::Span<std::byte> data = pin.data();
    if (meta != nullptr) *meta = MetaOf(holder, segment);
    return std::vector<std::byte>(data.begin(), data.end());
  }
  WireWriter w;
  w.Put<uint64_t>(segment.value());
  TOKENLAKE_ASSIGN_OR_RETURN(uint64_t ticket, Send(compute, holder, kPullRequest, w.Take()));
  TOKENLAKE_ASSIGN_OR_RETURN(transport::Message m, AwaitReply(compute, ticket));
  WireReader r(m.payload);
  std::vector<std::byte> bytes;
  TOKENLAKE_RETURN_IF_ERROR(r.GetArray(&bytes, "slot bytes"));
  if (static_cast<int64_t>(bytes.size()) != options_.layout.SlotBytes()) {
    return absl::DataLossError("PullSegment: reply is not one slot");
  }
  uint64_t parent = 0, sequence = 0;
  int32_t tokens = 0;
  TOKENLAKE_RETURN_IF_ERROR(r.Get(&parent, "parent id"));
  TOKENLAKE_RETURN_IF_ERROR(r.Get(&tokens, "segment tokens"));
  TOKENLAKE_RETURN_IF_ERROR(r.Get(&sequence, "placement sequence"));
  if (meta != nullptr) *meta = StoredMeta{SegmentId(parent), tokens, sequence};
  return bytes;
}

absl::Status InstancePool::StoreSegment(InstanceId compute, InstanceId target, SegmentId segment,
                                        absl::Span<const std::byte> slot_bytes, StoredMeta meta) {
  TOKENLAKE_RETURN_IF_ERROR(CheckDriver(compute, target, "StoreSegment"));
  if (static_cast<int64_t>(slot_bytes.size()) != options_.layout.SlotBytes()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("StoreSegment: %d bytes for segment %d, a slot holds %d", slot_bytes.size(),
                        segment.value(), options_.layout.SlotBytes()));
  }
  if (compute == target) return LocalStore(target, segment, slot_bytes, meta);
  WireWriter w;
  w.Put<uint64_t>(segment.value());
  w.PutArray<std::byte>(slot_bytes);
  w.Put<uint64_t>(meta.parent.value());
  w.Put<int32_t>(meta.num_tokens);
  w.Put<uint64_t>(meta.placement_sequence);
  TOKENLAKE_ASSIGN_OR_RETURN(uint64_t ticket, Send(compute, target, kStoreRequest, w.Take()));
  return AwaitReply(compute, ticket).status();
}

absl::StatusOr<int64_t> InstancePool::CopyForRebalance(InstanceId to, InstanceId from,
                                                       SegmentId segment, uint64_t sequence) {
  StoredMeta meta;
  TOKENLAKE_ASSIGN_OR_RETURN(std::vector<std::byte> slot, PullSegment(to, from, segment, &meta));
  meta.placement_sequence = sequence;
  TOKENLAKE_RETURN_IF_ERROR(StoreSegment(to, to, segment, slot, meta));
  return static_cast<int64_t>(slot.size());
}

absl::Status InstancePool::FreeSegment(InstanceId compute, InstanceId target, SegmentId segment,
                                       uint64_t evicted_at) {
  TOKENLAKE_RETURN_IF_ERROR(CheckDriver(compute, target, "FreeSegment"));
  if (compute == target) return LocalFree(target, segment, evicted_at);
  WireWriter w;
  w.Put<uint64_t>(segment.value());
  w.Put<uint64_t>(evicted_at);
  TOKENLAKE_ASSIGN_OR_RETURN(uint64_t ticket, Send(compute, target, kFreeRequest, w.Take()));
  return AwaitReply(compute, ticket).status();
}

}  // namespace tokenlake::engine
