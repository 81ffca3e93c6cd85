// `tokenlake profile --json OUT`: measures this machine's GPU for the simulator's cost model and
// writes the GPU-profile JSON that `tokenlake sim --gpu FILE` reads (schema in
// src/tokenlake/sched/cost_model.h): device copy bandwidth, cuBLAS bf16 GEMM rate, the dense layers
// of Llama-3-8B (qkv, o, gate-up, down over 32 layers) by batch tokens, the prefill FLOP/s and
// decode bytes/s of our paged attention kernels (GQA 32/8, head_dim 128, bf16, 32K-token pooled
// prefix in 512-token segments), and (forward_ms) the GPU engine's forward pass of Llama-3-8B
// with attention left out, by batch tokens: what an iteration of the engine runs besides
// attention. Needs the CUDA build (`cuda` preset); without it the command prints an error and
// exits 1.
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "CLI/CLI.hpp"
#include "command.h"

#ifdef TOKENLAKE_HAVE_CUDA
#include <cuda_runtime_api.h>

#include <algorithm>
#include <random>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/cuda/engine_bench.h"
#include "tokenlake/engine/cuda/gpu_llama.h"
#include "tokenlake/profile/gpu_profile.h"
#endif

namespace {

struct ProfileFlags {
  std::string json_path;
  std::vector<int64_t> dense_tokens = {1, 64, 256, 1024, 4096, 16384};
  // The engine forward's batch sizes: decode batches, mixed iterations and prefill chunks up to
  // twice the engine's default token budget.
  std::vector<int64_t> forward_tokens = {1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384};
  bool skip_forward = false;
  int repeats = 10;
};

#ifdef TOKENLAKE_HAVE_CUDA
namespace ecuda = tokenlake::engine::cuda;

// Attention left out: writes zeros as the attention output and keeps no KV, so that a forward
// times everything else the engine runs. The output is the model's activation buffer, reused
// by every layer and forward: it is zeroed once per buffer and size, not at every call.
class NoAttention final : public ecuda::GpuAttentionBackend {
 public:
  explicit NoAttention(int64_t out_row_floats) : row_floats_(out_row_floats) {}

  absl::Status Attend(int32_t layer, int32_t num_tokens, const uint16_t* q, const uint16_t* k,
                      const uint16_t* v, float* out, cudaStream_t stream) override {
    (void)layer, (void)q, (void)k, (void)v;
    const size_t bytes =
        static_cast<size_t>(num_tokens) * static_cast<size_t>(row_floats_) * sizeof(float);
    if (out == zeroed_ && bytes <= zeroed_bytes_) return absl::OkStatus();
    if (cudaError_t e = cudaMemsetAsync(out, 0, bytes, stream); e != cudaSuccess) {
      return absl::InternalError(
          absl::StrFormat("cudaMemsetAsync of the attention output: %s", cudaGetErrorString(e)));
    }
    zeroed_ = out;
    zeroed_bytes_ = bytes;
    return absl::OkStatus();
  }

 private:
  int64_t row_floats_;
  float* zeroed_ = nullptr;
  size_t zeroed_bytes_ = 0;
};

// The GPU engine's forward of Llama-3-8B (random weights, cuBLAS as the engine runs it) with
// attention left out, at each batch size in `tokens`: the median device time of `repeats`
// forwards after two warm-ups (GpuLlamaModel::last_forward_gpu_ms), ms. A batch of up to 256
// tokens is that many one-token sequences (a decode batch: an LM head row and an argmax each),
// a larger one a single sequence (a prefill chunk: one LM head row).
absl::StatusOr<std::vector<std::pair<int64_t, double>>> MeasureEngineForward(
    const std::vector<int64_t>& tokens, int repeats) {
  constexpr int64_t kDecodeBatchMax = 256;
  TOKENLAKE_ASSIGN_OR_RETURN(tokenlake::engine::LlamaConfig config,
                             ecuda::BenchModelConfig("llama3-8b"));
  TOKENLAKE_ASSIGN_OR_RETURN(std::unique_ptr<ecuda::GpuLlamaModel> model,
                             ecuda::GpuLlamaModel::CreateRandom(config, 1, 0.02f, {}));
  NoAttention none(int64_t{config.num_heads} * config.head_dim);
  std::mt19937_64 rng(1);
  std::vector<std::pair<int64_t, double>> points;
  for (int64_t t : tokens) {
    if (t < 1 || t > (int64_t{1} << 20)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("--forward-tokens: %d is outside [1, 1048576]", t));
    }
    std::vector<int32_t> ids(static_cast<size_t>(t));
    for (int32_t& id : ids) {
      id = static_cast<int32_t>(rng() % static_cast<uint64_t>(config.vocab_size));
    }
    std::vector<ecuda::GpuSequenceInput> seqs;
    if (t <= kDecodeBatchMax) {
      for (int64_t i = 0; i < t; ++i) {
        seqs.push_back({.tokens = absl::MakeConstSpan(&ids[static_cast<size_t>(i)], 1),
                        .start_pos = 2048,
                        .logits = ecuda::GpuSequenceInput::Logits::kArgmax});
      }
    } else {
      seqs.push_back(
          {.tokens = ids, .start_pos = 0, .logits = ecuda::GpuSequenceInput::Logits::kArgmax});
    }
    std::vector<double> ms;
    for (int r = 0; r < repeats + 2; ++r) {
      absl::StatusOr<ecuda::GpuBatchOutput> out = model->ForwardBatch(seqs, none);
      if (!out.ok()) {
        return absl::Status(
            out.status().code(),
            absl::StrFormat("the engine's forward of %d tokens: %s", t, out.status().message()));
      }
      if (r >= 2) ms.push_back(model->last_forward_gpu_ms());
    }
    std::sort(ms.begin(), ms.end());
    points.emplace_back(t, ms[ms.size() / 2]);
    std::fprintf(stderr,
                 "tokenlake profile: engine forward without attention, %ld tokens: %.3f ms\n",
                 static_cast<long>(t), ms[ms.size() / 2]);
  }
  return points;
}

int RunProfile(const ProfileFlags& flags) {
  absl::StatusOr<std::string> text =
      tokenlake::profile::MeasureGpuProfileJson(flags.dense_tokens, flags.repeats);
  if (!text.ok()) {
    std::fprintf(stderr, "tokenlake profile: %s\n", text.status().ToString().c_str());
    return 1;
  }
  nlohmann::json json = nlohmann::json::parse(*text);
  if (!flags.skip_forward) {
    // Measured after the rest, whose device buffers are freed by then (the model takes 16 GB).
    auto forward = MeasureEngineForward(flags.forward_tokens, flags.repeats);
    if (!forward.ok()) {
      // The other measurements stand on their own: the profile is written without forward_ms
      // (the simulator then charges dense_ms), and the failure is reported.
      std::fprintf(stderr,
                   "tokenlake profile: the engine's forward (forward_ms) was not measured: %s\n",
                   forward.status().ToString().c_str());
    } else {
      json["forward_ms"] = nlohmann::json::array();
      for (const auto& [tokens, ms] : *forward) json["forward_ms"].push_back({tokens, ms});
      json["measured"]["forward"] =
          "the GPU engine's forward pass (engine/cuda/gpu_llama.h) of Llama-3-8B, random bf16 "
          "weights, attention left out (its output zeros): GEMMs with float32 outputs, RMSNorm, "
          "RoPE, SiLU x up, bf16 conversions, embedding, final norm and LM head; up to 256 "
          "tokens as one-token sequences (decodes), beyond as one sequence; device time, median";
    }
  }
  const std::string out_text = json.dump(2);
  std::ofstream out(flags.json_path);
  out << out_text << "\n";
  out.close();
  if (!out) {
    std::fprintf(stderr, "tokenlake profile: cannot write '%s'\n", flags.json_path.c_str());
    return 1;
  }
  std::printf("%s\n", out_text.c_str());
  return 0;
}
#else
int RunProfile(const ProfileFlags&) {
  std::fprintf(stderr,
               "tokenlake profile: this build has no CUDA support; rebuild with the `cuda` preset "
               "(cmake --preset cuda) on a machine with nvcc to measure a GPU\n");
  return 1;
}
#endif

void SetUpProfile(CLI::App& app, int* exit_code) {
  auto flags = std::make_shared<ProfileFlags>();
  CLI::App* cmd = app.add_subcommand(
      "profile", "Measure this machine's GPU and write the simulator's GPU-profile JSON");
  cmd->add_option("--json", flags->json_path, "Output file for the GPU profile JSON")->required();
  cmd->add_option("--dense-tokens", flags->dense_tokens, "Batch token counts of the dense profile");
  cmd->add_option("--forward-tokens", flags->forward_tokens,
                  "Batch token counts of the engine forward's profile (forward_ms)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  cmd->add_flag("--skip-forward", flags->skip_forward,
                "Do not measure the engine's forward (forward_ms; needs 17 GB of device memory)");
  cmd->add_option("--repeats", flags->repeats, "Timed repeats per dense point (median)")
      ->check(CLI::Range(1, 1000));
  cmd->callback([flags, exit_code] { *exit_code = RunProfile(*flags); });
}

}  // namespace

TOKENLAKE_REGISTER_COMMAND(profile, SetUpProfile);
