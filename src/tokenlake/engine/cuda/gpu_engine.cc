#include "tokenlake/engine/cuda/gpu_engine.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_format.h"
#include "tokenlake/attention/cuda/paged_attention.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/cuda/kv_append.h"
#include "tokenlake/engine/ops.h"
#include "tokenlake/engine/pool_shape.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/lake/prompt.h"

namespace tokenlake::engine::cuda {

namespace acuda = ::tokenlake::attention::cuda;

// The attention of one iteration's batch (see the file comment of gpu_engine.h). Rows of the
// forward: the batch's decodes (one new token each) first, then its prefill chunks.
class GpuEngine::Backend final : public GpuAttentionBackend {
 public:
  // A prefill chunk: its rows, its pooled blocks (descriptors [first, first + count) of every
  // layer) and its tail's blocks (descriptors [tail_block, tail_block + tail_count): rows
  // [pooled, computed + n), S per block, in pool slots).
  struct Prefill {
    int32_t row = 0;
    int32_t num_tokens = 0;
    int32_t first = 0;
    int32_t count = 0;
    int32_t tail_block = 0;
    int32_t tail_count = 0;
    int32_t tail_tokens = 0;   // computed + n - pooled
    int32_t causal_start = 0;  // computed - pooled: the first new token's row in the tail
  };

  struct Setup {
    LlamaConfig config;
    attention::KvSlotLayout layout;
    int32_t num_tokens = 0;  // rows of the forward
    // Decodes: rows [0, num_decodes); per decode its blocks (pooled, then its tail cut into
    // blocks of S rows, the new token included) are descriptors [offsets[i], offsets[i + 1]).
    int32_t num_decodes = 0;
    int32_t decode_blocks = 0;                // descriptors of all decodes (offsets[num_decodes])
    const int32_t* decode_offsets = nullptr;  // device [num_decodes + 1]
    std::vector<Prefill> prefills;
    const acuda::DeviceKvBlock* blocks = nullptr;    // device [layer][stride]
    int32_t stride = 0;                              // descriptors per layer
    const KvRowDestination* destinations = nullptr;  // device [num_tokens]
    float* partials = nullptr;  // [rows][head_dim] then [rows] f32 (the pooled partial)
    float* lse = nullptr;       // [rows] f32
    DeviceBuffer* workspace = nullptr;
    // Programmatic dependent launch for the KV append and the decode kernel (the model's
    // GpuLlamaModel::pdl).
    bool pdl = false;
  };

  explicit Backend(Setup setup) : s_(std::move(setup)) {}

  // Plans the batch's attention calls once for every layer (they differ between layers only in
  // their descriptors, queries and outputs) and grows the shared workspace to the largest plan's
  // need, zeroed, before the forward's first kernel. Call once, before the first Attend.
  absl::Status Plan(cudaStream_t stream) {
    size_t ws = 0;
    auto plan = [&](const acuda::PagedAttentionParams& shape) -> absl::Status {
      TOKENLAKE_ASSIGN_OR_RETURN(acuda::PagedAttentionPlan p,
                                 acuda::PagedAttentionPlan::Create(shape));
      ws = std::max(ws, p.workspace_bytes());
      plans_.push_back(p);
      return absl::OkStatus();
    };
    if (s_.num_decodes > 0) TOKENLAKE_RETURN_IF_ERROR(plan(DecodeShape()));
    for (const Prefill& f : s_.prefills) {
      if (f.count > 0) TOKENLAKE_RETURN_IF_ERROR(plan(PooledShape(f)));
      TOKENLAKE_RETURN_IF_ERROR(plan(TailShape(f)));
    }
    if (ws > s_.workspace->size_bytes()) {
      TOKENLAKE_RETURN_IF_ERROR(s_.workspace->Reserve(ws));
      TOKENLAKE_RETURN_IF_ERROR(
          CudaStatus(cudaMemsetAsync(s_.workspace->get(), 0, s_.workspace->size_bytes(), stream),
                     "workspace memset"));
    }
    planned_ = true;
    return absl::OkStatus();
  }

  absl::Status Attend(int32_t layer, int32_t n, const uint16_t* q, const uint16_t* k,
                      const uint16_t* v, float* out, cudaStream_t stream) override {
    const LlamaConfig& c = s_.config;
    if (!planned_ || layer < 0 || layer >= c.num_layers || n != s_.num_tokens) {
      return absl::InternalError(absl::StrFormat(
          "GpuEngine backend: layer %d / %d tokens, planned %d layers / %d tokens%s", layer, n,
          c.num_layers, s_.num_tokens, planned_ ? "" : " (not planned)"));
    }
    const int64_t row_bytes = s_.layout.TokenRowBytes();
    const int64_t qd = int64_t{c.num_heads} * c.head_dim;
    // 1. Every new token's K and V join its sequence's tail: one launch for the batch.
    TOKENLAKE_RETURN_IF_ERROR(
        AppendKvRows(s_.destinations, n, layer, k, v, row_bytes, stream, s_.pdl));
    const acuda::DeviceKvBlock* layer_blocks = s_.blocks + int64_t{layer} * s_.stride;
    // The plans in Plan's order; each run swaps in this layer's descriptors, queries, outputs.
    auto next_plan = plans_.begin();
    auto run = [&](acuda::PagedAttentionParams& p, int32_t row) -> absl::Status {
      p.q = q + row * qd;
      p.workspace = s_.workspace->get();
      p.workspace_bytes = s_.workspace->size_bytes();
      return (next_plan++)->Run(p, stream);
    };
    // 2. All decodes in one launch: each row attends to its own blocks (on one device a
    // holder's partial is a run of the kernel's splits, merged inside the kernel).
    if (s_.num_decodes > 0) {
      acuda::PagedAttentionParams p = DecodeShape();
      p.blocks = layer_blocks;
      p.out = out;
      p.lse = s_.lse;
      TOKENLAKE_RETURN_IF_ERROR(run(p, 0));
    }
    // 3. Each prefill chunk: a partial over its pooled blocks, then the causal partial over its
    // tail and new tokens with the pooled partial as an extra (merged by the kernel).
    for (const Prefill& f : s_.prefills) {
      const int64_t rows = int64_t{f.num_tokens} * c.num_heads;
      float* pooled_out = s_.partials;
      float* pooled_lse = s_.partials + rows * c.head_dim;
      if (f.count > 0) {
        acuda::PagedAttentionParams p = PooledShape(f);
        p.blocks = layer_blocks + f.first;
        p.out = pooled_out;
        p.lse = pooled_lse;
        TOKENLAKE_RETURN_IF_ERROR(run(p, f.row));
      }
      acuda::PagedAttentionParams p = TailShape(f);
      p.blocks = layer_blocks + f.tail_block;
      p.out = out + f.row * qd;
      p.lse = s_.lse;
      p.extra_out = f.count > 0 ? pooled_out : nullptr;
      p.extra_lse = f.count > 0 ? pooled_lse : nullptr;
      TOKENLAKE_RETURN_IF_ERROR(run(p, f.row));
    }
    return absl::OkStatus();
  }

 private:
  // The calls' shapes (PagedAttentionPlan::Create): the same for every layer.
  acuda::PagedAttentionParams Shape(int32_t num_q) const {
    acuda::PagedAttentionParams p;
    p.num_q_tokens = num_q;
    p.num_heads = s_.config.num_heads;
    p.num_kv_heads = s_.config.num_kv_heads;
    p.head_dim = s_.config.head_dim;
    // 1, not 2: the kernel before the decode is the KV append, which writes the tails' blocks.
    p.pdl = s_.pdl ? 1 : 0;
    return p;
  }
  acuda::PagedAttentionParams DecodeShape() const {
    acuda::PagedAttentionParams p = Shape(s_.num_decodes);
    p.num_blocks = s_.decode_blocks;
    p.max_block_tokens = s_.layout.segment_tokens;
    p.q_block_offsets = s_.decode_offsets;
    return p;
  }
  acuda::PagedAttentionParams PooledShape(const Prefill& f) const {
    acuda::PagedAttentionParams p = Shape(f.num_tokens);
    p.num_blocks = f.count;
    p.max_block_tokens = s_.layout.segment_tokens;
    return p;
  }
  acuda::PagedAttentionParams TailShape(const Prefill& f) const {
    acuda::PagedAttentionParams p = Shape(f.num_tokens);
    p.num_blocks = f.tail_count;
    p.max_block_tokens = s_.layout.segment_tokens;
    p.causal = true;
    p.q_start_pos = f.causal_start;
    p.num_extra = f.count > 0 ? 1 : 0;
    return p;
  }

  Setup s_;
  std::vector<acuda::PagedAttentionPlan> plans_;  // Plan's, in the order Attend runs them
  bool planned_ = false;
};

// The engine's IterationExecutor: per request its KV tail (the rows the pool does not serve
// yet, absolute token rows [pooled, computed)) in TAIL SLOTS of the pool (docs/adr/0017): block i
// holds rows [pooled + i S, pooled + (i + 1) S) in a slot of the instance the lake's plan names
// (IterationPlan::tail_slots), laid out as every slot. A completed segment is committed in place
// (its block becomes the segment's slot) or copied to the slot of another instance, the block
// then given back. So the requests' KV needs no device memory beside the pool. The batch runs as
// one forward (GpuLlamaModel::ForwardBatch) over the Backend above.
class GpuEngine::Executor final : public IterationExecutor {
 public:
  explicit Executor(GpuEngine* engine) : e_(engine) {}
  ~Executor() override {
    if (staging_ != nullptr) cudaFreeHost(staging_);
  }

  // The most pool slots the tails held at once (GpuEngine::peak_tail_slots).
  int64_t peak_tail_slots() const { return peak_tail_slots_; }

  absl::Status BeginSequence(RequestId request, int64_t max_tokens) override {
    auto seq = std::make_unique<Sequence>();
    seq->max_tokens = max_tokens;
    sequences_[request] = std::move(seq);
    return absl::OkStatus();
  }

  DataPlaneCounters EndSequence(RequestId request) override {
    auto it = sequences_.find(request);
    if (it == sequences_.end()) return {};
    const DataPlaneCounters c = it->second->counters;
    // Its blocks go back to their stores; work queued on the stream that reads them runs before
    // any later write to those slots (one stream).
    for (TailBlock& b : it->second->blocks) GiveBack(b);
    sequences_.erase(it);
    return c;
  }

  absl::Status DropTailRows(RequestId request, int64_t rows) override {
    TOKENLAKE_ASSIGN_OR_RETURN(Sequence * s, Find(request));
    const int64_t seg = e_->layout_.segment_tokens;
    if (rows < 0 || rows % seg != 0 || s->pooled + rows > s->computed) {
      return absl::InternalError(
          absl::StrFormat("GpuEngine: dropping %d tail rows of request %d (tail [%d, %d))", rows,
                          request.value(), s->pooled, s->computed));
    }
    const size_t n = std::min(s->blocks.size(), static_cast<size_t>(rows / seg));
    for (size_t i = 0; i < n; ++i) GiveBack(s->blocks[i]);
    s->blocks.erase(s->blocks.begin(), s->blocks.begin() + static_cast<std::ptrdiff_t>(n));
    s->pooled += rows;
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<WorkOutput>> Run(absl::Span<const IterationWork> batch) override;

  absl::StatusOr<int64_t> StoreSegment(RequestId request, InstanceId /*compute*/, int64_t first_row,
                                       InstanceId target, SegmentId segment,
                                       const StoredMeta& meta) override {
    TOKENLAKE_ASSIGN_OR_RETURN(Sequence * s, Find(request));
    const attention::KvSlotLayout& layout = e_->layout_;
    const int64_t seg = layout.segment_tokens;
    const int64_t row = s->pooled + first_row;  // absolute row
    const size_t index = static_cast<size_t>(first_row / seg);
    if (first_row < 0 || first_row % seg != 0 || row + seg > s->computed ||
        index >= s->blocks.size() || !s->blocks[index].live) {
      return absl::InternalError(
          absl::StrFormat("GpuEngine: segment rows [%d, %d) outside the tail of request %d", row,
                          row + seg, request.value()));
    }
    TailBlock& block = s->blocks[index];
    if (target == block.instance) {
      // Committed in place (lake::CommitResult::in_place): the block is the segment's slot.
      TOKENLAKE_RETURN_IF_ERROR(e_->pool_->CommitTail(block.instance, block.slot, segment, meta));
      block.live = false;
      AddTailSlots(-1);
      return layout.SlotBytes();
    }
    TOKENLAKE_RETURN_IF_ERROR(
        e_->pool_->Store(target, segment, block.data, meta, e_->model_->stream()));
    GiveBack(block);
    return layout.SlotBytes();
  }

  absl::Status FreeSegment(InstanceId /*compute*/, InstanceId target, SegmentId segment,
                           uint64_t evicted_at) override {
    return e_->pool_->Free(target, segment, evicted_at, e_->model_->stream());
  }

 private:
  // One block of a tail: a tail slot of `instance`'s store.
  struct TailBlock {
    InstanceId instance;
    SlotId slot;
    std::byte* data = nullptr;  // the slot's bytes
    bool live = true;           // still the tail's (not committed in place, not given back)
  };
  struct Sequence {
    std::vector<TailBlock> blocks;  // blocks[i]: rows [pooled + i S, pooled + (i + 1) S)
    int64_t max_tokens = 0;
    int64_t pooled = 0;    // absolute rows before this are served by the pool
    int64_t computed = 0;  // rows written
    DataPlaneCounters counters;
  };

  // Makes the request's tail the blocks `want` names (the plan's tail_slots) for `rows` rows:
  // the blocks it has must be the first ones; the others are taken from their instances' free
  // slots, which the lake's accounting guarantees (else the data plane is out of step with it:
  // Internal).
  absl::Status TakeTailBlocks(RequestId request, Sequence* s, absl::Span<const InstanceId> want,
                              int64_t rows);

  // Gives a live block's slot back to its store. Queued work that reads it runs before any
  // later write to the slot (one stream).
  void GiveBack(TailBlock& b) {
    if (!b.live) return;
    TOKENLAKE_CHECK_OK(e_->pool_->FreeTail(b.instance, b.slot));
    b.live = false;
    AddTailSlots(-1);
  }

  absl::StatusOr<Sequence*> Find(RequestId request) {
    auto it = sequences_.find(request);
    if (it == sequences_.end()) {
      return absl::InternalError(
          absl::StrFormat("GpuEngine: no sequence for request %d", request.value()));
    }
    return it->second.get();
  }

  void AddTailSlots(int64_t delta) {
    tail_slots_ += delta;
    peak_tail_slots_ = std::max(peak_tail_slots_, tail_slots_);
  }

  GpuEngine* e_;
  absl::flat_hash_map<RequestId, std::unique_ptr<Sequence>> sequences_;
  int64_t tail_slots_ = 0;
  int64_t peak_tail_slots_ = 0;
  // Pinned host staging of an iteration's descriptors, decode offsets and row destinations (one
  // upload; the previous iteration's forward synchronised the stream, so it is free).
  void* staging_ = nullptr;
  size_t staging_bytes_ = 0;
};

absl::Status GpuEngine::Executor::TakeTailBlocks(RequestId request, Sequence* s,
                                                 absl::Span<const InstanceId> want, int64_t rows) {
  const int64_t seg = e_->layout_.segment_tokens;
  if (static_cast<int64_t>(want.size()) != (rows + seg - 1) / seg ||
      s->blocks.size() > want.size()) {
    return absl::InternalError(absl::StrFormat(
        "GpuEngine: request %d: the plan names %d tail slots for %d rows, the tail holds %d",
        request.value(), want.size(), rows, s->blocks.size()));
  }
  for (size_t i = 0; i < want.size(); ++i) {
    const InstanceId x = want[i];
    if (i < s->blocks.size()) {
      if (s->blocks[i].instance != x || !s->blocks[i].live) {
        return absl::InternalError(absl::StrFormat(
            "GpuEngine: request %d: tail block %d is on instance %d, the plan says %d",
            request.value(), i, s->blocks[i].instance.value(), x.valid() ? x.value() : -1));
      }
      continue;
    }
    absl::StatusOr<DeviceSlot> slot = e_->pool_->AllocateTail(x);
    if (!slot.ok()) {
      return StatusWithPrefix(slot.status(),
                              absl::StrFormat("GpuEngine: request %d: ", request.value()));
    }
    s->blocks.push_back({x, slot->slot, slot->data, true});
    AddTailSlots(1);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<WorkOutput>> GpuEngine::Executor::Run(
    absl::Span<const IterationWork> batch) {
  const auto started = std::chrono::steady_clock::now();
  const LlamaConfig& c = e_->model_->config();
  const cudaStream_t stream = e_->model_->stream();
  const attention::KvSlotLayout& layout = e_->layout_;
  const int32_t seg = layout.segment_tokens;
  const int64_t row_bytes = layout.TokenRowBytes();
  const int64_t slot_bytes = layout.SlotBytes();

  // Forward order: decodes (one new token) first, so that their rows are one batched launch.
  std::vector<size_t> order;
  for (size_t i = 0; i < batch.size(); ++i) {
    if (batch[i].tokens.size() == 1) order.push_back(i);
  }
  const int32_t num_decodes = static_cast<int32_t>(order.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    if (batch[i].tokens.size() != 1) order.push_back(i);
  }

  // Check every request's rows against its tail, and count the pulls.
  std::vector<Sequence*> seqs(batch.size());
  size_t to_pull = 0;
  int64_t num_tokens = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const IterationWork& w = batch[i];
    TOKENLAKE_ASSIGN_OR_RETURN(Sequence * sq, Find(w.request));
    const int64_t n = static_cast<int64_t>(w.tokens.size());
    if (sq->computed == 0 && sq->pooled == 0) {
      // A (re)started sequence: the pool serves the plan's cached prefix, the tail starts after.
      sq->pooled = sq->computed = w.plan->cached_tokens;
    }
    if (w.plan->cached_tokens != sq->pooled || w.start_pos != sq->computed ||
        w.start_pos + n > sq->max_tokens) {
      return absl::InternalError(absl::StrFormat(
          "GpuEngine: request %d computes rows [%d, %d) over a cached prefix of %d; its tail "
          "holds [%d, %d) of %d rows",
          w.request.value(), w.start_pos, w.start_pos + n, w.plan->cached_tokens, sq->pooled,
          sq->computed, sq->max_tokens));
    }
    TOKENLAKE_RETURN_IF_ERROR(
        TakeTailBlocks(w.request, sq, w.plan->tail_slots, sq->computed + n - sq->pooled));
    for (const plan::SegmentAssignment& a : w.plan->segments) {
      if (a.holder != w.compute && a.action == plan::HolderAction::kPullKv) ++to_pull;
    }
    seqs[i] = sq;
    num_tokens += n;
  }
  if (to_pull > 0) {
    TOKENLAKE_RETURN_IF_ERROR(e_->pulled_.Reserve(static_cast<size_t>(slot_bytes) * to_pull));
  }
  // Where every cached segment of the batch is (in forward order), asked of the pool at once.
  std::vector<SlotRef> refs;
  for (size_t i : order) {
    for (const plan::SegmentAssignment& a : batch[i].plan->segments) {
      refs.push_back({a.holder, a.segment});
    }
  }
  std::vector<const std::byte*> slots(refs.size());
  TOKENLAKE_RETURN_IF_ERROR(e_->pool_->Resolve(refs, absl::MakeSpan(slots)));
  size_t next_slot = 0;

  // Per request (in forward order): its pooled segments (own and pulled first, then each
  // moved-queries holder's: on one device the holder's slots are read where they are) and its
  // tail; the descriptors of layer 0 are built, the other layers differ by the layer offset.
  struct Block {
    const std::byte* base;  // the slot (layer offsets added per layer)
    int32_t num_tokens;
  };
  std::vector<Block> blocks;
  std::vector<int32_t> decode_offsets{0};
  std::vector<Backend::Prefill> prefills;
  std::vector<KvRowDestination> destinations;
  destinations.reserve(static_cast<size_t>(num_tokens));
  size_t pulled_index = 0;
  int32_t row = 0;
  for (size_t pos = 0; pos < order.size(); ++pos) {
    const IterationWork& w = batch[order[pos]];
    Sequence* sq = seqs[order[pos]];
    const int32_t n = static_cast<int32_t>(w.tokens.size());
    const int32_t first = static_cast<int32_t>(blocks.size());
    std::vector<std::pair<InstanceId, std::vector<Block>>> remote;
    bool any_local = false;
    for (const plan::SegmentAssignment& a : w.plan->segments) {
      const std::byte* slot = slots[next_slot++];
      if (a.holder == w.compute) {
        blocks.push_back({slot, a.num_tokens});
        any_local = true;
      } else if (a.action == plan::HolderAction::kPullKv) {
        // Pull: a device-to-device copy of the whole slot into the computing instance's scratch
        // (the same GPU holds both).
        std::byte* dst = e_->pulled_.as<std::byte>() + pulled_index++ * slot_bytes;
        TOKENLAKE_RETURN_IF_ERROR(
            CudaStatus(cudaMemcpyAsync(dst, slot, static_cast<size_t>(slot_bytes),
                                       cudaMemcpyDeviceToDevice, stream),
                       "pull copy"));
        blocks.push_back({dst, a.num_tokens});
        any_local = true;
        ++sq->counters.pulled_segments;
        sq->counters.pulled_bytes += slot_bytes;
      } else {
        auto it = std::find_if(remote.begin(), remote.end(),
                               [&](const auto& r) { return r.first == a.holder; });
        if (it == remote.end()) {
          remote.push_back({a.holder, {}});
          it = remote.end() - 1;
        }
        it->second.push_back({slot, a.num_tokens});
      }
    }
    for (const auto& r : remote) blocks.insert(blocks.end(), r.second.begin(), r.second.end());
    // The partials this request's attention stands for, per layer: one over the computing
    // instance's own and pulled segments, one per moved-queries holder.
    sq->counters.local_attend_calls += any_local ? c.num_layers : 0;
    sq->counters.remote_attend_calls += static_cast<int64_t>(remote.size()) * c.num_layers;
    const int32_t count = static_cast<int32_t>(blocks.size()) - first;
    // The tail (the new tokens included): its blocks of S rows, the last one partly filled.
    const int64_t tail_tokens = sq->computed + n - sq->pooled;
    const int32_t tail_block = static_cast<int32_t>(blocks.size());
    for (size_t b = 0; b < sq->blocks.size(); ++b) {
      const int64_t r = static_cast<int64_t>(b) * seg;
      blocks.push_back(
          {sq->blocks[b].data, static_cast<int32_t>(std::min<int64_t>(seg, tail_tokens - r))});
    }
    if (n == 1) {
      decode_offsets.push_back(static_cast<int32_t>(blocks.size()));
    } else {
      prefills.push_back({.row = row,
                          .num_tokens = n,
                          .first = first,
                          .count = count,
                          .tail_block = tail_block,
                          .tail_count = static_cast<int32_t>(sq->blocks.size()),
                          .tail_tokens = static_cast<int32_t>(tail_tokens),
                          .causal_start = static_cast<int32_t>(sq->computed - sq->pooled)});
    }
    // Each new row's K and V go to its block's row (the slot layout: [layer][kv][S][row]).
    for (int32_t t = 0; t < n; ++t) {
      const int64_t at = sq->computed + t - sq->pooled;
      const TailBlock& b = sq->blocks[static_cast<size_t>(at / seg)];
      destinations.push_back(
          {.k0 = reinterpret_cast<uint64_t>(b.data + layout.BlockOffsetBytes(0, 0) +
                                            (at % seg) * row_bytes),
           .layer_stride = 2 * layout.BlockBytes(),  // [layer][kv]: a layer is K and V blocks
           .v_offset = layout.BlockOffsetBytes(0, 1) - layout.BlockOffsetBytes(0, 0)});
    }
    row += n;
  }

  // One upload: descriptors [layer][stride], decode offsets, row destinations.
  const int32_t stride = static_cast<int32_t>(blocks.size());
  const size_t desc_bytes =
      static_cast<size_t>(stride) * c.num_layers * sizeof(acuda::DeviceKvBlock);
  const size_t offsets_at = (desc_bytes + 15) / 16 * 16;
  const size_t dest_at = (offsets_at + decode_offsets.size() * 4 + 15) / 16 * 16;
  const size_t total_bytes = dest_at + destinations.size() * sizeof(KvRowDestination);
  if (total_bytes > staging_bytes_) {
    TOKENLAKE_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "synchronize"));
    if (staging_ != nullptr) cudaFreeHost(staging_);
    staging_ = nullptr;
    staging_bytes_ = 0;
    TOKENLAKE_RETURN_IF_ERROR(
        CudaStatus(cudaHostAlloc(&staging_, total_bytes * 2, 0), "cudaHostAlloc(descriptors)"));
    staging_bytes_ = total_bytes * 2;
  }
  auto* host = static_cast<std::byte*>(staging_);
  auto* desc = reinterpret_cast<acuda::DeviceKvBlock*>(host);
  for (int32_t l = 0; l < c.num_layers; ++l) {
    for (int32_t i = 0; i < stride; ++i) {
      const Block& b = blocks[static_cast<size_t>(i)];
      acuda::DeviceKvBlock& d = desc[static_cast<size_t>(l) * stride + i];
      d.k = b.base + layout.BlockOffsetBytes(l, 0);
      d.v = b.base + layout.BlockOffsetBytes(l, 1);
      d.num_tokens = b.num_tokens;
      d.reserved = 0;
    }
  }
  std::memcpy(host + offsets_at, decode_offsets.data(), decode_offsets.size() * 4);
  std::memcpy(host + dest_at, destinations.data(), destinations.size() * sizeof(KvRowDestination));
  TOKENLAKE_RETURN_IF_ERROR(e_->blocks_.Reserve(total_bytes));
  TOKENLAKE_RETURN_IF_ERROR(CudaStatus(
      cudaMemcpyAsync(e_->blocks_.get(), host, total_bytes, cudaMemcpyHostToDevice, stream),
      "descriptor upload"));
  int64_t max_prefill = 0;
  for (const Backend::Prefill& f : prefills)
    max_prefill = std::max<int64_t>(max_prefill, f.num_tokens);
  TOKENLAKE_RETURN_IF_ERROR(
      e_->partials_.Reserve(static_cast<size_t>(max_prefill * c.num_heads) * (c.head_dim + 1) * 4));
  TOKENLAKE_RETURN_IF_ERROR(
      e_->merged_lse_.Reserve(static_cast<size_t>(num_tokens * c.num_heads) * 4));
  std::byte* dev = e_->blocks_.as<std::byte>();
  Backend backend(
      Backend::Setup{.config = c,
                     .layout = layout,
                     .num_tokens = static_cast<int32_t>(num_tokens),
                     .num_decodes = num_decodes,
                     .decode_blocks = decode_offsets.back(),
                     .decode_offsets = reinterpret_cast<const int32_t*>(dev + offsets_at),
                     .prefills = std::move(prefills),
                     .blocks = reinterpret_cast<const acuda::DeviceKvBlock*>(dev),
                     .stride = stride,
                     .destinations = reinterpret_cast<const KvRowDestination*>(dev + dest_at),
                     .partials = e_->partials_.as<float>(),
                     .lse = e_->merged_lse_.as<float>(),
                     .workspace = &e_->workspace_,
                     .pdl = e_->model_->pdl()});
  TOKENLAKE_RETURN_IF_ERROR(backend.Plan(stream));

  std::vector<GpuSequenceInput> inputs;
  inputs.reserve(order.size());
  for (size_t i : order) {
    const IterationWork& w = batch[i];
    inputs.push_back({.tokens = w.tokens,
                      .start_pos = w.start_pos,
                      .logits = !w.want_logits       ? GpuSequenceInput::Logits::kNone
                                : w.want_full_logits ? GpuSequenceInput::Logits::kFull
                                                     : GpuSequenceInput::Logits::kArgmax});
  }
  const std::array<double, GpuLlamaModel::kNumPhases> phases_before = e_->model_->phase_ms();
  absl::StatusOr<GpuBatchOutput> fwd = e_->model_->ForwardBatch(inputs, backend);
  if (!fwd.ok()) {
    cudaStreamSynchronize(stream);
    return fwd.status();
  }
  if (e_->forward_timings_.size() < 1'000'000) {
    std::array<double, GpuLlamaModel::kNumPhases> phase_us{};
    for (int p = 0; p < GpuLlamaModel::kNumPhases; ++p) {
      phase_us[p] = (e_->model_->phase_ms()[p] - phases_before[p]) * 1e3;
    }
    e_->forward_timings_.push_back({.rows = static_cast<int32_t>(num_tokens),
                                    .requests = static_cast<int32_t>(batch.size()),
                                    .decodes = num_decodes,
                                    .run_us = std::chrono::duration<double, std::micro>(
                                                  std::chrono::steady_clock::now() - started)
                                                  .count(),
                                    .gpu_us = e_->model_->last_forward_gpu_ms() * 1e3,
                                    .phase_us = phase_us});
  }
  std::vector<WorkOutput> out(batch.size());
  for (size_t pos = 0; pos < order.size(); ++pos) {
    const size_t i = order[pos];
    out[i].next_token = fwd->next_tokens[pos];
    out[i].logits = std::move(fwd->logits[pos]);
    seqs[i]->computed += static_cast<int64_t>(batch[i].tokens.size());
  }
  return out;
}

GpuEngine::GpuEngine(GpuLlamaModel* model, const GpuEngineOptions& options)
    : model_(model), options_(options) {}

GpuEngine::~GpuEngine() {
  loop_.reset();  // releases what its requests still pin, ends their sequences
  if (model_ != nullptr) cudaStreamSynchronize(model_->stream());
}

absl::Status GpuEngine::CheckOptions(const GpuLlamaModel* model, const GpuEngineOptions& options) {
  if (model == nullptr) return absl::InvalidArgumentError("GpuEngine: model is null");
  if (options.num_instances < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("GpuEngine: num_instances must be >= 1, got %d", options.num_instances));
  }
  if (options.segment_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("GpuEngine: segment_tokens must be >= 1, got %d", options.segment_tokens));
  }
  if (options.slots_per_instance < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "GpuEngine: slots_per_instance must be >= 1, got %d", options.slots_per_instance));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<GpuEngine>> GpuEngine::Create(GpuLlamaModel* model,
                                                             const GpuEngineOptions& options) {
  TOKENLAKE_RETURN_IF_ERROR(CheckOptions(model, options));
  std::unique_ptr<GpuEngine> e(new GpuEngine(model, options));
  const LlamaConfig& c = model->config();
  e->layout_ = PoolSlotLayout(c, options.segment_tokens, attention::KvDtype::kBFloat16);
  TOKENLAKE_RETURN_IF_ERROR(e->layout_.Validate());
  TOKENLAKE_ASSIGN_OR_RETURN(
      e->own_pool_, SharedDevicePool::Create({.num_instances = options.num_instances,
                                              .slots_per_instance = options.slots_per_instance,
                                              .layout = e->layout_,
                                              .device = model->device()}));
  const lake::LakeOptions lo = PoolLakeOptions(c,
                                               {.num_instances = options.num_instances,
                                                .segment_tokens = options.segment_tokens,
                                                .slots_per_instance = options.slots_per_instance},
                                               attention::KvDtype::kBFloat16);
  TOKENLAKE_ASSIGN_OR_RETURN(e->lake_, lake::Lake::Create(lo, &e->clock_));
  e->own_control_ = std::make_unique<lake::LocalControlPlane>(e->lake_.get(), &e->clock_);
  e->pool_ = e->own_pool_.get();
  e->control_ = e->own_control_.get();
  TOKENLAKE_RETURN_IF_ERROR(e->Start(InstanceId()));
  return e;
}

absl::StatusOr<std::unique_ptr<GpuEngine>> GpuEngine::CreateOver(GpuLlamaModel* model,
                                                                 const GpuEngineOptions& options,
                                                                 lake::ControlPlane* control,
                                                                 DevicePool* pool,
                                                                 InstanceId compute_instance) {
  TOKENLAKE_RETURN_IF_ERROR(CheckOptions(model, options));
  if (control == nullptr || pool == nullptr) {
    return absl::InvalidArgumentError("GpuEngine::CreateOver: control plane or pool is null");
  }
  std::unique_ptr<GpuEngine> e(new GpuEngine(model, options));
  e->layout_ =
      PoolSlotLayout(model->config(), options.segment_tokens, attention::KvDtype::kBFloat16);
  TOKENLAKE_RETURN_IF_ERROR(e->layout_.Validate());
  if (pool->layout() != e->layout_ || pool->num_instances() != options.num_instances) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "GpuEngine::CreateOver: the pool has %d instances of %d-byte slots; the model and "
        "options need %d instances of %d-byte slots (%d-token segments, bf16)",
        pool->num_instances(), pool->layout().SlotBytes(), options.num_instances,
        e->layout_.SlotBytes(), options.segment_tokens));
  }
  if (compute_instance.valid() && compute_instance.value() >= options.num_instances) {
    return absl::InvalidArgumentError(
        absl::StrFormat("GpuEngine::CreateOver: compute_instance %d of a pool of %d",
                        compute_instance.value(), options.num_instances));
  }
  e->pool_ = pool;
  e->control_ = control;
  TOKENLAKE_RETURN_IF_ERROR(e->Start(compute_instance));
  return e;
}

absl::Status GpuEngine::Start(InstanceId compute_instance) {
  const LlamaConfig& c = model_->config();
  salt_ = index::NamespaceSalt(options_.namespace_name);
  executor_ = std::make_unique<Executor>(this);
  TOKENLAKE_ASSIGN_OR_RETURN(
      loop_,
      IterationLoop::Create(
          control_, executor_.get(),
          {.segment_tokens = options_.segment_tokens,
           .salt = salt_,
           .max_batch_tokens = options_.max_batch_tokens,
           .max_batch_requests = options_.max_batch_requests,
           .memory_admission = options_.memory_admission,
           .vocab_size = c.vocab_size,
           .max_request_tokens = c.max_position_embeddings,
           .pool_tokens = int64_t{options_.num_instances} * options_.slots_per_instance *
                          options_.segment_tokens,
           .fixed_compute = compute_instance,
           .rotate_over_instances = options_.rotate_compute_instance ? options_.num_instances : 0,
           .tails_in_pool = true}));
  return absl::OkStatus();
}

const store::SegmentStore& GpuEngine::store(InstanceId instance) const {
  TOKENLAKE_CHECK(own_pool_ != nullptr);
  return own_pool_->store(instance);
}

absl::Status GpuEngine::CheckInput(absl::Span<const int32_t> prompt, int32_t max_new_tokens,
                                   absl::Span<const int32_t> force_tokens) const {
  const LlamaConfig& c = model_->config();
  return StatusWithPrefix(lake::ValidatePrompt(prompt, max_new_tokens, force_tokens,
                                               {.vocab_size = c.vocab_size,
                                                .context_tokens = c.max_position_embeddings}),
                          "GpuEngine::Generate: ");
}

namespace {

GpuGenerateResult ToGpuResult(LoopResult r, int64_t slot_bytes) {
  GpuGenerateResult out;
  out.tokens = std::move(r.tokens);
  out.finish_reason = std::move(r.finish_reason);
  out.cached_tokens = r.cached_tokens;
  out.last_logits = std::move(r.last_logits);
  out.decode_logits = std::move(r.decode_logits);
  out.remote_attend_calls = r.data_plane.remote_attend_calls;
  out.local_attend_calls = r.data_plane.local_attend_calls;
  out.pulled_segments = r.data_plane.pulled_segments;
  out.pulled_bytes = r.data_plane.pulled_bytes;
  out.stored_segments = r.stored_segments;
  out.remote_stored_segments = r.remote_stored_segments;
  out.stored_bytes = r.stored_segments * slot_bytes;
  out.iteration_us = std::move(r.iteration_us);
  return out;
}

}  // namespace

absl::StatusOr<GpuGenerateResult> GpuEngine::Generate(absl::Span<const int32_t> prompt,
                                                      int32_t max_new_tokens,
                                                      absl::Span<const int32_t> force_tokens) {
  TOKENLAKE_RETURN_IF_ERROR(CheckInput(prompt, max_new_tokens, force_tokens));
  const RequestId id(next_request_++);
  TOKENLAKE_RETURN_IF_ERROR(loop_->Submit(
      {.id = id,
       .prompt = std::vector<int32_t>(prompt.begin(), prompt.end()),
       .max_new_tokens = max_new_tokens,
       .force_tokens = std::vector<int32_t>(force_tokens.begin(), force_tokens.end())}));
  while (!loop_->idle()) {
    for (LoopResult& r : loop_->Step()) {
      if (r.id != id) continue;
      if (!r.status.ok()) return r.status;
      return ToGpuResult(std::move(r), layout_.SlotBytes());
    }
  }
  return absl::InternalError("GpuEngine::Generate: the request left the loop without a result");
}

std::vector<absl::StatusOr<GpuGenerateResult>> GpuEngine::GenerateBatch(
    absl::Span<const GenerateRequest> requests) {
  std::vector<absl::StatusOr<LoopResult>> served = ServeInArrivalOrder(
      *loop_, requests,
      [this](const GenerateRequest& r) {
        return CheckInput(r.prompt, r.max_new_tokens, r.force_tokens);
      },
      [this] { return RequestId(next_request_++); });
  std::vector<absl::StatusOr<GpuGenerateResult>> out;
  out.reserve(served.size());
  for (absl::StatusOr<LoopResult>& r : served) {
    if (r.ok()) {
      out.push_back(ToGpuResult(*std::move(r), layout_.SlotBytes()));
    } else {
      out.push_back(r.status());
    }
  }
  return out;
}

absl::Status GpuEngine::Submit(const GenerateRequest& request) {
  if (!request.id.valid()) {
    return absl::InvalidArgumentError("GpuEngine::Submit: the request needs a valid id");
  }
  TOKENLAKE_RETURN_IF_ERROR(
      CheckInput(request.prompt, request.max_new_tokens, request.force_tokens));
  return loop_->Submit(ToLoopRequest(request, request.id));
}

std::vector<std::pair<RequestId, absl::StatusOr<GenerateResult>>> GpuEngine::Step() {
  std::vector<std::pair<RequestId, absl::StatusOr<GenerateResult>>> out;
  for (LoopResult& r : loop_->Step()) {
    const RequestId id = r.id;
    if (r.status.ok()) {
      out.emplace_back(id, ToGenerateResult(std::move(r)));
    } else {
      out.emplace_back(id, std::move(r.status));
    }
  }
  return out;
}

absl::Status GpuEngine::Cancel(RequestId request) { return loop_->Cancel(request); }

std::optional<Engine::Progress> GpuEngine::ProgressOf(RequestId request) const {
  const LoopResult* r = loop_->Progress(request);
  if (r == nullptr) return std::nullopt;
  return Engine::Progress{.tokens = r->tokens, .cached_tokens = r->cached_tokens};
}

bool GpuEngine::idle() const { return loop_->idle(); }

LoopLoad GpuEngine::Load() const { return loop_->Load(); }

int32_t GpuEngine::max_batch_requests_seen() const { return loop_->max_batch_requests_seen(); }

std::vector<GpuEngine::ForwardTiming> GpuEngine::TakeForwardTimings() {
  std::vector<ForwardTiming> out;
  out.swap(forward_timings_);
  return out;
}

std::vector<IterationTiming> GpuEngine::TakeIterationTimings() { return loop_->TakeTimings(); }

int64_t GpuEngine::peak_tail_slots() const { return executor_->peak_tail_slots(); }

}  // namespace tokenlake::engine::cuda
