// The GPU engine's benchmark (`tokenlake bench engine`): a random-init Llama of a named shape on
// one GPU, its pool sized from the memory left after the weights, measured against the
// hardware's own bounds measured in the same run.
//
// Sections (each optional; decode, prefill and workload by default):
//   peaks:    device copy bandwidth (bytes read + written per second, cudaMemcpyAsync device to
//             device) and the cuBLAS bf16 GEMM rate (8192^3), median of repeats;
//   decode:   the engine's decode iteration (control plane, data plane, forward, stores: wall
//             time of the whole iteration) at each batch size and context length, against the
//             memory bound: (weight bytes + the batch's KV bytes) / copy bandwidth. The contexts
//             are prefilled once (distinct random prompts); each batch then runs them again
//             (served from the pool) with decode_steps new tokens (plus as many as the
//             iterations the batch takes to join), and the figure is the median of its
//             pure-decode iterations (every iteration's shape is reported too). A combination whose
//             KV does not fit the pool is reported as skipped, with the bytes it needs;
//   prefill:  a fresh prompt of each length, chunked under the engine's token budget: tokens/s
//             and the model FLOPs (dense GEMMs + causal attention) per second against the GEMM
//             peak (median of repeats);
//   workload: requests arriving at once on a fresh pool (documents shared as prefixes, random
//             suffixes): completion time, tokens/s, pool hit rate, against the hardware bound
//             (uncached prefill FLOPs / GEMM peak + every decode step's weight and KV bytes /
//             copy bandwidth);
//   dense:    each dense projection of a layer and the LM head alone at 1-32 rows: cuBLAS and
//             SmallBatchGemm (each SmallGemmLayout), weight bytes read per second against the
//             copy bandwidth.
// The decode section also runs each batch once more with the model's phase events on and
// reports a decode forward's device time by phase (GEMMs, attention, other kernels, ends).
// Memory: the pool gets the device's free memory after the weights minus reserve_bytes; the
// JSON reports what the engine used beyond the weights and the pool.
//
// Thread-safety: one bench at a time per device (it measures the whole GPU).
#ifndef TOKENLAKE_ENGINE_CUDA_ENGINE_BENCH_H_
#define TOKENLAKE_ENGINE_CUDA_ENGINE_BENCH_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "tokenlake/engine/cuda/decode_gemm.h"
#include "tokenlake/engine/cuda/small_batch_gemm.h"
#include "tokenlake/engine/llama_config.h"
#include "tokenlake/engine/pool_shape.h"

namespace tokenlake::engine::cuda {

// The named model shapes: "llama2-7b" (Llama-2-7B / LWM-7B: MHA 32 heads, MLP 11008, vocab
// 32000) and "llama3-8b" (GQA 32/8, MLP 14336, vocab 128256).
// Errors: InvalidArgument naming the valid names.
absl::StatusOr<LlamaConfig> BenchModelConfig(const std::string& name);

// A workload of requests arriving at once: `documents` shared prefixes of doc_min..doc_max
// tokens, each request one document plus its own random suffix up to a total of
// prompt_min..prompt_max tokens, max_new_tokens each.
struct BenchWorkload {
  std::string name;
  int32_t requests = 64;
  int32_t documents = 8;
  int64_t doc_min = 1024;
  int64_t doc_max = 4096;
  int64_t prompt_min = 2048;
  int64_t prompt_max = 8192;
  int32_t max_new_tokens = 128;
};

struct EngineBenchOptions {
  std::string model = "llama2-7b";
  // Sections to run: any of "peaks" (always run when another section needs the peaks),
  // "decode", "prefill", "workload".
  std::vector<std::string> sections = {"decode", "prefill", "workload"};
  std::vector<int32_t> decode_batches = {1, 8, 32, 128};
  std::vector<int64_t> decode_contexts = {2048, 16384};
  int32_t decode_steps = 32;
  std::vector<int64_t> prefill_tokens = {4096, 32768};
  int32_t prefill_repeats = 3;
  std::vector<BenchWorkload> workloads = {
      {.name = "shared-prefix-64"},
      // Sixteen 2,048-token prompts, the first 1,024 tokens shared by all, 64 new tokens each.
      {.name = "sixteen-2k",
       .requests = 16,
       .documents = 1,
       .doc_min = 1024,
       .doc_max = 1024,
       .prompt_min = 2048,
       .prompt_max = 2048,
       .max_new_tokens = 64}};
  // Engine settings.
  int32_t segment_tokens = kDefaultGpuSegmentTokens;
  int64_t max_batch_tokens = 8192;
  int32_t max_batch_requests = 256;
  // Forwards of at most this many rows run their dense layers on SmallBatchGemm
  // (GpuLlamaModel::set_small_batch_rows; 0 = cuBLAS always).
  int32_t small_batch_rows = kSmallBatchDefaultRows;
  // Larger forwards of at most this many rows run them on DecodeGemm
  // (GpuLlamaModel::set_decode_gemm_rows; 0 = cuBLAS).
  int32_t decode_gemm_rows = kDecodeGemmDefaultRows;
  // And those of at most this many rows, the layers DecodeGemm reads without a split
  // (GpuLlamaModel::set_decode_gemm_unsplit_rows).
  int32_t decode_gemm_unsplit_rows = kDecodeGemmUnsplitDefaultRows;
  // Replay forwards of at most GpuLlamaModel::kGraphMaxRows rows as CUDA graphs
  // (GpuLlamaModel::set_decode_graphs).
  bool decode_graphs = true;
  // Chain the forward's kernels by programmatic dependent launch (GpuLlamaModel::set_pdl).
  bool pdl = true;
  // Device memory kept out of the pool (activations and workspaces; the requests' KV tails are
  // slots of the pool).
  int64_t reserve_bytes = int64_t{4} << 30;
  uint64_t seed = 1;
  // Non-empty: the workloads' prompts are written there as JSON ({"workloads": [{"name",
  // "max_new_tokens", "prompts": [[ids...], ...]}]}) for the transformers comparison script.
  std::string prompts_path;
};

// Runs the bench and returns its JSON (options, device, peaks, sections, memory).
// `progress` (may be empty) receives one line per step.
// Errors: InvalidArgument (bad options, naming them), FailedPrecondition (no CUDA device),
//   ResourceExhausted (the model does not fit), the engine's errors.
absl::StatusOr<nlohmann::json> RunEngineBench(
    const EngineBenchOptions& options, const std::function<void(const std::string&)>& progress);

}  // namespace tokenlake::engine::cuda

#endif  // TOKENLAKE_ENGINE_CUDA_ENGINE_BENCH_H_
