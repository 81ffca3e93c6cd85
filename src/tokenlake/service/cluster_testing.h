// Shared set-up of the cluster tests (cluster_inprocess_test.cc, cluster_tls_test.cc,
// election_test.cc, tests/service_cluster_test.cc): where the small model checkpoint they run
// lives, and the coordinator options sized for a two-instance cluster of it. One place, so that
// the tests cannot drift apart in what "the test cluster" means. Used only by tests.
//
// Thread-safety: the functions are pure (they read the environment) and may be called from any
// thread.
#ifndef TOKENLAKE_SERVICE_CLUSTER_TESTING_H_
#define TOKENLAKE_SERVICE_CLUSTER_TESTING_H_

#include <string>

#include "tokenlake/engine/llama_config.h"
#include "tokenlake/service/coordinator.h"

namespace tokenlake::service {

// The source tree: $TOKENLAKE_SOURCE_DIR (ctest sets it for every test), else "." (a test binary
// run by hand from the repository root).
std::string TestSourceDir();

// The small model checkpoint folder of the tests: TestSourceDir() + "/tests/fixtures/llama_tiny/
// model" (a 512-token vocabulary).
std::string TestModelDir();

// Coordinator options for a cluster of two instances of the test model (`config`, as loaded from
// TestModelDir()): limits of the tiny model (vocabulary 512, context 4096, at most 64 new
// tokens), fast failure detection (heartbeats every 50 ms, dead after 400 ms), a lake of 2
// instances with 256 slots each over float32 KV, and `cluster_secret`. The other fields keep
// their defaults; a test sets what it needs beyond these (e.g. attempt_timeout, tls) itself.
CoordinatorOptions SmallClusterOptions(const engine::LlamaConfig& config,
                                       const std::string& cluster_secret);

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_CLUSTER_TESTING_H_
