// libFuzzer target: the Mooncake JSON-lines trace reader (sim/workload.h). Any input must give
// a workload or a clear error, never a crash or a sanitizer report.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <string>

#include "tokenlake/sim/workload.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::istringstream in(std::string(reinterpret_cast<const char*>(data), size));
  auto w = tokenlake::sim::ParseMooncakeTrace(in, "fuzz.jsonl");
  if (!w.ok() && w.status().message().empty()) std::abort();
  return 0;
}
