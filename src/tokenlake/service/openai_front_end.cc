#include "tokenlake/service/openai_front_end.h"

#include <atomic>
#include <random>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "tokenlake/service/stop_text.h"

namespace tokenlake::service {

struct OpenAiFrontEnd::Prepared {
  // One backend request per choice.
  std::vector<CompletionRequest> requests;
};

namespace {

// Decodes one choice's tokens and applies its stop sequences.
class ChoiceText {
 public:
  ChoiceText(const tokenizer::Tokenizer* tok, const std::vector<std::string>& stops)
      : decoder_(tok != nullptr ? tok->NewDecodeStream(/*skip_special_tokens=*/true) : nullptr),
        stop_(stops) {}

  // The text that `tokens` make final (before any stop sequence).
  std::string Push(absl::Span<const int32_t> tokens) {
    if (decoder_ == nullptr || stop_.stopped()) return "";
    std::string piece;
    for (int32_t id : tokens) decoder_->Push(id, &piece);
    return Take(stop_.Push(piece));
  }
  // The end of generation: what was held back (unless a stop sequence ended the text).
  std::string Finish() {
    if (decoder_ == nullptr || stop_.stopped()) return "";
    std::string piece;
    decoder_->Finish(&piece);
    std::string out = stop_.Push(piece);
    out += stop_.Finish();
    return Take(std::move(out));
  }
  bool stopped() const { return stop_.stopped(); }
  const std::string& text() const { return text_; }

 private:
  std::string Take(std::string s) {
    text_ += s;
    return s;
  }
  std::unique_ptr<tokenizer::DecodeStream> decoder_;
  StopText stop_;
  std::string text_;
};

uint64_t RandomSeed() {
  std::random_device rd;
  return (uint64_t{rd()} << 32) ^ rd();
}

std::string NewAnswerId(OpenAiEndpoint endpoint) {
  static std::atomic<uint64_t> counter{RandomSeed()};
  return absl::StrFormat("%s-%016x", endpoint == OpenAiEndpoint::kCompletions ? "cmpl" : "chatcmpl",
                         counter.fetch_add(0x9E3779B97F4A7C15ull));
}

}  // namespace

absl::StatusOr<std::unique_ptr<OpenAiFrontEnd>> OpenAiFrontEnd::Create(
    const OpenAiFrontEndOptions& options, Backend backend, RefusalCounter on_refused) {
  if (backend == nullptr) return absl::InvalidArgumentError("OpenAiFrontEnd: backend is null");
  if (options.tokenizer != nullptr && options.tokenizer->vocab_size() > options.limits.vocab_size) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "the tokenizer (%s) knows ids up to %d, the model's vocabulary has only %d rows",
        options.tokenizer->source(), options.tokenizer->vocab_size() - 1,
        options.limits.vocab_size));
  }
  return std::unique_ptr<OpenAiFrontEnd>(
      new OpenAiFrontEnd(options, std::move(backend), std::move(on_refused)));
}

OpenAiFrontEnd::OpenAiFrontEnd(const OpenAiFrontEndOptions& options, Backend backend,
                               RefusalCounter on_refused)
    : options_(options), backend_(std::move(backend)), on_refused_(std::move(on_refused)) {
  if (options_.tokenizer == nullptr) {
    chat_unavailable_ =
        "the served model has no tokenizer (tokenizer.json or tokenizer.model in its checkpoint "
        "folder): chat is not served; send token ids to /v1/completions";
    return;
  }
  absl::StatusOr<tokenizer::ChatTemplate> t =
      tokenizer::ChatTemplate::ForTokenizer(*options_.tokenizer);
  if (t.ok()) {
    chat_template_ = *std::move(t);
  } else {
    chat_unavailable_ =
        absl::StrCat("the served model's chat template cannot be used: ", t.status().message());
  }
}

absl::StatusOr<OpenAiFrontEnd::Prepared> OpenAiFrontEnd::Prepare(
    const OpenAiRequest& request) const {
  const CompletionLimits& limits = options_.limits;
  const tokenizer::Tokenizer* tok = options_.tokenizer.get();
  std::vector<std::vector<int32_t>> prompts;
  std::string param = "prompt";
  if (request.endpoint == OpenAiEndpoint::kChatCompletions) {
    param = "messages";
    if (!chat_template_.has_value()) return absl::InvalidArgumentError(chat_unavailable_);
    tokenizer::ChatTemplateOptions o{.add_generation_prompt = true,
                                     .bos_token = tok->config().bos_token,
                                     .eos_token = tok->config().eos_token};
    absl::StatusOr<std::string> text = chat_template_->Render(request.messages, o);
    if (!text.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the chat template could not render the messages: ", text.status().message()));
    }
    absl::StatusOr<std::vector<int32_t>> ids = tok->Encode(*text, /*add_special_tokens=*/false);
    if (!ids.ok()) return absl::InvalidArgumentError(ids.status().message());
    prompts.push_back(*std::move(ids));
  } else {
    for (const OpenAiPrompt& p : request.prompts) {
      if (!p.is_text) {
        prompts.push_back(p.ids);
        continue;
      }
      if (tok == nullptr) {
        return absl::InvalidArgumentError(
            "the served model has no tokenizer (tokenizer.json or tokenizer.model in its "
            "checkpoint folder): send the prompt as an array of token ids");
      }
      absl::StatusOr<std::vector<int32_t>> ids = tok->Encode(p.text, /*add_special_tokens=*/true);
      if (!ids.ok()) return absl::InvalidArgumentError(ids.status().message());
      prompts.push_back(*std::move(ids));
    }
  }
  Prepared out;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const int64_t n = static_cast<int64_t>(prompts[i].size());
    const std::string what = prompts.size() > 1 ? absl::StrFormat("prompt[%d]", i) : "prompt";
    if (n == 0) return absl::InvalidArgumentError(absl::StrCat(what, " encodes to no tokens"));
    if (n >= limits.context_tokens) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s of %d tokens does not fit the model's context of %d tokens", what, n,
                          limits.context_tokens));
    }
    int32_t max_tokens = 0;
    if (request.max_tokens.has_value()) {
      max_tokens = *request.max_tokens;
    } else if (request.endpoint == OpenAiEndpoint::kCompletions) {
      max_tokens = limits.default_max_tokens;
    } else {
      max_tokens = static_cast<int32_t>(
          std::min<int64_t>(limits.max_tokens_limit, limits.context_tokens - n));
    }
    if (n + max_tokens > limits.context_tokens) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s of %d tokens plus max_tokens %d exceeds the model's context of %d tokens", what, n,
          max_tokens, limits.context_tokens));
    }
    CompletionRequest c;
    c.prompt = std::move(prompts[i]);
    c.max_tokens = max_tokens;
    c.temperature = request.temperature;
    c.top_k = request.top_k;
    c.top_p = request.top_p;
    c.seed = request.seed;
    if (tok != nullptr) c.stop_token_ids = tok->config().stop_token_ids;
    // Progress reports let a stop sequence end the instance's work early.
    c.stream = request.stream || !request.stop.empty();
    out.requests.push_back(std::move(c));
  }
  return out;
}

std::vector<HttpRoute> OpenAiFrontEnd::Routes() {
  auto refuse = [this](HttpResponse& res, const absl::Status& s) {
    const int http = HttpStatusFor(s);
    if (on_refused_) on_refused_(http);
    res.status = http;
    res.body = OpenAiErrorJson(s);
  };
  auto handle = [this, refuse](OpenAiEndpoint endpoint, const HttpRequest& req, HttpResponse& res) {
    absl::StatusOr<OpenAiRequest> parsed = ParseOpenAiRequest(req.body, endpoint, options_.limits);
    if (!parsed.ok()) return refuse(res, parsed.status());
    absl::StatusOr<Prepared> prepared = Prepare(*parsed);
    if (!prepared.ok()) {
      return refuse(res,
                    WithParam(prepared.status(),
                              endpoint == OpenAiEndpoint::kCompletions ? "prompt" : "messages"));
    }
    // A tenant's prompts share cached segments only with the same tenant (and cache_salt).
    if (!req.tenant.empty() || !parsed->cache_salt.empty()) {
      const std::string salt = absl::StrCat(req.tenant.size(), ":", req.tenant, parsed->cache_salt);
      for (CompletionRequest& c : prepared->requests) c.cache_salt = salt;
    }
    // The caller's budget of tokens in flight (an API key's max_tokens_in_flight): every
    // prompt's tokens and max_tokens, held until the answer is complete.
    if (req.reserve_tokens) {
      int64_t tokens = 0;
      for (const CompletionRequest& c : prepared->requests) {
        tokens += static_cast<int64_t>(c.prompt.size()) + c.max_tokens;
      }
      if (absl::Status taken = req.reserve_tokens(tokens); !taken.ok()) {
        if (taken.code() == absl::StatusCode::kResourceExhausted) {
          res.headers.emplace_back("Retry-After", "1");
        }
        return refuse(res, taken);
      }
    }
    const OpenAiAnswerHeader header{
        .endpoint = endpoint,
        .id = NewAnswerId(endpoint),
        .created_unix_s = absl::ToUnixSeconds(absl::Now()),
        .model = parsed->model.empty() ? options_.model_id : parsed->model};
    const tokenizer::Tokenizer* tok = options_.tokenizer.get();
    if (!parsed->stream) {
      std::vector<OpenAiChoice> choices;
      OpenAiUsage usage;
      CompletionResult last;
      for (size_t i = 0; i < prepared->requests.size(); ++i) {
        const CompletionRequest& c = prepared->requests[i];
        ChoiceText text(tok, parsed->stop);
        absl::StatusOr<CompletionResult> r = backend_(c, [&](absl::Span<const int32_t> tokens) {
          text.Push(tokens);
          return !text.stopped();
        });
        if (!r.ok()) {
          res.status = HttpStatusFor(r.status());
          res.body = OpenAiErrorJson(r.status());
          return;
        }
        text.Finish();
        usage.prompt_tokens += static_cast<int64_t>(c.prompt.size());
        usage.completion_tokens += static_cast<int64_t>(r->tokens.size());
        usage.cached_tokens += r->cached_tokens;
        choices.push_back({.index = static_cast<int32_t>(i),
                           .text = text.text(),
                           .tokens = r->tokens,
                           .finish_reason = text.stopped() ? "stop" : r->finish_reason});
        last = *std::move(r);
      }
      res.status = 200;
      res.body = OpenAiResponseJson(header, choices, usage,
                                    {{"instance", last.instance}, {"attempts", last.attempts}});
      return;
    }
    // Streamed: the 200 and the events go out as the tokens come.
    res.status = 200;
    res.content_type = "text/event-stream";
    res.headers.emplace_back("Cache-Control", "no-cache");
    auto run = std::make_shared<std::pair<OpenAiRequest, Prepared>>(*std::move(parsed),
                                                                    *std::move(prepared));
    res.stream = [this, run, header, tok](const std::function<bool(std::string_view)>& send) {
      const OpenAiRequest& request = run->first;
      const bool chat = request.endpoint == OpenAiEndpoint::kChatCompletions;
      bool gone = false;
      auto write = [&](const std::string& event) {
        if (!gone && !send(event)) gone = true;
        return !gone;
      };
      OpenAiUsage usage;
      for (size_t i = 0; i < run->second.requests.size() && !gone; ++i) {
        const int32_t index = static_cast<int32_t>(i);
        const CompletionRequest& c = run->second.requests[i];
        if (chat) write(OpenAiChunkEvent(header, index, "", "", /*role_delta=*/true));
        ChoiceText text(tok, request.stop);
        absl::StatusOr<CompletionResult> r = backend_(c, [&](absl::Span<const int32_t> tokens) {
          const std::string piece = text.Push(tokens);
          if (tok == nullptr && !chat) {
            // No tokenizer: the stream carries the token ids.
            write(OpenAiChunkEvent(header, index, "", "", false,
                                   std::vector<int32_t>(tokens.begin(), tokens.end())));
          } else if (!piece.empty()) {
            write(OpenAiChunkEvent(header, index, piece, ""));
          }
          return !gone && !text.stopped();
        });
        if (gone) break;  // the backend's request was cancelled: nobody to tell
        if (!r.ok()) {
          write(OpenAiErrorEvent(r.status()));
          return;
        }
        const std::string rest = text.Finish();
        if (!rest.empty()) write(OpenAiChunkEvent(header, index, rest, ""));
        write(OpenAiChunkEvent(header, index, "", text.stopped() ? "stop" : r->finish_reason));
        usage.prompt_tokens += static_cast<int64_t>(c.prompt.size());
        usage.completion_tokens += static_cast<int64_t>(r->tokens.size());
        usage.cached_tokens += r->cached_tokens;
      }
      if (gone) return;
      if (request.include_usage) write(OpenAiUsageEvent(header, usage));
      write(OpenAiDoneEvent());
    };
  };
  const int64_t created = absl::ToUnixSeconds(absl::Now());
  std::vector<HttpRoute> routes;
  routes.push_back({"POST", "/v1/completions", [handle](const HttpRequest& req, HttpResponse* res) {
                      handle(OpenAiEndpoint::kCompletions, req, *res);
                    }});
  routes.push_back(
      {"POST", "/v1/chat/completions", [handle](const HttpRequest& req, HttpResponse* res) {
         handle(OpenAiEndpoint::kChatCompletions, req, *res);
       }});
  routes.push_back({"GET", "/v1/models", [this, created](const HttpRequest&, HttpResponse* res) {
                      res->body = OpenAiModelsJson(options_.model_id, created);
                    }});
  return routes;
}

}  // namespace tokenlake::service
