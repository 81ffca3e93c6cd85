// The front end's own handling of bodies and statuses (http_content.h): bounded inflation of
// compressed bodies, and the names of statuses.
#include "tokenlake/service/http_content.h"

#include <zlib.h>

#include <string>

#include "gtest/gtest.h"

namespace tokenlake::service {
namespace {

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

TEST(HttpContentTest, ContentDecodingIsBoundedAndStrict) {
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

TEST(HttpContentTest, StatusNamesAreTheReasonsInSnakeCase) {
  EXPECT_STREQ(HttpReason(413), "Payload Too Large");
  EXPECT_EQ(HttpStatusName(413), "payload_too_large");
  EXPECT_EQ(HttpStatusName(431), "request_header_fields_too_large");
  EXPECT_EQ(HttpStatusName(503), "service_unavailable");
}

}  // namespace
}  // namespace tokenlake::service
