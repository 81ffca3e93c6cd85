// The iteration cost model: model shapes, a GPU profile, the interconnect, and the time of one
// continuous-batching iteration. The simulator charges every policy through this one model, and
// the elastic scheduler sees it through CostModelBatchCost (its BatchCostModel), in the
// simulator's `tokenlake` policy and in the running cluster's coordinator (service/router.h)
// alike.
//
// GPU profile JSON schema (what `tokenlake profile` writes; `--gpu FILE` reads it):
//   {
//     "name": "H100-80GB",                  // free text
//     "memory_bytes": 85017493504,          // device memory
//     "memory_utilization": 0.9,            // share usable by the engine (vLLM's default 0.9)
//     "activation_reserve_bytes": 4294967296, // kept for activations/workspace
//     "copy_gbps": 3003,                    // device copy bandwidth, GB/s (read + write)
//     "gemm_tflops": 779,                   // dense bf16 GEMM
//     "attn_prefill_tflops": 547,           // attention prefill (GQA), TFLOP/s
//     "attn_decode_gbps": 2500,             // attention decode, KV bytes read per s, GB/s
//     "dense_ms": [[1, 5.5], [1024, 18.7], [4096, 81.4], [16384, 316.1]]
//                                           // model's dense layers (all of them) per iteration,
//                                           // by batch tokens; linear interpolation between
//                                           // points, linear extrapolation past the last two
//     "forward_ms": [[1, 6.1], [4096, 103.1]] // optional: the model's whole forward pass but
//                                           // attention, per iteration by batch tokens, as the
//                                           // GPU engine runs it (see GpuProfile::forward_ms);
//                                           // when present it replaces dense_ms
//   }
// Model JSON schema (`--model FILE`): {"name", "num_layers", "num_heads", "num_kv_heads",
//   "head_dim", "hidden", "intermediate", "vocab", "dtype_bytes"}; "dense_ms" in the GPU
//   profile belongs to the model it was measured with (for other models it is rescaled by
//   the ratio of dense parameters).
//
// Thread-safety: immutable after construction; safe to share.
#ifndef TOKENLAKE_SCHED_COST_MODEL_H_
#define TOKENLAKE_SCHED_COST_MODEL_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "tokenlake/plan/cost_model.h"
#include "tokenlake/sched/elastic_scheduler.h"

namespace tokenlake::sched {

struct ModelSpec {
  std::string name = "llama-3-8b";
  int64_t num_layers = 32;
  int64_t num_heads = 32;
  int64_t num_kv_heads = 8;
  int64_t head_dim = 128;
  int64_t hidden = 4096;
  int64_t intermediate = 14336;
  int64_t vocab = 128256;
  int64_t dtype_bytes = 2;  // bf16

  // K and V of one token over all layers.
  int64_t KvBytesPerToken() const { return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes; }
  // Parameters (embedding and LM head included).
  int64_t ParamCount() const;
  // Parameters of the per-layer dense matmuls (qkv, o, gate-up, down), all layers.
  int64_t DenseParamCount() const;
};

// A GPU's costs as the cost model uses them. The defaults are the built-in "h100" profile: the
// H100 MEASURED by `tokenlake profile` (our own profiler, profile/gpu_profile.cu):
//   device   NVIDIA H100 80GB HBM3 (132 SMs, 79.2 GiB), driver 580.159.04
//   date     2026-11-25
//   command  bench/gpu_session.sh, whose profile step is
//              tokenlake profile --json h100.json
//                --dense-tokens 1 16 64 128 256 512 1024 2048 4096 8192 16384
//   commit   75dad69 (the `cuda` preset; the file: bench/data/h100-profile/h100.json)
// The values below are that file's, digit for digit (cost_model_test checks it).
// Attention: the figures are those of OUR kernels (attention/cuda/paged_attention.h), because
// they are what TokenLake's data plane runs (kAuto's choices at that commit): prefill = the sm90
// wgmma kernel (prefill_sm90.cu), 1,024 new tokens over 32K cached tokens in 512-token segments
// (GQA 32/8, d = 128, bf16, not causal); decode = the tensor-core (mma.sync) split-KV decode
// kernel with its fused merge, one token over the same 32K tokens, one call (KV bytes read once /
// time). Every policy is charged with them alike. (On the same shapes in the same run PyTorch's
// SDPA/cuDNN ran prefill at 685.5 TFLOP/s and decode at 1,963 GB/s:
// bench/data/h100-profile/report.txt.) The dense point at 4,096 tokens moves by about 10%
// between runs (81.4 ms here; 70.7-78.6 ms in five other runs).
// The paper-derived profile that was the default before (TOKENLAKE.md 5.3) is PaperH100Profile(),
// built-in name "h100-paper".
struct GpuProfile {
  std::string name = "H100-80GB-HBM3 (measured)";
  int64_t memory_bytes = 85017493504;  // what the device reports (79.2 GiB)
  double memory_utilization = 0.9;
  int64_t activation_reserve_bytes = 4LL << 30;
  double copy_gbps = 3003.3054984635755;
  double gemm_tflops = 779.273762443103;
  double attn_prefill_tflops = 546.9902184358677;
  double attn_decode_gbps = 2499.585263052424;
  // (batch tokens, ms) for the default model, increasing in tokens: its dense layers' GEMMs
  // (cuBLAS, bf16 in and out), all layers, one iteration.
  std::vector<std::pair<double, double>> dense_ms = {
      {1, 5.478400230407715},     {16, 5.582848072052002},    {64, 5.683199882507324},
      {128, 6.007808208465576},   {256, 6.639616012573242},   {512, 9.92255973815918},
      {1024, 18.734079360961914}, {2048, 36.915199279785156}, {4096, 81.364990234375},
      {8192, 158.86233520507813}, {16384, 316.08831787109375}};
  // (batch tokens, ms) for the default model, increasing in tokens, or empty: one iteration of
  // the GPU engine's forward pass with attention left out (engine/cuda/gpu_llama.h: the GEMMs
  // with float32 outputs, RMSNorm, RoPE, SiLU x up, bf16 conversions, embedding, final norm and
  // LM head), as `tokenlake profile` measures it. An iteration of the engine runs all of that
  // besides attention, so when present the cost model charges it instead of dense_ms. Empty
  // in the built-in profiles: the policies are compared on the GEMMs alone (docs/results.md),
  // the same for every policy.
  std::vector<std::pair<double, double>> forward_ms;
};

// The paper-derived H100 profile (TOKENLAKE.md 5.3), the default before the measured one:
// "H100-80GB", 80 GiB, copy 2,964 GB/s, GEMM 791 TFLOP/s, attention prefill 590 TFLOP/s
// (flash-attention class), decode 2,900 GB/s, dense 6.7 / 19.8 / 73 / 312 ms at
// 1 / 1,024 / 4,096 / 16,384 tokens. Built-in name "h100-paper".
GpuProfile PaperH100Profile();

// An A100-SXM4-80GB profile built from PUBLISHED specifications (not measured on an A100):
// NVIDIA A100 Tensor Core GPU datasheet: 80 GB HBM2e (the device reports 81,920 MiB), 2,039 GB/s,
// 312 TFLOP/s dense BF16, NVLink 600 GB/s in total (300 GB/s per direction). Each throughput is
// the A100 peak times the efficiency our MEASURED H100 profile (GpuProfile{}) reaches against
// the H100 SXM5's published peaks (989.4 TFLOP/s dense BF16, 3,350 GB/s), the same kernels'
// class on both GPUs:
//   gemm          779.3 / 989.4  = 78.8%  -> 245.7 TFLOP/s
//   attn prefill  547.0 / 989.4  = 55.3%  -> 172.5 TFLOP/s
//   attn decode   2,499.6 / 3,350 = 74.6% -> 1,521 GB/s
//   copy          3,003.3 / 3,350 = 89.7% -> 1,828 GB/s
// dense_ms (for the reference model, ModelSpec{}, as every profile's table) is a roofline:
// max(weight bytes / (B x e_b), 2 x dense params x tokens / (P x e_f)), with the efficiencies
// the measured H100 dense table shows at its ends: e_b = 76.1% (13.96 GB of Llama-3-8B dense
// weights in 5.478 ms at 1 token, against 3,350 GB/s) and e_f = 73.1% (2.287e14 FLOPs in
// 316.1 ms at 16,384 tokens, against 989.4 TFLOP/s), at the measured table's token points.
// Both terms are linear in the dense parameters, so the cost model's rescaling to another model
// (CostModel's dense_scale) gives that model's own roofline exactly. Built-in name "a100-80gb".
// docs/paper-preset.md has the derivation with its numbers.
GpuProfile A100Profile();

// LWM-7B (LWM-Text-1M, Llama-2-7B shape): 32 layers, 32 heads, 32 KV heads (multi-head
// attention), head_dim 128, hidden 4096, intermediate 11008, vocab 32000, bf16 (512 KiB of KV
// per token). Built-in name "lwm-7b".
ModelSpec Lwm7bModel();

struct InterconnectSpec {
  // Bandwidth between instances of one node (NVLink), GB/s per direction.
  double intra_node_gbps = 300;
  // Bandwidth between nodes (per GPU RDMA NIC, 400 Gb/s), GB/s.
  double inter_node_gbps = 50;
  // GPUs per node.
  int64_t gpus_per_node = 8;
  // Latency of one transfer, microseconds.
  double latency_us = 10;
};

// A model or GPU profile from JSON: the struct's fields by name (those absent keep the struct's
// defaults). Errors: InvalidArgument naming `source` and the field for text that is not a JSON
// object, a field of the wrong type or out of range, and a field the struct does not have (a
// GPU profile may also carry `tokenlake profile`'s "device", "measured" and
// "dense_ms_by_tokens", which are ignored).
absl::StatusOr<ModelSpec> ParseModelSpec(const std::string& json_text, const std::string& source);
absl::StatusOr<GpuProfile> ParseGpuProfile(const std::string& json_text, const std::string& source);
std::string GpuProfileToJson(const GpuProfile& gpu);
// Reads a model by built-in name ("llama-3-8b", "lwm-7b") or from a JSON file path.
absl::StatusOr<ModelSpec> LoadModelSpec(const std::string& name_or_path);
// Reads a GPU profile by built-in name ("h100": the measured GpuProfile{}; "h100-paper":
// PaperH100Profile(); "a100-80gb": A100Profile()) or from a JSON file path (fields it lacks keep
// GpuProfile{}'s values). Errors: NotFound when the name is no built-in and no readable file;
// InvalidArgument (naming the file and field) for a bad file.
absl::StatusOr<GpuProfile> LoadGpuProfile(const std::string& name_or_path);

// One sequence's work in an iteration.
struct SeqWork {
  // New tokens processed for it this iteration (1 for decode).
  int64_t new_tokens = 0;
  // Tokens already in its context before these new tokens (cached or computed earlier) whose
  // attention runs locally.
  int64_t context_tokens = 0;
};

// Tensor parallelism: an instance of `tensor_parallel` = t GPUs (Megatron-style: attention heads
// and MLP columns split over the t GPUs, KV heads with them). Then:
//   - memory: t x the GPU's usable memory, minus the weights once (split, not replicated) and t
//     activation reserves;
//   - dense layers: the profile's time / t (each GPU reads 1/t of the weights and does 1/t of
//     the FLOPs; smaller GEMMs' lower efficiency is not modelled), plus 2 all-reduces per layer
//     of tokens x hidden x dtype bytes over NVLink (ring: 2 (t - 1) / t of the bytes per GPU at
//     intra_node_gbps, plus latency_us each), not overlapped with compute (as in vLLM/SGLang);
//   - attention: / t (each GPU holds and reads 1/t of the heads' KV);
//   - transfers between instances: t x the link bandwidth (each GPU moves its heads' share over
//     its own link in parallel).
// t = 1 (the default) is the single-GPU instance, every figure as without it.
class CostModel {
 public:
  // REQUIRES: tensor_parallel >= 1 and model.num_kv_heads % tensor_parallel == 0.
  CostModel(ModelSpec model, GpuProfile gpu, InterconnectSpec net, int tensor_parallel = 1);

  const ModelSpec& model() const { return model_; }
  const GpuProfile& gpu() const { return gpu_; }
  const InterconnectSpec& net() const { return net_; }
  int tensor_parallel() const { return tp_; }
  // Whether instances `a` and `b` (ids) sit on one node: max(1, gpus_per_node / t) instances
  // per node.
  bool SameNode(int a, int b) const;

  // KV cache capacity of one instance in bytes: t x (memory x utilization - activations) -
  // weights.
  int64_t KvCapacityBytes() const;
  // An iteration's work besides attention for a batch of `tokens` tokens (> 0), seconds: the
  // profile's forward_ms when it has one, else its dense_ms (both interpolated linearly, and
  // scaled to the model by its dense parameters); with t > 1 it includes the tensor-parallel
  // all-reduces (AllReduceSeconds).
  double DenseSeconds(int64_t tokens) const;
  // The 2 x num_layers all-reduces of one iteration of `tokens` tokens; 0 when t = 1.
  double AllReduceSeconds(int64_t tokens) const;
  // Attention time of `new_tokens` queries over `context_tokens` earlier tokens plus the causal
  // part among themselves, seconds: max(FLOPs at prefill efficiency, KV bytes at decode
  // bandwidth).
  double AttentionSeconds(int64_t new_tokens, int64_t context_tokens) const;
  // Attention of `new_tokens` queries over `cached_tokens` tokens held elsewhere (no causal
  // part): max(FLOPs at prefill efficiency, their KV bytes at decode bandwidth).
  double CachedAttentionSeconds(int64_t new_tokens, int64_t cached_tokens) const;
  // Attention seconds per context token of one decode query: AttentionSeconds(1, c) equals
  // DecodeSecondsPerContextToken() * (c + 1) exactly.
  double DecodeSecondsPerContextToken() const;
  // One iteration: dense over all new tokens + each sequence's attention. 0 for an empty batch.
  double IterationSeconds(const std::vector<SeqWork>& batch) const;
  // Prefill of `new_tokens` after `cached_tokens`, alone, chunked by `chunk_tokens`.
  double PrefillSeconds(int64_t new_tokens, int64_t cached_tokens, int64_t chunk_tokens) const;
  // Moving `bytes` between two instances (same node or not), seconds, latency included.
  double TransferSeconds(int64_t bytes, bool same_node) const;

 private:
  ModelSpec model_;
  GpuProfile gpu_;
  InterconnectSpec net_;
  int tp_;
  double dense_scale_;
};

// The scheduler's latency model (BatchCostModel) over a CostModel: dense and attention as the
// cost model charges them; sequence parallelism as each of the d members sending its queries to
// the d - 1 others (which hold the earlier parts' KV) and getting their partial results back,
// over the intra-node link. Borrows `cost`, which must outlive it. Thread-safe (immutable).
class CostModelBatchCost final : public BatchCostModel {
 public:
  CostModelBatchCost(const CostModel& cost, const plan::ModelShape& shape)
      : cost_(cost), shape_(shape) {}
  double DenseSeconds(int64_t tokens) const override { return cost_.DenseSeconds(tokens); }
  double AttentionSeconds(int64_t new_tokens, int64_t context_tokens) const override {
    return cost_.AttentionSeconds(new_tokens, context_tokens);
  }
  double ParallelSeconds(int64_t tokens, int32_t dop) const override;

 private:
  const CostModel& cost_;
  plan::ModelShape shape_;
};

}  // namespace tokenlake::sched

#endif  // TOKENLAKE_SCHED_COST_MODEL_H_
