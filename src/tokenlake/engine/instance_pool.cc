#include "tokenlake/engine/instance_pool.h"

#include <cstring>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"
#include "tokenlake/base/status_macros.h"
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
  kErrorReply = 99,
};

transport::Message ErrorReply(const transport::Message& request, const absl::Status& status) {
  WireWriter w;
  w.Put<int32_t>(static_cast<int32_t>(status.code()));
  const std::string text(status.message());
  w.PutArray<char>(absl::MakeConstSpan(text.data(), text.size()));
  return transport::Message{.from = request.to,
                            .to = request.from,
                            .tag = kErrorReply,
                            .correlation_id = request.correlation_id,
                            .payload = w.Take()};
}

absl::Status DecodeError(const transport::Message& reply) {
  WireReader r(reply.payload);
  int32_t code = 0;
  std::vector<char> text;
  if (!r.Get(&code, "error code").ok() || !r.GetArray(&text, "error message").ok()) {
    return absl::DataLossError("malformed error reply");
  }
  return absl::Status(
      static_cast<absl::StatusCode>(code),
      absl::StrCat("instance ", reply.from.value(), ": ", std::string(text.begin(), text.end())));
}

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
  std::unique_ptr<InstancePool> pool(new InstancePool(options));
  TOKENLAKE_ASSIGN_OR_RETURN(pool->loopback_, transport::LoopbackTransport::Create(
                                                  {.num_endpoints = 2 * options.num_instances}));
  pool->transport_ = pool->loopback_.get();
  if (options.wrap_transport) {
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
    auto inst = std::make_unique<Instance>();
    inst->arena.resize(slot_bytes * static_cast<size_t>(options.slots_per_instance));
    TOKENLAKE_ASSIGN_OR_RETURN(inst->store,
                               store::SegmentStore::Create({.arena = inst->arena.data(),
                                                            .arena_bytes = inst->arena.size(),
                                                            .slot_bytes = slot_bytes,
                                                            .num_slots = options.slots_per_instance,
                                                            .instance = InstanceId(i)}));
    pool->instances_.push_back(std::move(inst));
    pool->drivers_.push_back(std::make_unique<Driver>());
  }
  for (int32_t i = 0; i < options.num_instances; ++i) {
    pool->instances_[static_cast<size_t>(i)]->server =
        std::thread([p = pool.get(), i] { p->ServeLoop(InstanceId(i)); });
  }
  return pool;
}

InstancePool::~InstancePool() {
  if (transport_ != nullptr) transport_->Shutdown();
  if (loopback_ != nullptr) loopback_->Shutdown();
  for (auto& inst : instances_) {
    if (inst->server.joinable()) inst->server.join();
  }
}

store::SegmentStore& InstancePool::store(InstanceId i) const {
  TOKENLAKE_CHECK(InRange(i));
  return *instances_[static_cast<size_t>(i.value())]->store;
}

void InstancePool::ServeLoop(InstanceId self) {
  while (true) {
    absl::StatusOr<transport::Message> m = transport_->Receive(self, absl::InfiniteDuration());
    if (!m.ok()) return;  // Cancelled: shut down.
    transport::Message reply = Handle(*m);
    // A failed reply send means the pool is shutting down; nothing else to do.
    (void)transport_->Send(std::move(reply));
  }
}

transport::Message InstancePool::Handle(const transport::Message& request) {
  const InstanceId self = request.to;
  WireReader r(request.payload);
  WireWriter w;
  auto reply = [&](uint32_t tag) {
    return transport::Message{.from = self,
                              .to = request.from,
                              .tag = tag,
                              .correlation_id = request.correlation_id,
                              .payload = w.Take()};
  };
  switch (request.tag) {
    case kAttendRequest: {
      int32_t layer = 0, num_q = 0;
      std::vector<uint64_t> ids;
      std::vector<int32_t> tokens;
      std::vector<float> q;
      absl::Status s = r.Get(&layer, "layer");
      if (s.ok()) s = r.Get(&num_q, "num_q");
      if (s.ok()) s = r.GetArray(&ids, "segment ids");
      if (s.ok()) s = r.GetArray(&tokens, "segment tokens");
      if (s.ok()) s = r.GetArray(&q, "queries");
      if (s.ok() && ids.size() != tokens.size()) {
        s = absl::DataLossError("attend: segment ids and token counts differ in length");
      }
      if (!s.ok()) return ErrorReply(request, s);
      std::vector<SegmentRef> segs(ids.size());
      for (size_t i = 0; i < ids.size(); ++i) segs[i] = {SegmentId(ids[i]), tokens[i]};
      const size_t rows = static_cast<size_t>(num_q) * options_.num_heads;
      std::vector<float> out(rows * static_cast<size_t>(options_.layout.head_dim)), lse(rows);
      s = LocalAttend(self, layer, segs, num_q, q, absl::MakeSpan(out), absl::MakeSpan(lse));
      if (!s.ok()) return ErrorReply(request, s);
      w.PutArray<float>(out);
      w.PutArray<float>(lse);
      return reply(kAttendReply);
    }
    case kPullRequest: {
      uint64_t id = 0;
      if (absl::Status s = r.Get(&id, "segment id"); !s.ok()) return ErrorReply(request, s);
      absl::StatusOr<store::SlotPin> pin = store(self).Pin(SegmentId(id));
      if (!pin.ok()) return ErrorReply(request, pin.status());
      const absl::Span<std::byte> data = pin->data();
      w.PutArray<std::byte>(data);
      return reply(kPullReply);
    }
    case kStoreRequest: {
      uint64_t id = 0;
      std::vector<std::byte> bytes;
      absl::Status s = r.Get(&id, "segment id");
      if (s.ok()) s = r.GetArray(&bytes, "slot bytes");
      if (s.ok()) s = LocalStore(self, SegmentId(id), bytes);
      if (!s.ok()) return ErrorReply(request, s);
      return reply(kStoreReply);
    }
    case kFreeRequest: {
      uint64_t id = 0;
      absl::Status s = r.Get(&id, "segment id");
      if (s.ok()) s = store(self).Free(SegmentId(id));
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
  if (!InRange(holder)) {
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

absl::Status InstancePool::LocalStore(InstanceId target, SegmentId segment,
                                      absl::Span<const std::byte> slot_bytes) const {
  if (!InRange(target)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("store: instance %d out of range", static_cast<int64_t>(target.value())));
  }
  if (static_cast<int64_t>(slot_bytes.size()) != options_.layout.SlotBytes()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("store: %d bytes for segment %d, a slot holds %d", slot_bytes.size(),
                        segment.value(), options_.layout.SlotBytes()));
  }
  store::SegmentStore& st = store(target);
  std::optional<SlotId> slot = st.Find(segment);
  if (!slot.has_value()) {
    TOKENLAKE_ASSIGN_OR_RETURN(SlotId allocated, st.Allocate(segment));
    slot = allocated;
  }
  const absl::Span<std::byte> data = st.SlotData(*slot);
  TOKENLAKE_CHECK(data.size() == slot_bytes.size());
  std::memcpy(data.data(), slot_bytes.data(), slot_bytes.size());
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> InstancePool::Send(InstanceId compute, InstanceId target, uint32_t tag,
                                            std::vector<std::byte> payload) {
  Driver& d = *drivers_[static_cast<size_t>(compute.value())];
  uint64_t ticket = 0;
  {
    absl::MutexLock lock(&d.mu);
    ticket = d.next_ticket++;
  }
  TOKENLAKE_RETURN_IF_ERROR(transport_->Send(transport::Message{.from = DriverEndpoint(compute),
                                                                .to = target,
                                                                .tag = tag,
                                                                .correlation_id = ticket,
                                                                .payload = std::move(payload)}));
  return ticket;
}

absl::StatusOr<transport::Message> InstancePool::AwaitReply(InstanceId compute, uint64_t ticket) {
  Driver& d = *drivers_[static_cast<size_t>(compute.value())];
  {
    absl::MutexLock lock(&d.mu);
    auto it = d.stash.find(ticket);
    if (it != d.stash.end()) {
      transport::Message m = std::move(it->second);
      d.stash.erase(it);
      if (m.tag == kErrorReply) return DecodeError(m);
      return m;
    }
  }
  const absl::Time deadline = absl::Now() + options_.reply_timeout;
  while (true) {
    TOKENLAKE_ASSIGN_OR_RETURN(
        transport::Message m, transport_->Receive(DriverEndpoint(compute), deadline - absl::Now()));
    if (m.correlation_id == ticket) {
      if (m.tag == kErrorReply) return DecodeError(m);
      return m;
    }
    absl::MutexLock lock(&d.mu);
    d.stash.emplace(m.correlation_id, std::move(m));
  }
}

absl::StatusOr<uint64_t> InstancePool::StartAttend(InstanceId compute, InstanceId holder,
                                                   int32_t layer,
                                                   absl::Span<const SegmentRef> segments,
                                                   int32_t num_q, absl::Span<const float> q) {
  if (!InRange(compute) || !InRange(holder)) {
    return absl::InvalidArgumentError("StartAttend: instance out of range");
  }
  if (segments.empty()) return absl::InvalidArgumentError("StartAttend: no segments");
  if (num_q < 0 || q.size() != static_cast<size_t>(num_q) * options_.num_heads *
                                   static_cast<size_t>(options_.layout.head_dim)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("StartAttend: %d query floats for %d tokens", q.size(), num_q));
  }
  WireWriter w;
  w.Put<int32_t>(layer);
  w.Put<int32_t>(num_q);
  std::vector<uint64_t> ids;
  std::vector<int32_t> tokens;
  for (const SegmentRef& s : segments) {
    ids.push_back(s.id.value());
    tokens.push_back(s.num_tokens);
  }
  w.PutArray<uint64_t>(ids);
  w.PutArray<int32_t>(tokens);
  w.PutArray<float>(q);
  return Send(compute, holder, kAttendRequest, w.Take());
}

absl::Status InstancePool::AwaitAttend(InstanceId compute, uint64_t ticket, absl::Span<float> out,
                                       absl::Span<float> lse) {
  TOKENLAKE_ASSIGN_OR_RETURN(transport::Message m, AwaitReply(compute, ticket));
  WireReader r(m.payload);
  std::vector<float> o, l;
  TOKENLAKE_RETURN_IF_ERROR(r.GetArray(&o, "out"));
  TOKENLAKE_RETURN_IF_ERROR(r.GetArray(&l, "lse"));
  if (o.size() != out.size() || l.size() != lse.size()) {
    return absl::DataLossError(absl::StrFormat(
        "attend reply from instance %d: %d/%d floats, expected %d/%d",
        static_cast<int64_t>(m.from.value()), o.size(), l.size(), out.size(), lse.size()));
  }
  std::copy(o.begin(), o.end(), out.begin());
  std::copy(l.begin(), l.end(), lse.begin());
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::byte>> InstancePool::PullSegment(InstanceId compute,
                                                                 InstanceId holder,
                                                                 SegmentId segment) {
  if (!InRange(compute) || !InRange(holder)) {
    return absl::InvalidArgumentError("PullSegment: instance out of range");
  }
  if (compute == holder) {
    TOKENLAKE_ASSIGN_OR_RETURN(store::SlotPin pin, store(holder).Pin(segment));
    const absl::Span<std::byte> data = pin.data();
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
  return bytes;
}

absl::Status InstancePool::StoreSegment(InstanceId compute, InstanceId target, SegmentId segment,
                                        absl::Span<const std::byte> slot_bytes) {
  if (!InRange(compute) || !InRange(target)) {
    return absl::InvalidArgumentError("StoreSegment: instance out of range");
  }
  if (static_cast<int64_t>(slot_bytes.size()) != options_.layout.SlotBytes()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("StoreSegment: %d bytes for segment %d, a slot holds %d", slot_bytes.size(),
                        segment.value(), options_.layout.SlotBytes()));
  }
  if (compute == target) return LocalStore(target, segment, slot_bytes);
  WireWriter w;
  w.Put<uint64_t>(segment.value());
  w.PutArray<std::byte>(slot_bytes);
  TOKENLAKE_ASSIGN_OR_RETURN(uint64_t ticket, Send(compute, target, kStoreRequest, w.Take()));
  return AwaitReply(compute, ticket).status();
}

absl::Status InstancePool::FreeSegment(InstanceId compute, InstanceId target, SegmentId segment) {
  if (!InRange(compute) || !InRange(target)) {
    return absl::InvalidArgumentError("FreeSegment: instance out of range");
  }
  if (compute == target) return store(target).Free(segment);
  WireWriter w;
  w.Put<uint64_t>(segment.value());
  TOKENLAKE_ASSIGN_OR_RETURN(uint64_t ticket, Send(compute, target, kFreeRequest, w.Take()));
  return AwaitReply(compute, ticket).status();
}

}  // namespace tokenlake::engine
