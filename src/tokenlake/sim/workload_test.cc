#include "tokenlake/sim/workload.h"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "zlib.h"

namespace tokenlake::sim {
namespace {

using ::testing::HasSubstr;

absl::StatusOr<Workload> Parse(const std::string& text) {
  std::istringstream in(text);
  return ParseMooncakeTrace(in, "t.jsonl");
}

TEST(MooncakeTraceTest, ParsesFieldsAndSortsByTimestamp) {
  auto w =
      Parse(R"({"timestamp": 2000, "input_length": 600, "output_length": 5, "hash_ids": [7, 8]})"
            "\n\n"
            R"({"timestamp": 500, "input_length": 512, "output_length": 1, "hash_ids": [7]})"
            "\n");
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_EQ(w->requests.size(), 2u);
  EXPECT_DOUBLE_EQ(w->requests[0].arrival_s, 0.5);
  EXPECT_EQ(w->requests[0].input_tokens, 512);
  EXPECT_EQ(w->requests[1].input_tokens, 600);
  EXPECT_EQ(w->requests[1].output_tokens, 5);
  EXPECT_EQ(w->requests[1].block_ids, (std::vector<uint64_t>{7, 8}));
  EXPECT_EQ(w->requests[1].BlockTokens(0), 512);
  EXPECT_EQ(w->requests[1].BlockTokens(1), 88);
}

struct BadLine {
  std::string line;
  std::string field;
};

class MooncakeTraceErrorTest : public ::testing::TestWithParam<BadLine> {};

TEST_P(MooncakeTraceErrorTest, NamesFileLineAndField) {
  const std::string good =
      R"({"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]})";
  auto w = Parse(good + "\n" + good + "\n" + GetParam().line + "\n" + good + "\n");
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(w.status().message()), HasSubstr("t.jsonl:3"));
  EXPECT_THAT(std::string(w.status().message()), HasSubstr(GetParam().field));
}

INSTANTIATE_TEST_SUITE_P(
    Lines, MooncakeTraceErrorTest,
    ::testing::Values(
        BadLine{R"({"input_length": 10, "output_length": 1, "hash_ids": [1]})", "'timestamp'"},
        BadLine{R"({"timestamp": "x", "input_length": 10, "output_length": 1, "hash_ids": [1]})",
                "'timestamp'"},
        BadLine{R"({"timestamp": -1, "input_length": 10, "output_length": 1, "hash_ids": [1]})",
                "'timestamp'"},
        BadLine{R"({"timestamp": 0, "output_length": 1, "hash_ids": [1]})", "'input_length'"},
        BadLine{R"({"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": []})",
                "'input_length'"},
        BadLine{R"({"timestamp": 0, "input_length": 10, "output_length": 2.5, "hash_ids": [1]})",
                "'output_length'"},
        BadLine{R"({"timestamp": 0, "input_length": 10, "output_length": 1})", "'hash_ids'"},
        BadLine{R"({"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": 3})",
                "'hash_ids'"},
        BadLine{R"({"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [-1]})",
                "'hash_ids'"},
        BadLine{R"({"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [1]})",
                "'hash_ids'"},
        BadLine{R"({"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1])",
                "not a JSON object"}));

TEST(MooncakeTraceTest, MissingFileIsNotFound) {
  auto w = ReadMooncakeTrace("/nonexistent/trace.jsonl");
  EXPECT_EQ(w.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(w.status().message()), HasSubstr("/nonexistent/trace.jsonl"));
}

TEST(MooncakeTraceTest, ReadsAGzipCompressedTraceLikeThePlainOne) {
  const std::string text =
      "{\"timestamp\": 5, \"input_length\": 600, \"output_length\": 3, \"hash_ids\": [1, 2]}\n"
      "{\"timestamp\": 1, \"input_length\": 10, \"output_length\": 4, \"hash_ids\": [7]}\n";
  const std::string dir = ::testing::TempDir();
  const std::string gz_path = dir + "/trace_test.jsonl.gz";
  gzFile gz = gzopen(gz_path.c_str(), "wb");
  ASSERT_NE(gz, nullptr);
  ASSERT_EQ(gzwrite(gz, text.data(), static_cast<unsigned>(text.size())),
            static_cast<int>(text.size()));
  ASSERT_EQ(gzclose(gz), Z_OK);
  auto w = ReadMooncakeTrace(gz_path);
  ASSERT_TRUE(w.ok()) << w.status();
  std::istringstream in(text);
  auto plain = ParseMooncakeTrace(in, "plain");
  ASSERT_TRUE(plain.ok());
  ASSERT_EQ(w->requests.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(w->requests[i].arrival_s, plain->requests[i].arrival_s);
    EXPECT_EQ(w->requests[i].input_tokens, plain->requests[i].input_tokens);
    EXPECT_EQ(w->requests[i].block_ids, plain->requests[i].block_ids);
  }
  // A corrupt stream is DataLoss naming the file; a bad line inside names file and line.
  const std::string bad_path = dir + "/trace_test_bad.jsonl.gz";
  std::ofstream(bad_path) << "\x1f\x8b\x08\x00garbage that is not deflate";
  auto bad = ReadMooncakeTrace(bad_path);
  EXPECT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr(bad_path));
  const std::string line_path = dir + "/trace_test_line.jsonl.gz";
  gz = gzopen(line_path.c_str(), "wb");
  ASSERT_NE(gz, nullptr);
  const std::string bad_line = "{\"timestamp\": \"x\"}\n";
  gzwrite(gz, bad_line.data(), static_cast<unsigned>(bad_line.size()));
  gzclose(gz);
  auto line = ReadMooncakeTrace(line_path);
  EXPECT_THAT(std::string(line.status().message()), HasSubstr(line_path + ":1"));
}

TEST(MooncakeTraceTest, ReadsTheCommittedFixture) {
  const char* src = std::getenv("TOKENLAKE_SOURCE_DIR");
  if (src == nullptr) GTEST_SKIP() << "TOKENLAKE_SOURCE_DIR not set";
  auto w = ReadMooncakeTrace(std::string(src) + "/tests/fixtures/sim_conversation_200.jsonl");
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->requests.size(), 200u);
  // The first line of the trace: 6758 input tokens in 14 blocks, 500 output tokens.
  EXPECT_EQ(w->requests[0].input_tokens, 6758);
  EXPECT_EQ(w->requests[0].block_ids.size(), 14u);
  EXPECT_EQ(w->requests[0].output_tokens, 500);
}

TEST(MooncakeTraceTest, ReadsTheFullConversationTraceWhenPresent) {
  const char* src = std::getenv("TOKENLAKE_SOURCE_DIR");
  if (src == nullptr) GTEST_SKIP() << "TOKENLAKE_SOURCE_DIR not set";
  auto w = ReadMooncakeTrace(std::string(src) + "/../shared/traces/conversation_trace.jsonl");
  if (!w.ok() && w.status().code() == absl::StatusCode::kNotFound) {
    GTEST_SKIP() << "shared trace absent";
  }
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->requests.size(), 12031u);
}

class GeneratorTest : public ::testing::TestWithParam<WorkloadKind> {};

TEST_P(GeneratorTest, SameSeedSameWorkloadDifferentSeedDifferent) {
  GeneratorOptions o;
  o.kind = GetParam();
  o.num_requests = 300;
  o.seed = 42;
  auto a = GenerateWorkload(o);
  auto b = GenerateWorkload(o);
  o.seed = 43;
  auto c = GenerateWorkload(o);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  ASSERT_EQ(a->requests.size(), 300u);
  bool differs = false;
  for (size_t i = 0; i < 300; ++i) {
    EXPECT_EQ(a->requests[i].arrival_s, b->requests[i].arrival_s);
    EXPECT_EQ(a->requests[i].block_ids, b->requests[i].block_ids);
    differs |= a->requests[i].block_ids != c->requests[i].block_ids;
  }
  EXPECT_TRUE(differs);
}

TEST_P(GeneratorTest, RequestsAreWellFormedAndShareOnlyPrefixes) {
  GeneratorOptions o;
  o.kind = GetParam();
  o.num_requests = 500;
  auto w = GenerateWorkload(o);
  ASSERT_TRUE(w.ok());
  std::set<uint64_t> first_blocks;
  int64_t shared_first = 0;
  double last = 0;
  for (const Request& r : w->requests) {
    EXPECT_GE(r.arrival_s, last);
    last = r.arrival_s;
    EXPECT_GE(r.input_tokens, 1);
    EXPECT_GE(r.output_tokens, 1);
    EXPECT_EQ(static_cast<int64_t>(r.block_ids.size()),
              (r.input_tokens + kBlockTokens - 1) / kBlockTokens);
    if (!first_blocks.insert(r.block_ids[0]).second) ++shared_first;
  }
  // Every shape shares prefixes: system prompts, agent histories, hot documents.
  EXPECT_GT(shared_first, 250);
}

INSTANTIATE_TEST_SUITE_P(Kinds, GeneratorTest,
                         ::testing::Values(WorkloadKind::kChat, WorkloadKind::kAgent,
                                           WorkloadKind::kDocQa, WorkloadKind::kLoogle,
                                           WorkloadKind::kScbench, WorkloadKind::kShareGpt));

// --- the paper's workloads: statistics against the published ones ---

// 6,000 system tokens fill blocks 0-10; block 11 holds its last 368 tokens and the next piece's
// first 144, so block 11's id names the document / session context (or the ShareGPT prompt).
constexpr size_t kSystemBlocks = 11;

Workload Paper(WorkloadKind kind, int64_t requests, uint64_t seed = 1) {
  GeneratorOptions o;
  o.kind = kind;
  o.num_requests = requests;
  o.seed = seed;
  o.rate_rps = 2;
  auto w = GenerateWorkload(o);
  EXPECT_TRUE(w.ok()) << w.status();
  return w.ok() ? *std::move(w) : Workload{};
}

double Mean(const std::vector<double>& v) {
  double sum = 0;
  for (double x : v) sum += x;
  return v.empty() ? 0 : sum / static_cast<double>(v.size());
}

// Every prompt starts with the same system prompt blocks.
void ExpectSharedSystemPrompt(const Workload& w) {
  for (const Request& r : w.requests) {
    ASSERT_GT(r.block_ids.size(), kSystemBlocks);
    EXPECT_TRUE(std::equal(r.block_ids.begin(), r.block_ids.begin() + kSystemBlocks,
                           w.requests[0].block_ids.begin()));
  }
}

size_t CommonBlocks(const Request& a, const Request& b) {
  size_t n = 0;
  while (n < a.block_ids.size() && n < b.block_ids.size() && a.block_ids[n] == b.block_ids[n]) ++n;
  return n;
}

TEST(PaperWorkloadTest, LoogleHasTheDatasetsCountsLengthsAndSharing) {
  for (uint64_t seed : {1, 2}) {
    SCOPED_TRACE(testing::Message() << "seed " << seed);
    const Workload w = Paper(WorkloadKind::kLoogle, 6448, seed);
    ASSERT_EQ(w.requests.size(), 6448u);
    ExpectSharedSystemPrompt(w);
    std::map<uint64_t, std::vector<const Request*>> docs;
    std::vector<double> input, output;
    for (const Request& r : w.requests) {
      docs[r.block_ids[kSystemBlocks]].push_back(&r);
      input.push_back(static_cast<double>(r.input_tokens - 6000));
      output.push_back(static_cast<double>(r.output_tokens));
    }
    EXPECT_EQ(docs.size(), 776u);
    int64_t single = 0, many = 0;
    for (const auto& [id, reqs] : docs) {
      if (reqs.size() == 1) {
        ++single;
        continue;
      }
      ++many;
      EXPECT_TRUE(reqs.size() == 22 || reqs.size() == 23) << reqs.size();
      // A document's questions share the document's blocks: every full block before the
      // question (at most 64 tokens) is common.
      const Request& a = *reqs[0];
      const Request& b = *reqs[1];
      const int64_t shorter = std::min(a.input_tokens, b.input_tokens);
      EXPECT_GE(static_cast<int64_t>(CommonBlocks(a, b)), (shorter - 64) / kBlockTokens);
      EXPECT_LT(CommonBlocks(a, b), a.block_ids.size());
    }
    EXPECT_EQ(single, 516);
    EXPECT_EQ(many, 260);
    // Questions interleave: one about the same document as the one before is rare (about
    // 260 x (23 / 6,448)^2 = 0.3% in a random order; 86% if grouped by document).
    int64_t same_as_previous = 0;
    for (size_t i = 1; i < w.requests.size(); ++i) {
      same_as_previous +=
          w.requests[i].block_ids[kSystemBlocks] == w.requests[i - 1].block_ids[kSystemBlocks];
    }
    EXPECT_LT(same_as_previous, 6448 / 50);
    // Document 24,005 + question 16-64 / instruction 24 tokens on average.
    EXPECT_NEAR(Mean(input), 24005 + 38, 0.05 * 24005);
    // (516 x 250 + 5,932 x 72) / 6,448.
    EXPECT_NEAR(Mean(output), (516 * 250.0 + 5932 * 72.0) / 6448, 5);
    EXPECT_NEAR(MeanRateRps(w), 2, 0.1);
  }
}

TEST(PaperWorkloadTest, LoogleByDocumentAsksEachDocumentsQuestionsTogether) {
  GeneratorOptions o;
  o.kind = WorkloadKind::kLoogle;
  o.num_requests = int64_t{2} * 6448;  // two passes
  o.question_order = QuestionOrder::kByDocument;
  auto w = GenerateWorkload(o);
  ASSERT_TRUE(w.ok()) << w.status();
  // Per pass: each document's questions form one run, and every document has one run.
  for (size_t pass = 0; pass < 2; ++pass) {
    SCOPED_TRACE(testing::Message() << "pass " << pass);
    std::map<uint64_t, int64_t> runs, questions;
    for (size_t i = pass * 6448; i < (pass + 1) * 6448; ++i) {
      const uint64_t doc = w->requests[i].block_ids[kSystemBlocks];
      ++questions[doc];
      if (i == pass * 6448 || w->requests[i - 1].block_ids[kSystemBlocks] != doc) ++runs[doc];
    }
    EXPECT_EQ(runs.size(), 776u);
    for (const auto& [doc, n] : runs) EXPECT_EQ(n, 1) << "document block " << doc;
    int64_t many = 0;
    for (const auto& [doc, n] : questions) many += n > 1;
    EXPECT_EQ(many, 260);
  }
  // The two passes visit the documents in different orders.
  EXPECT_NE(w->requests[0].block_ids[kSystemBlocks], w->requests[6448].block_ids[kSystemBlocks]);
  EXPECT_EQ(*ParseQuestionOrder("by-document"), QuestionOrder::kByDocument);
  EXPECT_EQ(*ParseQuestionOrder("shuffled"), QuestionOrder::kShuffled);
  EXPECT_THAT(std::string(ParseQuestionOrder("random").status().message()),
              HasSubstr("by-document"));
}

TEST(PaperWorkloadTest, ScbenchSessionsGrowTurnByTurnOverALongContext) {
  const Workload w = Paper(WorkloadKind::kScbench, 4841);
  ASSERT_EQ(w.requests.size(), 4841u);
  ExpectSharedSystemPrompt(w);
  std::map<uint64_t, std::vector<const Request*>> sessions;
  std::vector<double> input, output;
  for (const Request& r : w.requests) {
    sessions[r.block_ids[kSystemBlocks]].push_back(&r);
    input.push_back(static_cast<double>(r.input_tokens - 6000));
    output.push_back(static_cast<double>(r.output_tokens));
  }
  // 931 sessions of 5.2 turns.
  EXPECT_NEAR(static_cast<double>(sessions.size()), 931, 40);
  EXPECT_NEAR(4841.0 / static_cast<double>(sessions.size()), 5.2, 0.3);
  EXPECT_NEAR(Mean(input), 227000, 0.05 * 227000);
  EXPECT_NEAR(Mean(output), 1684, 0.07 * 1684);
  for (const auto& [id, turns] : sessions) {
    EXPECT_EQ(turns[0]->previous_turn, -1);
    for (size_t k = 1; k < turns.size(); ++k) {
      const Request& prev = *turns[k - 1];
      const Request& next = *turns[k];
      EXPECT_GT(next.arrival_s, prev.arrival_s);
      // The next prompt extends the previous one by its answer and a new question.
      EXPECT_GE(next.input_tokens, prev.input_tokens + prev.output_tokens + 32);
      EXPECT_EQ(CommonBlocks(prev, next), static_cast<size_t>(prev.input_tokens / kBlockTokens));
      // Sent closed-loop after the previous turn, with no think time.
      EXPECT_EQ(next.previous_turn, turns[k - 1] - w.requests.data());
      EXPECT_EQ(next.think_s, 0);
    }
  }
  // Sessions start at rate_rps / 5.2 (the request rate is rate_rps while sessions overlap
  // fully; MeanRateRps over the whole span is lower, by the last sessions' drain).
  double first = 1e18, last = 0;
  for (const auto& [id, turns] : sessions) {
    first = std::min(first, turns[0]->arrival_s);
    last = std::max(last, turns[0]->arrival_s);
  }
  EXPECT_NEAR(static_cast<double>(sessions.size() - 1) / (last - first), 2 / 5.2, 0.04);
}

TEST(PaperWorkloadTest, ShareGptFirstTurnsAreShortAndSkewed) {
  const Workload w = Paper(WorkloadKind::kShareGpt, 20000);
  ASSERT_EQ(w.requests.size(), 20000u);
  ExpectSharedSystemPrompt(w);
  std::vector<double> input, output;
  std::set<uint64_t> prompts;
  for (const Request& r : w.requests) {
    input.push_back(static_cast<double>(r.input_tokens - 6000));
    output.push_back(static_cast<double>(r.output_tokens));
    prompts.insert(r.block_ids.back());
  }
  EXPECT_NEAR(Mean(input), 300, 30);
  std::vector<double> sorted = input;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_NEAR(sorted[sorted.size() / 2], 40, 4);
  EXPECT_NEAR(Mean(output), 358, 0.08 * 358);
  // Only the system prompt is shared: the last blocks are all distinct.
  EXPECT_EQ(prompts.size(), w.requests.size());
  EXPECT_NEAR(MeanRateRps(w), 2, 0.1);
}

TEST(PaperWorkloadTest, NamesAndBadSystemPrompt) {
  EXPECT_EQ(*ParseWorkloadKind("loogle"), WorkloadKind::kLoogle);
  EXPECT_EQ(*ParseWorkloadKind("scbench"), WorkloadKind::kScbench);
  EXPECT_EQ(*ParseWorkloadKind("sharegpt"), WorkloadKind::kShareGpt);
  EXPECT_EQ(WorkloadKindName(WorkloadKind::kShareGpt), "sharegpt");
  EXPECT_THAT(std::string(ParseWorkloadKind("sc").status().message()), HasSubstr("scbench"));
  GeneratorOptions o;
  o.kind = WorkloadKind::kLoogle;
  o.system_prompt_tokens = 0;
  EXPECT_EQ(GenerateWorkload(o).status().code(), absl::StatusCode::kInvalidArgument);
  // More questions than the dataset: further passes over the same documents.
  o.system_prompt_tokens = 6000;
  o.num_requests = 7000;
  auto w = GenerateWorkload(o);
  ASSERT_TRUE(w.ok());
  std::set<uint64_t> docs;
  for (const Request& r : w->requests) docs.insert(r.block_ids[kSystemBlocks]);
  EXPECT_EQ(docs.size(), 776u);
}

TEST(GeneratorTest, MultiTurnPromptsExtendThePreviousTurn) {
  GeneratorOptions o;
  o.kind = WorkloadKind::kChat;
  o.num_requests = 400;
  auto w = GenerateWorkload(o);
  ASSERT_TRUE(w.ok());
  // Some request's full blocks are a strict prefix of a later request's blocks (next turn).
  int64_t extended = 0;
  for (size_t i = 0; i < w->requests.size() && extended == 0; ++i) {
    const Request& a = w->requests[i];
    const size_t full = static_cast<size_t>(a.input_tokens / kBlockTokens);
    if (full < 2) continue;
    for (size_t j = i + 1; j < w->requests.size(); ++j) {
      const Request& b = w->requests[j];
      if (b.block_ids.size() > full &&
          std::equal(a.block_ids.begin(), a.block_ids.begin() + full, b.block_ids.begin()) &&
          b.block_ids[0] == a.block_ids[0] && b.block_ids[full - 1] == a.block_ids[full - 1]) {
        ++extended;
        break;
      }
    }
  }
  EXPECT_GT(extended, 0);
}

TEST(GeneratorTest, BadOptionsAreInvalidArgument) {
  GeneratorOptions o;
  o.num_requests = 0;
  EXPECT_EQ(GenerateWorkload(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.num_requests = 10;
  o.rate_rps = 0;
  EXPECT_EQ(GenerateWorkload(o).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseWorkloadKind("nope").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(*ParseWorkloadKind("docqa"), WorkloadKind::kDocQa);
}

TEST(WorkloadTest, ScaleArrivalsMultipliesTheRate) {
  Workload w;
  for (int i = 0; i < 5; ++i) {
    Request r;
    r.arrival_s = i * 2.0;
    w.requests.push_back(r);
  }
  EXPECT_DOUBLE_EQ(MeanRateRps(w), 0.5);
  EXPECT_DOUBLE_EQ(MeanRateRps(ScaleArrivals(w, 4)), 2.0);
}

}  // namespace
}  // namespace tokenlake::sim
