#include "tokenlake/engine/checkpoint.h"

#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <set>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"
#include "tokenlake/base/status_macros.h"

namespace tokenlake::engine {
namespace {

using json = nlohmann::json;

bool FileExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// Why a shard name would leave the checkpoint folder (or cannot name a file), or "" if it is a
// plain relative path. The check is on the name only: a shard that is a symbolic link is
// followed (the Hugging Face cache links every file of a snapshot to a blob elsewhere).
std::string UnsafeShardName(const std::string& shard) {
  if (shard.empty()) return "is empty";
  if (shard.find('\0') != std::string::npos) return "contains a NUL byte";
  if (shard.find('\\') != std::string::npos) return "contains a backslash";
  if (shard.front() == '/') return "is an absolute path";
  for (absl::string_view part : absl::StrSplit(shard, '/')) {
    if (part == "..") return "has a '..' component (it would leave the checkpoint folder)";
  }
  return "";
}

}  // namespace

absl::StatusOr<CheckpointIndex> ParseCheckpointIndex(const std::string& json_text,
                                                     const std::string& src) {
  const json doc = json::parse(json_text, nullptr, false);
  if (doc.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(src, ": not valid JSON"));
  if (!doc.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(src, ": not a JSON object"));
  }
  auto meta = doc.find("metadata");
  if (meta != doc.end() && !meta->is_null() && !meta->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(src, ": 'metadata' is not an object"));
  }
  auto map = doc.find("weight_map");
  if (map == doc.end() || !map->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(src, ": missing or non-object 'weight_map' (tensor name -> shard file)"));
  }
  if (map->empty()) return absl::InvalidArgumentError(absl::StrCat(src, ": 'weight_map' is empty"));
  CheckpointIndex index;
  std::set<std::string> shards;
  for (auto it = map->begin(); it != map->end(); ++it) {
    if (!it.value().is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(src, ": weight_map entry of tensor '", it.key(), "' is not a string"));
    }
    const std::string shard = it.value().get<std::string>();
    if (const std::string why = UnsafeShardName(shard); !why.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(src, ": shard '", shard, "' of tensor '", it.key(), "' ", why));
    }
    index.weight_map.emplace(it.key(), shard);
    shards.insert(shard);
  }
  index.shards.assign(shards.begin(), shards.end());
  return index;
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  const std::string single = dir + "/" + kSafetensorsFileName;
  const std::string index_path = dir + "/" + kSafetensorsIndexFileName;
  std::unique_ptr<Checkpoint> ckpt(new Checkpoint());
  if (FileExists(single) || !FileExists(index_path)) {
    if (!FileExists(single)) {
      return absl::NotFoundError(absl::StrCat(dir, ": no checkpoint: neither ",
                                              kSafetensorsFileName, " nor ",
                                              kSafetensorsIndexFileName, " is in the folder"));
    }
    TOKENLAKE_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file,
                               SafetensorsFile::Open(single));
    ckpt->source_name_ = single;
    ckpt->shards_.push_back(file.get());
    ckpt->owned_.push_back(std::move(file));
    TOKENLAKE_RETURN_IF_ERROR(ckpt->AddTensorsOf(ckpt->shards_.back()));
    return ckpt;
  }

  std::ifstream in(index_path);
  if (!in) return absl::NotFoundError(absl::StrCat(index_path, ": cannot open the index"));
  std::stringstream text;
  text << in.rdbuf();
  TOKENLAKE_ASSIGN_OR_RETURN(CheckpointIndex index, ParseCheckpointIndex(text.str(), index_path));
  ckpt->source_name_ = index_path;
  // A tensor mapped to each shard, for messages.
  std::map<std::string, std::string> example;
  for (const auto& [name, shard] : index.weight_map) example.emplace(shard, name);
  for (const std::string& shard : index.shards) {
    const std::string path = dir + "/" + shard;
    if (!FileExists(path)) {
      return absl::NotFoundError(absl::StrCat(path, ": shard file missing (", index_path,
                                              " maps tensor '", example[shard], "' to it)"));
    }
    TOKENLAKE_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(path));
    ckpt->shards_.push_back(file.get());
    ckpt->owned_.push_back(std::move(file));
    TOKENLAKE_RETURN_IF_ERROR(ckpt->AddTensorsOf(ckpt->shards_.back()));
  }
  // The shards and the index must agree, tensor by tensor, both ways.
  for (const auto& [name, shard] : index.weight_map) {
    auto it = ckpt->tensors_.find(name);
    if (it == ckpt->tensors_.end()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": tensor '", name,
                                                     "' is mapped to ", dir, "/", shard,
                                                     ", which does not hold it"));
    }
    if (it->second.shard->source_name() != dir + "/" + shard) {
      return absl::InvalidArgumentError(absl::StrCat(
          index_path, ": tensor '", name, "' is mapped to ", dir, "/", shard, " but is in ",
          it->second.shard->source_name(), " (and not in the shard it is mapped to)"));
    }
  }
  for (const auto& [name, t] : ckpt->tensors_) {
    if (!index.weight_map.contains(name)) {
      return absl::InvalidArgumentError(absl::StrCat(t.shard->source_name(), ": tensor '", name,
                                                     "' is not listed in ", index_path));
    }
  }
  return ckpt;
}

std::unique_ptr<Checkpoint> Checkpoint::Borrow(const SafetensorsFile& file) {
  std::unique_ptr<Checkpoint> ckpt(new Checkpoint());
  ckpt->source_name_ = file.source_name();
  ckpt->shards_.push_back(&file);
  // One file cannot hold a name twice: this cannot fail.
  absl::Status s = ckpt->AddTensorsOf(&file);
  (void)s;
  return ckpt;
}

absl::Status Checkpoint::AddTensorsOf(const SafetensorsFile* shard) {
  for (const auto& [name, info] : shard->tensors()) {
    auto [it, inserted] = tensors_.emplace(name, CheckpointTensor{shard, &info});
    if (!inserted) {
      return absl::InvalidArgumentError(absl::StrCat(
          source_name_, ": tensor '", name, "' is in two shards: ", it->second.shard->source_name(),
          " and ", shard->source_name()));
    }
    total_bytes_ += info.end - info.begin;
  }
  return absl::OkStatus();
}

const CheckpointTensor* Checkpoint::Find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

absl::StatusOr<const CheckpointTensor*> Checkpoint::FindFloat(
    const std::string& name, absl::Span<const int64_t> expected_shape) const {
  const CheckpointTensor* t = Find(name);
  if (t == nullptr) {
    return absl::NotFoundError(absl::StrCat(source_name_, ": missing tensor '", name, "'"));
  }
  const std::vector<int64_t>& shape = t->info->shape;
  if (!std::equal(shape.begin(), shape.end(), expected_shape.begin(), expected_shape.end())) {
    return absl::InvalidArgumentError(absl::StrCat(
        t->shard->source_name(), ": tensor '", name, "' has shape [", absl::StrJoin(shape, ", "),
        "], expected [", absl::StrJoin(expected_shape, ", "), "]"));
  }
  const TensorDtype d = t->info->dtype;
  if (d != TensorDtype::kF32 && d != TensorDtype::kBF16 && d != TensorDtype::kF16) {
    return absl::UnimplementedError(absl::StrCat(t->shard->source_name(), ": tensor '", name,
                                                 "' has dtype ", TensorDtypeName(d),
                                                 "; only F32, BF16 and F16 are supported"));
  }
  return t;
}

absl::StatusOr<std::vector<float>> Checkpoint::ReadFloat32(
    const std::string& name, absl::Span<const int64_t> expected_shape) const {
  const CheckpointTensor* t = Find(name);
  if (t == nullptr) {
    return absl::NotFoundError(absl::StrCat(source_name_, ": missing tensor '", name, "'"));
  }
  return t->shard->ReadFloat32(name, expected_shape);
}

}  // namespace tokenlake::engine
