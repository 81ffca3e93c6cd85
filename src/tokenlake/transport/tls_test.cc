#include "tokenlake/transport/tls.h"

#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tokenlake::transport {
namespace {

using ::testing::HasSubstr;
using ::testing::IsSupersetOf;

class TlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/tokenlake-tls-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // Runs a shell command; returns its exit status and output.
  static std::pair<int, std::string> Shell(const std::string& command) {
    std::string out;
    FILE* pipe = popen((command + " 2>&1").c_str(), "r");
    if (pipe == nullptr) return {-1, ""};
    char buf[512];
    while (fgets(buf, sizeof(buf), pipe) != nullptr) out += buf;
    const int status = pclose(pipe);
    return {WEXITSTATUS(status), out};
  }

  std::string dir_;
};

TEST_F(TlsTest, ANewClusterCaAndHostCertificateVerifyWithTheOpensslTool) {
  absl::StatusOr<TlsIdentity> id = MakeClusterCertificates(
      {.out_dir = dir_ + "/a", .hosts = {"node-1.example", "198.51.100.7", "2001:db8::7"}});
  ASSERT_TRUE(id.ok()) << id.status();
  EXPECT_THAT(id->names, IsSupersetOf({"node-1.example", "198.51.100.7", "2001:db8::7", "localhost",
                                       "127.0.0.1", "::1"}));
  EXPECT_GT(id->not_after, absl::Now() + absl::Hours(24 * 364));
  // An independent check: OpenSSL's own command-line verifier and certificate printer.
  auto [rc, out] =
      Shell(absl::StrCat("openssl verify -CAfile ", dir_, "/a/ca.pem ", dir_, "/a/cert.pem"));
  EXPECT_EQ(rc, 0) << out;
  auto [rc2, text] = Shell(absl::StrCat("openssl x509 -noout -text -in ", dir_, "/a/cert.pem"));
  ASSERT_EQ(rc2, 0) << text;
  EXPECT_THAT(text, HasSubstr("DNS:node-1.example"));
  EXPECT_THAT(text, HasSubstr("IP Address:198.51.100.7"));
  EXPECT_THAT(text, HasSubstr("TLS Web Server Authentication, TLS Web Client Authentication"));
  EXPECT_THAT(text, HasSubstr("CA:FALSE"));
  // Private keys are readable by the owner only.
  struct stat st;
  ASSERT_EQ(stat((dir_ + "/a/key.pem").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ASSERT_EQ(stat((dir_ + "/a/ca-key.pem").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST_F(TlsTest, AHostSignedByAnExistingCaVerifiesAgainstIt) {
  ASSERT_TRUE(MakeClusterCertificates({.out_dir = dir_ + "/ca", .hosts = {"ca-host"}}).ok());
  absl::StatusOr<TlsIdentity> b =
      MakeClusterCertificates({.out_dir = dir_ + "/b", .hosts = {"b"}, .ca_dir = dir_ + "/ca"});
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/b/ca-key.pem"));  // hosts get no CA key
  auto [rc, out] =
      Shell(absl::StrCat("openssl verify -CAfile ", dir_, "/ca/ca.pem ", dir_, "/b/cert.pem"));
  EXPECT_EQ(rc, 0) << out;
  // Two hosts of one CA have different keys.
  std::ifstream ka(dir_ + "/ca/key.pem"), kb(dir_ + "/b/key.pem");
  std::string a_key((std::istreambuf_iterator<char>(ka)), {});
  std::string b_key((std::istreambuf_iterator<char>(kb)), {});
  EXPECT_NE(a_key, b_key);
}

TEST_F(TlsTest, LoadRefusesEachBrokenFolderNamingTheFile) {
  ASSERT_TRUE(MakeClusterCertificates({.out_dir = dir_ + "/one", .hosts = {"one"}}).ok());
  ASSERT_TRUE(MakeClusterCertificates({.out_dir = dir_ + "/two", .hosts = {"two"}}).ok());

  // Missing folder / file.
  absl::StatusOr<TlsIdentity> missing = LoadTlsIdentity(dir_ + "/none");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("ca.pem"));
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("tokenlake certs"));

  // A certificate from another cluster's CA.
  std::filesystem::copy_file(dir_ + "/one/ca.pem", dir_ + "/two/ca.pem",
                             std::filesystem::copy_options::overwrite_existing);
  absl::StatusOr<TlsIdentity> foreign = LoadTlsIdentity(dir_ + "/two");
  EXPECT_EQ(foreign.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(foreign.status().message()), HasSubstr("two/cert.pem"));
  EXPECT_THAT(std::string(foreign.status().message()), HasSubstr("does not verify"));

  // Another host's key.
  std::filesystem::copy_file(dir_ + "/two/key.pem", dir_ + "/one/key.pem",
                             std::filesystem::copy_options::overwrite_existing);
  absl::StatusOr<TlsIdentity> wrong_key = LoadTlsIdentity(dir_ + "/one");
  EXPECT_EQ(wrong_key.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(wrong_key.status().message()), HasSubstr("one/key.pem"));

  // Not PEM at all.
  std::ofstream(dir_ + "/one/cert.pem") << "hello";
  absl::StatusOr<TlsIdentity> garbage = LoadTlsIdentity(dir_ + "/one");
  EXPECT_EQ(garbage.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(garbage.status().message()), HasSubstr("one/cert.pem"));
}

TEST_F(TlsTest, AnExpiredCertificateIsRefused) {
  ASSERT_TRUE(MakeClusterCertificates({.out_dir = dir_ + "/ca", .hosts = {"ca"}}).ok());
  ASSERT_TRUE(MakeClusterCertificates({.out_dir = dir_ + "/short",
                                       .hosts = {"short"},
                                       .valid_for = absl::Seconds(1),
                                       .ca_dir = dir_ + "/ca"})
                  .ok());
  absl::SleepFor(absl::Milliseconds(2100));
  absl::StatusOr<TlsIdentity> expired = LoadTlsIdentity(dir_ + "/short");
  EXPECT_EQ(expired.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(expired.status().message()), HasSubstr("expired"));
}

TEST_F(TlsTest, RefusesBadOptions) {
  EXPECT_EQ(MakeClusterCertificates({.out_dir = ""}).status().code(),
            absl::StatusCode::kInvalidArgument);
  absl::StatusOr<TlsIdentity> bad_host =
      MakeClusterCertificates({.out_dir = dir_ + "/x", .hosts = {"bad host!"}});
  EXPECT_EQ(bad_host.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad_host.status().message()), HasSubstr("bad host!"));
  EXPECT_EQ(MakeClusterCertificates({.out_dir = dir_ + "/x", .valid_for = absl::ZeroDuration()})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  absl::StatusOr<TlsIdentity> no_ca =
      MakeClusterCertificates({.out_dir = dir_ + "/x", .ca_dir = dir_ + "/nope"});
  EXPECT_EQ(no_ca.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(no_ca.status().message()), HasSubstr("nope/ca.pem"));
}

}  // namespace
}  // namespace tokenlake::transport
