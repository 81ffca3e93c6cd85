#include "tokenlake/service/cluster_testing.h"

#include <cstdlib>

#include "absl/time/time.h"
#include "tokenlake/attention/attention.h"
#include "tokenlake/engine/pool_shape.h"

namespace tokenlake::service {

std::string TestSourceDir() {
  const char* d = std::getenv("TOKENLAKE_SOURCE_DIR");
  return d != nullptr ? d : ".";
}

std::string TestModelDir() { return TestSourceDir() + "/tests/fixtures/llama_tiny/model"; }

CoordinatorOptions SmallClusterOptions(const engine::LlamaConfig& config,
                                       const std::string& cluster_secret) {
  CoordinatorOptions options;
  options.limits = {.vocab_size = 512, .context_tokens = 4096, .max_tokens_limit = 64};
  options.heartbeat_interval = absl::Milliseconds(50);
  options.dead_after = absl::Milliseconds(400);
  options.lake_instances = 2;
  options.slots_per_instance = 256;
  options.model = engine::PoolModelShape(config, attention::KvDtype::kFloat32);
  options.cluster_secret = cluster_secret;
  return options;
}

}  // namespace tokenlake::service
