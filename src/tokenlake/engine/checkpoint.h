// Checkpoint: the tensors of a Hugging Face checkpoint folder, as users have them: one
// `model.safetensors`, or `model.safetensors.index.json` with its shards.
//
// The index is JSON: {"metadata": {...}, "weight_map": {tensor name -> shard file name}}; every
// shard is a safetensors file in the same folder. Each file is mapped read-only through
// SafetensorsFile (nothing is copied at open: the OS pages the bytes in on demand) and every
// header is validated at open, so a successful Open means every Find / Data below is safe.
//
// A checkpoint that has both files is read from model.safetensors (the order transformers uses).
//
// Thread-safety: immutable after construction; every const method is safe from any thread.
#ifndef TOKENLAKE_ENGINE_CHECKPOINT_H_
#define TOKENLAKE_ENGINE_CHECKPOINT_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tokenlake/engine/safetensors.h"

namespace tokenlake::engine {

// The file names the Hugging Face format uses inside a checkpoint folder.
inline constexpr char kSafetensorsFileName[] = "model.safetensors";
inline constexpr char kSafetensorsIndexFileName[] = "model.safetensors.index.json";

// A parsed and validated index: tensor name -> shard file name (relative to the folder), and
// the distinct shard names, sorted.
struct CheckpointIndex {
  std::map<std::string, std::string> weight_map;
  std::vector<std::string> shards;
};

// Parses the text of a model.safetensors.index.json. `source_name` prefixes every message.
// Errors: InvalidArgument when the text is not a JSON object, has no "weight_map" object, the
//   map is empty or one of its values is not a string, "metadata" is present but not an object,
//   or a shard name is empty, absolute, has a ".." component or a backslash (it would escape
//   the folder) or a NUL; messages name the tensor and the shard.
absl::StatusOr<CheckpointIndex> ParseCheckpointIndex(const std::string& json_text,
                                                     const std::string& source_name);

// One tensor of the checkpoint: its entry and the shard holding it.
struct CheckpointTensor {
  const SafetensorsFile* shard = nullptr;
  const TensorInfo* info = nullptr;
};

class Checkpoint {
 public:
  // Opens the checkpoint folder `dir`: model.safetensors if present, else
  // model.safetensors.index.json and every shard it names.
  // Errors: NotFound (neither file exists, naming the folder and both names; a shard file is
  //   missing, naming it, the index and one tensor mapped to it), InvalidArgument (as
  //   ParseCheckpointIndex; a shard lacks a tensor the index maps to it; a tensor sits in two
  //   shards; a shard holds a tensor the index does not list or maps to another shard; each
  //   message names the files and the tensor), and SafetensorsFile::Open's errors for a bad
  //   shard (naming the shard).
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  // A checkpoint over one already opened file, which it borrows. REQUIRES: `file` outlives the
  // result.
  static std::unique_ptr<Checkpoint> Borrow(const SafetensorsFile& file);

  Checkpoint(const Checkpoint&) = delete;
  Checkpoint& operator=(const Checkpoint&) = delete;

  // The tensor called `name` in whichever shard holds it, or nullptr.
  const CheckpointTensor* Find(const std::string& name) const;
  // Every tensor, by name.
  const std::map<std::string, CheckpointTensor>& tensors() const { return tensors_; }
  // The files, in the index's order (one for a single-file checkpoint).
  const std::vector<const SafetensorsFile*>& shards() const { return shards_; }
  // The raw bytes of `tensor`. REQUIRES: it came from this checkpoint.
  absl::Span<const std::byte> Data(const CheckpointTensor& tensor) const {
    return tensor.shard->Data(*tensor.info);
  }
  // Sum of every tensor's bytes.
  int64_t total_bytes() const { return total_bytes_; }
  // The index file's path, or the single file's name: what messages about the whole checkpoint
  // name.
  const std::string& source_name() const { return source_name_; }

  // Tensor `name`, checked to have `expected_shape` and a floating-point dtype (F32, BF16, F16):
  // what a loader that converts on its own (the GPU upload) needs.
  // Errors: NotFound naming source_name() and the tensor when no shard holds it;
  //   InvalidArgument naming the shard, the tensor and both shapes; Unimplemented naming the
  //   shard, the tensor and its dtype.
  absl::StatusOr<const CheckpointTensor*> FindFloat(const std::string& name,
                                                    absl::Span<const int64_t> expected_shape) const;

  // Tensor `name` converted to float32 after a shape check, as SafetensorsFile::ReadFloat32
  // (its messages name the shard). Errors: NotFound naming source_name() and the tensor when
  // no shard holds it; the shard's ReadFloat32 errors otherwise.
  absl::StatusOr<std::vector<float>> ReadFloat32(const std::string& name,
                                                 absl::Span<const int64_t> expected_shape) const;

 private:
  Checkpoint() = default;
  absl::Status AddTensorsOf(const SafetensorsFile* shard);

  std::string source_name_;
  std::vector<std::unique_ptr<SafetensorsFile>> owned_;
  std::vector<const SafetensorsFile*> shards_;
  std::map<std::string, CheckpointTensor> tensors_;
  int64_t total_bytes_ = 0;
};

}  // namespace tokenlake::engine

#endif  // TOKENLAKE_ENGINE_CHECKPOINT_H_
