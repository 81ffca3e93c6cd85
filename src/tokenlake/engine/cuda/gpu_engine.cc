#include "tokenlake/engine/cuda/gpu_engine.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <utility>

#include "absl/strings/str_format.h"
#include "tokenlake/attention/cuda/paged_attention.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/cuda/pool_steps.h"
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
    GpuGenerateResult* counters = nullptr;
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

GpuEngine::GpuEngine(GpuLlamaModel* model, const GpuEngineOptions& options)
    : model_(model), options_(options) {}

GpuEngine::~GpuEngine() {
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

absl::StatusOr<GpuGenerateResult> GpuEngine::Generate(absl::Span<const int32_t> prompt,
                                                      int32_t max_new_tokens,
                                                      absl::Span<const int32_t> force_tokens) {
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
  const int32_t s = options_.segment_tokens;
  const cudaStream_t stream = model_->stream();
  const int64_t row_bytes = layout_.TokenRowBytes();
  const int64_t slot_bytes = layout_.SlotBytes();
  const RequestId request(next_request_++);
  const InstanceId preferred =
      options_.rotate_compute_instance
          ? InstanceId(static_cast<int32_t>(request.value() % options_.num_instances))
          : InstanceId();

  // Tail: absolute token rows [0, prompt + max_new) of every layer's K and V.
  const int64_t capacity = static_cast<int64_t>(prompt.size()) + max_new_tokens;
  if (capacity > tail_capacity_) {
    TOKENLAKE_RETURN_IF_ERROR(
        tail_.Reserve(static_cast<size_t>(int64_t{c.num_layers} * 2 * capacity * row_bytes)));
    tail_capacity_ = capacity;
  }
  std::byte* tail = tail_.as<std::byte>();

  GpuGenerateResult result;
  std::vector<int32_t> seq(prompt.begin(), prompt.end());
  int64_t pooled = 0;    // tokens of the sequence's prefix held by the pool (multiple of S)
  int64_t computed = 0;  // tokens whose KV exists (pool prefix + tail rows [pooled, computed))
  InstanceId last_compute = preferred;
  std::vector<float> logits;
  for (int32_t step = 0;; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    const bool prefill = step == 0;
    const bool want_logits = prefill || step == max_new_tokens - 1;
    TOKENLAKE_ASSIGN_OR_RETURN(
        StepPlan ip,
        PlanStep(*control_, StepRequest{.id = request,
                                        .salt = salt_,
                                        .seq = seq,
                                        .prefill = prefill,
                                        .computed = computed,
                                        .segment_tokens = s,
                                        .preferred = prefill ? preferred : last_compute,
                                        .pooled = pooled}));
    if (prefill) {
      computed = ip.plan.cached_tokens;
      result.cached_tokens = ip.plan.cached_tokens;
    }
    // Rows [pooled, cached) are in the tail and (the same prefix) in the pool: use the pool.
    pooled = ip.plan.cached_tokens;
    const InstanceId compute = ip.plan.compute_instance;
    last_compute = compute;
    const int32_t n = static_cast<int32_t>(ip.plan.new_tokens);
    int32_t next_token = 0;

    auto run_iteration = [&]() -> absl::Status {
      // Group the cached segments: own + pulled (one partial), each moved-queries holder.
      struct Seg {
        const std::byte* slot;
        int32_t num_tokens;
      };
      std::vector<Seg> own;
      std::vector<std::pair<InstanceId, std::vector<Seg>>> remote;
      std::vector<const plan::SegmentAssignment*> to_pull;
      for (const plan::SegmentAssignment& a : ip.plan.segments) {
        if (a.holder != compute && a.action == plan::HolderAction::kPullKv) {
          to_pull.push_back(&a);
        }
      }
      if (!to_pull.empty()) {
        TOKENLAKE_RETURN_IF_ERROR(
            pulled_.Reserve(static_cast<size_t>(slot_bytes) * to_pull.size()));
      }
      size_t pulled_index = 0;
      for (const plan::SegmentAssignment& a : ip.plan.segments) {
        TOKENLAKE_ASSIGN_OR_RETURN(std::byte * slot, SlotPointer(a.holder, a.segment));
        if (a.holder == compute) {
          own.push_back({slot, a.num_tokens});
        } else if (a.action == plan::HolderAction::kPullKv) {
          // Pull: a device-to-device copy of the whole slot into the computing instance's
          // scratch (the same GPU holds both).
          std::byte* dst = pulled_.as<std::byte>() + pulled_index++ * slot_bytes;
          TOKENLAKE_RETURN_IF_ERROR(
              CudaStatus(cudaMemcpyAsync(dst, slot, static_cast<size_t>(slot_bytes),
                                         cudaMemcpyDeviceToDevice, stream),
                         "pull copy"));
          own.push_back({dst, a.num_tokens});
          ++result.pulled_segments;
          result.pulled_bytes += slot_bytes;
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
          lb[i].k = sg.slot + layout_.BlockOffsetBytes(l, 0);
          lb[i].v = sg.slot + layout_.BlockOffsetBytes(l, 1);
          lb[i].num_tokens = sg.num_tokens;
          ++i;
        };
        for (const Seg& sg : own) add(sg);
        for (const auto& r : remote) {
          for (const Seg& sg : r.second) add(sg);
        }
        lb[i].k = tail + ((int64_t{l} * 2 + 0) * tail_capacity_ + pooled) * row_bytes;
        lb[i].v = tail + ((int64_t{l} * 2 + 1) * tail_capacity_ + pooled) * row_bytes;
        lb[i].num_tokens = static_cast<int32_t>(computed + n - pooled);
      }
      const size_t blocks_bytes = blocks.size() * sizeof(acuda::DeviceKvBlock);
      TOKENLAKE_RETURN_IF_ERROR(blocks_.Reserve(blocks_bytes));
      // Synchronous: the host vector dies with this scope (and earlier work may read blocks_).
      TOKENLAKE_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "synchronize"));
      TOKENLAKE_RETURN_IF_ERROR(
          CudaStatus(cudaMemcpy(blocks_.get(), blocks.data(), blocks_bytes, cudaMemcpyHostToDevice),
                     "descriptor upload"));
      const int64_t rows = int64_t{n} * c.num_heads;
      const size_t num_partials = groups.size() + 1;
      TOKENLAKE_RETURN_IF_ERROR(
          partials_.Reserve(num_partials * static_cast<size_t>(rows) * (c.head_dim + 1) * 4));
      TOKENLAKE_RETURN_IF_ERROR(merged_lse_.Reserve(static_cast<size_t>(rows) * 4));
      Backend backend(Backend::Setup{.config = c,
                                     .layout = layout_,
                                     .num_tokens = n,
                                     .computed = computed,
                                     .pooled = pooled,
                                     .tail = tail,
                                     .tail_capacity = tail_capacity_,
                                     .blocks = blocks_.as<acuda::DeviceKvBlock>(),
                                     .stride = stride,
                                     .groups = std::move(groups),
                                     .partials = partials_.as<float>(),
                                     .merged_lse = merged_lse_.as<float>(),
                                     .workspace = &workspace_,
                                     .counters = &result});
      const absl::Span<const int32_t> fed =
          absl::MakeConstSpan(seq).subspan(static_cast<size_t>(computed));
      if (want_logits) {
        TOKENLAKE_ASSIGN_OR_RETURN(logits, model_->Forward(fed, computed, backend));
        next_token = Argmax(logits);
      } else {
        TOKENLAKE_ASSIGN_OR_RETURN(next_token, model_->ForwardArgmax(fed, computed, backend));
      }
      computed += n;

      // Store the segments this iteration completed where the lake placed them.
      TOKENLAKE_ASSIGN_OR_RETURN(StepCommit commit, CommitStep(*control_, request, ip, s));
      for (const lake::StoredReplica& ev : commit.evicted) {
        TOKENLAKE_RETURN_IF_ERROR(
            instances_[static_cast<size_t>(ev.instance.value())].store->Free(ev.segment));
      }
      for (const StepCommit::Store& st : commit.to_store) {
        store::SegmentStore& target = *instances_[static_cast<size_t>(st.target.value())].store;
        TOKENLAKE_ASSIGN_OR_RETURN(SlotId slot, target.Allocate(ip.keys[st.key_index].id));
        std::byte* dst = target.SlotData(slot).data();
        const int64_t first_row = static_cast<int64_t>(st.key_index) * s;
        // [layer][kv] blocks of S rows: one strided copy from the tail.
        TOKENLAKE_RETURN_IF_ERROR(CudaStatus(
            cudaMemcpy2DAsync(
                dst, static_cast<size_t>(layout_.BlockBytes()), tail + first_row * row_bytes,
                static_cast<size_t>(tail_capacity_ * row_bytes),
                static_cast<size_t>(layout_.BlockBytes()), static_cast<size_t>(c.num_layers) * 2,
                cudaMemcpyDeviceToDevice, stream),
            "store copy"));
        ++result.stored_segments;
        result.stored_bytes += slot_bytes;
        if (st.target != compute) ++result.remote_stored_segments;
      }
      pooled = commit.pooled_tokens;
      return CudaStatus(cudaStreamSynchronize(stream), "iteration synchronize");
    };
    absl::Status status = run_iteration();
    if (!status.ok()) cudaStreamSynchronize(stream);
    absl::Status released = control_->Release(request);
    TOKENLAKE_RETURN_IF_ERROR(status);
    TOKENLAKE_RETURN_IF_ERROR(released);
    result.iteration_us.push_back(
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());

    if (prefill) result.last_logits = logits;
    result.tokens.push_back(next_token);
    if (static_cast<int32_t>(result.tokens.size()) == max_new_tokens) break;
    seq.push_back(force_tokens.empty() ? next_token : force_tokens[static_cast<size_t>(step)]);
  }
  result.decode_logits = std::move(logits);
  return result;
}

}  // namespace tokenlake::engine::cuda
