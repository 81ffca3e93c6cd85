#include "tokenlake/engine/cuda/decode_gemm.h"

#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tokenlake/attention/bf16.h"
#include "tokenlake/attention/cuda/pdl_testing.h"
#include "tokenlake/base/random_testing.h"
#include "tokenlake/engine/cuda/device_buffer.h"
#include "tokenlake/engine/cuda/gpu_test_util.h"

namespace tokenlake::engine::cuda {
namespace {

using attention::FloatToBf16;
using testing_util::Download;
using testing_util::Upload;

std::vector<uint16_t> RandomBf16(std::mt19937_64& rng, size_t count, float scale) {
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  std::vector<uint16_t> v(count);
  for (uint16_t& e : v) e = FloatToBf16(uniform(rng) * scale);
  return v;
}

std::vector<float> RandomFloats(std::mt19937_64& rng, size_t count) {
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  std::vector<float> v(count);
  for (float& e : v) e = uniform(rng);
  return v;
}

struct Shape {
  int in, out;
};

// The weights of a call: [out][in], or [2 out][in] (gate rows, then up rows) for kSiluMulBf16.
std::vector<uint16_t> RandomWeights(std::mt19937_64& rng, Shape s, DenseEpilogue e) {
  const int rows = e == DenseEpilogue::kSiluMulBf16 ? 2 * s.out : s.out;
  return RandomBf16(rng, static_cast<size_t>(rows) * s.in, 0.1f);
}

constexpr DenseEpilogue kEpilogues[] = {DenseEpilogue::kStoreF32, DenseEpilogue::kAddF32,
                                        DenseEpilogue::kSiluMulBf16};

// One call's inputs, result and reference check; `again` repeats the call and expects the same
// bits (the slices are summed in a fixed order).
void CheckCall(std::mt19937_64& rng, const std::vector<uint16_t>& w, const DeviceBuffer& dw, int n,
               Shape s, DenseEpilogue e, DenseInput input, const DecodeGemmWorkspace& ws,
               cudaStream_t stream, bool pdl_with_late_input) {
  // float32 inputs (which the kernel must round to bf16) or bf16 ones; x is what the reference
  // reads.
  const std::vector<float> x32 = RandomFloats(rng, static_cast<size_t>(n) * s.in);
  std::vector<uint16_t> x(x32.size());
  for (size_t i = 0; i < x.size(); ++i) x[i] = FloatToBf16(x32[i]);
  const std::vector<float> y0 = RandomFloats(rng, static_cast<size_t>(n) * s.out);
  const DeviceBuffer staged = input == DenseInput::kF32 ? Upload(x32) : Upload(x);
  DeviceBuffer dx;
  ASSERT_TRUE(dx.Allocate(staged.size_bytes()).ok());
  if (pdl_with_late_input) {
    // The kernel before lets this one start at once and writes x 100 us later (x holds NaN
    // until then): an early read shows in the results.
    ASSERT_EQ(cudaMemset(dx.get(), 0xff, dx.size_bytes()), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_TRUE(attention::cuda::EnqueueDelayedCopy(dx.get(), staged.get(), staged.size_bytes(),
                                                    100'000, stream)
                    .ok());
  } else {
    ASSERT_EQ(cudaMemcpy(dx.get(), staged.get(), staged.size_bytes(), cudaMemcpyDeviceToDevice),
              cudaSuccess);
  }
  DeviceBuffer dy = Upload(y0);
  DeviceBuffer dy16;
  ASSERT_TRUE(dy16.Allocate(y0.size() * 2).ok());
  ASSERT_TRUE(DecodeGemm(dw.as<uint16_t>(), dx.get(), input, n, s.in, s.out, e, dy.as<float>(),
                         dy16.as<uint16_t>(), ws, stream, pdl_with_late_input)
                  .ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> y = Download<float>(dy, y0.size());
  const std::vector<uint16_t> y16 = Download<uint16_t>(dy16, y0.size());
  ASSERT_NO_FATAL_FAILURE(
      testing_util::ExpectDenseMatchesReference(w, x, y0, y, y16, n, s.in, s.out, e));
  if (pdl_with_late_input) return;
  DeviceBuffer again = Upload(y0);
  DeviceBuffer again16;
  ASSERT_TRUE(again16.Allocate(y0.size() * 2).ok());
  ASSERT_TRUE(DecodeGemm(dw.as<uint16_t>(), dx.get(), input, n, s.in, s.out, e, again.as<float>(),
                         again16.as<uint16_t>(), ws, stream)
                  .ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  if (e == DenseEpilogue::kSiluMulBf16) {
    ASSERT_EQ(Download<uint16_t>(again16, y0.size()), y16);
  } else {
    ASSERT_EQ(Download<float>(again, y0.size()), y);
  }
}

// Every epilogue; row counts across every tile bucket (8, 16, 32, 64 rows) and their edges;
// shapes split and not split, with outputs that are no multiple of a thread block's rows; the
// same workspace for every call (its counters must be left at zero by each).
TEST(DecodeGemmTest, MatchesAPlainReferenceOnRandomInputs) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(TestSeed(6101));
  absl::StatusOr<DecodeGemmWorkspace> ws = DecodeGemmWorkspace::Create(0);
  ASSERT_TRUE(ws.ok()) << ws.status();
  const Shape shapes[] = {{128, 1},     {128, 130},   {512, 300}, {1024, 4096},
                          {4096, 1000}, {256, 17000}, {1408, 77}};
  std::uniform_int_distribution<int> bucket(0, 7);
  for (const Shape& s : shapes) {
    for (DenseEpilogue e : kEpilogues) {
      const std::vector<uint16_t> w = RandomWeights(rng, s, e);
      const DeviceBuffer dw = Upload(w);
      for (int n : {1, 5, 8, 9, 16, 17, 32, 33, 64, 1 + 8 * bucket(rng)}) {
        // float32 input at odd row counts (as o_proj reads the attention's output).
        const DenseInput input = n % 2 == 1 ? DenseInput::kF32 : DenseInput::kBf16;
        SCOPED_TRACE(testing::Message()
                     << "in " << s.in << " out " << s.out << " epilogue " << static_cast<int>(e)
                     << " input " << static_cast<int>(input) << " n " << n << " splits "
                     << DecodeGemmSplits(n, s.in, s.out, e, *ws));
        ASSERT_NO_FATAL_FAILURE(CheckCall(rng, w, dw, n, s, e, input, *ws, nullptr, false));
      }
    }
  }
  // Matrices with few row blocks are split (what the partial sums and counters are for).
  EXPECT_GT(DecodeGemmSplits(32, 4096, 1000, DenseEpilogue::kAddF32, *ws), 1);
  EXPECT_GT(DecodeGemmSplits(32, 4096, 1000, DenseEpilogue::kSiluMulBf16, *ws), 1);
  EXPECT_EQ(DecodeGemmSplits(32, 256, 34000, DenseEpilogue::kStoreF32, *ws), 1);
}

// Under programmatic dependent launch the kernel may start while the kernel before it still
// runs, but must read x and y only once that kernel has completed.
TEST(DecodeGemmTest, UnderPdlReadsItsInputsOnlyAfterTheKernelBeforeIt) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(TestSeed(6102));
  absl::StatusOr<DecodeGemmWorkspace> ws = DecodeGemmWorkspace::Create(0);
  ASSERT_TRUE(ws.ok()) << ws.status();
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  for (const Shape s : {Shape{4096, 1024}, Shape{1024, 30000}}) {
    for (DenseEpilogue e : kEpilogues) {
      const std::vector<uint16_t> w = RandomWeights(rng, s, e);
      const DeviceBuffer dw = Upload(w);
      for (int n : {7, 32, 64}) {
        for (DenseInput input : {DenseInput::kBf16, DenseInput::kF32}) {
          SCOPED_TRACE(testing::Message()
                       << "in " << s.in << " out " << s.out << " epilogue " << static_cast<int>(e)
                       << " input " << static_cast<int>(input) << " n " << n);
          ASSERT_NO_FATAL_FAILURE(CheckCall(rng, w, dw, n, s, e, input, *ws, stream, true));
        }
      }
    }
  }
  ASSERT_EQ(cudaStreamDestroy(stream), cudaSuccess);
}

TEST(DecodeGemmTest, RejectsBadArguments) {
  SKIP_WITHOUT_GPU();
  absl::StatusOr<DecodeGemmWorkspace> ws = DecodeGemmWorkspace::Create(0);
  ASSERT_TRUE(ws.ok()) << ws.status();
  DeviceBuffer w, x, y;
  ASSERT_TRUE(w.Allocate(256 * 256 * 2).ok());
  ASSERT_TRUE(x.Allocate(65 * 256 * 2).ok());
  ASSERT_TRUE(y.Allocate(65 * 256 * 4).ok());
  const auto call = [&](int n, int in, int out, const uint16_t* wp, const DecodeGemmWorkspace& s,
                        DenseEpilogue e = DenseEpilogue::kStoreF32) {
    return DecodeGemm(wp, x.get(), DenseInput::kBf16, n, in, out, e, y.as<float>(), nullptr, s,
                      nullptr);
  };
  EXPECT_TRUE(call(1, 256, 256, w.as<uint16_t>(), *ws).ok());
  EXPECT_FALSE(call(0, 256, 256, w.as<uint16_t>(), *ws).ok());
  EXPECT_FALSE(call(65, 256, 256, w.as<uint16_t>(), *ws).ok());
  EXPECT_FALSE(call(1, 192, 256, w.as<uint16_t>(), *ws).ok());  // not a multiple of 128
  EXPECT_FALSE(call(1, 256, 0, w.as<uint16_t>(), *ws).ok());
  EXPECT_FALSE(call(1, 256, 256, w.as<uint16_t>() + 1, *ws).ok());
  EXPECT_FALSE(call(1, 256, 256, w.as<uint16_t>(), *ws, static_cast<DenseEpilogue>(7)).ok());
  EXPECT_FALSE(DecodeGemm(w.as<uint16_t>(), x.get(), static_cast<DenseInput>(5), 1, 256, 256,
                          DenseEpilogue::kStoreF32, y.as<float>(), nullptr, *ws, nullptr)
                   .ok());
  // kSiluMulBf16 needs y16.
  const absl::Status silu = call(1, 256, 128, w.as<uint16_t>(), *ws, DenseEpilogue::kSiluMulBf16);
  EXPECT_FALSE(silu.ok());
  EXPECT_NE(silu.message().find("y16"), std::string::npos) << silu;
  const absl::Status s = call(1, 256, 256, w.as<uint16_t>(), DecodeGemmWorkspace());
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("workspace"), std::string::npos) << s;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

}  // namespace
}  // namespace tokenlake::engine::cuda
