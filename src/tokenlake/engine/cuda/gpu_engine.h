// GpuEngine: greedy generation for a Llama model on one GPU with its KV cache in a TokenLake
// pool of N instances that share that GPU (the same-device path of the data plane).
//
// Requests run on the engine's IterationLoop (engine/iteration_loop.h), the one the CPU engine
// and the cluster's instances run: continuous batching (requests join and leave at every
// iteration, prompts prefilled in chunks under a per-iteration token budget, decodes first, a
// request waits while the pool cannot hold its new KV), one control-plane call (PlanBatch) per
// iteration. The GPU side of it is the engine's IterationExecutor: the whole batch runs as ONE
// forward (GpuLlamaModel::ForwardBatch: one GEMM per projection over all the batch's tokens),
// and per layer the batch's new K/V rows join their requests' device tails in one launch, all
// the batch's decodes attend in one batched paged-attention launch (each request over its own
// blocks), and each prefill chunk attends in one or two launches (below).
//
// Data plane: a DevicePool (device_pool.h). By default the engine's own SharedDevicePool: every
// instance owns a store::DeviceArena (cudaMalloc'd) with a store::SegmentStore slot allocator
// over it; a slot holds one segment's KV for all layers in bf16, laid out as
// attention::KvSlotLayout says ([layer][kv][token][kv_head][head_dim]). Control plane: by
// default the real lake::Lake (prefix tree, planner, balancer) behind lake::LocalControlPlane;
// CreateOver runs the engine over a control plane and a data plane given to it instead.
//
// Per request of an iteration, on the computing instance the plan names:
//   - segments the computing instance holds, and kPullKv segments (their slot is first copied
//     device-to-device, cudaMemcpyAsync, into a scratch slot of the computing instance: "pulling
//     KV" on a shared device), count as one partial per layer (local_attend_calls);
//   - each kMoveQueries holder counts as one partial per layer (remote_attend_calls): on a
//     shared device, "moving queries" is reading the holder's slots where they are;
//   - the sequence's tail (tokens after its pooled prefix, bf16, kept by the request) plus the
//     new tokens.
// A decode (one new token) attends to all of these as one block list inside the batched decode
// launch: the holders' partials are runs of the kernel's KV splits, merged by log-sum-exp in
// the kernel. A prefill chunk computes one partial over its pooled segments, then the causal
// partial over its tail and new tokens, into which the kernel merges the pooled one
// (PagedAttentionParams::num_extra).
// A request's tail lives in slots of the pool (tail slots the lake accounts: docs/adr/0017), so
// the requests' KV takes no device memory beside the pool. A segment the iteration completes is
// committed in place when its placement is the instance of its tail block (the block becomes
// its slot, no copy), else copied into a slot of the instance the placement names (the block
// goes back); the copy becomes visible to later requests once confirmed. The counters of
// GpuGenerateResult say how many attend calls, pulls and stores (and bytes) this took.
//
// Thread-safety: not thread-safe; one thread calls Generate / GenerateBatch. The model is borrowed
// and must outlive the engine (and must not be used by anyone else meanwhile: the engine runs on
// its stream).
#ifndef TOKENLAKE_ENGINE_CUDA_GPU_ENGINE_H_
#define TOKENLAKE_ENGINE_CUDA_GPU_ENGINE_H_

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tokenlake/attention/attention.h"
#include "tokenlake/base/check.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/base/ids.h"
#include "tokenlake/engine/cuda/device_buffer.h"
#include "tokenlake/engine/cuda/device_pool.h"
#include "tokenlake/engine/cuda/gpu_llama.h"
#include "tokenlake/engine/engine.h"
#include "tokenlake/engine/iteration_loop.h"
#include "tokenlake/lake/control_plane.h"
#include "tokenlake/lake/lake.h"
#include "tokenlake/store/segment_store.h"

namespace tokenlake::engine::cuda {

struct GpuEngineOptions {
  // Instances sharing the GPU, >= 1.
  int32_t num_instances = 1;
  // Tokens per segment (S), >= 1.
  int32_t segment_tokens = 16;
  // Segment slots per instance, >= 1 (each a cudaMalloc'd range of the instance's arena).
  int32_t slots_per_instance = 256;
  // Namespace of the segment ids (a different model must use a different one).
  std::string namespace_name = "tokenlake-gpu-engine";
  // Prefer computing request k on instance k mod num_instances (as EngineOptions): cached
  // segments are then often served by other instances (query movement and KV pulls).
  bool rotate_compute_instance = false;
  // Continuous batching (as EngineOptions): tokens per iteration over the whole batch, >= 1;
  // requests per iteration, >= 1; memory admission.
  int64_t max_batch_tokens = 2048;
  int32_t max_batch_requests = 256;
  bool memory_admission = true;
};

struct GpuGenerateResult {
  // The chosen tokens (argmax at every step unless the request samples): max_new_tokens of
  // them, or fewer when a stop token ended the request.
  std::vector<int32_t> tokens;
  // "length" or "stop" (see LoopResult).
  std::string finish_reason;
  // Prompt tokens served from the pool (not recomputed).
  int64_t cached_tokens = 0;
  // Logits at the last prompt position [vocab_size].
  std::vector<float> last_logits;
  // Logits at the last fed position (that produced tokens.back()) [vocab_size].
  std::vector<float> decode_logits;
  // Data-plane work of this request, summed over its iterations and layers: partials computed
  // over another instance's slots (moved queries), partials over the computing instance's own
  // (and pulled) slots, segments pulled (D2D copies into scratch) and their bytes, segments
  // stored (D2D copies from the tail into a slot) anywhere and away from the computing
  // instance, and the bytes stored.
  int64_t remote_attend_calls = 0;
  int64_t local_attend_calls = 0;
  int64_t pulled_segments = 0;
  int64_t pulled_bytes = 0;
  int64_t stored_segments = 0;
  int64_t remote_stored_segments = 0;
  int64_t stored_bytes = 0;
  // Wall time of every iteration the request took part in, in microseconds (the whole batch's
  // iteration: control plane, data plane and the forwards; index 0 = its first prefill chunk).
  std::vector<double> iteration_us;
};

class GpuEngine {
 public:
  // `model` is borrowed and must outlive the engine.
  // Errors: InvalidArgument naming a bad option (num_instances, segment_tokens,
  //   slots_per_instance) or a null model; errors creating the arenas (ResourceExhausted...)
  //   or the lake.
  static absl::StatusOr<std::unique_ptr<GpuEngine>> Create(GpuLlamaModel* model,
                                                           const GpuEngineOptions& options);
  // The engine over a control plane and a data plane it does not own (both borrowed, must
  // outlive the engine), as an instance process runs it: the pool's layout must be the model's
  // at options.segment_tokens in bf16, and its instance count options.num_instances; the
  // control plane's lake must have the same geometry. With `compute_instance` valid, every
  // request is computed there (an instance process computes on its own instance); else the
  // lake chooses. lake() and store() are then unavailable (CHECK).
  // Errors: as Create; InvalidArgument when the pool does not match the model and options, or
  // compute_instance is out of range.
  static absl::StatusOr<std::unique_ptr<GpuEngine>> CreateOver(
      GpuLlamaModel* model, const GpuEngineOptions& options, lake::ControlPlane* control,
      DevicePool* pool, InstanceId compute_instance = InstanceId());
  ~GpuEngine();
  GpuEngine(const GpuEngine&) = delete;
  GpuEngine& operator=(const GpuEngine&) = delete;

  // Greedy generation of max_new_tokens (>= 1) tokens after `prompt` (non-empty, ids in the
  // vocabulary). With `force_tokens` non-empty (teacher forcing, for tests), step i feeds
  // force_tokens[i] instead of its argmax (result.tokens still holds the argmaxes); it then
  // needs at least max_new_tokens - 1 entries, all in the vocabulary. The request's full
  // segments stay in the pool for later requests.
  // Errors: InvalidArgument (empty prompt, a bad token naming its index, max_new_tokens < 1,
  //   force_tokens too short or with a bad token); ResourceExhausted (device memory); Internal
  //   (CUDA errors, a lake inconsistency).
  absl::StatusOr<GpuGenerateResult> Generate(absl::Span<const int32_t> prompt,
                                             int32_t max_new_tokens,
                                             absl::Span<const int32_t> force_tokens = {});

  // Serves every request with continuous batching (arrival_iteration as engine::Engine's) and
  // returns each one's result or error, in order (errors per request as Generate's).
  std::vector<absl::StatusOr<GpuGenerateResult>> GenerateBatch(
      absl::Span<const GenerateRequest> requests);
  // Continuous serving, one iteration at a time (as engine::Engine's calls of the same names;
  // an instance process's worker drives them): Submit checks and queues a request (its id
  // must be valid and unique: the control plane's), Step runs one iteration and returns the
  // requests that finished in it, Cancel drops a request (its pins and KV tail released),
  // ProgressOf gives a running request's tokens so far.
  absl::Status Submit(const GenerateRequest& request);
  std::vector<std::pair<RequestId, absl::StatusOr<GenerateResult>>> Step();
  absl::Status Cancel(RequestId request);
  std::optional<Engine::Progress> ProgressOf(RequestId request) const;
  bool idle() const;
  LoopLoad Load() const;
  // The most requests that ran in one iteration so far.
  int32_t max_batch_requests_seen() const;
  // Timing of one iteration's forward (for benchmarks): the rows it computed, how many of its
  // requests were decodes, the host wall time of Executor::Run (descriptors, pulls, the forward
  // and its synchronisation) and the device time of the forward's kernels, microseconds.
  struct ForwardTiming {
    int32_t rows = 0;
    int32_t requests = 0;
    int32_t decodes = 0;
    double run_us = 0;
    double gpu_us = 0;
    // With the model's profiling on (GpuLlamaModel::SetProfiling): this forward's device time
    // per phase (GpuLlamaModel::kPhase*), microseconds; zeros otherwise.
    std::array<double, GpuLlamaModel::kNumPhases> phase_us{};
  };
  // The timings of the forwards since the last call (cleared by it).
  std::vector<ForwardTiming> TakeForwardTimings();
  // The iteration loop's timings since the last call (IterationLoop::TakeTimings).
  std::vector<IterationTiming> TakeIterationTimings();

  // The most pool slots the requests' tails (KV of tokens not yet in pooled segments: a prefill
  // chunk's rows until its segments are stored, a part-segment while decoding) held at once so
  // far. They are slots of the pool: the tails take no device memory beside it.
  int64_t peak_tail_slots() const;

  const GpuEngineOptions& options() const { return options_; }
  // The engine's own control plane, for tests and statistics. REQUIRES: made by Create.
  const lake::Lake& lake() const {
    TOKENLAKE_CHECK(lake_ != nullptr);
    return *lake_;
  }
  // Instance i's slot allocator (device slots) in the engine's own pool.
  // REQUIRES: made by Create; 0 <= i < num_instances.
  const store::SegmentStore& store(InstanceId instance) const;
  // The slot layout of the pool.
  const attention::KvSlotLayout& layout() const { return layout_; }

  class Backend;   // the per-iteration attention backend (gpu_engine.cc)
  class Executor;  // the IterationExecutor over the device pool (gpu_engine.cc)

 private:
  GpuEngine(GpuLlamaModel* model, const GpuEngineOptions& options);
  // Create's option checks.
  static absl::Status CheckOptions(const GpuLlamaModel* model, const GpuEngineOptions& options);
  // Builds the executor and the loop over control_ and pool_.
  absl::Status Start(InstanceId compute_instance);
  // Generate's input checks.
  absl::Status CheckInput(absl::Span<const int32_t> prompt, int32_t max_new_tokens,
                          absl::Span<const int32_t> force_tokens) const;

  GpuLlamaModel* model_;
  GpuEngineOptions options_;
  attention::KvSlotLayout layout_;
  ManualClock clock_{1};
  // The engine's own pool and lake (Create), or none (CreateOver).
  std::unique_ptr<SharedDevicePool> own_pool_;
  std::unique_ptr<lake::Lake> lake_;
  std::unique_ptr<lake::LocalControlPlane> own_control_;  // over lake_
  DevicePool* pool_ = nullptr;                            // own_pool_ or borrowed
  lake::ControlPlane* control_ = nullptr;                 // own_control_ or borrowed
  uint64_t salt_ = 0;
  uint64_t next_request_ = 1;
  std::unique_ptr<Executor> executor_;
  std::vector<ForwardTiming> forward_timings_;
  std::unique_ptr<IterationLoop> loop_;
  // Device scratch reused by every request's forward (the tails are per request).
  DeviceBuffer pulled_;      // pulled slots
  DeviceBuffer blocks_;      // DeviceKvBlock descriptors of an iteration
  DeviceBuffer partials_;    // [partial][n][heads][head_dim] f32, then [partial][n][heads] f32
  DeviceBuffer merged_lse_;  // [n][heads] f32
  DeviceBuffer workspace_;   // paged attention workspace (counters zeroed once)
};

}  // namespace tokenlake::engine::cuda

#endif  // TOKENLAKE_ENGINE_CUDA_GPU_ENGINE_H_
