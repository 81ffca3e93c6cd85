#include "tokenlake/sim/workload.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <numeric>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "tokenlake/base/hash.h"
#include "tokenlake/base/random.h"
#include "zlib.h"

namespace tokenlake::sim {

int64_t Request::BlockTokens(size_t i) const {
  const int64_t start = static_cast<int64_t>(i) * kBlockTokens;
  return std::clamp<int64_t>(input_tokens - start, 0, kBlockTokens);
}

namespace {

absl::Status LineError(std::string_view source, int64_t line, std::string_view field,
                       std::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrFormat("%s:%d: field '%s': %s", source, line, field, what));
}

}  // namespace

absl::StatusOr<Workload> ParseMooncakeTrace(std::istream& in, std::string_view source_name) {
  Workload workload;
  workload.name = std::string(source_name);
  std::string text;
  int64_t line = 0;
  while (std::getline(in, text)) {
    ++line;
    if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s:%d: not a JSON object", source_name, line));
    }
    Request r;
    auto ts = j.find("timestamp");
    if (ts == j.end()) return LineError(source_name, line, "timestamp", "missing");
    if (!ts->is_number() || ts->get<double>() < 0 || !std::isfinite(ts->get<double>())) {
      return LineError(source_name, line, "timestamp", "must be a number >= 0 (ms)");
    }
    r.arrival_s = ts->get<double>() / 1000.0;
    for (const char* field : {"input_length", "output_length"}) {
      auto it = j.find(field);
      if (it == j.end()) return LineError(source_name, line, field, "missing");
      if (!it->is_number_integer() || it->get<int64_t>() < 1) {
        return LineError(source_name, line, field, "must be an integer >= 1");
      }
      (std::string_view(field) == "input_length" ? r.input_tokens : r.output_tokens) =
          it->get<int64_t>();
    }
    auto ids = j.find("hash_ids");
    if (ids == j.end()) return LineError(source_name, line, "hash_ids", "missing");
    if (!ids->is_array()) return LineError(source_name, line, "hash_ids", "must be an array");
    r.block_ids.reserve(ids->size());
    for (size_t k = 0; k < ids->size(); ++k) {
      const auto& v = (*ids)[k];
      if (!v.is_number_integer() || v.get<int64_t>() < 0) {
        return LineError(source_name, line, "hash_ids",
                         absl::StrFormat("element %d must be an integer >= 0", k));
      }
      r.block_ids.push_back(v.get<uint64_t>());
    }
    const int64_t want = (r.input_tokens + kBlockTokens - 1) / kBlockTokens;
    if (static_cast<int64_t>(r.block_ids.size()) != want) {
      return LineError(source_name, line, "hash_ids",
                       absl::StrFormat("has %d ids but input_length %d needs %d (one per %d "
                                       "tokens)",
                                       r.block_ids.size(), r.input_tokens, want, kBlockTokens));
    }
    workload.requests.push_back(std::move(r));
  }
  if (in.bad()) {
    return absl::DataLossError(absl::StrFormat("%s:%d: read error", source_name, line));
  }
  std::stable_sort(workload.requests.begin(), workload.requests.end(),
                   [](const Request& a, const Request& b) { return a.arrival_s < b.arrival_s; });
  return workload;
}

absl::StatusOr<Workload> ReadMooncakeTrace(const std::string& path) {
  if (path.size() > 3 && path.compare(path.size() - 3, 3, ".gz") == 0) {
    gzFile gz = gzopen(path.c_str(), "rb");
    if (gz == nullptr) {
      return absl::NotFoundError(absl::StrFormat("cannot open trace file '%s'", path));
    }
    std::string text;
    char buffer[1 << 16];
    int n = 0;
    while ((n = gzread(gz, buffer, sizeof(buffer))) > 0)
      text.append(buffer, static_cast<size_t>(n));
    // A truncated or corrupt stream may end with 0 rather than -1: ask the stream.
    int code = Z_OK;
    const std::string message = gzerror(gz, &code);
    gzclose(gz);
    if (n < 0 || (code != Z_OK && code != Z_STREAM_END)) {
      return absl::DataLossError(
          absl::StrFormat("%s: not a readable gzip file (%s)", path, message));
    }
    std::istringstream in(std::move(text));
    return ParseMooncakeTrace(in, path);
  }
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrFormat("cannot open trace file '%s'", path));
  return ParseMooncakeTrace(in, path);
}

absl::StatusOr<QuestionOrder> ParseQuestionOrder(std::string_view name) {
  if (name == "shuffled") return QuestionOrder::kShuffled;
  if (name == "by-document") return QuestionOrder::kByDocument;
  return absl::InvalidArgumentError(
      absl::StrFormat("unknown question order '%s' (expected shuffled or by-document)", name));
}

absl::StatusOr<WorkloadKind> ParseWorkloadKind(std::string_view name) {
  if (name == "chat") return WorkloadKind::kChat;
  if (name == "agent") return WorkloadKind::kAgent;
  if (name == "docqa") return WorkloadKind::kDocQa;
  if (name == "loogle") return WorkloadKind::kLoogle;
  if (name == "scbench") return WorkloadKind::kScbench;
  if (name == "sharegpt") return WorkloadKind::kShareGpt;
  return absl::InvalidArgumentError(absl::StrFormat(
      "unknown workload '%s' (expected chat, agent, docqa, loogle, scbench or sharegpt)", name));
}

std::string_view WorkloadKindName(WorkloadKind kind) {
  switch (kind) {
    case WorkloadKind::kChat:
      return "chat";
    case WorkloadKind::kAgent:
      return "agent";
    case WorkloadKind::kDocQa:
      return "docqa";
    case WorkloadKind::kLoogle:
      return "loogle";
    case WorkloadKind::kScbench:
      return "scbench";
    case WorkloadKind::kShareGpt:
      return "sharegpt";
  }
  return "?";
}

Workload ScaleArrivals(const Workload& workload, double scale) {
  Workload out = workload;
  for (Request& r : out.requests) r.arrival_s /= scale;
  return out;
}

double MeanRateRps(const Workload& workload) {
  const auto& rs = workload.requests;
  if (rs.size() < 2) return 0;
  const double span = rs.back().arrival_s - rs.front().arrival_s;
  return span > 0 ? static_cast<double>(rs.size() - 1) / span : 0;
}

namespace {

// A run of tokens with one identity: piece `content_id` of `tokens` tokens. Two prompts share
// KV exactly where they share the same sequence of pieces.
struct Piece {
  uint64_t content_id;
  int64_t tokens;
};

// Chained block ids of a prompt made of `pieces`.
std::vector<uint64_t> BlockIdsOf(const std::vector<Piece>& pieces) {
  std::vector<uint64_t> ids;
  uint64_t prev = 0x5EED5EEDULL;  // namespace salt of id(0)
  uint64_t block_hash = prev;
  int64_t filled = 0;
  for (const Piece& p : pieces) {
    int64_t offset = 0;
    while (offset < p.tokens) {
      const int64_t take = std::min(p.tokens - offset, kBlockTokens - filled);
      block_hash = HashCombine(block_hash, HashCombine(p.content_id, (offset << 20) ^ take));
      offset += take;
      filled += take;
      if (filled == kBlockTokens) {
        prev = HashCombine(prev, block_hash);
        ids.push_back(prev);
        block_hash = prev;
        filled = 0;
      }
    }
  }
  if (filled > 0) ids.push_back(HashCombine(prev, block_hash));
  return ids;
}

// Llama-3.1's context window: generated sessions stop before it.
constexpr int64_t kMaxContextTokens = 131072;

int64_t Total(const std::vector<Piece>& pieces) {
  int64_t n = 0;
  for (const Piece& p : pieces) n += p.tokens;
  return n;
}

// Zipf(s) sampler over [0, n) by inverse CDF.
class Zipf {
 public:
  Zipf(int64_t n, double s) {
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) cdf_.push_back(sum += 1.0 / std::pow(i + 1.0, s));
    for (double& c : cdf_) c /= sum;
  }
  int64_t Sample(Rng& rng) const {
    const double u = rng.UniformDouble();
    return std::min<int64_t>(std::lower_bound(cdf_.begin(), cdf_.end(), u) - cdf_.begin(),
                             static_cast<int64_t>(cdf_.size()) - 1);
  }

 private:
  std::vector<double> cdf_;
};

int64_t LogUniform(Rng& rng, int64_t lo, int64_t hi) {
  const double x = std::log(lo) + rng.UniformDouble() * (std::log(hi) - std::log(lo));
  return std::clamp<int64_t>(static_cast<int64_t>(std::exp(x)), lo, hi);
}

double Normal(Rng& rng) {
  const double u1 = 1.0 - rng.UniformDouble();  // (0, 1]
  const double u2 = rng.UniformDouble();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * 3.14159265358979323846 * u2);
}

// Lognormal with the given mean and log-space sigma, rounded and clamped to [lo, hi].
int64_t LogNormalMean(Rng& rng, double mean, double sigma, int64_t lo, int64_t hi) {
  const double mu = std::log(mean) - sigma * sigma / 2;
  return std::clamp<int64_t>(std::llround(std::exp(mu + sigma * Normal(rng))), lo, hi);
}

int64_t Poisson(Rng& rng, double lambda) {
  const double limit = std::exp(-lambda);
  int64_t k = 0;
  double p = rng.UniformDouble();
  while (p > limit) {
    ++k;
    p *= rng.UniformDouble();
  }
  return k;
}

// The paper's workloads (WorkloadKind comments): appends requests to `out` with arrival times
// from 0; `emit(t, prompt, output)` adds one.
template <typename Emit>
void GeneratePaperWorkload(const GeneratorOptions& o, Rng& rng, uint64_t& next_content,
                           std::vector<Request>& out, Emit emit) {
  const Piece system{next_content++, o.system_prompt_tokens};
  if (o.kind == WorkloadKind::kLoogle) {
    constexpr int64_t kArxiv = 516, kOther = 260, kOtherQuestions = 5932;
    std::vector<Piece> docs;
    for (int64_t d = 0; d < kArxiv + kOther; ++d) {
      docs.push_back({next_content++, LogNormalMean(rng, 24005, 0.4, 4096, 131072)});
    }
    // One entry per question: arXiv papers one each, the other documents share
    // kOtherQuestions as evenly as possible (22 or 23 each).
    auto questions_of = [&](int64_t d) -> size_t {
      const int64_t k = d - kArxiv;
      return d < kArxiv ? 1 : kOtherQuestions / kOther + (k < kOtherQuestions % kOther ? 1 : 0);
    };
    std::vector<int64_t> questions;
    for (int64_t d = 0; d < kArxiv + kOther; ++d) {
      questions.insert(questions.end(), questions_of(d), d);
    }
    auto shuffle = [&rng](std::vector<int64_t>& v) {
      for (size_t i = v.size() - 1; i > 0; --i) {
        std::swap(v[i], v[static_cast<size_t>(rng.UniformInt(0, static_cast<int64_t>(i)))]);
      }
    };
    std::vector<int64_t> order(docs.size());  // kByDocument: the documents' order in a pass
    std::iota(order.begin(), order.end(), int64_t{0});
    double t = 0;
    while (static_cast<int64_t>(out.size()) < o.num_requests) {
      // Each pass: every question once, in a seeded random order (of questions, or of
      // documents with each one's questions together).
      if (o.question_order == QuestionOrder::kShuffled) {
        shuffle(questions);
      } else {
        shuffle(order);
        questions.clear();
        for (int64_t d : order) questions.insert(questions.end(), questions_of(d), d);
      }
      for (size_t i = 0; i < questions.size() && static_cast<int64_t>(out.size()) < o.num_requests;
           ++i) {
        const int64_t d = questions[i];
        t += rng.Exponential(1.0 / o.rate_rps);
        if (d < kArxiv) {
          emit(t, {system, docs[d], {next_content++, 24}}, rng.UniformInt(150, 350));
        } else {
          emit(t, {system, docs[d], {next_content++, rng.UniformInt(16, 64)}},
               rng.UniformInt(16, 128));
        }
      }
    }
  } else if (o.kind == WorkloadKind::kScbench) {
    constexpr double kMeanTurns = 5.2;
    double start = 0;
    int64_t emitted = 0;
    // previous[i]: the index (in emission order) of request i's previous turn, or -1.
    std::vector<int64_t> previous;
    while (emitted < o.num_requests) {
      start += rng.Exponential(kMeanTurns / o.rate_rps);
      std::vector<Piece> prompt = {
          system, {next_content++, LogNormalMean(rng, 222280, 0.3, 32768, 786432)}};
      // The last session is cut at num_requests; every other one runs all its turns.
      const int64_t turns = std::min(1 + Poisson(rng, kMeanTurns - 1), o.num_requests - emitted);
      double t = start;
      for (int64_t k = 0; k < turns; ++k) {
        prompt.push_back({next_content++, rng.UniformInt(32, 256)});
        const int64_t output = LogNormalMean(rng, 1684, 0.8, 16, 16384);
        previous.push_back(k == 0 ? -1 : static_cast<int64_t>(out.size()) - 1);
        emit(t, prompt, output);
        prompt.push_back({next_content++, output});
        t += 2.0 + 0.05 * static_cast<double>(output);
      }
      emitted += turns;
    }
    // Sort by nominal arrival (a turn's previous one is always earlier) and renumber the links.
    std::vector<int64_t> order(out.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return out[a].arrival_s < out[b].arrival_s; });
    std::vector<int64_t> position(out.size());
    for (size_t i = 0; i < order.size(); ++i) position[order[i]] = static_cast<int64_t>(i);
    std::vector<Request> sorted;
    sorted.reserve(out.size());
    for (int64_t i : order) {
      sorted.push_back(std::move(out[i]));
      sorted.back().previous_turn = previous[i] < 0 ? -1 : position[previous[i]];
      sorted.back().think_s = 0;  // the benchmark sends the next turn when the answer is back
    }
    out = std::move(sorted);
  } else {  // kShareGpt
    double t = 0;
    for (int64_t i = 0; i < o.num_requests; ++i) {
      t += rng.Exponential(1.0 / o.rate_rps);
      const int64_t input = std::clamp<int64_t>(
          std::llround(std::exp(std::log(40.0) + 2.07 * Normal(rng))), 1, 16384);
      emit(t, {system, {next_content++, input}}, LogNormalMean(rng, 358, 1.0, 1, 4096));
    }
  }
}

}  // namespace

absl::StatusOr<Workload> GenerateWorkload(const GeneratorOptions& o) {
  if (o.num_requests < 1) return absl::InvalidArgumentError("num_requests must be >= 1");
  if (!(o.rate_rps > 0) || !std::isfinite(o.rate_rps)) {
    return absl::InvalidArgumentError("rate_rps must be > 0");
  }
  if (o.system_prompt_tokens < 1) {
    return absl::InvalidArgumentError("system_prompt_tokens must be >= 1");
  }
  Rng rng(o.seed);
  uint64_t next_content = 1;
  Workload w;
  w.name = std::string(WorkloadKindName(o.kind));
  auto& out = w.requests;
  auto emit = [&](double t, const std::vector<Piece>& prompt, int64_t output) {
    Request r;
    r.arrival_s = t;
    r.input_tokens = Total(prompt);
    r.output_tokens = std::max<int64_t>(1, output);
    r.block_ids = BlockIdsOf(prompt);
    out.push_back(std::move(r));
  };

  if (o.kind == WorkloadKind::kLoogle || o.kind == WorkloadKind::kScbench ||
      o.kind == WorkloadKind::kShareGpt) {
    GeneratePaperWorkload(o, rng, next_content, out, emit);
  } else if (o.kind == WorkloadKind::kDocQa) {
    // 200 documents of 8k-64k tokens (log-uniform), Zipf(1.0) popularity; a shared 600-token
    // instruction prompt precedes the document; a 50-200-token question follows.
    const int64_t num_docs = 200;
    std::vector<Piece> docs;
    for (int64_t d = 0; d < num_docs; ++d)
      docs.push_back({next_content++, LogUniform(rng, 8192, 65536)});
    const Piece instructions{next_content++, 600};
    Zipf zipf(num_docs, 1.0);
    double t = 0;
    for (int64_t i = 0; i < o.num_requests; ++i) {
      t += rng.Exponential(1.0 / o.rate_rps);
      const Piece& doc = docs[zipf.Sample(rng)];
      emit(t, {instructions, doc, {next_content++, rng.UniformInt(50, 200)}},
           rng.UniformInt(100, 400));
    }
  } else {
    // Sessions arrive as a Poisson process; each runs several turns, the prompt of turn k being
    // the prompt of turn k-1, its answer and a new message.
    const bool chat = o.kind == WorkloadKind::kChat;
    const int64_t num_system = chat ? 8 : 4;
    std::vector<Piece> system;
    for (int64_t s = 0; s < num_system; ++s) {
      system.push_back(
          {next_content++, chat ? rng.UniformInt(1000, 4000) : rng.UniformInt(4000, 8000)});
    }
    Zipf sys_zipf(num_system, 1.0);
    const double mean_turns = chat ? 5.0 : 16.0;
    const double session_rate = o.rate_rps / mean_turns;
    double session_start = 0;
    while (static_cast<int64_t>(out.size()) < o.num_requests * 2 + 64) {
      session_start += rng.Exponential(1.0 / session_rate);
      std::vector<Piece> prompt = {system[sys_zipf.Sample(rng)]};
      const int64_t turns =
          std::max<int64_t>(1, static_cast<int64_t>(rng.Exponential(mean_turns)) + 1);
      double t = session_start;
      for (int64_t k = 0; k < turns; ++k) {
        // chat: user message 50-1000 tokens, answer 100-600; agent: tool output 500-4000,
        // action 50-300.
        prompt.push_back(
            {next_content++, chat ? rng.UniformInt(50, 1000) : rng.UniformInt(500, 4000)});
        const int64_t output = chat ? rng.UniformInt(100, 600) : rng.UniformInt(50, 300);
        // A session ends when its context would pass the model's 128k-token window.
        if (Total(prompt) + output > kMaxContextTokens) break;
        emit(t, prompt, output);
        prompt.push_back({next_content++, output});
        t += chat ? 5.0 + rng.Exponential(30.0) : 1.0 + rng.Exponential(5.0);
      }
    }
    std::stable_sort(out.begin(), out.end(),
                     [](const Request& a, const Request& b) { return a.arrival_s < b.arrival_s; });
    out.resize(static_cast<size_t>(o.num_requests));
  }
  const double t0 = out.front().arrival_s;
  for (Request& r : out) r.arrival_s -= t0;
  return w;
}

}  // namespace tokenlake::sim
