// OpenAiFrontEnd: the OpenAI-compatible HTTP routes of the coordinator, over a backend that
// generates token ids (Coordinator::CompleteStreaming in the cluster, a fake in tests):
//
//   POST /v1/completions       prompt as text, token ids, or a list of either (choices 0, 1, ...,
//                              served one after another)
//   POST /v1/chat/completions  messages rendered with the checkpoint's chat template (with the
//                              generation prompt), then tokenized without added special tokens
//   GET  /v1/models            the served model
//
// openai_api.h parses and formats; this class tokenizes, runs the backend and detokenizes.
// Text is encoded with the checkpoint's tokenizer (text prompts get its BOS, as Hugging Face's
// tokenizers add it) and generated tokens are decoded incrementally (special tokens skipped,
// never half a UTF-8 character); generation stops at the tokenizer's end-of-sequence ids
// (finish_reason "stop"), at a `stop` sequence matched on the decoded text (StopText: the stop
// text is not returned; the backend's request is cancelled at once, so the instance stops
// computing), or after max_tokens ("length"). Without a tokenizer, text prompts and chat get
// a 400 saying the served model has none, and token-id prompts are served as before (the
// answer's `tokens`, and in a stream each chunk's new `tokens`; empty `text`). A chat template the
// tokenizer module cannot render (Jinja outside its subset) makes chat requests a 400 naming the
// construct.
//
// `stream: true` answers with server-sent events in OpenAI's chunk format (for chat the first
// chunk of a choice carries the assistant role; the last one finish_reason; with
// stream_options.include_usage a usage chunk follows) and ends with `data: [DONE]`. Errors
// found before generation starts are HTTP 4xx/5xx with OpenAI's error body; an error after the
// stream started is sent as an error event and ends the stream. A client that goes away
// mid-stream is noticed at the next write (HttpResponse::stream's write returns false): the
// backend's request is cancelled (its pins and pool slots are released on the instance).
//
// Usage: prompt_tokens, completion_tokens (the generated ids, a stop token included) and
// prompt_tokens_details.cached_tokens (prompt tokens served from the pool).
//
// A request that carries a budget of tokens in flight (HttpRequest::reserve_tokens, an API key's
// max_tokens_in_flight) takes its prompts' tokens plus their max_tokens from it before
// generating (they are given back when its answer is complete); a budget that cannot take them
// now is a 429 with Retry-After, one that never can a 400.
//
// Thread-safety: thread-safe (the routes run on the server's worker threads; the backend must
// be thread-safe).
#ifndef TOKENLAKE_SERVICE_OPENAI_FRONT_END_H_
#define TOKENLAKE_SERVICE_OPENAI_FRONT_END_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tokenlake/service/completion_api.h"
#include "tokenlake/service/http_front_end.h"
#include "tokenlake/service/openai_api.h"
#include "tokenlake/tokenizer/chat_template.h"
#include "tokenlake/tokenizer/tokenizer.h"

namespace tokenlake::service {

struct OpenAiFrontEndOptions {
  // Request limits (vocabulary, context, max_tokens).
  CompletionLimits limits;
  // The id GET /v1/models lists and answers carry when the request names none.
  std::string model_id = "tokenlake";
  // The checkpoint's tokenizer (shared, immutable); null = none (see the file comment).
  std::shared_ptr<const tokenizer::Tokenizer> tokenizer;
};

class OpenAiFrontEnd {
 public:
  // Generates for one request: hands each new batch of token ids to the sink as they come
  // (the sink returns false to cancel) and returns the result (Coordinator::CompleteStreaming).
  using TokenSink = std::function<bool(absl::Span<const int32_t> tokens)>;
  using Backend =
      std::function<absl::StatusOr<CompletionResult>(const CompletionRequest&, const TokenSink&)>;
  // Called with the HTTP status of every request refused before reaching the backend (for
  // metrics); may be null.
  using RefusalCounter = std::function<void(int http_status)>;

  // Errors: InvalidArgument when the tokenizer knows ids outside limits.vocab_size (the
  // model's vocabulary must cover the tokenizer's).
  static absl::StatusOr<std::unique_ptr<OpenAiFrontEnd>> Create(
      const OpenAiFrontEndOptions& options, Backend backend, RefusalCounter on_refused);

  // The three routes, for HttpFrontEnd (they borrow `this`, which must outlive the server).
  std::vector<HttpRoute> Routes();

  // Why chat requests are refused ("" when they are served): no tokenizer, no chat template,
  // or a template outside the supported Jinja subset.
  const std::string& chat_unavailable() const { return chat_unavailable_; }

 private:
  OpenAiFrontEnd(const OpenAiFrontEndOptions& options, Backend backend, RefusalCounter on_refused);
  struct Prepared;
  // Tokenizes the request's prompts (or renders and tokenizes its messages) and resolves its
  // max_tokens. Errors: InvalidArgument naming the problem.
  absl::StatusOr<Prepared> Prepare(const OpenAiRequest& request) const;

  OpenAiFrontEndOptions options_;
  Backend backend_;
  RefusalCounter on_refused_;
  std::optional<tokenizer::ChatTemplate> chat_template_;
  std::string chat_unavailable_;
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_OPENAI_FRONT_END_H_
