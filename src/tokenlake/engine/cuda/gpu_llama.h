// GpuLlamaModel: the Llama forward pass of engine::LlamaModel on one CUDA device.
//
// Weights are uploaded once as bfloat16 (bf16 checkpoint tensors as they are, f32 and f16 ones
// rounded to nearest even on the device; RMSNorm weights as float32), straight from the mapped
// checkpoint through pinned staging buffers (weight_upload.h). Dense layers run on cuBLAS
// (cublasGemmEx: bf16 inputs, float32 accumulation and float32 output; the q/k/v and the gate/up
// projections are each one GEMM over concatenated weights; o_proj and down_proj accumulate into the
// float32 residual stream with beta = 1), and forwards of a few rows (small decode batches) on
// SmallBatchGemm, which streams the weights closer to the memory bandwidth
// (set_small_batch_rows). Small kernels do the rest: embedding gather, RMSNorm
// (float32 statistics, bf16 output for the next GEMM), RoPE (the conventions of engine/ops.cc:
// rotate-half, inverse frequencies from engine::RopeInvFreq, angle = position * inv_freq in
// float32, cos/sin in double), SiLU(gate) * up. The residual stream x is float32; GEMM inputs
// (normed activations, attention output, SiLU*up) are rounded to bf16. Queries and the new tokens'
// K and V are bf16 (the KV is stored as bf16 in the pool). A forward runs a batch of sequences:
// the dense layers over all their tokens at once (one GEMM per projection for the whole batch),
// each token at its own RoPE position; only the last token of each sequence that asks for it
// goes through the LM head, and only its argmax (and, when asked, its logits) is copied to the
// host.
//
// Attention is delegated to a GpuAttentionBackend (the pool: see gpu_engine.h).
//
// Thread-safety: not thread-safe; one Forward at a time. All device work runs on the model's
// stream (stream()); Forward returns after that stream has finished its work.
#ifndef TOKENLAKE_ENGINE_CUDA_GPU_LLAMA_H_
#define TOKENLAKE_ENGINE_CUDA_GPU_LLAMA_H_

#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tokenlake/engine/checkpoint.h"
#include "tokenlake/engine/cuda/decode_gemm.h"
#include "tokenlake/engine/cuda/device_buffer.h"
#include "tokenlake/engine/cuda/small_batch_gemm.h"
#include "tokenlake/engine/cuda/weight_upload.h"
#include "tokenlake/engine/llama_config.h"
#include "tokenlake/engine/safetensors.h"

namespace tokenlake::engine::cuda {

// Attention of one forward pass on the device (stream order: enqueue on `stream`).
//
// A forward runs a batch of sequences (see GpuLlamaModel::ForwardBatch): their new tokens are
// the rows of q, k, v and out, sequence after sequence, in the order the caller gave them; the
// backend is built by the caller for that batch and knows which rows belong to which sequence.
class GpuAttentionBackend {
 public:
  virtual ~GpuAttentionBackend() = default;
  // Attention of the batch's `num_tokens` new tokens at layer `layer`. Device pointers: q
  // [num_tokens][num_heads][head_dim] bf16 bits (RoPE applied), k and v
  // [num_tokens][num_kv_heads][head_dim] bf16 bits (RoPE on k). The backend keeps k and v as
  // each sequence's KV of this layer (copying them before returning or in stream order) and
  // writes out [num_tokens][num_heads][head_dim] float32: per row, softmax(q K^T /
  // sqrt(head_dim)) V over all earlier tokens of the row's sequence and, causally, its new ones.
  // q, k, v are valid until the work enqueued on `stream` by this call has run.
  virtual absl::Status Attend(int32_t layer, int32_t num_tokens, const uint16_t* q,
                              const uint16_t* k, const uint16_t* v, float* out,
                              cudaStream_t stream) = 0;
};

// One sequence of a batched forward.
struct GpuSequenceInput {
  // Its new tokens (non-empty), at positions start_pos, start_pos + 1, ...
  absl::Span<const int32_t> tokens;
  int64_t start_pos = 0;
  // What leaves the device for its last token: nothing, the argmax of its logits (4 bytes), or
  // the argmax and the float32 logits [vocab_size].
  enum class Logits : uint8_t { kNone, kArgmax, kFull };
  Logits logits = Logits::kFull;
};

// What a batched forward returns, per sequence in input order.
struct GpuBatchOutput {
  // The first index of the maximum of the last token's logits, or -1 (Logits::kNone).
  std::vector<int32_t> next_tokens;
  // The last token's logits [vocab_size] (Logits::kFull), else empty.
  std::vector<std::vector<float>> logits;
};

class GpuLlamaModel {
 public:
  struct Options {
    // CUDA device ordinal, >= 0.
    int device = 0;
    // How the weights travel to the device (threads, staging buffers).
    UploadOptions upload;
  };

  // Where the time of the last load went (seconds of wall clock; phases in order).
  struct LoadStats {
    // config.json and Checkpoint::Open (mapping the files, parsing the headers and the index);
    // 0 when the caller opened the checkpoint (FromCheckpoint).
    double open_seconds = 0;
    // CUDA device, stream and cuBLAS setup (creates the CUDA context on a process's first use).
    double init_seconds = 0;
    // cudaMalloc of the weights.
    double allocate_seconds = 0;
    // UploadTensors: staging setup, copies and conversions, device synchronised.
    double upload_seconds = 0;
    // All of the above.
    double total_seconds = 0;
    // Checkpoint bytes read, and shard files.
    int64_t checkpoint_bytes = 0;
    int32_t shards = 0;
    // Bytes of device memory the weights take.
    int64_t device_bytes = 0;
    UploadStats upload;
  };

  // Reads `dir`/config.json and the checkpoint in `dir` (Checkpoint::Open: model.safetensors or
  // model.safetensors.index.json + shards) and uploads the weights.
  // Errors: those of LoadLlamaConfig / Checkpoint::Open / FromCheckpoint.
  static absl::StatusOr<std::unique_ptr<GpuLlamaModel>> Load(const std::string& dir,
                                                             const Options& options);

  // Uploads the checkpoint's tensors (LlamaCheckpointTensors(config); F32, F16 or BF16). Every
  // tensor's presence, shape and dtype is checked before any weight is allocated, and the
  // weights' device memory against what is free.
  // Errors: NotFound / InvalidArgument / Unimplemented for a missing or mis-shaped tensor or an
  //   unsupported dtype (as engine::LlamaModel::FromCheckpoint, naming the file and the tensor),
  //   InvalidArgument for a config the GPU path does not run (head_dim odd or not in
  //   {16, 32, 64, 128}, see attention/cuda/paged_attention.h), FailedPrecondition (no CUDA
  //   device), ResourceExhausted (device memory: names the bytes the weights need and the bytes
  //   free), Internal (CUDA or cuBLAS error), and UploadTensors' errors.
  static absl::StatusOr<std::unique_ptr<GpuLlamaModel>> FromCheckpoint(const LlamaConfig& config,
                                                                       const Checkpoint& checkpoint,
                                                                       const Options& options);
  // FromCheckpoint over one file. Errors: as FromCheckpoint.
  static absl::StatusOr<std::unique_ptr<GpuLlamaModel>> FromSafetensors(const LlamaConfig& config,
                                                                        const SafetensorsFile& file,
                                                                        const Options& options);

  // A model with random weights drawn on the device (uniform in [-scale, scale], RMSNorm
  // weights 1 + uniform), for timing larger shapes without a checkpoint. Errors as
  // FromSafetensors (config checks, device, memory).
  static absl::StatusOr<std::unique_ptr<GpuLlamaModel>> CreateRandom(const LlamaConfig& config,
                                                                     uint64_t seed, float scale,
                                                                     const Options& options);

  ~GpuLlamaModel();
  GpuLlamaModel(const GpuLlamaModel&) = delete;
  GpuLlamaModel& operator=(const GpuLlamaModel&) = delete;

  // Bytes of device memory the weights of `config` take (bf16 matrices, f32 norms): what
  // FromCheckpoint and CreateRandom allocate (LoadStats::device_bytes), known before loading.
  static int64_t WeightDeviceBytes(const LlamaConfig& config);

  const LlamaConfig& config() const { return config_; }
  int device() const { return device_; }
  // The stream every kernel and copy of this model (and its backend) runs on.
  cudaStream_t stream() const { return stream_; }
  // The phases of the load that made this model (zeros for CreateRandom).
  const LoadStats& load_stats() const { return load_stats_; }

  // Runs a batch of sequences through the model in one forward: the dense layers (GEMMs,
  // RMSNorm, RoPE at each token's own position, SiLU) over all their tokens at once, attention
  // on `backend` (built for this batch: its rows are the sequences' tokens in input order), and
  // the final norm and LM head over the last token of each sequence that wants logits. Each
  // sequence's results equal its own forward's (every row's arithmetic is independent of the
  // other rows, given the same GEMM algorithm; cuBLAS may pick another kernel for another row
  // count, so equal within bf16 rounding).
  // Errors: InvalidArgument (no sequences, a sequence without tokens, a token id outside
  //   [0, vocab_size) naming the sequence and index, start_pos < 0, more than 2^31 - 1 tokens);
  //   any backend error; ResourceExhausted (device memory for the activations); Internal on a
  //   CUDA / cuBLAS error. On error nothing enqueued outlives the call.
  absl::StatusOr<GpuBatchOutput> ForwardBatch(absl::Span<const GpuSequenceInput> sequences,
                                              GpuAttentionBackend& backend);

  // One sequence: ForwardBatch of it alone, returning the float32 logits [vocab_size] of its
  // last token (host). Errors as ForwardBatch.
  absl::StatusOr<std::vector<float>> Forward(absl::Span<const int32_t> tokens, int64_t start_pos,
                                             GpuAttentionBackend& backend);

  // Forwards of at most `rows` rows (decode steps of small batches) run their dense layers on
  // SmallBatchGemm (small_batch_gemm.h, with SiLU*up and the attention output's bf16 rounding
  // fused); 0 = never. Clamped to [0, kSmallBatchMaxRows]. The default, kSmallBatchDefaultRows,
  // is where a decode step measures faster on it than on DecodeGemm (docs/results-engine.md);
  // `tokenlake bench engine --small-batch-rows N` compares settings.
  void set_small_batch_rows(int32_t rows);
  int32_t small_batch_rows() const { return small_batch_rows_; }

  // Forwards of more rows than that and at most `rows` run their dense layers on DecodeGemm
  // (decode_gemm.h: tensor cores, the weights streamed once, with SiLU*up and the attention
  // output's bf16 rounding fused) where the layer's input width is a multiple of
  // kDecodeGemmInMultiple, else on cuBLAS; 0 = cuBLAS. Clamped to [0, kDecodeGemmMaxRows]; the
  // default, kDecodeGemmDefaultRows, is where it measures faster than cuBLAS on every
  // projection; `tokenlake bench engine --decode-gemm-rows N` compares settings.
  void set_decode_gemm_rows(int32_t rows);
  int32_t decode_gemm_rows() const { return decode_gemm_rows_; }

  // Forwards of more rows than that and at most `rows` run on DecodeGemm the layers it reads
  // without splitting their input width (DecodeGemmSplits == 1: gate/up with SiLU*up, the LM
  // head), the others on cuBLAS; at most decode_gemm_rows() = no such forwards. Clamped to
  // [0, kDecodeGemmMaxRows]; default kDecodeGemmUnsplitDefaultRows; `tokenlake bench engine
  // --decode-gemm-unsplit-rows N` compares settings.
  void set_decode_gemm_unsplit_rows(int32_t rows);
  int32_t decode_gemm_unsplit_rows() const { return decode_gemm_unsplit_rows_; }

  // Whether forwards of at most kGraphMaxRows rows (decode steps, small prefill chunks) replay
  // the work between two attentions (o_proj, RMSNorm, gate/up, SiLU, down_proj, the next
  // layer's RMSNorm, q/k/v, RoPE) as CUDA graphs, one per stretch and batch-size bucket:
  // exact row counts up to 8, then multiples of 8 up to 64 and of 32 up to kGraphMaxRows; a
  // forward runs those stretches over its bucket's rows (the extra ones on token 0, dropped),
  // the attention over its own. Captured on a bucket's first forward, kept until the
  // activations are reallocated. On by default; off while profiling events are on. Each row's
  // results are the same kernels' either way, except that cuBLAS may pick another algorithm for
  // the padded row count (equal within bf16 rounding, as for any other batch).
  static constexpr int32_t kGraphMaxRows = 256;
  void set_decode_graphs(bool on);

  // Whether the forward's kernels are chained by programmatic dependent launch
  // (attention/cuda/pdl.cuh): each of the forward's own kernels (SmallBatchGemm, RMSNorm, RoPE,
  // the KV append and the decode attention through the pool backend, ...) may be scheduled
  // while the kernel before it drains, SmallBatchGemm loading its first weights meanwhile, and
  // waits for it before touching its outputs; cuBLAS's kernels launch as usual. This hides the
  // gaps between the many short kernels of a decode step. The results are the same kernels'
  // either way (bit for bit). On by default; a change drops the captured graphs.
  void set_pdl(bool on);
  bool pdl() const { return pdl_; }

  // Device time of the last successful ForwardBatch (from its first kernel to its last), ms.
  double last_forward_gpu_ms() const { return last_forward_gpu_ms_; }

  // Phase timing, for performance analysis (off by default): with profiling on, every forward
  // records CUDA events around its phases and adds their device time (ms) to phase_ms():
  // kPhaseGemm = the layers' dense GEMMs, kPhaseAttention = the backend's Attend (tail KV copy,
  // partials, merge), kPhaseOther = the layers' other kernels (RMSNorm, RoPE, SiLU*up, bf16
  // conversion), kPhaseEnds = embedding, final norm and LM head. The events themselves add a
  // little time. SetProfiling resets the sums.
  static constexpr int kPhaseGemm = 0;
  static constexpr int kPhaseAttention = 1;
  static constexpr int kPhaseOther = 2;
  static constexpr int kPhaseEnds = 3;
  static constexpr int kNumPhases = 4;
  void SetProfiling(bool on);
  const std::array<double, kNumPhases>& phase_ms() const { return phase_ms_; }

  // One sequence, only the argmax of its last token's logits leaves the device (4 bytes).
  // Errors as ForwardBatch.
  absl::StatusOr<int32_t> ForwardArgmax(absl::Span<const int32_t> tokens, int64_t start_pos,
                                        GpuAttentionBackend& backend);

 private:
  struct Layer;
  GpuLlamaModel(const LlamaConfig& config, int device);
  absl::Status Init();
  // Sizes the activations for `num_tokens` rows and `num_logits` logits rows.
  absl::Status EnsureActivations(int32_t num_tokens, int32_t num_logits);
  // Enqueues the whole forward; leaves the argmaxes of the logits rows in argmax_ and their
  // logits in logits_ ([row][vocab], rows = the sequences that want logits, in order).
  absl::Status Enqueue(absl::Span<const GpuSequenceInput> sequences, GpuAttentionBackend& backend);
  // Records a profiling event starting phase `phase` (-1: the end) when profiling is on.
  void Mark(int phase);
  // After the stream synchronised: adds the marked intervals to phase_ms_.
  void CollectMarks();

  const LlamaConfig config_;
  const int device_;
  cudaStream_t stream_ = nullptr;
  void* cublas_ = nullptr;  // cublasHandle_t
  std::vector<Layer> layers_;
  DeviceBuffer embed_;       // [vocab][hidden] bf16
  DeviceBuffer lm_head_;     // [vocab][hidden] bf16 (empty when tied)
  DeviceBuffer final_norm_;  // [hidden] f32
  DeviceBuffer inv_freq_;    // [head_dim / 2] f32
  // Activations, sized for act_tokens_ tokens.
  int32_t act_tokens_ = 0;
  int32_t act_logits_ = 0;
  // Host staging (pinned) of the per-token inputs: [n] tokens, [n] positions, [m] logits rows.
  void* host_inputs_ = nullptr;
  size_t host_inputs_bytes_ = 0;
  DeviceBuffer inputs_;   // [n] int32 tokens, [n] int32 positions, [m] int32 logits rows
  DeviceBuffer x_;        // [n][hidden] f32 residual stream
  DeviceBuffer normed_;   // [n][hidden] bf16
  DeviceBuffer qkv_;      // [n][qd + 2 kvd] f32
  DeviceBuffer q_;        // [n][qd] bf16
  DeviceBuffer k_;        // [n][kvd] bf16
  DeviceBuffer v_;        // [n][kvd] bf16
  DeviceBuffer attn_;     // [n][qd] f32
  DeviceBuffer attn16_;   // [n][qd] bf16
  DeviceBuffer gate_up_;  // [n][2 inter] f32
  DeviceBuffer act16_;    // [n][inter] bf16
  DeviceBuffer head_in_;  // [m][hidden] bf16 (the normed logits rows)
  DeviceBuffer logits_;   // [m][vocab] f32
  DeviceBuffer argmax_;   // [m] int32
  LoadStats load_stats_;
  int32_t small_batch_rows_ = kSmallBatchDefaultRows;
  int32_t decode_gemm_rows_ = kDecodeGemmDefaultRows;
  int32_t decode_gemm_unsplit_rows_ = kDecodeGemmUnsplitDefaultRows;
  DecodeGemmWorkspace decode_gemm_workspace_;  // made by Init
  bool decode_graphs_ = true;
  // Destroys the captured graphs (their activations are about to change, or the model goes).
  void ClearGraphs();
  // cudaGraphExec_t per (stretch between attentions, bucket): index
  // stretch * (kGraphMaxRows + 1) + bucket rows; null until captured. Sized by Init.
  std::vector<cudaGraphExec_t> graphs_;
  // cuBLAS's workspace, ours so that captured GEMMs share it.
  static constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;
  DeviceBuffer cublas_workspace_;
  bool pdl_ = true;  // set_pdl
  // Profiling.
  bool profiling_ = false;
  std::vector<std::pair<cudaEvent_t, int>> marks_;  // events (reused) and the phase each starts
  size_t marks_used_ = 0;
  cudaEvent_t forward_begin_ = nullptr;
  cudaEvent_t forward_end_ = nullptr;
  double last_forward_gpu_ms_ = 0;
  std::array<double, kNumPhases> phase_ms_{};
};

}  // namespace tokenlake::engine::cuda

#endif  // TOKENLAKE_ENGINE_CUDA_GPU_LLAMA_H_
