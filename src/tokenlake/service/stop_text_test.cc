// StopText against the naive model: the whole text, cut before the stop sequence that
// completes first when read byte by byte, must equal the concatenation of what StopText emits for
// the text fed in random pieces; no emitted piece may end inside a UTF-8 character or contain a
// stop sequence's start that later completes.
#include "tokenlake/service/stop_text.h"

#include <algorithm>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace tokenlake::service {
namespace {

// Reads the text one byte at a time and stops at the first byte that completes any stop
// sequence, cutting before the earliest-starting occurrence that ends there.
std::string Naive(const std::string& text, const std::vector<std::string>& stops) {
  for (size_t end = 1; end <= text.size(); ++end) {
    size_t start = std::string::npos;
    for (const std::string& s : stops) {
      if (s.size() <= end && text.compare(end - s.size(), s.size(), s) == 0) {
        start = std::min(start, end - s.size());
      }
    }
    if (start != std::string::npos) return text.substr(0, start);
  }
  return text;
}

bool EndsOnCharacterBoundary(const std::string& s) {
  // The last character's first byte and its announced length.
  size_t i = s.size();
  while (i > 0 && (static_cast<unsigned char>(s[i - 1]) & 0xC0) == 0x80) --i;
  if (i == 0) return s.empty();
  const auto lead = static_cast<unsigned char>(s[i - 1]);
  const size_t len = lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
  return s.size() - (i - 1) == len;
}

TEST(StopTextTest, CutsBeforeTheEarliestStopAndHoldsBackOnlyAPossibleStart) {
  StopText st({"\n\n", "END"});
  EXPECT_EQ(st.Push("Hello E"), "Hello ");  // "E" may start "END"
  EXPECT_EQ(st.Push("N"), "");
  EXPECT_EQ(st.Push("X more"), "ENX more");  // it did not
  EXPECT_EQ(st.Push(" and\n"), " and");
  EXPECT_EQ(st.Push("\nrest"), "");  // "\n\n" completed
  EXPECT_TRUE(st.stopped());
  EXPECT_EQ(st.Push("later"), "");
  EXPECT_EQ(st.Finish(), "");

  StopText none({"zz"});
  EXPECT_EQ(none.Push("abz"), "ab");
  EXPECT_EQ(none.Finish(), "z");  // the end: what was held back goes out
  EXPECT_FALSE(none.stopped());
}

TEST(StopTextTest, TheStopThatCompletesFirstWinsWhateverThePieces) {
  StopText st({"cd", "b"});
  EXPECT_EQ(st.Push("abcd"), "a");
  EXPECT_TRUE(st.stopped());
  // "b" completes before "abc" does, in one piece or byte by byte.
  StopText whole({"abc", "b"});
  EXPECT_EQ(whole.Push("abc"), "a");
  StopText bytes({"abc", "b"});
  EXPECT_EQ(bytes.Push("a"), "");
  EXPECT_EQ(bytes.Push("b"), "a");
  EXPECT_TRUE(bytes.stopped());
  StopText multi({"é!", "ü"});
  EXPECT_EQ(multi.Push("aé"), "a");    // "é" may start "é!" (held whole: a character)
  EXPECT_EQ(multi.Push("éx"), "ééx");  // no
  EXPECT_EQ(multi.Push("ü"), "");
  EXPECT_TRUE(multi.stopped());
}

TEST(StopTextTest, RandomPiecesMatchTheNaiveCutAndEndOnCharacterBoundaries) {
  const uint32_t seed = std::random_device{}();
  std::cout << "seed " << seed << "\n";
  std::mt19937 rng(seed);
  // Characters of 1 to 4 bytes; stop sequences drawn from the same ones so that they occur.
  const std::vector<std::string> alphabet = {"a", "b", "\n", " ", "é", "€", "😀", "ab"};
  for (int round = 0; round < 2000; ++round) {
    std::vector<std::string> chars;
    const int n = std::uniform_int_distribution<int>(0, 30)(rng);
    for (int i = 0; i < n; ++i) chars.push_back(alphabet[rng() % alphabet.size()]);
    std::vector<std::string> stops;
    const int k = std::uniform_int_distribution<int>(1, 4)(rng);
    for (int i = 0; i < k; ++i) {
      std::string s;
      const int len = std::uniform_int_distribution<int>(1, 3)(rng);
      for (int j = 0; j < len; ++j) s += alphabet[rng() % 4 + (rng() % 2) * 4];
      stops.push_back(s);
    }
    std::string text;
    for (const std::string& c : chars) text += c;
    StopText st(stops);
    std::string emitted;
    size_t i = 0;
    while (i < chars.size() && !st.stopped()) {
      const size_t take = std::uniform_int_distribution<size_t>(0, 3)(rng);
      std::string piece;
      for (size_t j = 0; j < take && i < chars.size(); ++j) piece += chars[i++];
      const std::string out = st.Push(piece);
      ASSERT_TRUE(EndsOnCharacterBoundary(out)) << "seed " << seed << " round " << round;
      emitted += out;
      // Never more than the naive answer's prefix.
      ASSERT_EQ(Naive(text, stops).compare(0, emitted.size(), emitted), 0)
          << "seed " << seed << " round " << round;
    }
    emitted += st.Finish();
    ASSERT_EQ(emitted, Naive(text, stops)) << "seed " << seed << " round " << round;
    ASSERT_EQ(st.stopped(), Naive(text, stops).size() < text.size()) << "seed " << seed;
  }
}

}  // namespace
}  // namespace tokenlake::service
