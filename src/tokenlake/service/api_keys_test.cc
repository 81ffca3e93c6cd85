#include "tokenlake/service/api_keys.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tokenlake::service {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

TEST(ApiKeysTest, ParsesKeysTenantsAndLimitsAndFindsBearerKeys) {
  auto keys = ApiKeys::Parse(
      "# keys\n\nsk-aaaaaaaa tenant=team-a max_concurrent=2\n  sk-bbbbbbbb  \n", "keys.txt");
  ASSERT_TRUE(keys.ok()) << keys.status();
  ASSERT_EQ((*keys)->size(), 2);
  EXPECT_EQ((*keys)->key(0).tenant, "team-a");
  EXPECT_EQ((*keys)->key(0).max_concurrent, 2);
  EXPECT_EQ((*keys)->key(1).tenant, "");
  EXPECT_EQ((*keys)->Find("Bearer sk-aaaaaaaa"), 0);
  EXPECT_EQ((*keys)->Find("Bearer sk-bbbbbbbb"), 1);
  EXPECT_EQ((*keys)->Find("Bearer sk-bbbbbbb"), -1);  // a prefix is not the key
  EXPECT_EQ((*keys)->Find("Bearer sk-bbbbbbbbX"), -1);
  EXPECT_EQ((*keys)->Find("sk-aaaaaaaa"), -1);  // no scheme
  EXPECT_EQ((*keys)->Find("Basic sk-aaaaaaaa"), -1);
  EXPECT_EQ((*keys)->Find(""), -1);
}

TEST(ApiKeysTest, BadFilesNameFileAndLineButNeverTheKey) {
  struct Case {
    const char* text;
    const char* want;
  } cases[] = {
      {"sk-secret-1 tenant=a\nshort\n", "keys.txt:2: the key is shorter"},
      {"sk-secret-1 colour=blue\n", "keys.txt:1: 'colour'"},
      {"sk-secret-1 max_concurrent=-1\n", "keys.txt:1: 'max_concurrent'"},
      {"sk-secret-1\nsk-secret-1\n", "keys.txt:2: the key is listed twice"},
      {"# nothing\n", "keys.txt: no API key"},
  };
  for (const Case& c : cases) {
    auto keys = ApiKeys::Parse(c.text, "keys.txt");
    ASSERT_FALSE(keys.ok()) << c.text;
    EXPECT_EQ(keys.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(keys.status().message()), HasSubstr(c.want));
    EXPECT_THAT(std::string(keys.status().message()), Not(HasSubstr("sk-secret-1")));
  }
  EXPECT_EQ(ApiKeys::Load("/nonexistent/keys.txt").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace tokenlake::service
