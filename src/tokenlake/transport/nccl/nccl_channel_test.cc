// GPU tests of nccl_channel.h: one process, one rank per visible GPU (ncclCommInitAll). With one
// GPU, rank 0 sends to itself (send and receive in one group); with two or more, every ordered
// pair of ranks exchanges (and every rank also sends to itself). Random payloads of random shapes
// (query tensors bf16/f32, partials, segments), byte-exact comparison with what was sent;
// destinations are poisoned before each round. Bad arguments -> InvalidArgument naming the field.
// Also prints one bandwidth figure: a 64 MiB self send/recv on device 0 (a same-GPU copy through
// NCCL, not NVLink). Skips cleanly without a GPU.
#include "tokenlake/transport/nccl/nccl_channel.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tokenlake::transport::nccl {
namespace {

using ::testing::HasSubstr;

int GpuCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

#define SKIP_WITHOUT_GPU() \
  if (GpuCount() == 0) GTEST_SKIP() << "no CUDA device"

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << cudaGetErrorString(cudaGetLastError())

// A device buffer on a given device, freed at scope exit.
class DeviceBuffer {
 public:
  DeviceBuffer(int device, size_t bytes) : device_(device), bytes_(bytes) {
    cudaSetDevice(device);
    if (bytes > 0 && cudaMalloc(&ptr_, bytes) != cudaSuccess) ptr_ = nullptr;
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) {
      cudaSetDevice(device_);
      cudaFree(ptr_);
    }
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  int device_;
  size_t bytes_;
  void* ptr_ = nullptr;
};

std::vector<int> AllDevices() {
  std::vector<int> devices(GpuCount());
  for (size_t i = 0; i < devices.size(); ++i) devices[i] = static_cast<int>(i);
  return devices;
}

// One tensor transfer of the test: `bytes` of random content from src (on the sender's device) to
// dst (on the receiver's device), as a query tensor, a partial (out + lse) or a segment.
struct Transfer {
  enum Kind { kQueries, kPartial, kSegment } kind;
  int from = 0;
  int to = 0;
  QueryTensor queries;    // shape (kQueries)
  PartialTensor partial;  // shape (kPartial)
  int64_t segment_bytes = 0;
  // Buffers: [0] queries/out/segment, [1] lse (partial only).
  std::vector<std::unique_ptr<DeviceBuffer>> src, dst;
  std::vector<std::vector<uint8_t>> expected;
};

int64_t RandomIn(std::mt19937_64& rng, int64_t lo, int64_t hi) {
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

// Fills device buffer `buffer` with random bytes and returns them.
std::vector<uint8_t> FillRandom(std::mt19937_64& rng, const DeviceBuffer& buffer) {
  std::vector<uint8_t> bytes(buffer.bytes());
  for (auto& b : bytes) b = static_cast<uint8_t>(rng());
  if (!bytes.empty()) {
    EXPECT_EQ(cudaMemcpy(buffer.get(), bytes.data(), bytes.size(), cudaMemcpyHostToDevice),
              cudaSuccess);
  }
  return bytes;
}

std::unique_ptr<Transfer> MakeTransfer(std::mt19937_64& rng, int from, int to) {
  auto t = std::make_unique<Transfer>();
  t->from = from;
  t->to = to;
  t->kind = static_cast<Transfer::Kind>(RandomIn(rng, 0, 2));
  const int64_t heads = RandomIn(rng, 0, 1) ? 32 : 8;
  const int64_t dim = RandomIn(rng, 0, 1) ? 128 : 64;
  const int64_t tokens = RandomIn(rng, 0, 4) == 0 ? 0 : RandomIn(rng, 1, 300);
  std::vector<int64_t> sizes;
  switch (t->kind) {
    case Transfer::kQueries:
      t->queries.dtype = RandomIn(rng, 0, 1) ? QueryDtype::kBFloat16 : QueryDtype::kFloat32;
      t->queries.num_tokens = tokens;
      t->queries.num_heads = heads;
      t->queries.head_dim = dim;
      sizes = {*QueryTensorBytes(t->queries)};
      break;
    case Transfer::kPartial:
      t->partial.num_tokens = tokens;
      t->partial.num_heads = heads;
      t->partial.head_dim = dim;
      sizes = {*PartialOutBytes(t->partial), *PartialLseBytes(t->partial)};
      break;
    case Transfer::kSegment:
      // Odd sizes too: NCCL moves bytes, no alignment needed.
      t->segment_bytes = RandomIn(rng, 0, 4) == 0 ? 0 : RandomIn(rng, 1, 6 << 20);
      sizes = {t->segment_bytes};
      break;
  }
  for (int64_t size : sizes) {
    t->src.push_back(std::make_unique<DeviceBuffer>(from, size));
    t->dst.push_back(std::make_unique<DeviceBuffer>(to, size));
    t->expected.push_back(FillRandom(rng, *t->src.back()));
    // Poison the destination.
    if (size > 0) {
      cudaSetDevice(to);
      EXPECT_EQ(cudaMemset(t->dst.back()->get(), 0xA5, size), cudaSuccess);
    }
  }
  return t;
}

absl::Status AddSend(Batch& batch, Transfer& t) {
  switch (t.kind) {
    case Transfer::kQueries: {
      QueryTensor q = t.queries;
      q.data = t.src[0]->get();
      return batch.AddSendQueries(t.to, q);
    }
    case Transfer::kPartial: {
      PartialTensor p = t.partial;
      p.out = static_cast<float*>(t.src[0]->get());
      p.lse = static_cast<float*>(t.src[1]->get());
      return batch.AddSendPartial(t.to, p);
    }
    case Transfer::kSegment:
      return batch.AddSendSegment(t.to, SegmentBytes{t.src[0]->get(), t.segment_bytes});
  }
  return absl::InternalError("unreachable");
}

absl::Status AddRecv(Batch& batch, Transfer& t) {
  switch (t.kind) {
    case Transfer::kQueries: {
      QueryTensor q = t.queries;
      q.data = t.dst[0]->get();
      return batch.AddRecvQueries(t.from, q);
    }
    case Transfer::kPartial: {
      PartialTensor p = t.partial;
      p.out = static_cast<float*>(t.dst[0]->get());
      p.lse = static_cast<float*>(t.dst[1]->get());
      return batch.AddRecvPartial(t.from, p);
    }
    case Transfer::kSegment:
      return batch.AddRecvSegment(t.from, SegmentBytes{t.dst[0]->get(), t.segment_bytes});
  }
  return absl::InternalError("unreachable");
}

struct Ranks {
  std::vector<std::unique_ptr<NcclComm>> comms;
  std::vector<cudaStream_t> streams;
  ~Ranks() {
    for (size_t i = 0; i < streams.size(); ++i) {
      cudaSetDevice(comms[i]->device());
      cudaStreamDestroy(streams[i]);
    }
  }
};

void MakeRanks(Ranks* ranks) {
  absl::StatusOr<std::vector<std::unique_ptr<NcclComm>>> comms = NcclComm::CreateAll(AllDevices());
  ASSERT_TRUE(comms.ok()) << comms.status();
  ranks->comms = std::move(*comms);
  for (const auto& comm : ranks->comms) {
    cudaStream_t stream = nullptr;
    CUDA_OK(cudaSetDevice(comm->device()));
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    ranks->streams.push_back(stream);
  }
}

// Runs without a device: the byte sizes and shape errors that every Add* checks first.
TEST(NcclTensorBytesTest, SizesByHandAndShapeErrorsNameTheField) {
  EXPECT_EQ(*QueryTensorBytes({nullptr, QueryDtype::kBFloat16, 3, 32, 128}), 3 * 32 * 128 * 2);
  EXPECT_EQ(*QueryTensorBytes({nullptr, QueryDtype::kFloat32, 3, 32, 128}), 3 * 32 * 128 * 4);
  EXPECT_EQ(*QueryTensorBytes({nullptr, QueryDtype::kFloat32, 0, 32, 128}), 0);
  PartialTensor p{nullptr, nullptr, 5, 8, 64};
  EXPECT_EQ(*PartialOutBytes(p), 5 * 8 * 64 * 4);
  EXPECT_EQ(*PartialLseBytes(p), 5 * 8 * 4);
  auto expect_invalid = [](const absl::Status& status, const std::string& field) {
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_THAT(std::string(status.message()), HasSubstr(field));
  };
  expect_invalid(QueryTensorBytes({nullptr, QueryDtype::kFloat32, -1, 8, 64}).status(),
                 "queries.num_tokens");
  expect_invalid(QueryTensorBytes({nullptr, QueryDtype::kFloat32, 1, 0, 64}).status(),
                 "queries.num_heads");
  expect_invalid(QueryTensorBytes({nullptr, static_cast<QueryDtype>(9), 1, 8, 64}).status(),
                 "queries.dtype");
  expect_invalid(PartialOutBytes({nullptr, nullptr, 1, 8, -64}).status(), "partial.head_dim");
  expect_invalid(PartialLseBytes({nullptr, nullptr, int64_t{1} << 62, 8, 64}).status(), "overflow");
}

TEST(NcclChannelTest, RandomTensorsArriveByteExactBetweenEveryPairOfRanks) {
  SKIP_WITHOUT_GPU();
  Ranks ranks;
  ASSERT_NO_FATAL_FAILURE(MakeRanks(&ranks));
  const int world = static_cast<int>(ranks.comms.size());
  std::cout << "ranks (GPUs): " << world << "\n";
  for (int round = 0; round < 6; ++round) {
    const uint64_t seed = 1000 + round;
    SCOPED_TRACE("seed=" + std::to_string(seed));
    std::cout << "seed=" << seed << "\n";
    std::mt19937_64 rng(seed);
    // Several transfers per ordered pair (self included), random kinds and sizes.
    std::vector<std::unique_ptr<Transfer>> transfers;
    for (int from = 0; from < world; ++from) {
      for (int to = 0; to < world; ++to) {
        const int n = static_cast<int>(RandomIn(rng, 1, 4));
        for (int i = 0; i < n; ++i) transfers.push_back(MakeTransfer(rng, from, to));
      }
    }
    // Shuffle the issue order across peers; per pair, the order stays that of `transfers` (rule
    // 1), on both sides.
    std::vector<std::unique_ptr<Batch>> batches;
    for (int r = 0; r < world; ++r) {
      batches.push_back(std::make_unique<Batch>(ranks.comms[r].get(), ranks.streams[r]));
    }
    int64_t sent = 0;
    for (auto& t : transfers) {
      ASSERT_TRUE(AddSend(*batches[t->from], *t).ok());
      ASSERT_TRUE(AddRecv(*batches[t->to], *t).ok());
      for (const auto& e : t->expected) sent += static_cast<int64_t>(e.size());
    }
    int64_t batch_sent = 0, batch_received = 0;
    std::vector<Batch*> all;
    for (auto& b : batches) {
      batch_sent += b->send_bytes();
      batch_received += b->recv_bytes();
      all.push_back(b.get());
    }
    EXPECT_EQ(batch_sent, sent);
    EXPECT_EQ(batch_received, sent);
    absl::Status submitted = Batch::SubmitAll(all);
    ASSERT_TRUE(submitted.ok()) << submitted;
    for (int r = 0; r < world; ++r) {
      CUDA_OK(cudaSetDevice(ranks.comms[r]->device()));
      CUDA_OK(cudaStreamSynchronize(ranks.streams[r]));
      ASSERT_TRUE(ranks.comms[r]->AsyncError().ok());
    }
    for (size_t i = 0; i < transfers.size(); ++i) {
      const Transfer& t = *transfers[i];
      for (size_t b = 0; b < t.expected.size(); ++b) {
        std::vector<uint8_t> got(t.expected[b].size());
        if (!got.empty()) {
          CUDA_OK(cudaMemcpy(got.data(), t.dst[b]->get(), got.size(), cudaMemcpyDeviceToHost));
        }
        ASSERT_TRUE(got == t.expected[b])
            << "transfer " << i << " (kind " << t.kind << ", " << t.from << " -> " << t.to
            << ") buffer " << b << " of " << got.size() << " bytes differs";
      }
    }
    // A submitted batch cannot be submitted again.
    EXPECT_EQ(batches[0]->Submit().code(), absl::StatusCode::kFailedPrecondition);
  }
}

TEST(NcclChannelTest, OneMessageFormsMatchTheirTwins) {
  SKIP_WITHOUT_GPU();
  if (GpuCount() < 2) {
    GTEST_SKIP() << "the one-message forms need two ranks (a rank sending to itself must post "
                    "send and receive in one group); this machine has 1 GPU";
  }
  Ranks ranks;
  ASSERT_NO_FATAL_FAILURE(MakeRanks(&ranks));
  std::mt19937_64 rng(7);
  auto t = MakeTransfer(rng, 0, 1);
  // Two ranks driven by one thread: wrap the two one-message calls in one outer group.
  ASSERT_EQ(ncclGroupStart(), ncclSuccess);
  QueryTensor q{t->src[0]->get(), QueryDtype::kFloat32, 0, 1, 1};
  // An empty tensor sends nothing and succeeds.
  EXPECT_TRUE(SendQueries(*ranks.comms[0], 1, q, ranks.streams[0]).ok());
  SegmentBytes src{t->src[0]->get(), static_cast<int64_t>(t->expected[0].size())};
  SegmentBytes dst{t->dst[0]->get(), static_cast<int64_t>(t->expected[0].size())};
  EXPECT_TRUE(SendSegment(*ranks.comms[0], 1, src, ranks.streams[0]).ok());
  EXPECT_TRUE(RecvSegment(*ranks.comms[1], 0, dst, ranks.streams[1]).ok());
  ASSERT_EQ(ncclGroupEnd(), ncclSuccess);
  for (int r = 0; r < 2; ++r) {
    CUDA_OK(cudaSetDevice(r));
    CUDA_OK(cudaStreamSynchronize(ranks.streams[r]));
  }
  std::vector<uint8_t> got(t->expected[0].size());
  if (!got.empty()) {
    CUDA_OK(cudaMemcpy(got.data(), dst.data, got.size(), cudaMemcpyDeviceToHost));
  }
  EXPECT_TRUE(got == t->expected[0]);
}

TEST(NcclChannelTest, BadArgumentsAreInvalidArgumentNamingTheField) {
  SKIP_WITHOUT_GPU();
  Ranks ranks;
  ASSERT_NO_FATAL_FAILURE(MakeRanks(&ranks));
  NcclComm& comm = *ranks.comms[0];
  const int world = comm.world();
  DeviceBuffer buffer(0, 1 << 20);
  ASSERT_NE(buffer.get(), nullptr);
  std::vector<uint8_t> host(1 << 20);
  Batch batch(&comm, ranks.streams[0]);

  auto expect_invalid = [](const absl::Status& status, const std::string& field) {
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_THAT(std::string(status.message()), HasSubstr(field));
  };
  QueryTensor q{buffer.get(), QueryDtype::kBFloat16, 2, 8, 64};
  expect_invalid(batch.AddSendQueries(world, q), "peer");
  expect_invalid(batch.AddRecvQueries(-1, q), "peer");
  QueryTensor bad = q;
  bad.data = nullptr;
  expect_invalid(batch.AddSendQueries(0, bad), "queries.data is null");
  bad = q;
  bad.num_tokens = -1;
  expect_invalid(batch.AddSendQueries(0, bad), "queries.num_tokens");
  bad = q;
  bad.num_heads = 0;
  expect_invalid(batch.AddRecvQueries(0, bad), "queries.num_heads");
  bad = q;
  bad.head_dim = 0;
  expect_invalid(batch.AddRecvQueries(0, bad), "queries.head_dim");
  bad = q;
  bad.dtype = static_cast<QueryDtype>(7);
  expect_invalid(batch.AddSendQueries(0, bad), "queries.dtype");
  bad = q;
  bad.num_tokens = int64_t{1} << 40;
  bad.num_heads = int64_t{1} << 20;
  expect_invalid(batch.AddSendQueries(0, bad), "overflow");
  bad = q;
  bad.data = host.data();
  expect_invalid(batch.AddSendQueries(0, bad), "queries.data is not");

  PartialTensor p{static_cast<float*>(buffer.get()), static_cast<float*>(buffer.get()) + 4 * 8 * 64,
                  4, 8, 64};
  PartialTensor badp = p;
  badp.lse = nullptr;
  expect_invalid(batch.AddSendPartial(0, badp), "partial.lse is null");
  badp = p;
  badp.out = nullptr;
  expect_invalid(batch.AddRecvPartial(0, badp), "partial.out is null");
  badp = p;
  badp.lse = badp.out + 1;
  expect_invalid(batch.AddSendPartial(0, badp), "overlap");
  badp = p;
  badp.num_heads = -2;
  expect_invalid(batch.AddSendPartial(0, badp), "partial.num_heads");
  badp = p;
  badp.lse = reinterpret_cast<float*>(host.data());
  expect_invalid(batch.AddRecvPartial(0, badp), "partial.lse is not");

  expect_invalid(batch.AddSendSegment(0, SegmentBytes{buffer.get(), -5}), "segment.bytes");
  expect_invalid(batch.AddRecvSegment(0, SegmentBytes{nullptr, 16}), "segment.data is null");
  expect_invalid(batch.AddRecvSegment(0, SegmentBytes{host.data(), 16}), "segment.data is not");
  // Nothing was recorded by the rejected calls.
  EXPECT_EQ(batch.num_messages(), 0u);
  // Empty tensors are fine with a null pointer and record nothing.
  EXPECT_TRUE(batch.AddSendSegment(0, SegmentBytes{nullptr, 0}).ok());
  EXPECT_TRUE(batch.AddSendQueries(0, QueryTensor{nullptr, QueryDtype::kFloat32, 0, 8, 64}).ok());
  EXPECT_EQ(batch.num_messages(), 0u);
  EXPECT_TRUE(batch.Submit().ok());

  // Comm creation arguments.
  absl::StatusOr<ncclUniqueId> id = NcclComm::NewUniqueId();
  ASSERT_TRUE(id.ok()) << id.status();
  expect_invalid(NcclComm::Create(2, 2, *id, 0).status(), "rank");
  expect_invalid(NcclComm::Create(0, 0, *id, 0).status(), "world");
  expect_invalid(NcclComm::Create(0, 1, *id, GpuCount()).status(), "device");
  expect_invalid(NcclComm::CreateAll({}).status(), "devices");
  expect_invalid(NcclComm::CreateAll({0, 0}).status(), "repeats");
}

// Not a timed test: prints one figure for docs/results-gpu.md. Same-GPU self send/recv of 64 MiB
// through NCCL on device 0 (a device-local copy, NOT an NVLink figure).
TEST(NcclChannelTest, PrintsSelfSendBandwidthOf64MiB) {
  SKIP_WITHOUT_GPU();
  absl::StatusOr<std::vector<std::unique_ptr<NcclComm>>> comms = NcclComm::CreateAll({0});
  ASSERT_TRUE(comms.ok()) << comms.status();
  NcclComm& comm = *(*comms)[0];
  constexpr int64_t kBytes = int64_t{64} << 20;
  DeviceBuffer src(0, kBytes), dst(0, kBytes);
  ASSERT_NE(src.get(), nullptr);
  ASSERT_NE(dst.get(), nullptr);
  std::mt19937_64 rng(3);
  std::vector<uint8_t> expected = FillRandom(rng, src);
  cudaStream_t stream = nullptr;
  CUDA_OK(cudaSetDevice(0));
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t start, stop;
  CUDA_OK(cudaEventCreate(&start));
  CUDA_OK(cudaEventCreate(&stop));
  auto once = [&]() -> absl::Status {
    Batch batch(&comm, stream);
    if (absl::Status s = batch.AddSendSegment(0, SegmentBytes{src.get(), kBytes}); !s.ok()) {
      return s;
    }
    if (absl::Status s = batch.AddRecvSegment(0, SegmentBytes{dst.get(), kBytes}); !s.ok()) {
      return s;
    }
    return batch.Submit();
  };
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(once().ok());
  std::vector<float> ms;
  for (int i = 0; i < 20; ++i) {
    CUDA_OK(cudaEventRecord(start, stream));
    ASSERT_TRUE(once().ok());
    CUDA_OK(cudaEventRecord(stop, stream));
    CUDA_OK(cudaEventSynchronize(stop));
    float t = 0;
    CUDA_OK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  const double median_ms = ms[ms.size() / 2];
  std::vector<uint8_t> got(kBytes);
  CUDA_OK(cudaMemcpy(got.data(), dst.get(), kBytes, cudaMemcpyDeviceToHost));
  EXPECT_TRUE(got == expected);
  cudaDeviceProp prop{};
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  std::cout << "nccl self send/recv (same GPU, not NVLink): " << prop.name << ", 64 MiB, median of "
            << ms.size() << ": " << median_ms << " ms = " << kBytes / (median_ms * 1e-3) / 1e9
            << " GB/s of payload\n";
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace tokenlake::transport::nccl
