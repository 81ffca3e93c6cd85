// libFuzzer target: the parser of a sharded checkpoint's model.safetensors.index.json
// (engine/checkpoint.h). Any input must give a validated index (every shard name a plain
// relative path) or a clear error.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "tokenlake/engine/checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto index = tokenlake::engine::ParseCheckpointIndex(
      std::string(reinterpret_cast<const char*>(data), size), "fuzz.index.json");
  if (!index.ok()) {
    if (index.status().message().empty()) std::abort();
    return 0;
  }
  if (index->weight_map.empty() || index->shards.empty()) std::abort();
  for (const auto& [name, shard] : index->weight_map) {
    if (shard.empty() || shard.front() == '/') std::abort();
    // No ".." component.
    const std::string padded = "/" + shard + "/";
    if (padded.find("/../") != std::string::npos) std::abort();
  }
  return 0;
}
