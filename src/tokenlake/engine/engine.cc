#include "tokenlake/engine/engine.h"

#include <utility>

#include "absl/strings/str_format.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/local_backend.h"
#include "tokenlake/engine/ops.h"

namespace tokenlake::engine {

class Engine::PoolState {};

Engine::Engine(const LlamaModel* model, const EngineOptions& options)
    : model_(model), options_(options) {}

Engine::~Engine() = default;

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const LlamaModel* model,
                                                       const EngineOptions& options) {
  if (model == nullptr) return absl::InvalidArgumentError("Engine: model is null");
  if (options.num_instances < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("Engine: num_instances must be >= 1, got %d", options.num_instances));
  }
  if (options.segment_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("Engine: segment_tokens must be >= 1, got %d", options.segment_tokens));
  }
  if (options.slots_per_instance < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "Engine: slots_per_instance must be >= 1, got %d", options.slots_per_instance));
  }
  std::unique_ptr<Engine> engine(new Engine(model, options));
  return engine;
}

absl::StatusOr<GenerateResult> Engine::Generate(absl::Span<const int32_t> prompt,
                                                int32_t max_new_tokens) {
  if (prompt.empty()) return absl::InvalidArgumentError("Generate: empty prompt");
  if (max_new_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("Generate: max_new_tokens must be >= 1, got %d", max_new_tokens));
  }
  const int32_t vocab = model_->config().vocab_size;
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrFormat("Generate: prompt token %d at index %d is outside the vocabulary [0, %d)",
                          prompt[i], i, vocab));
    }
  }
  return GenerateLocal(prompt, max_new_tokens);
}

absl::StatusOr<GenerateResult> Engine::GenerateLocal(absl::Span<const int32_t> prompt,
                                                     int32_t max_new_tokens) {
  LocalKvBackend backend(model_->config(), nullptr);
  GenerateResult result;
  TOKENLAKE_ASSIGN_OR_RETURN(std::vector<float> logits, model_->Forward(prompt, 0, backend));
  result.last_logits = logits;
  int64_t pos = static_cast<int64_t>(prompt.size());
  while (true) {
    const int32_t next = Argmax(logits);
    result.tokens.push_back(next);
    if (static_cast<int32_t>(result.tokens.size()) == max_new_tokens) break;
    const int32_t fed[1] = {next};
    TOKENLAKE_ASSIGN_OR_RETURN(logits, model_->Forward(fed, pos, backend));
    ++pos;
  }
  result.decode_logits = std::move(logits);
  return result;
}

}  // namespace tokenlake::engine
