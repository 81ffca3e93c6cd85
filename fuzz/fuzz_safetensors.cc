// libFuzzer target: the safetensors reader (engine/safetensors.h) over bytes in memory. Any
// input must give a file whose accessors are safe, or a clear error.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "tokenlake/engine/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto f = tokenlake::engine::SafetensorsFile::FromBytes(
      std::string(reinterpret_cast<const char*>(data), size), "fuzz.safetensors");
  if (!f.ok() && f.status().message().empty()) std::abort();
  return 0;
}
