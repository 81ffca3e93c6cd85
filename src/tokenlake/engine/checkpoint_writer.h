// Writing checkpoint folders in the Hugging Face layout that Checkpoint::Open reads: one
// model.safetensors, or model-0000i-of-0000n.safetensors shards with a
// model.safetensors.index.json. The bytes are streamed to disk in pieces, so a checkpoint of
// many gigabytes is never held in memory (the load benchmark writes a 13.5 GB one).
//
// Thread-safety: free functions; concurrent calls must write to different folders.
#ifndef TOKENLAKE_ENGINE_CHECKPOINT_WRITER_H_
#define TOKENLAKE_ENGINE_CHECKPOINT_WRITER_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "tokenlake/engine/llama_config.h"
#include "tokenlake/engine/safetensors.h"

namespace tokenlake::engine {

// Writes bytes [offset, offset + out.size()) of tensor `index` into `out`.
using TensorBytesFill =
    std::function<void(size_t index, int64_t offset, absl::Span<std::byte> out)>;

// The shard file name of shard `i` (0-based) of `num_shards`: "model-00001-of-00003.safetensors".
std::string ShardFileName(int32_t i, int32_t num_shards);

// Shards for `tensors` in order, contiguous runs of about equal bytes (as the Hugging Face
// writer splits), shard_of[i] in [0, num_shards). REQUIRES: num_shards >= 1.
std::vector<int32_t> ContiguousShards(const std::vector<TensorLayout>& tensors, int32_t num_shards);

// Writes the tensors into the existing folder `dir`. num_shards == 0: one model.safetensors
// (shard_of unused); num_shards >= 1: tensor i goes to shard shard_of[i] (in order within a
// shard), and model.safetensors.index.json maps every tensor to its shard (metadata
// total_size = the tensors' bytes). A shard may be left empty. `fill` is called once per
// piece of at most 8 MiB, in file order.
// Errors: InvalidArgument (shard_of's size or a value out of range, num_shards < 0),
//   Internal naming the file when it cannot be written.
absl::Status WriteCheckpoint(const std::string& dir, const std::vector<TensorLayout>& tensors,
                             const std::vector<int32_t>& shard_of, int32_t num_shards,
                             const TensorBytesFill& fill);

// Writes `dir`/config.json (LlamaConfigJson). Errors: Internal naming the file.
absl::Status WriteLlamaConfig(const std::string& dir, const LlamaConfig& config);

// A random checkpoint of `config` in `dir` (config.json and the weights, in `dtype`: F32, BF16
// or F16), with num_shards as WriteCheckpoint (contiguous shards). Weights are uniform in
// [-a, a], a = sqrt(3 / fan_in) (unit-variance outputs), RMSNorm weights 1 + uniform(-0.2,
// 0.2); the values are 65,536 evenly spaced levels of that range picked by a counter-based
// hash of (seed, tensor, element), which writes gigabytes per second.
// Errors: InvalidArgument (dtype), and those of WriteCheckpoint / WriteLlamaConfig.
absl::Status WriteRandomLlamaCheckpoint(const std::string& dir, const LlamaConfig& config,
                                        TensorDtype dtype, int32_t num_shards, uint64_t seed);

}  // namespace tokenlake::engine

#endif  // TOKENLAKE_ENGINE_CHECKPOINT_WRITER_H_
