// Test-only helpers shared by the engine's tests on the CPU (engine/) and on the GPU
// (engine/cuda/): the transformers fixture of tests/fixtures/llama_tiny (see its README), and an
// oracle of the cached prefix that is independent of the engine and the lake.
//
// Thread-safety: LoadLlamaTinyFixture is safe to call from several threads (a function-local
// static); the rest are pure functions.
#ifndef TOKENLAKE_ENGINE_FIXTURE_TEST_UTIL_H_
#define TOKENLAKE_ENGINE_FIXTURE_TEST_UTIL_H_

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"

namespace tokenlake::engine::testing_fixture {

// tests/fixtures/llama_tiny under $TOKENLAKE_SOURCE_DIR (ctest sets it), or under the current
// directory.
inline std::string LlamaTinyDir() {
  const char* src = std::getenv("TOKENLAKE_SOURCE_DIR");
  return std::string(src != nullptr ? src : ".") + "/tests/fixtures/llama_tiny";
}

struct LlamaTinyFixture {
  // prompts.jsonl's input_ids, in order.
  std::vector<std::vector<int32_t>> prompts;
  // expected.json (null when the file is missing: the caller's prompts check fails first).
  nlohmann::json expected;
};

// Reads the fixture once. A missing directory gives no prompts (tests assert on that, naming
// LlamaTinyDir()).
inline const LlamaTinyFixture& LoadLlamaTinyFixture() {
  static const LlamaTinyFixture* fixture = [] {
    auto* f = new LlamaTinyFixture();
    std::ifstream prompts(LlamaTinyDir() + "/prompts.jsonl");
    std::string line;
    while (std::getline(prompts, line)) {
      if (line.empty()) continue;
      f->prompts.push_back(nlohmann::json::parse(line)["input_ids"].get<std::vector<int32_t>>());
    }
    std::ifstream expected(LlamaTinyDir() + "/expected.json");
    if (expected) f->expected = nlohmann::json::parse(expected);
    return f;
  }();
  return *fixture;
}

// Independent of the engine: the longest prefix of `prompt` (in whole segments of `s` tokens,
// leaving at least one token to compute) that an earlier sequence's full segments cover.
// `histories` holds, for every earlier request, the tokens whose KV was computed (prompt + the
// fed tokens: every generated token but the last).
inline int64_t ExpectedCachedTokens(const std::vector<int32_t>& prompt,
                                    const std::vector<std::vector<int32_t>>& histories, int32_t s) {
  int64_t best = 0;
  for (const auto& h : histories) {
    int64_t common = 0;
    while (common < static_cast<int64_t>(prompt.size()) &&
           common < static_cast<int64_t>(h.size()) && prompt[common] == h[common]) {
      ++common;
    }
    const int64_t full_in_h = static_cast<int64_t>(h.size()) / s * s;
    int64_t usable = std::min(common, full_in_h);
    usable = std::min<int64_t>(usable, static_cast<int64_t>(prompt.size()) - 1);
    best = std::max(best, usable / s * s);
  }
  return best;
}

}  // namespace tokenlake::engine::testing_fixture

#endif  // TOKENLAKE_ENGINE_FIXTURE_TEST_UTIL_H_
