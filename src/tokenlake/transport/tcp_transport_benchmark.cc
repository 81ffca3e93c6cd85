// Round trips (request + reply of the same size) between two endpoints: over TcpTransport
// (two transports, i.e. two "processes", on 127.0.0.1) and over the in-process loopback, for
// payloads from 64 B to 4 MiB (a 16-token segment of an 8B model's layer is ~1 MiB in bf16).
#include <memory>
#include <vector>

#include "benchmark/benchmark.h"
#include "tokenlake/transport/loopback.h"
#include "tokenlake/transport/tcp_transport.h"

namespace tokenlake::transport {
namespace {

void RoundTrips(benchmark::State& state, Transport& a, Transport& b) {
  const std::vector<std::byte> payload(static_cast<size_t>(state.range(0)));
  for (auto _ : state) {
    Message m{InstanceId(0), InstanceId(1), 1, 1, payload};
    if (!a.Send(std::move(m)).ok()) state.SkipWithError("send failed");
    auto got = b.Receive(InstanceId(1), absl::Seconds(10));
    if (!got.ok()) state.SkipWithError("receive failed");
    got->from = InstanceId(1);
    got->to = InstanceId(0);
    if (!b.Send(std::move(*got)).ok()) state.SkipWithError("reply failed");
    auto back = a.Receive(InstanceId(0), absl::Seconds(10));
    if (!back.ok()) state.SkipWithError("reply lost");
    benchmark::DoNotOptimize(back->payload.data());
  }
  state.SetBytesProcessed(2 * state.iterations() * state.range(0));
}

void BM_TcpRoundTrip(benchmark::State& state) {
  auto a = *TcpTransport::Create({.num_endpoints = 2, .local_endpoints = {InstanceId(0)}});
  auto b = *TcpTransport::Create({.num_endpoints = 2, .local_endpoints = {InstanceId(1)}});
  (void)a->SetPeer(InstanceId(1), b->port());
  (void)b->SetPeer(InstanceId(0), a->port());
  RoundTrips(state, *a, *b);
}
BENCHMARK(BM_TcpRoundTrip)->RangeMultiplier(16)->Range(64, 4 << 20)->UseRealTime();

void BM_LoopbackRoundTrip(benchmark::State& state) {
  auto t = *LoopbackTransport::Create({.num_endpoints = 2});
  RoundTrips(state, *t, *t);
}
BENCHMARK(BM_LoopbackRoundTrip)->RangeMultiplier(16)->Range(64, 4 << 20)->UseRealTime();

}  // namespace
}  // namespace tokenlake::transport
