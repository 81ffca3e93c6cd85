#include "tokenlake/engine/pool_backend.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_format.h"
#include "tokenlake/attention/attention.h"
#include "tokenlake/attention/bf16.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/ops.h"

namespace tokenlake::engine {

PoolBackend::PoolBackend(InstancePool* pool, const LlamaConfig& config, InstanceId compute,
                         std::vector<RemoteHolder> remote, std::vector<SegmentRef> local,
                         std::vector<PulledSegment> pulled, SequenceTail* tail,
                         PoolTraffic* traffic)
    : pool_(pool),
      config_(config),
      compute_(compute),
      remote_(std::move(remote)),
      local_(std::move(local)),
      pulled_(std::move(pulled)),
      tail_(tail),
      traffic_(traffic) {}

absl::Status PoolBackend::Attend(int32_t layer, int32_t num_tokens, absl::Span<const float> q,
                                 absl::Span<const float> k, absl::Span<const float> v,
                                 absl::Span<float> out) {
  PoolBackend* self = this;
  const AttendCall call{.num_tokens = num_tokens, .q = q, .k = k, .v = v, .out = out};
  return AttendBatch(absl::MakeConstSpan(&self, 1), layer, absl::MakeConstSpan(&call, 1));
}

absl::Status PoolBackend::AttendBatch(absl::Span<PoolBackend* const> backends, int32_t layer,
                                      absl::Span<const AttendCall> calls) {
  if (backends.size() != calls.size()) {
    return absl::InvalidArgumentError("PoolBackend: one call per backend");
  }
  if (backends.empty()) return absl::OkStatus();
  const LlamaConfig& config = backends[0]->config_;
  InstancePool* pool = backends[0]->pool_;
  if (layer < 0 || layer >= config.num_layers) {
    return absl::InvalidArgumentError(absl::StrFormat("PoolBackend: layer %d", layer));
  }
  // Per sequence: its partials (slot 0 = the causal tail, then local, pulled, remote ones).
  struct Partials {
    std::vector<std::vector<float>> outs, lses;
  };
  std::vector<Partials> parts(backends.size());
  const int64_t hd = config.head_dim;
  for (size_t b = 0; b < backends.size(); ++b) {
    const PoolBackend& be = *backends[b];
    const size_t n = static_cast<size_t>(calls[b].num_tokens);
    const size_t num_partials =
        1 + (be.local_.empty() ? 0 : 1) + (be.pulled_.empty() ? 0 : 1) + be.remote_.size();
    parts[b].outs.assign(num_partials, std::vector<float>(n * config.num_heads * hd));
    parts[b].lses.assign(num_partials, std::vector<float>(n * config.num_heads));
  }

  // 1. The batch's queries out first, so that holders compute while we do: ONE message per
  // (computing instance, holder) pair carries every sequence's queries for that holder.
  struct Outgoing {
    InstanceId compute, holder;
    std::vector<AttendGroup> groups;
    std::vector<absl::Span<float>> outs, lses;
    uint64_t ticket = 0;
  };
  std::vector<Outgoing> outgoing;
  for (size_t b = 0; b < backends.size(); ++b) {
    PoolBackend& be = *backends[b];
    size_t slot = parts[b].outs.size() - be.remote_.size();
    for (const RemoteHolder& r : be.remote_) {
      auto it = std::find_if(outgoing.begin(), outgoing.end(), [&](const Outgoing& o) {
        return o.compute == be.compute_ && o.holder == r.holder;
      });
      if (it == outgoing.end()) {
        outgoing.push_back({.compute = be.compute_, .holder = r.holder});
        it = outgoing.end() - 1;
      }
      it->groups.push_back({.segments = r.segments, .num_q = calls[b].num_tokens, .q = calls[b].q});
      it->outs.push_back(absl::MakeSpan(parts[b].outs[slot]));
      it->lses.push_back(absl::MakeSpan(parts[b].lses[slot]));
      ++slot;
      ++be.traffic_->remote_attend_calls;
      be.traffic_->query_bytes_out += static_cast<int64_t>(calls[b].q.size() * sizeof(float));
      be.traffic_->partial_bytes_back +=
          static_cast<int64_t>((parts[b].outs[0].size() + parts[b].lses[0].size()) * sizeof(float));
    }
  }
  for (Outgoing& o : outgoing) {
    TOKENLAKE_ASSIGN_OR_RETURN(o.ticket,
                               pool->StartAttendBatch(o.compute, o.holder, layer, o.groups));
  }

  // 2. Each sequence's own partials: causal over its tail plus the new tokens, then over its
  // local and pulled segments.
  const int64_t row = int64_t{config.num_kv_heads} * hd;
  for (size_t b = 0; b < backends.size(); ++b) {
    PoolBackend& be = *backends[b];
    const AttendCall& c = calls[b];
    auto& kl = be.tail_->k[static_cast<size_t>(layer)];
    auto& vl = be.tail_->v[static_cast<size_t>(layer)];
    const int64_t before = static_cast<int64_t>(kl.size()) / row;
    kl.insert(kl.end(), c.k.begin(), c.k.end());
    vl.insert(vl.end(), c.v.begin(), c.v.end());
    const attention::KvBlock tail_block{
        .k = kl.data(), .v = vl.data(), .num_tokens = static_cast<int32_t>(before + c.num_tokens)};
    const attention::AttentionParams causal{.num_heads = config.num_heads,
                                            .num_kv_heads = config.num_kv_heads,
                                            .head_dim = config.head_dim,
                                            .kv_dtype = attention::KvDtype::kFloat32,
                                            .causal = true,
                                            .q_start_pos = before};
    TOKENLAKE_RETURN_IF_ERROR(attention::PartialAttention(causal, c.num_tokens, c.q,
                                                          absl::MakeConstSpan(&tail_block, 1),
                                                          c.out, absl::MakeSpan(parts[b].lses[0])));
    size_t next = 1;
    if (!be.local_.empty()) {
      TOKENLAKE_RETURN_IF_ERROR(pool->LocalAttend(be.compute_, layer, be.local_, c.num_tokens, c.q,
                                                  absl::MakeSpan(parts[b].outs[next]),
                                                  absl::MakeSpan(parts[b].lses[next])));
      ++be.traffic_->local_attend_calls;
      ++next;
    }
    if (!be.pulled_.empty()) {
      std::vector<attention::KvBlock> blocks;
      for (const PulledSegment& p : be.pulled_) {
        TOKENLAKE_ASSIGN_OR_RETURN(
            attention::KvBlock block,
            attention::SlotLayerBlock(pool->layout(), p.slot.data(), layer, p.ref.num_tokens));
        blocks.push_back(block);
      }
      const attention::AttentionParams plain{.num_heads = config.num_heads,
                                             .num_kv_heads = config.num_kv_heads,
                                             .head_dim = config.head_dim,
                                             .kv_dtype = pool->layout().dtype,
                                             .causal = false};
      TOKENLAKE_RETURN_IF_ERROR(attention::PartialAttention(plain, c.num_tokens, c.q, blocks,
                                                            absl::MakeSpan(parts[b].outs[next]),
                                                            absl::MakeSpan(parts[b].lses[next])));
    }
  }

  // 3. The holders' replies, then every sequence's partials merged by log-sum-exp.
  for (Outgoing& o : outgoing) {
    TOKENLAKE_RETURN_IF_ERROR(pool->AwaitAttendBatch(o.compute, o.ticket, o.outs, o.lses));
  }
  for (size_t b = 0; b < backends.size(); ++b) {
    const AttendCall& c = calls[b];
    if (parts[b].outs.size() == 1) continue;
    const attention::PartialShape shape{
        .num_q_tokens = c.num_tokens, .num_heads = config.num_heads, .head_dim = config.head_dim};
    std::vector<attention::PartialView> others;
    for (size_t i = 1; i < parts[b].outs.size(); ++i) {
      others.push_back({parts[b].outs[i], parts[b].lses[i]});
    }
    TOKENLAKE_RETURN_IF_ERROR(
        attention::MergePartialsInPlace(shape, {c.out, absl::MakeSpan(parts[b].lses[0])}, others));
  }
  return absl::OkStatus();
}

absl::StatusOr<PoolExecutor::Sequence*> PoolExecutor::Find(RequestId request) {
  auto it = sequences_.find(request);
  if (it == sequences_.end()) {
    return absl::NotFoundError(
        absl::StrFormat("PoolExecutor: no sequence for request %d", request.value()));
  }
  return it->second.get();
}

absl::Status PoolExecutor::BeginSequence(RequestId request, int64_t /*max_tokens*/) {
  auto seq = std::make_unique<Sequence>();
  const size_t layers = static_cast<size_t>(model_->config().num_layers);
  seq->tail.k.resize(layers);
  seq->tail.v.resize(layers);
  sequences_[request] = std::move(seq);
  return absl::OkStatus();
}

DataPlaneCounters PoolExecutor::EndSequence(RequestId request) {
  DataPlaneCounters c;
  auto it = sequences_.find(request);
  if (it == sequences_.end()) return c;
  const Sequence& s = *it->second;
  c.remote_attend_calls = s.traffic.remote_attend_calls;
  c.local_attend_calls = s.traffic.local_attend_calls;
  c.query_bytes_out = s.traffic.query_bytes_out;
  c.partial_bytes_back = s.traffic.partial_bytes_back;
  c.pulled_segments = s.pulled_segments;
  c.pulled_bytes = s.pulled_bytes;
  sequences_.erase(it);
  return c;
}

absl::Status PoolExecutor::DropTailRows(RequestId request, int64_t rows) {
  TOKENLAKE_ASSIGN_OR_RETURN(Sequence * s, Find(request));
  const LlamaConfig& c = model_->config();
  const int64_t row = int64_t{c.num_kv_heads} * c.head_dim;
  for (size_t l = 0; l < s->tail.k.size(); ++l) {
    if (rows < 0 || rows * row > static_cast<int64_t>(s->tail.k[l].size())) {
      return absl::InternalError(absl::StrFormat(
          "PoolExecutor: dropping %d tail rows of request %d", rows, request.value()));
    }
    s->tail.k[l].erase(s->tail.k[l].begin(), s->tail.k[l].begin() + rows * row);
    s->tail.v[l].erase(s->tail.v[l].begin(), s->tail.v[l].begin() + rows * row);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<WorkOutput>> PoolExecutor::Run(absl::Span<const IterationWork> batch) {
  const LlamaConfig& c = model_->config();
  std::vector<std::unique_ptr<PoolBackend>> backends;
  std::vector<BatchSequence> sequences;
  for (const IterationWork& w : batch) {
    TOKENLAKE_ASSIGN_OR_RETURN(Sequence * s, Find(w.request));
    // Segments by holder: local, pulled (KV copied here now), or queries sent per layer.
    std::vector<RemoteHolder> remote;
    std::vector<SegmentRef> local;
    std::vector<PulledSegment> pulled;
    for (const plan::SegmentAssignment& a : w.plan->segments) {
      const SegmentRef ref{a.segment, a.num_tokens};
      if (a.holder == w.compute) {
        local.push_back(ref);
      } else if (a.action == plan::HolderAction::kPullKv) {
        TOKENLAKE_ASSIGN_OR_RETURN(std::vector<std::byte> slot,
                                   pool_->PullSegment(w.compute, a.holder, a.segment));
        s->pulled_bytes += static_cast<int64_t>(slot.size());
        ++s->pulled_segments;
        pulled.push_back({ref, std::move(slot)});
      } else {
        auto it = std::find_if(remote.begin(), remote.end(),
                               [&](const RemoteHolder& r) { return r.holder == a.holder; });
        if (it == remote.end()) {
          remote.push_back({a.holder, {}});
          it = remote.end() - 1;
        }
        it->segments.push_back(ref);
      }
    }
    backends.push_back(std::make_unique<PoolBackend>(pool_, c, w.compute, std::move(remote),
                                                     std::move(local), std::move(pulled), &s->tail,
                                                     &s->traffic));
    sequences.push_back({.tokens = w.tokens,
                         .start_pos = w.start_pos,
                         .backend = backends.back().get(),
                         .want_logits = w.want_logits});
  }
  // Every layer's attention of the whole batch at once: one message per holder for the batch.
  struct Joint final : BatchAttention {
    std::vector<PoolBackend*> backends;
    absl::Status AttendBatch(int32_t layer, absl::Span<const AttendCall> calls) override {
      return PoolBackend::AttendBatch(backends, layer, calls);
    }
  } joint;
  for (const auto& b : backends) joint.backends.push_back(b.get());
  TOKENLAKE_ASSIGN_OR_RETURN(std::vector<std::vector<float>> logits,
                             model_->ForwardBatch(sequences, &joint));
  std::vector<WorkOutput> out(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    if (!batch[i].want_logits) continue;
    out[i].next_token = Argmax(logits[i]);
    out[i].logits = std::move(logits[i]);
  }
  return out;
}

absl::StatusOr<int64_t> PoolExecutor::StoreSegment(RequestId request, InstanceId compute,
                                                   int64_t first_row, InstanceId target,
                                                   SegmentId segment, const StoredMeta& meta) {
  TOKENLAKE_ASSIGN_OR_RETURN(Sequence * s, Find(request));
  const attention::KvSlotLayout& layout = pool_->layout();
  const int64_t row_elems = int64_t{layout.num_kv_heads} * layout.head_dim;
  const int64_t elems = row_elems * layout.segment_tokens;
  if (first_row < 0 ||
      (first_row + layout.segment_tokens) * row_elems > static_cast<int64_t>(s->tail.k[0].size())) {
    return absl::InternalError(
        absl::StrFormat("PoolExecutor: segment rows [%d, %d) outside the tail of request %d",
                        first_row, first_row + layout.segment_tokens, request.value()));
  }
  // The slot image (layout of attention.h) from the tail rows, in the pool's KV dtype.
  std::vector<std::byte> slot(static_cast<size_t>(layout.SlotBytes()));
  for (int32_t l = 0; l < layout.num_layers; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      const float* src =
          (kv == 0 ? s->tail.k : s->tail.v)[static_cast<size_t>(l)].data() + first_row * row_elems;
      std::byte* dst = slot.data() + layout.BlockOffsetBytes(l, kv);
      if (layout.dtype == attention::KvDtype::kFloat32) {
        std::memcpy(dst, src, static_cast<size_t>(elems) * sizeof(float));
      } else {
        for (int64_t i = 0; i < elems; ++i) {
          const uint16_t bits = attention::FloatToBf16(src[i]);
          std::memcpy(dst + 2 * i, &bits, 2);
        }
      }
    }
  }
  TOKENLAKE_RETURN_IF_ERROR(pool_->StoreSegment(compute, target, segment, slot, meta));
  return static_cast<int64_t>(slot.size());
}

absl::Status PoolExecutor::FreeSegment(InstanceId compute, InstanceId target, SegmentId segment,
                                       uint64_t evicted_at) {
  return pool_->FreeSegment(compute, target, segment, evicted_at);
}

}  // namespace tokenlake::engine
