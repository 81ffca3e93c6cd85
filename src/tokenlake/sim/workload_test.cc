#include "tokenlake/sim/workload.h"

#include <cstdlib>
#include <fstream>
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
                                           WorkloadKind::kDocQa));

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
