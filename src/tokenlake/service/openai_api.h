// The OpenAI-compatible HTTP API's formats: requests of POST /v1/completions and
// POST /v1/chat/completions parsed and validated into one internal request, and the response
// bodies, streamed chunks and errors formatted as OpenAI's API does. Pure functions, kept apart
// from any server so that they are unit-tested and fuzzed on their own (openai_front_end.h
// serves them).
//
// Requests (a JSON object; every field is checked, unknown ones refused so that a typo or a
// feature we do not serve never silently changes the answer):
//   both:         model (string, informational), max_tokens (integer >= 1), temperature
//                 ([0, 2]; default 0 = greedy, unlike OpenAI's 1, so that answers reproduce
//                 unless sampling is asked for), top_p ((0, 1]), top_k (integer >= -1; -1 and 0
//                 = no limit), seed (integer; the same seed gives the same tokens), stop (a
//                 string or a list of at most 4 non-empty strings), stream (boolean),
//                 stream_options ({"include_usage": boolean}, only with stream), n and best_of
//                 (1 only), user (string, ignored), frequency_penalty and presence_penalty (0
//                 only), logit_bias (null or {} only), logprobs (null, false or 0 only);
//   completions:  prompt (required): a string, an array of token ids, or a list of strings /
//                 token-id arrays (several prompts are answered as choices 0, 1, ...);
//                 echo (false only), suffix (null only);
//   chat:         messages (required, non-empty): objects with role (system, developer, user,
//                 assistant, tool) and content (a string, null, or an array of
//                 {"type": "text", "text": ...} parts); max_completion_tokens (as max_tokens),
//                 top_logprobs (null or 0), tools (null or empty), tool_choice ("none"),
//                 response_format ({"type": "text"}), parallel_tool_calls (boolean, ignored).
// Text must be valid UTF-8 (the message names the field and byte offset). Limits that depend on
// the tokenized prompt (context length, vocabulary) are checked by the front end.
//
// Errors are InvalidArgument with a message naming the field; ParamOf() gives the field (the
// error body's "param").
//
// Thread-safety: pure functions.
#ifndef TOKENLAKE_SERVICE_OPENAI_API_H_
#define TOKENLAKE_SERVICE_OPENAI_API_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "tokenlake/service/completion_api.h"

namespace tokenlake::service {

enum class OpenAiEndpoint { kCompletions, kChatCompletions };

// One prompt of /v1/completions: text, or token ids (then `text` is empty and `is_text` false).
struct OpenAiPrompt {
  bool is_text = false;
  std::string text;
  std::vector<int32_t> ids;
};

struct OpenAiRequest {
  OpenAiEndpoint endpoint = OpenAiEndpoint::kCompletions;
  std::string model;
  // /v1/completions: one or more prompts.
  std::vector<OpenAiPrompt> prompts;
  // /v1/chat/completions: the messages, validated (roles, content shapes, UTF-8).
  nlohmann::ordered_json messages;
  // Absent: the front end's default (completions: limits.default_max_tokens; chat: as many as
  // fit the context, up to limits.max_tokens_limit).
  std::optional<int32_t> max_tokens;
  float temperature = 0;
  float top_p = 1;
  int32_t top_k = 0;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  bool stream = false;
  bool include_usage = false;
  // Requests share cached prefixes only with requests of the same cache_salt (and tenant);
  // empty: with everyone.
  std::string cache_salt;
};

// Parses and validates a request body for `endpoint`. max_tokens is checked against
// limits.max_tokens_limit and token ids against limits.vocab_size.
// Errors: InvalidArgument naming the field (see the file comment). Never crashes on any input.
absl::StatusOr<OpenAiRequest> ParseOpenAiRequest(std::string_view body, OpenAiEndpoint endpoint,
                                                 const CompletionLimits& limits);

// The field an error is about (the error body's "param"), or "" when none.
std::string ParamOf(const absl::Status& status);
// `status` marked as being about field `param`.
absl::Status WithParam(absl::Status status, std::string_view param);

// One answered choice.
struct OpenAiChoice {
  int32_t index = 0;
  std::string text;
  // The generated token ids (in /v1/completions answers as "tokens", an extension that keeps
  // token-id clients working without a tokenizer).
  std::vector<int32_t> tokens;
  std::string finish_reason = "length";
};

struct OpenAiUsage {
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  // Prompt tokens served from the pool (prompt_tokens_details.cached_tokens).
  int64_t cached_tokens = 0;
};

// What every body of one answer shares.
struct OpenAiAnswerHeader {
  OpenAiEndpoint endpoint = OpenAiEndpoint::kCompletions;
  // "cmpl-..." or "chatcmpl-...", the same in every chunk of a stream.
  std::string id;
  int64_t created_unix_s = 0;
  std::string model;
};

// The body of a non-streamed answer: a text_completion or chat.completion object with its
// choices and usage. `extra` (an object) is merged at the top level (e.g. the instance that
// computed it).
std::string OpenAiResponseJson(const OpenAiAnswerHeader& header,
                               const std::vector<OpenAiChoice>& choices, const OpenAiUsage& usage,
                               const nlohmann::json& extra = nlohmann::json::object());

// One server-sent event of a stream, "data: {...}\n\n": a text_completion or
// chat.completion.chunk object with one choice. For chat: `role_delta` sends the assistant role
// (the first chunk of a choice), else `text` is the content delta. `finish_reason` empty = null.
// For /v1/completions, non-empty `tokens` are sent as "tokens" (the new token ids: what a stream
// carries when the served model has no tokenizer).
std::string OpenAiChunkEvent(const OpenAiAnswerHeader& header, int32_t index, std::string_view text,
                             std::string_view finish_reason, bool role_delta = false,
                             const std::vector<int32_t>& tokens = {});
// The usage event of stream_options.include_usage: empty choices and the usage.
std::string OpenAiUsageEvent(const OpenAiAnswerHeader& header, const OpenAiUsage& usage);
// The last event: "data: [DONE]\n\n".
std::string OpenAiDoneEvent();
// An error inside a stream (after the 200 went out): "data: {"error": {...}}\n\n".
std::string OpenAiErrorEvent(const absl::Status& status);

// The error body {"error": {"message", "type", "param", "code"}}: type is
// "invalid_request_error" for 4xx, "server_error" otherwise; param from ParamOf (null when
// none); code is a short snake_case name of the status (e.g. "invalid_argument").
std::string OpenAiErrorJson(const absl::Status& status);

// GET /v1/models: one model, `model_id`.
std::string OpenAiModelsJson(std::string_view model_id, int64_t created_unix_s);

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_OPENAI_API_H_
