// PeerArena and IpcEvent between real processes: this binary starts itself again as the peer
// (peer_process_testing.h), the child modes below say what a peer does, and the tests check the
// outcome in the parent (bytes, exit codes). Every random pattern prints its seed.
//
// Without a CUDA device the GPU tests skip; the argument checks that need no device still run.
#include "tokenlake/store/cuda/peer_arena.h"

#include <cuda_runtime_api.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenlake/store/cuda/cuda_device.h"
#include "tokenlake/store/cuda/device_arena.h"
#include "tokenlake/store/cuda/ipc_handle.h"
#include "tokenlake/store/cuda/peer_process_testing.h"

namespace tokenlake::store {
namespace {

using internal::HaveCudaDevice;

using ::testing::HasSubstr;

// A multiple of 2 MiB, as exported arenas should be (device_arena.h).
constexpr size_t kArenaBytes = size_t{8} << 20;

// ---------------------------------------------------------------------------------------------
// The child side. Each mode returns a ChildExit code; objects are destroyed on return, so the
// mappings are closed through the code under test before the process exits.

template <typename Handle>
std::optional<Handle> HandleFlag(const ChildContext& c, const std::string& name, std::string* why) {
  auto hex = c.Flag(name);
  if (!hex) {
    *why = "missing --" + name;
    return std::nullopt;
  }
  auto bytes = FromHex(*hex);
  if (!bytes) {
    *why = "--" + name + " is not lower-case hex";
    return std::nullopt;
  }
  auto handle = Handle::Parse(*bytes);
  if (!handle.ok()) {
    *why = handle.status().ToString();
    return std::nullopt;
  }
  return *handle;
}

// Reads `region` of device memory at `base` and compares it with Pattern(seed).
int CheckDeviceBytes(const ChildContext& c, const void* base, Region region, uint64_t seed,
                     const std::string& what) {
  std::vector<uint8_t> got(region.bytes);
  const cudaError_t err = cudaMemcpy(got.data(), static_cast<const uint8_t*>(base) + region.offset,
                                     region.bytes, cudaMemcpyDeviceToHost);
  if (err != cudaSuccess) {
    return c.Fail(kChildCudaError, absl::StrCat("reading ", what, ": ", cudaGetErrorString(err)));
  }
  const int64_t diff = FirstDifference(got, Pattern(seed, region.bytes));
  if (diff >= 0) {
    return c.Fail(kChildMismatch,
                  absl::StrFormat("%s: byte %d of %d (arena offset %d) differs "
                                  "(seed %d)",
                                  what, diff, region.bytes, region.offset + diff, seed));
  }
  return kChildOk;
}

// verify-write: maps --arena; checks --read against Pattern(--read-seed); writes
// Pattern(--write-seed) to --write; copies --read to --copy-to on the device; opens the handle a
// second time (CUDA's reference-counted mapping: same pointer, and closing it keeps the first).
int ChildVerifyWrite(ChildContext& c) {
  std::string why;
  auto handle = HandleFlag<ArenaHandle>(c, "arena", &why);
  auto read = Region::Parse(c.Flag("read").value_or(""));
  auto write = Region::Parse(c.Flag("write").value_or(""));
  auto read_seed = c.NumberFlag("read-seed");
  auto write_seed = c.NumberFlag("write-seed");
  auto copy_to = c.NumberFlag("copy-to");
  if (!handle || !read || !write || !read_seed || !write_seed || !copy_to) {
    return c.Fail(kChildUsage,
                  "usage: --arena=HEX --read=OFF:LEN --read-seed=N --write=OFF:LEN "
                  "--write-seed=N --copy-to=OFF (" +
                      why + ")");
  }
  auto peer = PeerArena::Open(*handle);
  if (!peer.ok()) {
    return c.Fail(kChildOpenFailedBase + static_cast<int>(peer.status().code()),
                  peer.status().ToString());
  }
  const PeerArena& arena = **peer;
  if (arena.data() == nullptr || arena.size_bytes() != handle->size_bytes ||
      !(arena.origin() == handle->origin)) {
    return c.Fail(kChildUnexpected, "the mapping does not describe the handle's arena");
  }
  if (read->offset + read->bytes > arena.size_bytes() ||
      write->offset + write->bytes > arena.size_bytes() ||
      *copy_to + read->bytes > arena.size_bytes()) {
    return c.Fail(kChildUsage, "a region is outside the arena");
  }
  if (int rc = CheckDeviceBytes(c, arena.data(), *read, *read_seed, "the parent's bytes");
      rc != kChildOk) {
    return rc;
  }
  auto* base = static_cast<uint8_t*>(arena.data());
  const std::vector<uint8_t> mine = Pattern(*write_seed, write->bytes);
  cudaError_t err =
      cudaMemcpy(base + write->offset, mine.data(), mine.size(), cudaMemcpyHostToDevice);
  if (err == cudaSuccess) {
    err = cudaMemcpy(base + *copy_to, base + read->offset, read->bytes, cudaMemcpyDeviceToDevice);
  }
  // The parent reads after this process exits; synchronising first is the protocol's rule 1.
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    return c.Fail(kChildCudaError, absl::StrCat("writing: ", cudaGetErrorString(err)));
  }
  {
    auto again = PeerArena::Open(*handle);
    if (!again.ok()) {
      return c.Fail(kChildOpenFailedBase + static_cast<int>(again.status().code()),
                    absl::StrCat("second open: ", again.status().ToString()));
    }
    if ((*again)->data() != arena.data()) {
      return c.Fail(kChildUnexpected, "a second open of the same handle mapped another address");
    }
  }
  // The first mapping survives closing the second.
  if (int rc = CheckDeviceBytes(c, arena.data(), *write, *write_seed, "own bytes after reopen");
      rc != kChildOk) {
    return rc;
  }
  c.Say("verified, wrote and copied");
  return kChildOk;
}

// open: maps --arena and closes it; the exit code tells the outcome.
int ChildOpen(ChildContext& c) {
  std::string why;
  auto handle = HandleFlag<ArenaHandle>(c, "arena", &why);
  if (!handle) return c.Fail(kChildUsage, "usage: --arena=HEX (" + why + ")");
  auto peer = PeerArena::Open(*handle);
  if (!peer.ok()) {
    return c.Fail(kChildOpenFailedBase + static_cast<int>(peer.status().code()),
                  peer.status().ToString());
  }
  c.Say("opened");
  return kChildOk;
}

// export: creates an arena of --bytes filled with Pattern(--seed), sends its handle as a hex line,
// then waits for "check OFF:LEN SEED" (the parent wrote Pattern(SEED) there and closed its
// mapping), checks it and exits.
int ChildExport(ChildContext& c) {
  auto bytes = c.NumberFlag("bytes");
  auto seed = c.NumberFlag("seed");
  if (!bytes || !seed) return c.Fail(kChildUsage, "usage: --bytes=N --seed=N");
  auto arena = DeviceArena::Create({.bytes = *bytes});
  if (!arena.ok()) return c.Fail(kChildCudaError, arena.status().ToString());
  const std::vector<uint8_t> fill = Pattern(*seed, *bytes);
  cudaError_t err = cudaMemcpy((*arena)->data(), fill.data(), fill.size(), cudaMemcpyHostToDevice);
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err != cudaSuccess) return c.Fail(kChildCudaError, cudaGetErrorString(err));
  auto handle = (*arena)->ExportHandle();
  if (!handle.ok()) return c.Fail(kChildUnexpected, handle.status().ToString());
  if (!SendLine(kChildFd, ToHex(handle->Serialize()))) {
    return c.Fail(kChildChannel, "cannot send the handle");
  }
  std::string why;
  auto line = c.ReadParentLine(&why);
  if (!line) return c.Fail(kChildChannel, "waiting for the parent's check request: " + why);
  std::vector<std::string> parts = absl::StrSplit(*line, ' ');
  std::optional<Region> region;
  uint64_t check_seed = 0;
  if (parts.size() != 3 || parts[0] != "check" || !(region = Region::Parse(parts[1])) ||
      !absl::SimpleAtoi(parts[2], &check_seed) || region->offset + region->bytes > *bytes) {
    return c.Fail(kChildUsage, "bad request from the parent: " + *line);
  }
  if (int rc = CheckDeviceBytes(c, (*arena)->data(), *region, check_seed, "the parent's write");
      rc != kChildOk) {
    return rc;
  }
  c.Say("the parent's write arrived");
  return kChildOk;
}

// The heart of event-wait: `stream` waits on `event`, then copies `bytes` from `src` to `host`;
// the copy must stay pending until the child has told the parent "waiting" (the parent holds
// the event back until then), and then complete with Pattern(seed).
int WaitThenRead(const ChildContext& c, IpcEvent& event, const uint8_t* src, size_t bytes,
                 uint64_t seed, cudaStream_t stream, uint8_t* host) {
  if (absl::Status s = event.StreamWait(stream); !s.ok()) {
    return c.Fail(kChildCudaError, s.ToString());
  }
  cudaError_t err = cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, stream);
  if (err != cudaSuccess) return c.Fail(kChildCudaError, cudaGetErrorString(err));
  err = cudaStreamQuery(stream);
  if (err != cudaErrorNotReady) {
    return c.Fail(err == cudaSuccess ? kChildEventTooEarly : kChildCudaError,
                  absl::StrCat("the stream behind the event is not held: ", cudaGetErrorName(err)));
  }
  if (!SendLine(kChildFd, "waiting")) return c.Fail(kChildChannel, "cannot tell the parent");
  const auto deadline = TestClock::now() + kChildDeadline;
  while ((err = cudaStreamQuery(stream)) == cudaErrorNotReady && TestClock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (err == cudaErrorNotReady) {
    return c.Fail(kChildTimeout, "the parent's copy did not complete within the deadline");
  }
  if (err != cudaSuccess) return c.Fail(kChildCudaError, cudaGetErrorString(err));
  const int64_t diff =
      FirstDifference(std::vector<uint8_t>(host, host + bytes), Pattern(seed, bytes));
  if (diff >= 0) {
    return c.Fail(kChildMismatch, absl::StrFormat("byte %d of the region differs", diff));
  }
  if (auto done = event.Query(); !done.ok() || !*done) {
    return c.Fail(kChildUnexpected, "the event is not complete after the wait");
  }
  return kChildOk;
}

// event-wait: maps --arena and opens --event, which the parent recorded after a copy of
// Pattern(--seed) into --region that it holds back. The event must not be complete yet; the
// child's stream waits on it, then copies the region to the host; the child tells the parent
// "waiting", and the copy must then complete with the pattern.
int ChildEventWait(ChildContext& c) {
  std::string why;
  auto handle = HandleFlag<ArenaHandle>(c, "arena", &why);
  auto event_handle = HandleFlag<EventHandle>(c, "event", &why);
  auto region = Region::Parse(c.Flag("region").value_or(""));
  auto seed = c.NumberFlag("seed");
  if (!handle || !event_handle || !region || !seed) {
    return c.Fail(kChildUsage,
                  "usage: --arena=HEX --event=HEX --region=OFF:LEN --seed=N (" + why + ")");
  }
  auto peer = PeerArena::Open(*handle);
  if (!peer.ok()) {
    return c.Fail(kChildOpenFailedBase + static_cast<int>(peer.status().code()),
                  peer.status().ToString());
  }
  if (region->offset + region->bytes > (*peer)->size_bytes()) {
    return c.Fail(kChildUsage, "the region is outside the arena");
  }
  auto event = IpcEvent::Open(*event_handle);
  if (!event.ok()) {
    return c.Fail(kChildOpenFailedBase + static_cast<int>(event.status().code()),
                  event.status().ToString());
  }
  if (!(*event)->opened() ||
      (*event)->ExportHandle().status().code() != absl::StatusCode::kFailedPrecondition) {
    return c.Fail(kChildUnexpected, "an opened event must say so and refuse to be exported");
  }
  auto done = (*event)->Query();
  if (!done.ok()) return c.Fail(kChildCudaError, done.status().ToString());
  if (*done) return c.Fail(kChildEventTooEarly, "the event is complete while the parent holds");

  cudaStream_t stream = nullptr;
  void* host = nullptr;
  cudaError_t err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  if (err == cudaSuccess) err = cudaMallocHost(&host, region->bytes);
  const int rc =
      err != cudaSuccess
          ? c.Fail(kChildCudaError, cudaGetErrorString(err))
          : WaitThenRead(c, **event, static_cast<const uint8_t*>((*peer)->data()) + region->offset,
                         region->bytes, *seed, stream, static_cast<uint8_t*>(host));
  if (rc != kChildOk) ::close(kChildFd);  // the parent stops waiting for "waiting" and releases
  if (stream != nullptr) {
    cudaStreamSynchronize(stream);
    cudaStreamDestroy(stream);
  }
  if (host != nullptr) cudaFreeHost(host);
  if (rc == kChildOk) c.Say("waited on the parent's event and read its bytes");
  return rc;
}

// echo: sends back the parent's first line. hang: sleeps far past any deadline. They test the
// process harness itself, without CUDA.
int ChildEcho(ChildContext& c) {
  std::string why;
  auto line = c.ReadParentLine(&why);
  if (!line) return c.Fail(kChildChannel, why);
  return SendLine(kChildFd, *line) ? kChildOk : c.Fail(kChildChannel, "cannot answer");
}

int ChildHang(ChildContext&) {
  std::this_thread::sleep_for(std::chrono::minutes(10));
  return kChildOk;
}

// ---------------------------------------------------------------------------------------------
// The parent side.

// Waits for `child` and expects exit code `want`.
void ExpectExit(Child& child, int want) {
  const std::optional<int> code = child.Wait();
  ASSERT_TRUE(code.has_value()) << "the child timed out and was killed";
  EXPECT_EQ(*code, want) << "child exit " << ExitMeaning(*code) << ", expected "
                         << ExitMeaning(want);
}

std::vector<uint8_t> ReadArena(const void* data, size_t bytes) {
  std::vector<uint8_t> out(bytes);
  EXPECT_EQ(cudaMemcpy(out.data(), data, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  return out;
}

DeviceUuid UuidOfDevice(int device) {
  cudaDeviceProp prop{};
  EXPECT_EQ(cudaGetDeviceProperties(&prop, device), cudaSuccess);
  DeviceUuid uuid;
  std::memcpy(uuid.data(), prop.uuid.bytes, uuid.size());
  return uuid;
}

// A handle that passes every format check, from a process that is not this one.
ArenaHandle WellFormedForeignHandle() {
  ArenaHandle h;
  h.ipc_handle.fill(0x5a);
  h.size_bytes = 4096;
  h.origin.pid = static_cast<uint32_t>(::getpid());
  h.origin.process_token = ThisProcessToken() ^ 1;
  return h;
}

// ---------------------------------------------------------------------------------------------
// The process harness (no device needed).

TEST(PeerProcessTest, ChildTalksOverTheChannelAndExitsWithItsCode) {
  auto child = Child::Start("echo", {});
  ASSERT_TRUE(child.ok()) << child.status();
  ASSERT_TRUE((*child)->SendLine("hello peer"));
  std::string why;
  EXPECT_EQ((*child)->ReadLine(&why).value_or("(" + why + ")"), "hello peer");
  ExpectExit(**child, kChildOk);

  auto unknown = Child::Start("no-such-mode", {});
  ASSERT_TRUE(unknown.ok()) << unknown.status();
  ExpectExit(**unknown, kChildUsage);
  auto bad_hex = Child::Start("open", {"--arena=not-hex"});
  ASSERT_TRUE(bad_hex.ok()) << bad_hex.status();
  ExpectExit(**bad_hex, kChildUsage);
}

TEST(PeerProcessTest, ChildPastItsDeadlineIsKilledAndReaped) {
  auto child = Child::Start("hang", {});
  ASSERT_TRUE(child.ok()) << child.status();
  const pid_t pid = (*child)->pid();
  EXPECT_FALSE((*child)->Wait(std::chrono::milliseconds(300)).has_value());
  EXPECT_NE(::kill(pid, 0), 0) << "the child still exists";
  std::string why;
  EXPECT_FALSE((*child)->ReadLine(&why).has_value());
  EXPECT_EQ(why, "the other side closed the channel");
}

// The child reaches PeerArena::Open and reports its status code through its exit code.
TEST(PeerProcessTest, ChildReportsTheOpenErrorCodeWithoutADevice) {
  if (HaveCudaDevice()) GTEST_SKIP() << "a GPU is present (the GPU tests cover the child's opens)";
  auto child = Child::Start("open", {"--arena=" + ToHex(WellFormedForeignHandle().Serialize())});
  ASSERT_TRUE(child.ok()) << child.status();
  ExpectExit(**child,
             kChildOpenFailedBase + static_cast<int>(absl::StatusCode::kFailedPrecondition));
}

// ---------------------------------------------------------------------------------------------
// Checks that need no device (they run everywhere).

TEST(PeerArenaTest, MalformedHandleIsInvalidArgumentBeforeAnyDeviceCheck) {
  ArenaHandle zero_size = WellFormedForeignHandle();
  zero_size.size_bytes = 0;
  auto a = PeerArena::Open(zero_size);
  EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(a.status().message()), HasSubstr("size_bytes"));
  ArenaHandle zero_ipc = WellFormedForeignHandle();
  zero_ipc.ipc_handle.fill(0);
  auto b = PeerArena::Open(zero_ipc);
  EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(b.status().message()), HasSubstr("all zeros"));
  EventHandle no_pid;
  no_pid.ipc_handle.fill(1);
  no_pid.origin.process_token = 7;
  auto e = IpcEvent::Open(no_pid);
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(e.status().message()), HasSubstr("pid 0"));
  EXPECT_EQ(IpcEvent::Create(-1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PeerArenaTest, OwnHandlesAreRefusedWithoutTouchingCuda) {
  ArenaHandle mine = WellFormedForeignHandle();
  mine.origin = IpcOrigin::ThisProcess(0, DeviceUuid{});
  auto a = PeerArena::Open(mine);
  EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(a.status().message()),
              HasSubstr("was exported by this process; use it directly"));
  EXPECT_THAT(std::string(a.status().message()), HasSubstr("4096 bytes"));
}

TEST(PeerArenaTest, WithoutADeviceOpenAndCreateAreFailedPrecondition) {
  if (HaveCudaDevice()) GTEST_SKIP() << "a GPU is present";
  auto a = PeerArena::Open(WellFormedForeignHandle());
  EXPECT_EQ(a.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(a.status().message()), HasSubstr("no CUDA device"));
  EXPECT_THAT(std::string(a.status().message()), HasSubstr("4096 bytes"));
  EXPECT_EQ(IpcEvent::Create(0).status().code(), absl::StatusCode::kFailedPrecondition);
  EventHandle e;
  e.ipc_handle.fill(1);
  e.origin = WellFormedForeignHandle().origin;
  EXPECT_EQ(IpcEvent::Open(e).status().code(), absl::StatusCode::kFailedPrecondition);
}

// ---------------------------------------------------------------------------------------------
// One process, with a GPU.

TEST(PeerArenaTest, ExportedHandleDescribesTheArena) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  auto arena = DeviceArena::Create({.bytes = kArenaBytes});
  ASSERT_TRUE(arena.ok()) << arena.status();
  auto handle = (*arena)->ExportHandle();
  ASSERT_TRUE(handle.ok()) << handle.status();
  EXPECT_EQ(handle->size_bytes, kArenaBytes);
  EXPECT_EQ(handle->origin.device, 0);
  EXPECT_EQ(handle->origin.pid, static_cast<uint32_t>(::getpid()));
  EXPECT_TRUE(handle->origin.IsThisProcess());
  EXPECT_EQ(handle->origin.device_uuid, UuidOfDevice(0));
  EXPECT_NE(handle->origin.device_uuid, DeviceUuid{});
  auto parsed = ArenaHandle::Parse(handle->Serialize());
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(*parsed, *handle);
}

TEST(PeerArenaTest, OpeningThisProcessesOwnExportIsInvalidArgument) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  auto arena = DeviceArena::Create({.bytes = kArenaBytes});
  ASSERT_TRUE(arena.ok()) << arena.status();
  auto handle = (*arena)->ExportHandle();
  ASSERT_TRUE(handle.ok()) << handle.status();
  auto peer = PeerArena::Open(*handle);
  EXPECT_EQ(peer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(peer.status().message()), HasSubstr("use it directly"));
  EXPECT_THAT(std::string(peer.status().message()), HasSubstr(absl::StrCat(kArenaBytes, " bytes")));

  auto event = IpcEvent::Create(0);
  ASSERT_TRUE(event.ok()) << event.status();
  EXPECT_FALSE((*event)->opened());
  auto event_handle = (*event)->ExportHandle();
  ASSERT_TRUE(event_handle.ok()) << event_handle.status();
  EXPECT_TRUE(event_handle->origin.IsThisProcess());
  auto opened = IpcEvent::Open(*event_handle);
  EXPECT_EQ(opened.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(opened.status().message()), HasSubstr("use it directly"));
}

TEST(PeerArenaTest, HandleOfAGpuThisProcessCannotSeeIsFailedPrecondition) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  ArenaHandle h = WellFormedForeignHandle();
  for (size_t i = 0; i < h.origin.device_uuid.size(); ++i) {
    h.origin.device_uuid[i] = static_cast<uint8_t>(0xe0 + i);  // no real GPU has this UUID
  }
  auto by_uuid = PeerArena::Open(h);
  EXPECT_EQ(by_uuid.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(by_uuid.status().message()),
              HasSubstr(FormatDeviceUuid(h.origin.device_uuid)));
  EXPECT_THAT(std::string(by_uuid.status().message()), HasSubstr("4096 bytes"));

  h.origin.device_uuid = DeviceUuid{};  // unknown UUID: the ordinal decides
  h.origin.device = 1 << 20;
  auto by_ordinal = PeerArena::Open(h);
  EXPECT_EQ(by_ordinal.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(by_ordinal.status().message()), HasSubstr("out of range"));
  EXPECT_EQ(IpcEvent::Create(1 << 20).status().code(), absl::StatusCode::kFailedPrecondition);
}

// ---------------------------------------------------------------------------------------------
// Two and three processes.

// The parent fills its arena; two children at once map it, check the parent's bytes, write
// their own region and copy the parent's region to a third, device to device. Afterwards every
// byte of the arena is what a host model of those writes says.
TEST(PeerArenaTest, TwoPeersReadTheParentsBytesAndWriteTheirOwn) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = 0x9ee7a7e4;
  std::cout << "seed=" << seed << "\n";
  SCOPED_TRACE(::testing::Message() << "seed=" << seed);
  std::mt19937_64 rng(seed);
  auto arena = DeviceArena::Create({.bytes = kArenaBytes});
  ASSERT_TRUE(arena.ok()) << arena.status();
  auto handle = (*arena)->ExportHandle();
  ASSERT_TRUE(handle.ok()) << handle.status();

  // Five disjoint regions: the parent's, the two copies of it and the two children's writes,
  // each in its own fifth of the arena (in random order), at a random, unaligned place.
  constexpr int kRegions = 5;
  const size_t slot = kArenaBytes / kRegions;
  std::array<size_t, kRegions> slots = {0, 1, 2, 3, 4};
  std::shuffle(slots.begin(), slots.end(), rng);
  auto place = [&](int i, size_t bytes) {
    return Region{slots[i] * slot + rng() % (slot - bytes + 1), bytes};
  };
  const Region read = place(0, 1 + rng() % (slot / 2));
  const Region copy[2] = {place(1, read.bytes), place(2, read.bytes)};
  const Region write[2] = {place(3, 1 + rng() % (slot / 2)), place(4, 1 + rng() % (slot / 2))};
  const uint64_t read_seed = rng();
  const uint64_t write_seed[2] = {rng(), rng()};

  std::vector<uint8_t> model = Pattern(rng(), kArenaBytes);
  const std::vector<uint8_t> parents = Pattern(read_seed, read.bytes);
  std::copy(parents.begin(), parents.end(), model.begin() + read.offset);
  ASSERT_EQ(cudaMemcpy((*arena)->data(), model.data(), kArenaBytes, cudaMemcpyHostToDevice),
            cudaSuccess);

  std::vector<std::unique_ptr<Child>> children;
  for (int i = 0; i < 2; ++i) {
    auto child = Child::Start(
        "verify-write",
        {"--arena=" + ToHex(handle->Serialize()), "--read=" + read.ToArg(),
         absl::StrCat("--read-seed=", read_seed), "--write=" + write[i].ToArg(),
         absl::StrCat("--write-seed=", write_seed[i]), absl::StrCat("--copy-to=", copy[i].offset)});
    ASSERT_TRUE(child.ok()) << child.status();
    children.push_back(std::move(*child));
  }
  for (auto& child : children) ExpectExit(*child, kChildOk);
  for (int i = 0; i < 2; ++i) {
    const std::vector<uint8_t> theirs = Pattern(write_seed[i], write[i].bytes);
    std::copy(theirs.begin(), theirs.end(), model.begin() + write[i].offset);
    std::copy(parents.begin(), parents.end(), model.begin() + copy[i].offset);
  }
  const std::vector<uint8_t> got = ReadArena((*arena)->data(), kArenaBytes);
  const int64_t diff = FirstDifference(got, model);
  EXPECT_EQ(diff, -1) << "arena byte " << diff << " differs from the model (read " << read.ToArg()
                      << ", writes " << write[0].ToArg() << " " << write[1].ToArg()
                      << ", copies to " << copy[0].offset << " " << copy[1].offset << ")";
}

// The reverse direction and the exporter's exit: a child exports its arena, the parent maps it,
// checks the child's bytes, writes its own and closes; the child checks them and exits; then
// the handle names a process that is gone.
TEST(PeerArenaTest, ParentMapsAChildsArenaWhichIsUnavailableOnceTheChildExits) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = 0xc41d0a7e;
  std::cout << "seed=" << seed << "\n";
  SCOPED_TRACE(::testing::Message() << "seed=" << seed);
  constexpr size_t kBytes = size_t{2} << 20;
  auto child =
      Child::Start("export", {absl::StrCat("--bytes=", kBytes), absl::StrCat("--seed=", seed)});
  ASSERT_TRUE(child.ok()) << child.status();
  std::string why;
  const std::optional<std::string> line = (*child)->ReadLine(&why);
  if (!line) {
    ExpectExit(**child, kChildOk);
    FAIL() << "no handle from the child: " << why;
  }
  const std::optional<std::string> bytes = FromHex(*line);
  ASSERT_TRUE(bytes.has_value()) << "not hex: " << *line;
  auto handle = ArenaHandle::Parse(*bytes);
  ASSERT_TRUE(handle.ok()) << handle.status();
  EXPECT_EQ(handle->origin.pid, static_cast<uint32_t>((*child)->pid()));
  EXPECT_EQ(handle->size_bytes, kBytes);

  const Region mine = {12345, 54321};
  const uint64_t my_seed = seed + 1;
  {
    auto peer = PeerArena::Open(*handle);
    ASSERT_TRUE(peer.ok()) << peer.status();
    ASSERT_EQ((*peer)->size_bytes(), kBytes);
    const int64_t diff = FirstDifference(ReadArena((*peer)->data(), kBytes), Pattern(seed, kBytes));
    EXPECT_EQ(diff, -1) << "byte " << diff << " of the child's arena differs";
    const std::vector<uint8_t> pattern = Pattern(my_seed, mine.bytes);
    ASSERT_EQ(cudaMemcpy(static_cast<uint8_t*>((*peer)->data()) + mine.offset, pattern.data(),
                         pattern.size(), cudaMemcpyHostToDevice),
              cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  }  // closed before the child may free its arena
  ASSERT_TRUE((*child)->SendLine(absl::StrCat("check ", mine.ToArg(), " ", my_seed)));
  ExpectExit(**child, kChildOk);

  auto gone = PeerArena::Open(*handle);
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kUnavailable) << gone.status();
  EXPECT_THAT(std::string(gone.status().message()),
              HasSubstr(absl::StrCat("process ", (*child)->pid(), " has exited")));
}

// A handle with the parent's identity but bytes that CUDA never issued: the child gets
// InvalidArgument (the exporter is alive, so the handle is bad) and exits with that code.
TEST(PeerArenaTest, AHandleCudaRefusesIsInvalidArgumentInThePeer) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = 0xbadc0de;
  std::cout << "seed=" << seed << "\n";
  SCOPED_TRACE(::testing::Message() << "seed=" << seed);
  auto arena = DeviceArena::Create({.bytes = kArenaBytes});
  ASSERT_TRUE(arena.ok()) << arena.status();
  auto handle = (*arena)->ExportHandle();
  ASSERT_TRUE(handle.ok()) << handle.status();
  std::mt19937_64 rng(seed);
  for (auto& b : handle->ipc_handle) b = static_cast<uint8_t>(rng());
  auto child = Child::Start("open", {"--arena=" + ToHex(handle->Serialize())});
  ASSERT_TRUE(child.ok()) << child.status();
  ExpectExit(**child, kChildOpenFailedBase + static_cast<int>(absl::StatusCode::kInvalidArgument));
}

// A real handle that claims more bytes than the allocation: refused when mapped, rather than a
// device fault later.
TEST(PeerArenaTest, AHandleLargerThanItsAllocationIsInvalidArgumentInThePeer) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  auto arena = DeviceArena::Create({.bytes = kArenaBytes});
  ASSERT_TRUE(arena.ok()) << arena.status();
  auto handle = (*arena)->ExportHandle();
  ASSERT_TRUE(handle.ok()) << handle.status();
  handle->size_bytes += size_t{1} << 30;
  auto child = Child::Start("open", {"--arena=" + ToHex(handle->Serialize())});
  ASSERT_TRUE(child.ok()) << child.status();
  ExpectExit(**child, kChildOpenFailedBase + static_cast<int>(absl::StatusCode::kInvalidArgument));
}

// A stream whose work can be held back: Hold() enqueues a host function that blocks the stream
// until Release() (or two minutes, so that nothing hangs for ever). The destructor releases,
// synchronises and destroys the stream.
class GatedStream {
 public:
  GatedStream() { error_ = cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking); }
  ~GatedStream() {
    Release();
    if (error_ == cudaSuccess) {
      cudaStreamSynchronize(stream_);
      cudaStreamDestroy(stream_);
    }
  }
  GatedStream(const GatedStream&) = delete;
  GatedStream& operator=(const GatedStream&) = delete;

  cudaError_t error() const { return error_; }
  cudaStream_t get() const { return stream_; }
  cudaError_t Hold() { return cudaLaunchHostFunc(stream_, &GatedStream::Block, this); }
  void Release() {
    std::lock_guard<std::mutex> lock(mu_);
    released_ = true;
    cv_.notify_all();
  }

 private:
  static void CUDART_CB Block(void* self) {
    auto* gate = static_cast<GatedStream*>(self);
    std::unique_lock<std::mutex> lock(gate->mu_);
    gate->cv_.wait_for(lock, std::chrono::minutes(2), [gate] { return gate->released_; });
  }

  cudaStream_t stream_ = nullptr;
  cudaError_t error_ = cudaSuccess;
  std::mutex mu_;
  std::condition_variable cv_;
  bool released_ = false;
};

// The parent holds its stream back, enqueues a copy of a pattern into its arena and records an
// IpcEvent after it. The child sees the event incomplete, makes its stream wait on it and
// enqueues a read, which must stay pending; once the child says so the parent releases its
// stream, and the child's read completes with the pattern.
TEST(PeerArenaTest, PeersStreamWaitsOnTheParentsEventBeforeReading) {
  if (!HaveCudaDevice()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = 0xe7e9700d;
  std::cout << "seed=" << seed << "\n";
  SCOPED_TRACE(::testing::Message() << "seed=" << seed);
  std::mt19937_64 rng(seed);
  // Declared in this order so that they go in the reverse one: the child first (killed if it
  // still runs), then the stream (released and synchronised), then the host buffer, the event
  // and the arena, which the child no longer uses.
  auto arena = DeviceArena::Create({.bytes = kArenaBytes});
  ASSERT_TRUE(arena.ok()) << arena.status();
  auto event = IpcEvent::Create(0);
  ASSERT_TRUE(event.ok()) << event.status();
  const Region region = {rng() % (kArenaBytes / 2), 1 + rng() % (kArenaBytes / 4)};
  const uint64_t pattern_seed = rng();
  const std::vector<uint8_t> pattern = Pattern(pattern_seed, region.bytes);
  void* pinned = nullptr;
  ASSERT_EQ(cudaMallocHost(&pinned, region.bytes), cudaSuccess);
  std::unique_ptr<void, decltype(&cudaFreeHost)> pinned_owner(pinned, &cudaFreeHost);
  std::memcpy(pinned, pattern.data(), region.bytes);
  ASSERT_EQ(cudaMemset((*arena)->data(), 0, kArenaBytes), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  auto arena_handle = (*arena)->ExportHandle();
  ASSERT_TRUE(arena_handle.ok()) << arena_handle.status();
  auto event_handle = (*event)->ExportHandle();
  ASSERT_TRUE(event_handle.ok()) << event_handle.status();

  GatedStream stream;
  ASSERT_EQ(stream.error(), cudaSuccess);
  ASSERT_EQ(stream.Hold(), cudaSuccess);
  ASSERT_EQ(cudaMemcpyAsync(static_cast<uint8_t*>((*arena)->data()) + region.offset, pinned,
                            region.bytes, cudaMemcpyHostToDevice, stream.get()),
            cudaSuccess);
  ASSERT_TRUE((*event)->Record(stream.get()).ok());
  auto pending = (*event)->Query();
  ASSERT_TRUE(pending.ok()) << pending.status();
  ASSERT_FALSE(*pending) << "the held stream's event completed";

  auto child = Child::Start(
      "event-wait",
      {"--arena=" + ToHex(arena_handle->Serialize()), "--event=" + ToHex(event_handle->Serialize()),
       "--region=" + region.ToArg(), absl::StrCat("--seed=", pattern_seed)});
  ASSERT_TRUE(child.ok()) << child.status();
  std::string why;
  const std::optional<std::string> line = (*child)->ReadLine(&why);
  stream.Release();  // whatever the child said: its exit code tells what went wrong
  ExpectExit(**child, kChildOk);
  EXPECT_EQ(line.value_or("(" + why + ")"), "waiting");
  ASSERT_EQ(cudaStreamSynchronize(stream.get()), cudaSuccess);
  auto complete = (*event)->Query();
  ASSERT_TRUE(complete.ok()) << complete.status();
  EXPECT_TRUE(*complete);
}

}  // namespace
}  // namespace tokenlake::store

// The peer processes of these tests are this binary with --peer-arena-child=MODE; GoogleTest
// runs otherwise.
int main(int argc, char** argv) {
  namespace store = tokenlake::store;
  if (store::IsChildInvocation(argc, argv)) {
    return store::RunChild(argc, argv,
                           {{"verify-write", store::ChildVerifyWrite},
                            {"open", store::ChildOpen},
                            {"export", store::ChildExport},
                            {"event-wait", store::ChildEventWait},
                            {"echo", store::ChildEcho},
                            {"hang", store::ChildHang}});
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
