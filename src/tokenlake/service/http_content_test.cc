// The front end's request parser and content decoding (http_parser.h): framing, every limit and
// its status, arrival in arbitrary pieces (random splits against the whole-buffer parse, seed
// printed), and bounded inflation of compressed bodies.
#include "tokenlake/service/http_parser.h"

#include <zlib.h>

#include <cstdlib>
#include <iostream>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"

namespace tokenlake::service {
namespace {

using State = HttpRequestParser::State;

HttpLimits SmallLimits() {
  return {.max_request_line = 64, .max_header_bytes = 256, .max_headers = 8, .max_body_bytes = 100};
}

// Parses `raw` whole; returns the final state.
State ParseAll(HttpRequestParser& p, const std::string& raw) { return p.Parse(raw); }

std::string Gzip(const std::string& data, int window_bits = 16 + MAX_WBITS) {
  z_stream z{};
  EXPECT_EQ(deflateInit2(&z, 9, Z_DEFLATED, window_bits, 8, Z_DEFAULT_STRATEGY), Z_OK);
  std::string out(deflateBound(&z, data.size()), '\0');
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data.data()));
  z.avail_in = static_cast<uInt>(data.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  EXPECT_EQ(deflate(&z, Z_FINISH), Z_STREAM_END);
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

TEST(HttpParserTest, ParsesARequestWithContentLengthAndLeavesThePipelinedRest) {
  HttpRequestParser p(SmallLimits());
  const std::string first =
      "POST /v1/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Type: "
      "application/x-www-form-urlencoded\r\nContent-Length: 5\r\n\r\nhello";
  ASSERT_EQ(ParseAll(p, first + "GET /metrics HTTP/1.1\r\n\r\n"), State::kComplete);
  EXPECT_EQ(p.request().method, "POST");
  EXPECT_EQ(p.request().path, "/v1/completions");
  EXPECT_EQ(p.request().body, "hello");
  EXPECT_EQ(p.request().Header("content-type"), "application/x-www-form-urlencoded");
  EXPECT_EQ(p.request_bytes(), first.size());
  EXPECT_TRUE(p.keep_alive());
}

TEST(HttpParserTest, ConnectionCloseAndHttp10DecideKeepAlive) {
  HttpRequestParser a(SmallLimits());
  ASSERT_EQ(a.Parse("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"), State::kComplete);
  EXPECT_FALSE(a.keep_alive());
  HttpRequestParser b(SmallLimits());
  ASSERT_EQ(b.Parse("GET / HTTP/1.0\r\n\r\n"), State::kComplete);
  EXPECT_FALSE(b.keep_alive());
  HttpRequestParser c(SmallLimits());
  ASSERT_EQ(c.Parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"), State::kComplete);
  EXPECT_TRUE(c.keep_alive());
}

TEST(HttpParserTest, EveryLimitHasItsOwnStatus) {
  struct Case {
    std::string raw;
    int status;
  };
  const std::vector<Case> cases = {
      {"GET /" + std::string(100, 'a') + " HTTP/1.1\r\n\r\n", 414},
      {"GET /" + std::string(100, 'a'), 414},  // before the line even ends
      {"GET / HTTP/1.1\r\nX: " + std::string(300, 'b') + "\r\n\r\n", 431},
      {"GET / HTTP/1.1\r\nX: " + std::string(300, 'b'), 431},
      {"GET / HTTP/1.1\r\n" +
           [] {
             std::string h;
             for (int i = 0; i < 9; ++i) h += absl::StrCat("H", i, ": v\r\n");
             return h;
           }() +
           "\r\n",
       431},
      {"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n", 413},
      {"POST / HTTP/1.1\r\n\r\n", 411},
      {"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501},
      {"POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n", 400},
      {"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400},
      {"GET / HTTP/2.0\r\n\r\n", 505},
      {"\x16\x03\x01 garbage\r\n\r\n", 400},
      {"GET / HTTP/1.1\r\n folded\r\n\r\n", 400},
      {"GET / HTTP/1.1\r\nno colon\r\n\r\n", 400},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n65\r\n", 413},  // 101 bytes
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000\r\n", 413},
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n50\r\n" + std::string(80, 'x') +
           "\r\n50\r\n",
       413},  // 160 bytes in two chunks
      {"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX", 400},
      {std::string(100, '\n'), 400},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.raw.substr(0, 80));
    HttpRequestParser p(SmallLimits());
    ASSERT_EQ(p.Parse(k.raw), State::kError);
    EXPECT_EQ(p.error_status(), k.status) << p.error_message();
    EXPECT_FALSE(p.error_message().empty());
    EXPECT_EQ(p.Parse(k.raw + "more"), State::kError);  // stays failed
  }
}

TEST(HttpParserTest, DecodesChunkedBodiesWithExtensionsAndTrailers) {
  HttpRequestParser p(SmallLimits());
  const std::string raw =
      "POST /x HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n"
      "5;ext=1\r\nhello\r\n1\n \n0\r\nTrailer: t\r\n\r\nNEXT";
  ASSERT_EQ(p.Parse(raw), State::kComplete);
  EXPECT_EQ(p.request().body, "hello ");
  EXPECT_EQ(p.request_bytes(), raw.size() - 4);
}

TEST(HttpParserTest, ExpectContinueIsNotedOnceHeadersAreAccepted) {
  HttpRequestParser p(SmallLimits());
  EXPECT_EQ(p.Parse("POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"),
            State::kIncomplete);
  EXPECT_TRUE(p.headers_done());
  EXPECT_TRUE(p.expects_continue());
  EXPECT_EQ(p.Parse("POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nabcd"),
            State::kComplete);
}

// Requests that arrive in random pieces parse exactly as when they arrive whole.
TEST(HttpParserTest, RandomSplitsParseLikeTheWholeBuffer) {
  uint64_t seed = std::random_device{}();
  if (const char* env = std::getenv("TOKENLAKE_TEST_SEED")) seed = std::strtoull(env, nullptr, 10);
  std::cout << "seed " << seed << " (TOKENLAKE_TEST_SEED to replay)\n";
  std::mt19937_64 rng(seed);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  const HttpLimits limits{.max_body_bytes = 4096};
  for (int round = 0; round < 300; ++round) {
    SCOPED_TRACE(absl::StrCat("seed ", seed, " round ", round));
    std::string body;
    const int n = pick(0, 3000);
    for (int i = 0; i < n; ++i) body.push_back(static_cast<char>(pick(0, 255)));
    std::string raw = "POST /p HTTP/1.1\r\nHost: h\r\n";
    if (pick(0, 1) == 0) {
      raw += absl::StrCat("Content-Length: ", body.size(), "\r\n\r\n", body);
    } else {
      raw += "Transfer-Encoding: chunked\r\n\r\n";
      size_t at = 0;
      while (at < body.size()) {
        const size_t len = std::min(body.size() - at, static_cast<size_t>(pick(1, 700)));
        raw += absl::StrFormat("%x\r\n", len) + body.substr(at, len) + "\r\n";
        at += len;
      }
      raw += "0\r\n\r\n";
    }
    HttpRequestParser whole(limits);
    ASSERT_EQ(whole.Parse(raw), State::kComplete);
    ASSERT_EQ(whole.request().body, body);
    HttpRequestParser pieces(limits);
    std::string arrived;
    State s = State::kIncomplete;
    size_t at = 0;
    while (at < raw.size()) {
      const size_t len = std::min(raw.size() - at, static_cast<size_t>(pick(1, 300)));
      arrived += raw.substr(at, len);
      at += len;
      s = pieces.Parse(arrived);
      if (at < raw.size()) {
        ASSERT_EQ(s, State::kIncomplete) << "at " << at;
      }
    }
    ASSERT_EQ(s, State::kComplete);
    EXPECT_EQ(pieces.request().body, body);
    EXPECT_EQ(pieces.request_bytes(), raw.size());
  }
}

TEST(HttpParserTest, ContentDecodingIsBoundedAndStrict) {
  const std::string text(5000, 'q');
  EXPECT_EQ(*DecodeContentEncoding(Gzip(text), "gzip", 5000), text);
  EXPECT_EQ(*DecodeContentEncoding(Gzip(text, MAX_WBITS), "deflate", 5000), text);
  EXPECT_EQ(*DecodeContentEncoding(text, "identity", 5000), text);
  EXPECT_EQ(*DecodeContentEncoding(Gzip("ab") + Gzip("cd"), "x-gzip", 10), "abcd");
  // A bomb: 8 MiB of zeros in a few KiB; refused after inflating little more than the limit.
  const std::string bomb = Gzip(std::string(8 << 20, '\0'));
  ASSERT_LT(bomb.size(), 16u << 10);
  EXPECT_EQ(DecodeContentEncoding(bomb, "gzip", 1 << 20).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(DecodeContentEncoding(text, "identity", 100).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(DecodeContentEncoding("not gzip at all", "gzip", 100).status().code(),
            absl::StatusCode::kInvalidArgument);
  const std::string cut = Gzip(text).substr(0, 20);
  EXPECT_EQ(DecodeContentEncoding(cut, "gzip", 10000).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodeContentEncoding(text, "br", 10000).status().code(),
            absl::StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace tokenlake::service
