// Encoding and streamed decoding speed of the fixture tokenizers (tests/fixtures/tokenizer) on
// mixed-script prose, in bytes per second.
#include <cstdlib>
#include <string>

#include "benchmark/benchmark.h"
#include "tokenlake/base/check.h"
#include "tokenlake/tokenizer/tokenizer.h"

namespace tokenlake::tokenizer {
namespace {

const Tokenizer& Fixture(int which) {
  static const char* const kNames[] = {"bpe_llama3", "bpe_gpt2", "bpe_qwen2", "spm_llama2"};
  static const Tokenizer* loaded[4] = {};
  if (loaded[which] == nullptr) {
    const char* src = std::getenv("TOKENLAKE_SOURCE_DIR");
    auto tok = Tokenizer::FromDir(std::string(src != nullptr ? src : ".") +
                                  "/tests/fixtures/tokenizer/" + kNames[which]);
    TOKENLAKE_CHECK_OK(tok.status());
    loaded[which] = tok->release();
  }
  return *loaded[which];
}

std::string Prose(size_t bytes) {
  const std::string unit =
      "The pool keeps the key and value tensors of shared prefixes, so a request skips most of "
      "its prefill. Grüße aus München! "
      "Привет, как дела? "
      "你好，世界。 🙂🚀 "
      "12345 ... "
      "\n\n";
  std::string out;
  while (out.size() < bytes) out += unit;
  return out;
}

void BM_Encode(benchmark::State& state) {
  const Tokenizer& tok = Fixture(static_cast<int>(state.range(0)));
  const std::string text = Prose(64 << 10);
  for (auto _ : state) {
    auto ids = tok.Encode(text, true);
    benchmark::DoNotOptimize(ids);
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(text.size()));
}
BENCHMARK(BM_Encode)->DenseRange(0, 3);

void BM_DecodeStream(benchmark::State& state) {
  const Tokenizer& tok = Fixture(static_cast<int>(state.range(0)));
  const std::string text = Prose(64 << 10);
  const std::vector<int32_t> ids = *tok.Encode(text, false);
  for (auto _ : state) {
    auto stream = tok.NewDecodeStream(false);
    std::string out;
    for (int32_t id : ids) stream->Push(id, &out);
    stream->Finish(&out);
    benchmark::DoNotOptimize(out);
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(text.size()));
}
BENCHMARK(BM_DecodeStream)->DenseRange(0, 3);

}  // namespace
}  // namespace tokenlake::tokenizer
