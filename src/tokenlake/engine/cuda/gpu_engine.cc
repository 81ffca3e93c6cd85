#include "tokenlake/engine/cuda/gpu_engine.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_format.h"
#include "tokenlake/attention/cuda/paged_attention.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/ops.h"
#include "tokenlake/index/segment_id.h"

namespace tokenlake::engine::cuda {

namespace acuda = ::tokenlake::attention::cuda;

// The attention of one iteration (see the file comment of gpu_engine.h).
class GpuEngine::Backend final : public GpuAttentionBackend {
 public:
  // One partial over a run of segment slots: descriptors [first, first + count) of each layer.
  struct Group {
    InstanceId holder;
    bool remote = false;
    int32_t first = 0;
    int32_t count = 0;
  };

  struct Setup {
    LlamaConfig config;
    attention::KvSlotLayout layout;
    int32_t num_tokens = 0;     // new tokens of the iteration
    int64_t computed = 0;       // tokens whose KV existed before (absolute tail rows)
    int64_t pooled = 0;         // pooled prefix (tail = rows [pooled, computed + num_tokens))
    std::byte* tail = nullptr;  // [layer][kv][capacity][row]
    int64_t tail_capacity = 0;
    const acuda::DeviceKvBlock* blocks = nullptr;  // [layer][stride]
    int32_t stride = 0;                            // descriptors per layer (groups..., tail)
    std::vector<Group> groups;
    float* partials = nullptr;    // [groups + 1][rows][head_dim], then [groups + 1][rows]
    float* merged_lse = nullptr;  // [rows]
    DeviceBuffer* workspace = nullptr;
    DataPlaneCounters* counters = nullptr;
  };

  explicit Backend(Setup setup) : s_(std::move(setup)) {}

  absl::Status Attend(int32_t layer, int32_t n, const uint16_t* q, const uint16_t* k,
                      const uint16_t* v, float* out, cudaStream_t stream) override {
    const LlamaConfig& c = s_.config;
    if (layer < 0 || layer >= c.num_layers || n != s_.num_tokens) {
      return absl::InternalError(
          absl::StrFormat("GpuEngine backend: layer %d / %d tokens, planned %d layers / %d tokens",
                          layer, n, c.num_layers, s_.num_tokens));
    }
    const int64_t row_bytes = s_.layout.TokenRowBytes();
    // 1. The new tokens' KV joins the tail (absolute rows computed .. computed + n - 1).
    std::byte* tk =
        s_.tail + ((int64_t{layer} * 2 + 0) * s_.tail_capacity + s_.computed) * row_bytes;
    std::byte* tv =
        s_.tail + ((int64_t{layer} * 2 + 1) * s_.tail_capacity + s_.computed) * row_bytes;
    TOKENLAKE_RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(tk, k, n * row_bytes, cudaMemcpyDeviceToDevice, stream), "tail K copy"));
    TOKENLAKE_RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(tv, v, n * row_bytes, cudaMemcpyDeviceToDevice, stream), "tail V copy"));

    const int32_t num_partials = static_cast<int32_t>(s_.groups.size()) + 1;
    const int64_t rows = int64_t{n} * c.num_heads;
    float* outs = s_.partials;
    float* lses = s_.partials + num_partials * rows * c.head_dim;
    const acuda::DeviceKvBlock* layer_blocks = s_.blocks + int64_t{layer} * s_.stride;
    auto run = [&](const acuda::DeviceKvBlock* blocks, int32_t num_blocks, int32_t max_tokens,
                   bool causal, int32_t q_start, float* o, float* l,
                   int32_t num_extra = 0) -> absl::Status {
      acuda::PagedAttentionParams p;
      p.q = q;
      p.num_q_tokens = n;
      p.blocks = blocks;
      p.num_blocks = num_blocks;
      p.max_block_tokens = max_tokens;
      p.num_heads = c.num_heads;
      p.num_kv_heads = c.num_kv_heads;
      p.head_dim = c.head_dim;
      p.causal = causal;
      p.q_start_pos = q_start;
      p.out = o;
      p.lse = l;
      // The group partials ([num_extra][rows][head_dim] and [num_extra][rows] at the start of
      // outs / lses) merged into this call's result by the attention kernel itself.
      p.num_extra = num_extra;
      p.extra_out = num_extra > 0 ? outs : nullptr;
      p.extra_lse = num_extra > 0 ? lses : nullptr;
      TOKENLAKE_ASSIGN_OR_RETURN(size_t ws, acuda::PagedAttentionWorkspaceBytes(p));
      if (ws > s_.workspace->size_bytes()) {
        TOKENLAKE_RETURN_IF_ERROR(s_.workspace->Reserve(ws));
        TOKENLAKE_RETURN_IF_ERROR(
            CudaStatus(cudaMemsetAsync(s_.workspace->get(), 0, s_.workspace->size_bytes(), stream),
                       "workspace memset"));
      }
      p.workspace = s_.workspace->get();
      p.workspace_bytes = s_.workspace->size_bytes();
      return acuda::PagedAttention(p, acuda::AttentionKernel::kAuto, stream);
    };
    // 2. One partial per group of pooled segments.
    for (size_t g = 0; g < s_.groups.size(); ++g) {
      const Group& grp = s_.groups[g];
      TOKENLAKE_RETURN_IF_ERROR(run(layer_blocks + grp.first, grp.count, s_.layout.segment_tokens,
                                    false, 0, outs + static_cast<int64_t>(g) * rows * c.head_dim,
                                    lses + static_cast<int64_t>(g) * rows));
      ++(grp.remote ? s_.counters->remote_attend_calls : s_.counters->local_attend_calls);
    }
    // 3. The causal partial over the tail and the new tokens, with the groups' partials as
    // extras: the call writes the log-sum-exp merge of all partials into `out` (the decode
    // kernels fold the extras into their own split merge, with no merge launch; prefill merges
    // them in one launch after its kernel).
    const int32_t tail_tokens = static_cast<int32_t>(s_.computed + n - s_.pooled);
    const int32_t last = num_partials - 1;
    return run(layer_blocks + s_.stride - 1, 1, tail_tokens, true,
               static_cast<int32_t>(s_.computed - s_.pooled), out,
               num_partials == 1 ? lses : s_.merged_lse, last);
  }

 private:
  Setup s_;
};

// The engine's IterationExecutor: per request a device tail (absolute token rows [0, max
// tokens) of every layer's K and V; rows before `pooled` are served by the pool), the batch's
// requests run one after another through the per-request forward.
class GpuEngine::Executor final : public IterationExecutor {
 public:
  explicit Executor(GpuEngine* engine) : e_(engine) {}

  absl::Status BeginSequence(RequestId request, int64_t max_tokens) override {
    const LlamaConfig& c = e_->model_->config();
    auto seq = std::make_unique<Sequence>();
    seq->capacity = max_tokens;
    TOKENLAKE_RETURN_IF_ERROR(seq->tail.Reserve(
        static_cast<size_t>(int64_t{c.num_layers} * 2 * max_tokens * e_->layout_.TokenRowBytes())));
    sequences_[request] = std::move(seq);
    return absl::OkStatus();
  }

  DataPlaneCounters EndSequence(RequestId request) override {
    // Copies out of the tail may still be queued.
    cudaStreamSynchronize(e_->model_->stream());
    auto it = sequences_.find(request);
    if (it == sequences_.end()) return {};
    const DataPlaneCounters c = it->second->counters;
    sequences_.erase(it);
    return c;
  }

  absl::Status DropTailRows(RequestId request, int64_t rows) override {
    TOKENLAKE_ASSIGN_OR_RETURN(Sequence * s, Find(request));
    if (rows < 0 || s->pooled + rows > s->computed) {
      return absl::InternalError(
          absl::StrFormat("GpuEngine: dropping %d tail rows of request %d (tail [%d, %d))", rows,
                          request.value(), s->pooled, s->computed));
    }
    s->pooled += rows;  // absolute rows: the tail's start moves
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<std::vector<float>>> Run(
      absl::Span<const IterationWork> batch) override {
    std::vector<std::vector<float>> out;
    for (const IterationWork& w : batch) {
      TOKENLAKE_ASSIGN_OR_RETURN(std::vector<float> logits, RunOne(w));
      out.push_back(std::move(logits));
    }
    return out;
  }

  absl::StatusOr<int64_t> StoreSegment(RequestId request, InstanceId /*compute*/, int64_t first_row,
                                       InstanceId target, SegmentId segment,
                                       const StoredMeta& /*meta*/) override {
    TOKENLAKE_ASSIGN_OR_RETURN(Sequence * s, Find(request));
    const LlamaConfig& c = e_->model_->config();
    const attention::KvSlotLayout& layout = e_->layout_;
    const int64_t row = s->pooled + first_row;  // absolute tail row
    if (first_row < 0 || row + layout.segment_tokens > s->computed) {
      return absl::InternalError(
          absl::StrFormat("GpuEngine: segment rows [%d, %d) outside the tail of request %d", row,
                          row + layout.segment_tokens, request.value()));
    }
    if (!target.valid() || target.value() >= e_->options_.num_instances) {
      return absl::InternalError(
          absl::StrFormat("GpuEngine: store on instance %d", target.valid() ? target.value() : -1));
    }
    store::SegmentStore& st = *e_->instances_[static_cast<size_t>(target.value())].store;
    TOKENLAKE_ASSIGN_OR_RETURN(SlotId slot, st.Allocate(segment));
    std::byte* dst = st.SlotData(slot).data();
    const int64_t row_bytes = layout.TokenRowBytes();
    // [layer][kv] blocks of S rows: one strided copy from the tail.
    TOKENLAKE_RETURN_IF_ERROR(CudaStatus(
        cudaMemcpy2DAsync(
            dst, static_cast<size_t>(layout.BlockBytes()),
            s->tail.as<std::byte>() + row * row_bytes, static_cast<size_t>(s->capacity * row_bytes),
            static_cast<size_t>(layout.BlockBytes()), static_cast<size_t>(c.num_layers) * 2,
            cudaMemcpyDeviceToDevice, e_->model_->stream()),
        "store copy"));
    return layout.SlotBytes();
  }

  absl::Status FreeSegment(InstanceId /*compute*/, InstanceId target, SegmentId segment,
                           uint64_t /*evicted_at*/) override {
    if (!target.valid() || target.value() >= e_->options_.num_instances) {
      return absl::InternalError(
          absl::StrFormat("GpuEngine: free on instance %d", target.valid() ? target.value() : -1));
    }
    // Queued copies may still read the slot.
    TOKENLAKE_RETURN_IF_ERROR(
        CudaStatus(cudaStreamSynchronize(e_->model_->stream()), "synchronize before a free"));
    return e_->instances_[static_cast<size_t>(target.value())].store->Free(segment);
  }

 private:
  struct Sequence {
    DeviceBuffer tail;  // [layer][kv][capacity][kv_heads][head_dim] bf16
    int64_t capacity = 0;
    int64_t pooled = 0;    // absolute rows before this are served by the pool
    int64_t computed = 0;  // rows written
    DataPlaneCounters counters;
  };

  absl::StatusOr<Sequence*> Find(RequestId request) {
    auto it = sequences_.find(request);
    if (it == sequences_.end()) {
      return absl::InternalError(
          absl::StrFormat("GpuEngine: no sequence for request %d", request.value()));
    }
    return it->second.get();
  }

  // One request's forward of the iteration (see the file comment of gpu_engine.h).
  absl::StatusOr<std::vector<float>> RunOne(const IterationWork& w);

  GpuEngine* e_;
  absl::flat_hash_map<RequestId, std::unique_ptr<Sequence>> sequences_;
};

absl::StatusOr<std::vector<float>> GpuEngine::Executor::RunOne(const IterationWork& w) {
  TOKENLAKE_ASSIGN_OR_RETURN(Sequence * sq, Find(w.request));
  const LlamaConfig& c = e_->model_->config();
  const cudaStream_t stream = e_->model_->stream();
  const attention::KvSlotLayout& layout = e_->layout_;
  const int64_t row_bytes = layout.TokenRowBytes();
  const int64_t slot_bytes = layout.SlotBytes();
  const InstanceId compute = w.compute;
  const int32_t n = static_cast<int32_t>(w.tokens.size());
  if (sq->computed == 0 && sq->pooled == 0) {
    // A (re)started sequence: the pool serves the plan's cached prefix, the tail starts after.
    sq->pooled = sq->computed = w.plan->cached_tokens;
  }
  // The loop's rows: the tail holds [pooled, start_pos) before this forward.
  if (w.plan->cached_tokens != sq->pooled || w.start_pos != sq->computed ||
      w.start_pos + n > sq->capacity) {
    return absl::InternalError(absl::StrFormat(
        "GpuEngine: request %d computes rows [%d, %d) over a cached prefix of %d; its tail holds "
        "[%d, %d) of %d rows",
        w.request.value(), w.start_pos, w.start_pos + n, w.plan->cached_tokens, sq->pooled,
        sq->computed, sq->capacity));
  }
  const int64_t pooled = sq->pooled;
  const int64_t computed = sq->computed;
  std::byte* tail = sq->tail.as<std::byte>();

  // Group the cached segments: own + pulled (one partial), each moved-queries holder.
  struct Seg {
    const std::byte* slot;
    int32_t num_tokens;
  };
  std::vector<Seg> own;
  std::vector<std::pair<InstanceId, std::vector<Seg>>> remote;
  size_t to_pull = 0;
  for (const plan::SegmentAssignment& a : w.plan->segments) {
    if (a.holder != compute && a.action == plan::HolderAction::kPullKv) ++to_pull;
  }
  if (to_pull > 0) {
    TOKENLAKE_RETURN_IF_ERROR(e_->pulled_.Reserve(static_cast<size_t>(slot_bytes) * to_pull));
  }
  size_t pulled_index = 0;
  for (const plan::SegmentAssignment& a : w.plan->segments) {
    TOKENLAKE_ASSIGN_OR_RETURN(std::byte * slot, e_->SlotPointer(a.holder, a.segment));
    if (a.holder == compute) {
      own.push_back({slot, a.num_tokens});
    } else if (a.action == plan::HolderAction::kPullKv) {
      // Pull: a device-to-device copy of the whole slot into the computing instance's scratch
      // (the same GPU holds both).
      std::byte* dst = e_->pulled_.as<std::byte>() + pulled_index++ * slot_bytes;
      TOKENLAKE_RETURN_IF_ERROR(
          CudaStatus(cudaMemcpyAsync(dst, slot, static_cast<size_t>(slot_bytes),
                                     cudaMemcpyDeviceToDevice, stream),
                     "pull copy"));
      own.push_back({dst, a.num_tokens});
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
  // Descriptors: per layer, [own][remote 0][remote 1]...[tail].
  std::vector<Backend::Group> groups;
  int32_t at = 0;
  if (!own.empty()) {
    groups.push_back({compute, false, at, static_cast<int32_t>(own.size())});
    at += static_cast<int32_t>(own.size());
  }
  for (const auto& r : remote) {
    groups.push_back({r.first, true, at, static_cast<int32_t>(r.second.size())});
    at += static_cast<int32_t>(r.second.size());
  }
  const int32_t stride = at + 1;
  std::vector<acuda::DeviceKvBlock> blocks(static_cast<size_t>(stride) * c.num_layers);
  for (int32_t l = 0; l < c.num_layers; ++l) {
    acuda::DeviceKvBlock* lb = blocks.data() + static_cast<size_t>(l) * stride;
    int32_t i = 0;
    auto add = [&](const Seg& sg) {
      lb[i].k = sg.slot + layout.BlockOffsetBytes(l, 0);
      lb[i].v = sg.slot + layout.BlockOffsetBytes(l, 1);
      lb[i].num_tokens = sg.num_tokens;
      ++i;
    };
    for (const Seg& sg : own) add(sg);
    for (const auto& r : remote) {
      for (const Seg& sg : r.second) add(sg);
    }
    lb[i].k = tail + ((int64_t{l} * 2 + 0) * sq->capacity + pooled) * row_bytes;
    lb[i].v = tail + ((int64_t{l} * 2 + 1) * sq->capacity + pooled) * row_bytes;
    lb[i].num_tokens = static_cast<int32_t>(computed + n - pooled);
  }
  const size_t blocks_bytes = blocks.size() * sizeof(acuda::DeviceKvBlock);
  TOKENLAKE_RETURN_IF_ERROR(e_->blocks_.Reserve(blocks_bytes));
  // Synchronous: the host vector dies with this scope (and earlier work may read blocks_).
  TOKENLAKE_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "synchronize"));
  TOKENLAKE_RETURN_IF_ERROR(
      CudaStatus(cudaMemcpy(e_->blocks_.get(), blocks.data(), blocks_bytes, cudaMemcpyHostToDevice),
                 "descriptor upload"));
  const int64_t rows = int64_t{n} * c.num_heads;
  const size_t num_partials = groups.size() + 1;
  TOKENLAKE_RETURN_IF_ERROR(
      e_->partials_.Reserve(num_partials * static_cast<size_t>(rows) * (c.head_dim + 1) * 4));
  TOKENLAKE_RETURN_IF_ERROR(e_->merged_lse_.Reserve(static_cast<size_t>(rows) * 4));
  Backend backend(Backend::Setup{.config = c,
                                 .layout = layout,
                                 .num_tokens = n,
                                 .computed = computed,
                                 .pooled = pooled,
                                 .tail = tail,
                                 .tail_capacity = sq->capacity,
                                 .blocks = e_->blocks_.as<acuda::DeviceKvBlock>(),
                                 .stride = stride,
                                 .groups = std::move(groups),
                                 .partials = e_->partials_.as<float>(),
                                 .merged_lse = e_->merged_lse_.as<float>(),
                                 .workspace = &e_->workspace_,
                                 .counters = &sq->counters});
  std::vector<float> logits;
  absl::Status status = absl::OkStatus();
  if (w.want_logits) {
    absl::StatusOr<std::vector<float>> l = e_->model_->Forward(w.tokens, computed, backend);
    if (l.ok()) {
      logits = *std::move(l);
    } else {
      status = l.status();
    }
  } else {
    // A prompt chunk that does not end the sequence: no logits leave the device.
    status = e_->model_->ForwardArgmax(w.tokens, computed, backend).status();
  }
  if (!status.ok()) {
    cudaStreamSynchronize(stream);
    return status;
  }
  sq->computed = computed + n;
  return logits;
}

GpuEngine::GpuEngine(GpuLlamaModel* model, const GpuEngineOptions& options)
    : model_(model), options_(options) {}

GpuEngine::~GpuEngine() {
  loop_.reset();  // releases what its requests still pin, ends their sequences
  if (model_ != nullptr) cudaStreamSynchronize(model_->stream());
}

absl::StatusOr<std::unique_ptr<GpuEngine>> GpuEngine::Create(GpuLlamaModel* model,
                                                             const GpuEngineOptions& options) {
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
  std::unique_ptr<GpuEngine> e(new GpuEngine(model, options));
  const LlamaConfig& c = model->config();
  e->layout_ = attention::KvSlotLayout{.num_layers = c.num_layers,
                                       .segment_tokens = options.segment_tokens,
                                       .num_kv_heads = c.num_kv_heads,
                                       .head_dim = c.head_dim,
                                       .dtype = attention::KvDtype::kBFloat16};
  TOKENLAKE_RETURN_IF_ERROR(e->layout_.Validate());
  const size_t slot_bytes = static_cast<size_t>(e->layout_.SlotBytes());
  for (int32_t i = 0; i < options.num_instances; ++i) {
    Instance inst;
    TOKENLAKE_ASSIGN_OR_RETURN(
        inst.arena, store::DeviceArena::Create(
                        {.bytes = slot_bytes * static_cast<size_t>(options.slots_per_instance),
                         .device = model->device()}));
    store::SegmentStore::Options so = inst.arena->StoreOptions(slot_bytes, InstanceId(i));
    so.num_slots = options.slots_per_instance;
    TOKENLAKE_ASSIGN_OR_RETURN(inst.store, store::SegmentStore::Create(so));
    e->instances_.push_back(std::move(inst));
  }
  lake::LakeOptions lo;
  lo.num_instances = options.num_instances;
  lo.segment_tokens = options.segment_tokens;
  lo.slots_per_instance = options.slots_per_instance;
  lo.heavy_hitter.num_instances = options.num_instances;
  lo.model = plan::ModelShape{.num_layers = c.num_layers,
                              .num_heads = c.num_heads,
                              .num_kv_heads = c.num_kv_heads,
                              .head_dim = c.head_dim,
                              .dtype_bytes = 2};
  TOKENLAKE_ASSIGN_OR_RETURN(e->lake_, lake::Lake::Create(lo, &e->clock_));
  e->control_ = std::make_unique<LocalControlPlane>(e->lake_.get(), &e->clock_);
  e->salt_ = index::NamespaceSalt(options.namespace_name);
  e->executor_ = std::make_unique<Executor>(e.get());
  TOKENLAKE_ASSIGN_OR_RETURN(
      e->loop_,
      IterationLoop::Create(
          e->control_.get(), e->executor_.get(),
          {.segment_tokens = options.segment_tokens,
           .salt = e->salt_,
           .max_batch_tokens = options.max_batch_tokens,
           .max_batch_requests = options.max_batch_requests,
           .memory_admission = options.memory_admission,
           .vocab_size = c.vocab_size,
           .max_request_tokens = c.max_position_embeddings,
           .rotate_over_instances = options.rotate_compute_instance ? options.num_instances : 0}));
  return e;
}

const store::SegmentStore& GpuEngine::store(InstanceId instance) const {
  return *instances_[static_cast<size_t>(instance.value())].store;
}

absl::StatusOr<std::byte*> GpuEngine::SlotPointer(InstanceId instance, SegmentId segment) const {
  if (!instance.valid() || instance.value() >= options_.num_instances) {
    return absl::InternalError(
        absl::StrFormat("GpuEngine: plan names instance %d", instance.value()));
  }
  const store::SegmentStore& st = *instances_[static_cast<size_t>(instance.value())].store;
  std::optional<SlotId> slot = st.Find(segment);
  if (!slot.has_value()) {
    return absl::InternalError(absl::StrFormat(
        "GpuEngine: segment %016x is not stored on instance %d (data plane out of step with the "
        "lake)",
        segment.value(), instance.value()));
  }
  return st.SlotData(*slot).data();
}

absl::Status GpuEngine::CheckInput(absl::Span<const int32_t> prompt, int32_t max_new_tokens,
                                   absl::Span<const int32_t> force_tokens) const {
  const LlamaConfig& c = model_->config();
  if (prompt.empty()) return absl::InvalidArgumentError("GpuEngine::Generate: empty prompt");
  if (max_new_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "GpuEngine::Generate: max_new_tokens must be >= 1, got %d", max_new_tokens));
  }
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "GpuEngine::Generate: prompt token %d at index %d is outside the vocabulary [0, %d)",
          prompt[i], i, c.vocab_size));
    }
  }
  if (!force_tokens.empty()) {
    if (static_cast<int64_t>(force_tokens.size()) < max_new_tokens - 1) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "GpuEngine::Generate: force_tokens has %d tokens, needs max_new_tokens - 1 = %d",
          force_tokens.size(), max_new_tokens - 1));
    }
    for (size_t i = 0; i < force_tokens.size(); ++i) {
      if (force_tokens[i] < 0 || force_tokens[i] >= c.vocab_size) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "GpuEngine::Generate: force_tokens[%d] = %d is outside the vocabulary [0, %d)", i,
            force_tokens[i], c.vocab_size));
      }
    }
  }
  const int64_t total = static_cast<int64_t>(prompt.size()) + max_new_tokens;
  if (c.max_position_embeddings > 0 && total > c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "GpuEngine::Generate: prompt of %d tokens plus %d new tokens does not fit the model's "
        "context of %d tokens",
        prompt.size(), max_new_tokens, c.max_position_embeddings));
  }
  return absl::OkStatus();
}

namespace {

GpuGenerateResult ToGpuResult(LoopResult r, int64_t slot_bytes) {
  GpuGenerateResult out;
  out.tokens = std::move(r.tokens);
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

int32_t GpuEngine::max_batch_requests_seen() const { return loop_->max_batch_requests_seen(); }

}  // namespace tokenlake::engine::cuda
