// Random Llama models for the GPU engine's tests (test-only header): a random checkpoint, the
// same weights as a CPU model (the float32 reference) and a GPU model, a small fixed shape, and
// the check of a batch's results against the CPU reference within the bf16 tolerance.
#ifndef TOKENLAKE_ENGINE_CUDA_GPU_MODEL_TESTING_H_
#define TOKENLAKE_ENGINE_CUDA_GPU_MODEL_TESTING_H_

#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "tokenlake/engine/checkpoint_testing.h"
#include "tokenlake/engine/cuda/gpu_engine.h"
#include "tokenlake/engine/cuda/gpu_llama.h"
#include "tokenlake/engine/cuda/gpu_test_util.h"
#include "tokenlake/engine/engine.h"
#include "tokenlake/engine/llama_model.h"
#include "tokenlake/engine/safetensors.h"

namespace tokenlake::engine::cuda::testing_util {

// Random weights as a safetensors image: uniform in [-a, a] with a = sqrt(3 / fan_in) (unit
// variance outputs for unit inputs), RMSNorm weights 1 + uniform(-0.2, 0.2).
inline std::string RandomCheckpoint(const LlamaConfig& c, uint64_t seed,
                                    const std::string& skip = "") {
  std::mt19937_64 rng(seed);
  return testing_checkpoint::LlamaCheckpointImage(
      c,
      [&](const std::vector<int64_t>& shape, bool norm, std::vector<float>& v) {
        const float a = norm ? 0.2f : std::sqrt(3.0f / static_cast<float>(shape.back()));
        std::uniform_real_distribution<float> u(-a, a);
        for (float& x : v) x = norm ? 1.0f + u(rng) : u(rng);
      },
      skip);
}

struct Models {
  std::unique_ptr<LlamaModel> cpu;
  std::unique_ptr<GpuLlamaModel> gpu;
};

inline Models MakeModels(const LlamaConfig& c, uint64_t seed) {
  Models m;
  auto file = SafetensorsFile::FromBytes(RandomCheckpoint(c, seed), "random");
  EXPECT_TRUE(file.ok()) << file.status();
  if (!file.ok()) return m;
  auto cpu = LlamaModel::FromSafetensors(c, **file);
  EXPECT_TRUE(cpu.ok()) << cpu.status();
  auto gpu = GpuLlamaModel::FromSafetensors(c, **file, {});
  EXPECT_TRUE(gpu.ok()) << gpu.status();
  if (cpu.ok()) m.cpu = *std::move(cpu);
  if (gpu.ok()) m.gpu = *std::move(gpu);
  return m;
}

inline LlamaConfig FixedConfig() {
  return LlamaConfig{.vocab_size = 256,
                     .hidden_size = 128,
                     .intermediate_size = 192,
                     .num_layers = 2,
                     .num_heads = 4,
                     .num_kv_heads = 2,
                     .head_dim = 64,
                     .rms_norm_eps = 1e-5f,
                     .rope_theta = 10000.0,
                     .max_position_embeddings = 4096,
                     .tie_word_embeddings = false};
}

// Each request of a batch's results (in request order) against its CPU reference, within the
// bf16 tolerance: the prompt's last logits and every decode step's.
inline void ExpectBatchMatches(const std::vector<absl::StatusOr<GpuGenerateResult>>& got,
                               const std::vector<GenerateResult>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    SCOPED_TRACE(testing::Message() << "request " << i);
    ASSERT_TRUE(got[i].ok()) << got[i].status();
    EXPECT_LE(MaxAbsDiff(got[i]->last_logits, want[i].last_logits),
              Bf16Tolerance(want[i].last_logits));
    EXPECT_LE(MaxAbsDiff(got[i]->decode_logits, want[i].decode_logits),
              Bf16Tolerance(want[i].decode_logits));
  }
}

}  // namespace tokenlake::engine::cuda::testing_util

#endif  // TOKENLAKE_ENGINE_CUDA_GPU_MODEL_TESTING_H_
