#include "tokenlake/tokenizer/utf8.h"

#include <random>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tokenlake::tokenizer {
namespace {

using ::testing::HasSubstr;

std::string Lossy(std::string_view bytes) {
  std::string out;
  AppendLossy(bytes, &out);
  return out;
}

TEST(Utf8Test, ValidateNamesTheOffsetOfTheFirstBadSequence) {
  EXPECT_TRUE(ValidateUtf8("Grüße 🙂", "text").ok());
  const absl::Status s = ValidateUtf8("abc\xC3(d", "prompt");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("prompt is not valid UTF-8"));
  EXPECT_THAT(s.message(), HasSubstr("byte offset 3"));
  // Surrogates, overlongs, code points past U+10FFFF and a truncated end are all ill-formed.
  for (std::string_view bad : {"\xED\xA0\x80", "\xC0\xAF", "\xF4\x90\x80\x80", "x\xE2\x82"}) {
    EXPECT_FALSE(ValidateUtf8(bad, "t").ok()) << bad;
  }
}

TEST(Utf8Test, ReplacesMaximalSubpartsAsTheUnicodeStandardShows) {
  // Unicode 15, section 3.9, table 3-8: <61 F1 80 80 E1 80 C2 62 80 63 80 BF 64>.
  EXPECT_EQ(Lossy("\x61\xF1\x80\x80\xE1\x80\xC2\x62\x80\x63\x80\xBF\x64"),
            "a\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"
            "b\xEF\xBF\xBD"
            "c\xEF\xBF\xBD\xEF\xBF\xBD"
            "d");
  // Python: b"\xf0\x9f\x99".decode(errors="replace") == "\ufffd" (one truncated sequence).
  EXPECT_EQ(Lossy("\xF0\x9F\x99"), "\xEF\xBF\xBD");
  EXPECT_EQ(Lossy("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");
  EXPECT_EQ(Lossy("ok"), "ok");
}

TEST(Utf8Test, FinalPrefixStopsBeforeATruncatedCharacterOnly) {
  EXPECT_EQ(FinalPrefixLength("ab"), 2u);
  EXPECT_EQ(FinalPrefixLength("ab\xF0\x9F"), 2u);  // may still become 🙂
  EXPECT_EQ(FinalPrefixLength("ab\xF0\x41"), 4u);  // never will: final
  EXPECT_EQ(FinalPrefixLength("\xE4\xB8"), 0u);
  EXPECT_EQ(FinalPrefixLength("\xE4\xB8\xAD"), 3u);
  EXPECT_EQ(FinalPrefixLength("\xFF"), 1u);
}

// Random byte strings fed in random pieces, emitting only final prefixes, give exactly the
// lossy decoding of the whole (the incremental decoder's invariant).
TEST(Utf8Test, IncrementalLossyEqualsWholeOnRandomBytes) {
  const uint32_t seed = std::random_device{}();
  std::mt19937 rng(seed);
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  const std::string alphabet = "a \x80\xBF\xC2\xC3\xE0\xE2\xED\xEF\xF0\xF4\xF5\xFF\x9F\x82\xA0\xAD";
  for (int round = 0; round < 2000; ++round) {
    std::string whole;
    const int n = std::uniform_int_distribution<int>(0, 24)(rng);
    for (int i = 0; i < n; ++i) whole += alphabet[rng() % alphabet.size()];
    std::string pending;
    std::string streamed;
    size_t pos = 0;
    while (pos < whole.size()) {
      const size_t take = std::min<size_t>(whole.size() - pos, 1 + rng() % 4);
      pending += whole.substr(pos, take);
      pos += take;
      const size_t final_len = FinalPrefixLength(pending);
      const std::string chunk = Lossy(std::string_view(pending).substr(0, final_len));
      ASSERT_TRUE(ValidateUtf8(chunk, "chunk").ok());
      streamed += chunk;
      pending.erase(0, final_len);
      ASSERT_LE(pending.size(), 3u);
    }
    streamed += Lossy(pending);
    ASSERT_EQ(streamed, Lossy(whole)) << "round " << round;
  }
}

}  // namespace
}  // namespace tokenlake::tokenizer
