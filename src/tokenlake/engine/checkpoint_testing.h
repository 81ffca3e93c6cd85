// Test- and benchmark-only: Llama checkpoints (the Hugging Face tensor names and shapes of a
// LlamaForCausalLM, LlamaCheckpointTensors) with values from the caller, as a safetensors image
// in memory or as a checkpoint folder (one file or shards), so that tests and benchmarks build
// random models through the real loaders.
//
// Thread-safety: pure functions (the fill callback's own state aside); folder writers as
// checkpoint_writer.h.
#ifndef TOKENLAKE_ENGINE_CHECKPOINT_TESTING_H_
#define TOKENLAKE_ENGINE_CHECKPOINT_TESTING_H_

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "tokenlake/attention/bf16.h"
#include "tokenlake/engine/checkpoint_writer.h"
#include "tokenlake/engine/llama_config.h"
#include "tokenlake/engine/safetensors.h"

namespace tokenlake::engine::testing_checkpoint {

// Fills `values` (already sized to the tensor's element count) of a tensor of `shape`; `norm`
// is true for the RMSNorm weights.
using TensorFill =
    std::function<void(const std::vector<int64_t>& shape, bool norm, std::vector<float>& values)>;

// Every tensor of `c` in the order of LlamaCheckpointTensors, each filled by `fill` in that
// order and stored as `dtype` (F32; BF16 or F16 rounded to nearest even from the filled
// values); the tensor named `skip` (if any) is left out, without calling `fill` for it.
inline std::vector<TensorToWrite> LlamaTensorsFilled(const LlamaConfig& c, const TensorFill& fill,
                                                     TensorDtype dtype = TensorDtype::kF32,
                                                     const std::string& skip = "") {
  std::vector<TensorToWrite> tensors;
  for (LlamaTensorSpec& spec : LlamaCheckpointTensors(c)) {
    if (spec.name == skip) continue;
    int64_t n = 1;
    for (int64_t d : spec.shape) n *= d;
    std::vector<float> v(static_cast<size_t>(n));
    fill(spec.shape, spec.is_norm(), v);
    std::string bytes(v.size() * static_cast<size_t>(TensorDtypeBytes(dtype)), '\0');
    for (size_t i = 0; i < v.size(); ++i) {
      if (dtype == TensorDtype::kF32) {
        std::memcpy(bytes.data() + 4 * i, &v[i], 4);
      } else {
        const uint16_t bits =
            dtype == TensorDtype::kBF16 ? attention::FloatToBf16(v[i]) : FloatToHalf(v[i]);
        std::memcpy(bytes.data() + 2 * i, &bits, 2);
      }
    }
    tensors.push_back({std::move(spec.name), dtype, std::move(spec.shape), std::move(bytes)});
  }
  return tensors;
}

// The float32 safetensors image of LlamaTensorsFilled(c, fill, kF32, skip).
inline std::string LlamaCheckpointImage(const LlamaConfig& c, const TensorFill& fill,
                                        const std::string& skip = "") {
  return SerializeSafetensors(LlamaTensorsFilled(c, fill, TensorDtype::kF32, skip));
}

// Writes `dir`/config.json for `c` and `tensors` as a checkpoint folder (WriteCheckpoint:
// num_shards == 0 one model.safetensors, else tensor i into shard shard_of[i]).
inline absl::Status WriteTensorsCheckpoint(const std::string& dir, const LlamaConfig& c,
                                           const std::vector<TensorToWrite>& tensors,
                                           const std::vector<int32_t>& shard_of,
                                           int32_t num_shards) {
  if (absl::Status s = WriteLlamaConfig(dir, c); !s.ok()) return s;
  std::vector<TensorLayout> layout;
  for (const auto& t : tensors) layout.push_back({t.name, t.dtype, t.shape});
  return WriteCheckpoint(dir, layout, shard_of, num_shards,
                         [&](size_t i, int64_t offset, absl::Span<std::byte> out) {
                           std::memcpy(out.data(), tensors[i].bytes.data() + offset, out.size());
                         });
}

}  // namespace tokenlake::engine::testing_checkpoint

#endif  // TOKENLAKE_ENGINE_CHECKPOINT_TESTING_H_
