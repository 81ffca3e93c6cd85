// LocalCluster's reading of the coordinator's port file: a malformed file is a clear error naming
// the file and the field, never an exception, both for the parser alone and for Start() over a
// stand-in coordinator that writes a bad file.
#include "tokenlake/service/local_cluster.h"

#include <stdlib.h>
#include <sys/stat.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenlake/base/random.h"
#include "tokenlake/base/random_testing.h"

namespace tokenlake::service {
namespace {

using ::testing::HasSubstr;

// What `tokenlake coordinator --port-file` writes (apps/tokenlake/coordinator_command.cc).
constexpr char kGoodFile[] =
    "{\"http_port\": 8080, \"grpc_port\": 9090, \"transport_port\": 7070}\n";

TEST(ParsePortFileTest, ReadsTheCoordinatorsFormatAndIgnoresOtherFields) {
  auto p = ParsePortFile(kGoodFile, "/tmp/c.ports");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->http_port, 8080);
  EXPECT_EQ(p->grpc_port, 9090);
  EXPECT_EQ(p->transport_port, 7070);
  auto extra =
      ParsePortFile(R"({"transport_port": 1, "http_port": 65535, "grpc_port": 2, "pid": 12})", "x");
  ASSERT_TRUE(extra.ok()) << extra.status();
  EXPECT_EQ(extra->http_port, 65535);
  EXPECT_EQ(extra->transport_port, 1);
  // What the coordinator writes now: it listens on no transport port.
  auto none = ParsePortFile(R"({"http_port": 8080, "grpc_port": 9090, "transport_port": 0})", "x");
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(none->transport_port, 0);
}

TEST(ParsePortFileTest, MalformedFilesNameTheFileAndTheField) {
  struct Case {
    const char* text;
    const char* says;  // the field named, or what is wrong with the whole file
  };
  for (const Case& c : {
           Case{"", "not a JSON object"},
           Case{"8080", "not a JSON object"},
           Case{"[8080, 9090, 7070]", "not a JSON object"},
           Case{"{\"http_port\": 8080, \"grpc_port\": 9090", "not a JSON object"},
           Case{R"({"grpc_port": 9090, "transport_port": 7070})", "'http_port'"},
           Case{R"({"http_port": 8080, "transport_port": 7070})", "'grpc_port'"},
           Case{R"({"http_port": 8080, "grpc_port": 9090})", "'transport_port'"},
           Case{R"({"http_port": 8080.5, "grpc_port": 9090, "transport_port": 7070})",
                "'http_port' must be an integer"},
           Case{R"({"http_port": "8080", "grpc_port": 9090, "transport_port": 7070})",
                "'http_port' must be an integer"},
           Case{R"({"http_port": 8080, "grpc_port": true, "transport_port": 7070})",
                "'grpc_port' must be an integer"},
           Case{R"({"http_port": 8080, "grpc_port": null, "transport_port": 7070})",
                "'grpc_port' must be an integer"},
           Case{R"({"http_port": 8080, "grpc_port": 9090, "transport_port": -1})",
                "'transport_port' must be an integer in [0, 65535]"},
           Case{R"({"http_port": 0, "grpc_port": 9090, "transport_port": 0})",
                "'http_port' must be an integer in [1, 65535]"},
           Case{R"({"http_port": -1, "grpc_port": 9090, "transport_port": 7070})",
                "'http_port' must be an integer in [1, 65535]"},
           Case{R"({"http_port": 65536, "grpc_port": 9090, "transport_port": 7070})",
                "'http_port' must be an integer in [1, 65535]"},
           Case{R"({"http_port": 18446744073709551615, "grpc_port": 9090, "transport_port": 1})",
                "'http_port' must be an integer in [1, 65535]"},
       }) {
    SCOPED_TRACE(c.text);
    auto p = ParsePortFile(c.text, "/work/c.ports");
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(p.status().message()), HasSubstr("/work/c.ports"));
    EXPECT_THAT(std::string(p.status().message()), HasSubstr(c.says));
  }
}

// Every prefix and random byte edits of a good file: an error or the right ports, never a throw.
TEST(ParsePortFileTest, TruncatedAndCorruptedFilesGiveErrorsOrValidPorts) {
  const std::string good = kGoodFile;
  for (size_t n = 0; n <= good.size(); ++n) {
    SCOPED_TRACE(n);
    auto p = ParsePortFile(good.substr(0, n), "f");
    if (n + 1 < good.size()) {  // only the whole object (with or without its newline) parses
      EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
    } else {
      ASSERT_TRUE(p.ok()) << p.status();
      EXPECT_EQ(p->grpc_port, 9090);
    }
  }
  const uint64_t seed = TestSeed(20261126);
  Rng rng(seed);
  const std::string alphabet = "{}[]\":,.-+e0123456789 \ntruefalsnl_xyz\\";
  int accepted = 0;
  for (int i = 0; i < 2000; ++i) {
    std::string text = good;
    const int edits = static_cast<int>(rng.UniformInt(1, 4));
    for (int e = 0; e < edits; ++e) {
      const size_t at = static_cast<size_t>(rng.UniformInt(0, text.size() - 1));
      const char ch = alphabet[static_cast<size_t>(rng.UniformInt(0, alphabet.size() - 1))];
      switch (rng.UniformInt(0, 2)) {
        case 0:
          text[at] = ch;
          break;
        case 1:
          text.insert(text.begin() + static_cast<std::ptrdiff_t>(at), ch);
          break;
        default:
          text.erase(at, 1);
          break;
      }
    }
    SCOPED_TRACE(testing::Message() << "seed=" << seed << " text=" << text);
    auto p = ParsePortFile(text, "f");
    if (p.ok()) {
      ++accepted;
      for (int32_t port : {p->http_port, p->grpc_port}) {
        EXPECT_GE(port, 1);
        EXPECT_LE(port, 65535);
      }
      EXPECT_GE(p->transport_port, 0);
      EXPECT_LE(p->transport_port, 65535);
    } else {
      EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_THAT(std::string(p.status().message()), HasSubstr("port file f"));
    }
  }
  std::cout << "accepted " << accepted << " of 2000 edited files\n";
}

// Start() over a stand-in `tokenlake` that, as coordinator, writes a malformed port file.
TEST(LocalClusterTest, StartReportsAMalformedPortFileAsAnError) {
  char dir_template[] = "/tmp/tokenlake-local-cluster-test-XXXXXX";
  ASSERT_NE(::mkdtemp(dir_template), nullptr);
  const std::string dir = dir_template;
  const std::string binary = dir + "/fake-tokenlake";
  {
    std::ofstream script(binary);
    script
        << "#!/bin/sh\n"
           "# Writes the port file atomically, as the real coordinator does, then waits.\n"
           "while [ $# -gt 0 ]; do\n"
           "  if [ \"$1\" = --port-file ]; then\n"
           "    printf '%s' '{\"http_port\": \"eighty\", \"grpc_port\": 1, \"transport_port\": 2}'"
           " > \"$2.tmp\" && mv \"$2.tmp\" \"$2\"\n"
           "  fi\n"
           "  shift\n"
           "done\n"
           "exec sleep 30\n";
  }
  ASSERT_EQ(::chmod(binary.c_str(), 0755), 0);
  LocalClusterOptions o;
  o.binary = binary;
  o.model = "unused";
  o.instances = 1;
  o.work_dir = dir;
  o.ready_timeout = absl::Seconds(20);
  auto c = LocalCluster::Start(o);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr(dir + "/tokenlake-coordinator-"));
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("'http_port' must be an integer"));
  // Start stopped the stand-in coordinator and removed its port file.
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    EXPECT_FALSE(absl::EndsWith(entry.path().string(), ".ports")) << entry.path();
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace tokenlake::service
