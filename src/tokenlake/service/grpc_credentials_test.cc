#include "tokenlake/service/grpc_credentials.h"

#include <grpcpp/grpcpp.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tokenlake/v1/tokenlake.grpc.pb.h"

namespace tokenlake::service {
namespace {

// A Coordinator service whose Register answers instance id 7 and reports what it saw.
class FakeCoordinator final : public v1::Coordinator::Service {
  grpc::Status Register(grpc::ServerContext*, const v1::RegisterRequest*,
                        v1::RegisterReply* reply) override {
    reply->set_instance_id(7);
    return grpc::Status::OK;
  }
};

class GrpcCredentialsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/tokenlake-grpc-tls-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    cluster_ = *transport::MakeClusterCertificates({.out_dir = dir_ + "/ca", .hosts = {"coord"}});
    member_ = *transport::MakeClusterCertificates(
        {.out_dir = dir_ + "/member", .hosts = {"member"}, .ca_dir = dir_ + "/ca"});
    stranger_ = *transport::MakeClusterCertificates({.out_dir = dir_ + "/x", .hosts = {"x"}});
  }
  void TearDown() override {
    if (server_ != nullptr) server_->Shutdown();
    std::filesystem::remove_all(dir_);
  }

  int Serve(const transport::TlsIdentity* tls) {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", GrpcServerCredentials(tls), &port);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    EXPECT_NE(server_, nullptr);
    return port;
  }

  static grpc::Status Call(int port, const transport::TlsIdentity* tls, int32_t* id = nullptr) {
    auto channel =
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), GrpcChannelCredentials(tls));
    auto stub = v1::Coordinator::NewStub(channel);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(3));
    v1::RegisterRequest request;
    v1::RegisterReply reply;
    grpc::Status s = stub->Register(&context, request, &reply);
    if (id != nullptr) *id = reply.instance_id();
    return s;
  }

  std::string dir_;
  transport::TlsIdentity cluster_, member_, stranger_;
  FakeCoordinator service_;
  std::unique_ptr<grpc::Server> server_;
};

TEST_F(GrpcCredentialsTest, MembersOfTheClusterTalkUnderMutualTls) {
  const int port = Serve(&cluster_);
  int32_t id = 0;
  grpc::Status s = Call(port, &member_, &id);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(id, 7);
}

TEST_F(GrpcCredentialsTest, StrangersAndClearClientsAreRefused) {
  const int port = Serve(&cluster_);
  EXPECT_FALSE(Call(port, &stranger_).ok());  // a certificate from another CA
  EXPECT_FALSE(Call(port, nullptr).ok());     // no TLS at all
}

TEST_F(GrpcCredentialsTest, AClusterClientRefusesAServerInTheClear) {
  const int port = Serve(nullptr);
  EXPECT_TRUE(Call(port, nullptr).ok());
  EXPECT_FALSE(Call(port, &member_).ok());
}

}  // namespace
}  // namespace tokenlake::service
