#include "tokenlake/engine/cuda/engine_bench.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <utility>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/cuda/decode_gemm.h"
#include "tokenlake/engine/cuda/device_buffer.h"
#include "tokenlake/engine/cuda/gpu_engine.h"
#include "tokenlake/engine/cuda/gpu_llama.h"
#include "tokenlake/engine/cuda/small_batch_gemm.h"
#include "tokenlake/profile/gpu_profile.h"

namespace tokenlake::engine::cuda {
namespace {

namespace gprof = ::tokenlake::profile;
using Json = nlohmann::json;

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 == 1 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

// Matrix weights of the transformer layers (bf16 elements).
int64_t LayerWeightElems(const LlamaConfig& c) {
  const int64_t h = c.hidden_size;
  const int64_t qd = int64_t{c.num_heads} * c.head_dim;
  const int64_t kvd = int64_t{c.num_kv_heads} * c.head_dim;
  const int64_t inter = c.intermediate_size;
  return c.num_layers * ((qd + 2 * kvd) * h + h * qd + 3 * inter * h);
}

// Bytes a decode step reads of the weights: every layer's matrices and the LM head (bf16),
// the norms (f32); the embedding gather reads one row per token (negligible).
int64_t DecodeWeightBytes(const LlamaConfig& c) {
  return 2 * (LayerWeightElems(c) + int64_t{c.vocab_size} * c.hidden_size) +
         4 * int64_t{c.hidden_size} * (2 * c.num_layers + 1);
}

int64_t KvBytesPerToken(const LlamaConfig& c) {
  return int64_t{c.num_layers} * 2 * c.num_kv_heads * c.head_dim * 2;
}

// FLOPs of computing `n` new tokens after `context` earlier ones: the layers' GEMMs and the
// attention (QK^T and PV over the visible keys, causal among the new tokens).
double PrefillFlops(const LlamaConfig& c, double n, double context) {
  const double qd = static_cast<double>(c.num_heads) * c.head_dim;
  const double dense = 2.0 * static_cast<double>(LayerWeightElems(c)) * n;
  const double keys = n * context + n * (n + 1) / 2;
  return dense + 4.0 * c.num_layers * qd * keys;
}

struct DeviceMemory {
  int64_t free = 0;
  int64_t total = 0;
};
absl::StatusOr<DeviceMemory> Memory() {
  size_t free = 0, total = 0;
  TOKENLAKE_RETURN_IF_ERROR(CudaStatus(cudaMemGetInfo(&free, &total), "cudaMemGetInfo"));
  return DeviceMemory{static_cast<int64_t>(free), static_cast<int64_t>(total)};
}

std::vector<int32_t> RandomTokens(std::mt19937_64& rng, int64_t n, int32_t vocab) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int32_t& x : t) x = static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab));
  return t;
}

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

class Bench {
 public:
  Bench(const EngineBenchOptions& o, const std::function<void(const std::string&)>& progress)
      : o_(o), progress_(progress), rng_(o.seed) {}

  absl::StatusOr<Json> Run();

 private:
  void Say(const std::string& line) {
    if (progress_) progress_(line);
  }
  bool Wants(const std::string& section) const {
    return std::find(o_.sections.begin(), o_.sections.end(), section) != o_.sections.end();
  }
  // A fresh engine whose pool takes the free memory minus the reserve.
  absl::StatusOr<std::unique_ptr<GpuEngine>> NewEngine();
  absl::Status Peaks();
  absl::Status Decode();
  absl::Status Prefill();
  absl::Status Workloads();
  absl::Status Dense();
  // The engine's memory beyond the weights and the pool, now.
  absl::StatusOr<Json> MemoryNow(const GpuEngine& engine);

  const EngineBenchOptions& o_;
  const std::function<void(const std::string&)>& progress_;
  std::mt19937_64 rng_;
  LlamaConfig config_;
  std::unique_ptr<GpuLlamaModel> model_;
  int64_t baseline_used_ = 0;  // device memory in use before the model (context, others)
  int64_t pool_bytes_ = 0;
  int64_t reserve_bytes_ = 0;
  double copy_gbps_ = 0;
  double gemm_tflops_ = 0;
  Json out_;
};

absl::StatusOr<std::unique_ptr<GpuEngine>> Bench::NewEngine() {
  TOKENLAKE_ASSIGN_OR_RETURN(DeviceMemory m, Memory());
  const int64_t slot_bytes = int64_t{o_.segment_tokens} * KvBytesPerToken(config_);
  // Kept out of the pool: the activations and workspaces (reserve_bytes) only; the requests'
  // tails live in slots of the pool (docs/adr/0017).
  reserve_bytes_ = o_.reserve_bytes;
  const int64_t slots = (m.free - reserve_bytes_) / slot_bytes;
  if (slots < 16) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "bench engine: %d bytes free after the weights, %d kept out of the pool: room for %d "
        "segments of %d bytes",
        m.free, reserve_bytes_, slots, slot_bytes));
  }
  pool_bytes_ = slots * slot_bytes;
  return GpuEngine::Create(model_.get(), {.num_instances = 1,
                                          .segment_tokens = o_.segment_tokens,
                                          .slots_per_instance = static_cast<int32_t>(slots),
                                          .namespace_name = "tokenlake-bench-engine",
                                          .max_batch_tokens = o_.max_batch_tokens,
                                          .max_batch_requests = o_.max_batch_requests});
}

absl::StatusOr<Json> Bench::MemoryNow(const GpuEngine& engine) {
  TOKENLAKE_ASSIGN_OR_RETURN(DeviceMemory m, Memory());
  const int64_t used = m.total - m.free - baseline_used_;
  const int64_t weights = GpuLlamaModel::WeightDeviceBytes(config_);
  return Json{{"used_bytes", used},
              {"weights_bytes", weights},
              {"pool_bytes", pool_bytes_},
              {"beyond_weights_and_pool_bytes", used - weights - pool_bytes_},
              // Tails are pool slots: none of their bytes are beyond the pool.
              {"peak_tail_slots", engine.peak_tail_slots()},
              {"peak_tail_slot_bytes", engine.peak_tail_slots() * engine.layout().SlotBytes()}};
}

absl::Status Bench::Peaks() {
  Say("peaks: copy bandwidth and GEMM rate");
  TOKENLAKE_ASSIGN_OR_RETURN(copy_gbps_, gprof::MeasureCopyGbps(size_t{1} << 30, 20));
  TOKENLAKE_ASSIGN_OR_RETURN(gemm_tflops_, gprof::MeasureGemmTflops(8192, 8192, 8192, 20));
  out_["peaks"] = {{"copy_gbps", copy_gbps_},
                   {"copy_what", "device-to-device cudaMemcpyAsync of 1 GiB, (read + written) / s"},
                   {"gemm_tflops", gemm_tflops_},
                   {"gemm_what", "cuBLAS bf16 GEMM 8192^3, float32 accumulation"}};
  return absl::OkStatus();
}

absl::Status Bench::Decode() {
  TOKENLAKE_ASSIGN_OR_RETURN(std::unique_ptr<GpuEngine> engine, NewEngine());
  const int64_t kv_token = KvBytesPerToken(config_);
  const int64_t weight_bytes = DecodeWeightBytes(config_);
  const int32_t new_tokens = o_.decode_steps + 1;
  Json rows = Json::array();
  for (int64_t context : o_.decode_contexts) {
    // The most requests of this context the pool holds (their prompts, new tokens, and a
    // segment of slack each); larger batches are skipped.
    const int64_t per_request = (context + new_tokens + 2 * o_.segment_tokens) * kv_token;
    std::vector<int32_t> batches;
    for (int32_t b : o_.decode_batches) {
      if (b * per_request <= pool_bytes_ * 9 / 10) {
        batches.push_back(b);
      } else {
        rows.push_back({{"batch", b},
                        {"context_tokens", context},
                        {"skipped", absl::StrFormat("needs %d bytes of KV, the pool has %d",
                                                    b * per_request, pool_bytes_)}});
      }
    }
    if (batches.empty()) continue;
    const int32_t most = *std::max_element(batches.begin(), batches.end());
    std::vector<GenerateRequest> prompts;
    for (int32_t i = 0; i < most; ++i) {
      prompts.push_back(
          {.prompt = RandomTokens(rng_, context, config_.vocab_size), .max_new_tokens = 1});
    }
    Say(absl::StrFormat("decode: prefilling %d prompts of %d tokens", most, context));
    for (const auto& r : engine->GenerateBatch(prompts)) TOKENLAKE_RETURN_IF_ERROR(r.status());
    for (int32_t b : batches) {
      // The requests join a few per iteration: the loop charges a new request's whole prompt
      // to the token budget (it learns what the pool serves only from the iteration's plan),
      // so b prompts of `context` tokens take about b * context / budget iterations to start,
      // the first ones decoding meanwhile. Their extra tokens keep decode_steps iterations in
      // which all b decode together.
      const int64_t catch_up =
          (int64_t{b} * context + o_.max_batch_tokens - 1) / o_.max_batch_tokens + 1;
      std::vector<GenerateRequest> reqs(prompts.begin(), prompts.begin() + b);
      for (GenerateRequest& r : reqs) r.max_new_tokens = new_tokens + catch_up;
      engine->TakeForwardTimings();
      engine->TakeIterationTimings();
      const auto t0 = std::chrono::steady_clock::now();
      auto results = engine->GenerateBatch(reqs);
      const double wall = SecondsSince(t0);
      // Where a pure-decode iteration's time goes: Executor::Run (host work and the forward) and
      // the forward's device time.
      std::vector<double> run_us, gpu_us, plan_us, finish_us, step_us;
      // Every iteration's shape (requests, tokens), counted: shows why a run has few pure
      // decode iterations when it does.
      std::map<std::pair<int32_t, int64_t>, int32_t> shapes;
      for (const IterationTiming& t : engine->TakeIterationTimings()) {
        ++shapes[{t.requests, t.tokens}];
        if (t.requests == b && t.tokens == b) {
          plan_us.push_back(t.plan_us);
          finish_us.push_back(t.finish_us);
          step_us.push_back(t.plan_us + t.run_us + t.finish_us);
        }
      }
      for (const GpuEngine::ForwardTiming& t : engine->TakeForwardTimings()) {
        if (t.decodes == b && t.requests == b) {
          run_us.push_back(t.run_us);
          gpu_us.push_back(t.gpu_us);
        }
      }
      // The same batch again with the model's phase events on: where a decode forward's device
      // time goes (the events add a little time of their own).
      model_->SetProfiling(true);
      engine->TakeForwardTimings();
      for (const auto& r : engine->GenerateBatch(reqs)) TOKENLAKE_RETURN_IF_ERROR(r.status());
      model_->SetProfiling(false);
      std::array<std::vector<double>, GpuLlamaModel::kNumPhases> phase_us;
      for (const GpuEngine::ForwardTiming& t : engine->TakeForwardTimings()) {
        if (t.decodes != b || t.requests != b) continue;
        for (int p = 0; p < GpuLlamaModel::kNumPhases; ++p) phase_us[p].push_back(t.phase_us[p]);
      }
      const Json phases = {
          {"gemm_ms", Median(phase_us[GpuLlamaModel::kPhaseGemm]) * 1e-3},
          {"attention_ms", Median(phase_us[GpuLlamaModel::kPhaseAttention]) * 1e-3},
          {"other_ms", Median(phase_us[GpuLlamaModel::kPhaseOther]) * 1e-3},
          {"ends_ms", Median(phase_us[GpuLlamaModel::kPhaseEnds]) * 1e-3}};
      int64_t cached = 0;
      for (const auto& r : results) {
        TOKENLAKE_RETURN_IF_ERROR(r.status());
        cached += r->cached_tokens;
      }
      // A step: the median whole iteration (control plane, forward, finish) of those in which
      // all b requests decoded together and nothing else ran. Request 0's iterations are not
      // used: with many requests, prefill chunks of the others share its early iterations.
      if (step_us.empty()) {
        return absl::InternalError(absl::StrFormat(
            "bench engine: decode batch %d at context %d: no iteration decoded all %d requests "
            "alone (raise --decode-steps)",
            b, context, b));
      }
      Json shapes_json = Json::array();  // [requests, tokens, iterations]
      for (const auto& [shape, count] : shapes) {
        shapes_json.push_back({shape.first, shape.second, count});
      }
      const double step_s = Median(step_us) * 1e-6;
      // KV read per step: the requests' mean sequence in the middle of the timed steps (they
      // joined over catch_up iterations and then decoded new_tokens together).
      const double kv_bytes =
          static_cast<double>(b) * static_cast<double>(kv_token) *
          (static_cast<double>(context) + static_cast<double>(catch_up + new_tokens) / 2);
      const double bound_s = (static_cast<double>(weight_bytes) + kv_bytes) / (copy_gbps_ * 1e9);
      rows.push_back(
          {{"batch", b},
           {"context_tokens", context},
           {"step_ms", step_s * 1e3},
           {"bound_ms", bound_s * 1e3},
           {"ratio_to_bound", step_s / bound_s},
           {"tokens_per_s", b / step_s},
           {"weight_bytes", weight_bytes},
           {"kv_bytes", kv_bytes},
           {"cached_fraction", static_cast<double>(cached) / (static_cast<double>(b) * context)},
           {"decode_iterations_timed", step_us.size()},
           {"iteration_shapes", shapes_json},
           {"plan_ms", Median(plan_us) * 1e-3},
           {"finish_ms", Median(finish_us) * 1e-3},
           {"forward_run_ms", Median(run_us) * 1e-3},
           {"forward_gpu_ms", Median(gpu_us) * 1e-3},
           {"phases_with_events", phases},
           {"wall_s", wall}});
      Say(absl::StrFormat(
          "decode: batch %d, context %d: %.3f ms per step (bound %.3f ms, %.2fx); "
          "phases %s",
          b, context, step_s * 1e3, bound_s * 1e3, step_s / bound_s, phases.dump()));
    }
  }
  out_["decode"] = rows;
  TOKENLAKE_ASSIGN_OR_RETURN(out_["memory"]["decode"], MemoryNow(*engine));
  return absl::OkStatus();
}

absl::Status Bench::Prefill() {
  TOKENLAKE_ASSIGN_OR_RETURN(std::unique_ptr<GpuEngine> engine, NewEngine());
  Json rows = Json::array();
  for (int64_t n : o_.prefill_tokens) {
    std::vector<double> seconds;
    for (int32_t rep = 0; rep < o_.prefill_repeats; ++rep) {
      auto r = engine->Generate(RandomTokens(rng_, n, config_.vocab_size), 1);
      TOKENLAKE_RETURN_IF_ERROR(r.status());
      if (r->cached_tokens != 0) {
        return absl::InternalError("bench engine: a random prompt was served from the pool");
      }
      double us = 0;
      for (double t : r->iteration_us) us += t;
      seconds.push_back(us * 1e-6);
    }
    const double s = Median(seconds);
    const double flops = PrefillFlops(config_, static_cast<double>(n), 0);
    rows.push_back({{"tokens", n},
                    {"seconds", s},
                    {"tokens_per_s", static_cast<double>(n) / s},
                    {"tflops", flops / s * 1e-12},
                    {"fraction_of_gemm_peak", flops / s * 1e-12 / gemm_tflops_},
                    {"chunks", (n + o_.max_batch_tokens - 1) / o_.max_batch_tokens}});
    Say(absl::StrFormat("prefill: %d tokens in %.3f s: %.0f tokens/s, %.0f%% of the GEMM peak", n,
                        s, static_cast<double>(n) / s, 100 * flops / s * 1e-12 / gemm_tflops_));
  }
  out_["prefill"] = rows;
  TOKENLAKE_ASSIGN_OR_RETURN(out_["memory"]["prefill"], MemoryNow(*engine));
  return absl::OkStatus();
}

absl::Status Bench::Workloads() {
  Json rows = Json::array();
  Json prompts_json = Json::array();
  const int64_t kv_token = KvBytesPerToken(config_);
  const double weight_bytes = static_cast<double>(DecodeWeightBytes(config_));
  for (const BenchWorkload& w : o_.workloads) {
    std::mt19937_64 rng(o_.seed * 7919 + std::hash<std::string>()(w.name));
    std::vector<std::vector<int32_t>> docs;
    for (int32_t d = 0; d < w.documents; ++d) {
      const int64_t len = w.doc_min + static_cast<int64_t>(
                                          rng() % static_cast<uint64_t>(w.doc_max - w.doc_min + 1));
      docs.push_back(RandomTokens(rng, len, config_.vocab_size));
    }
    std::vector<GenerateRequest> reqs;
    Json prompt_list = Json::array();
    int64_t prompt_tokens = 0;
    for (int32_t i = 0; i < w.requests; ++i) {
      const std::vector<int32_t>& doc = docs[static_cast<size_t>(i) % docs.size()];
      const int64_t total = std::max<int64_t>(
          static_cast<int64_t>(doc.size()) + 1,
          w.prompt_min +
              static_cast<int64_t>(rng() % static_cast<uint64_t>(w.prompt_max - w.prompt_min + 1)));
      std::vector<int32_t> p = doc;
      const std::vector<int32_t> suffix =
          RandomTokens(rng, total - static_cast<int64_t>(doc.size()), config_.vocab_size);
      p.insert(p.end(), suffix.begin(), suffix.end());
      prompt_tokens += static_cast<int64_t>(p.size());
      prompt_list.push_back(p);
      reqs.push_back({.prompt = std::move(p), .max_new_tokens = w.max_new_tokens});
    }
    prompts_json.push_back(
        {{"name", w.name}, {"max_new_tokens", w.max_new_tokens}, {"prompts", prompt_list}});
    // A fresh pool: hits come from the documents the requests share. The warm-up (cuBLAS,
    // kernels) runs on random tokens, which no workload prompt shares a segment with.
    TOKENLAKE_ASSIGN_OR_RETURN(std::unique_ptr<GpuEngine> engine, NewEngine());
    TOKENLAKE_RETURN_IF_ERROR(
        engine->Generate(RandomTokens(rng, 300, config_.vocab_size), 4).status());
    Say(absl::StrFormat("workload %s: %d requests, %d prompt tokens, %d new tokens each", w.name,
                        w.requests, prompt_tokens, w.max_new_tokens));
    const auto t0 = std::chrono::steady_clock::now();
    auto results = engine->GenerateBatch(reqs);
    const double wall = SecondsSince(t0);
    int64_t cached = 0;
    double prefill_flops = 0;
    double decode_bytes = 0;
    for (size_t i = 0; i < results.size(); ++i) {
      TOKENLAKE_RETURN_IF_ERROR(results[i].status());
      cached += results[i]->cached_tokens;
      const double len = static_cast<double>(reqs[i].prompt.size());
      const double hit = static_cast<double>(results[i]->cached_tokens);
      prefill_flops += PrefillFlops(config_, len - hit, hit);
      // Its decode steps read its KV (prompt + the tokens so far: on average half the new).
      decode_bytes += static_cast<double>(w.max_new_tokens - 1) * static_cast<double>(kv_token) *
                      (len + w.max_new_tokens / 2.0);
    }
    // Every decode step reads the weights once for the whole batch.
    decode_bytes += static_cast<double>(w.max_new_tokens - 1) * weight_bytes;
    const double bound = prefill_flops / (gemm_tflops_ * 1e12) + decode_bytes / (copy_gbps_ * 1e9);
    const int64_t new_tokens = int64_t{w.requests} * w.max_new_tokens;
    rows.push_back(
        {{"name", w.name},
         {"requests", w.requests},
         {"prompt_tokens", prompt_tokens},
         {"new_tokens", new_tokens},
         {"seconds", wall},
         {"new_tokens_per_s", static_cast<double>(new_tokens) / wall},
         {"tokens_per_s", static_cast<double>(prompt_tokens + new_tokens) / wall},
         {"pool_hit_rate", static_cast<double>(cached) / static_cast<double>(prompt_tokens)},
         {"bound_seconds", bound},
         {"ratio_to_bound", wall / bound},
         {"max_batch_requests", engine->max_batch_requests_seen()}});
    Say(absl::StrFormat("workload %s: %.2f s (bound %.2f s, %.2fx), hit rate %.3f", w.name, wall,
                        bound, wall / bound,
                        static_cast<double>(cached) / static_cast<double>(prompt_tokens)));
    TOKENLAKE_ASSIGN_OR_RETURN(out_["memory"]["workload_" + w.name], MemoryNow(*engine));
  }
  out_["workloads"] = rows;
  if (!o_.prompts_path.empty()) {
    std::ofstream f(o_.prompts_path);
    f << Json{{"model", o_.model}, {"workloads", prompts_json}}.dump() << "\n";
    f.close();
    if (!f) {
      return absl::InvalidArgumentError(
          absl::StrFormat("bench engine: cannot write the prompts to '%s'", o_.prompts_path));
    }
  }
  return absl::OkStatus();
}

absl::Status Bench::Dense() {
  // Each projection of a layer and the LM head at decode-sized row counts, alone: cuBLAS (as the
  // forward calls it: bf16 in, float32 out), SmallBatchGemm and DecodeGemm (each with the
  // forward's epilogue for that projection), the weight bytes read per second against the copy
  // bandwidth. Several copies of each matrix are cycled so that no call finds its weights in the
  // L2 cache.
  const LlamaConfig& c = config_;
  const int h = c.hidden_size;
  const int qd = c.num_heads * c.head_dim;
  const int kvd = c.num_kv_heads * c.head_dim;
  const int inter = c.intermediate_size;
  struct Shape {
    const char* name;
    int in, out;
    DenseEpilogue epilogue;
  };
  const Shape shapes[] = {{"qkv", h, qd + 2 * kvd, DenseEpilogue::kStoreF32},
                          {"o", qd, h, DenseEpilogue::kAddF32},
                          {"gate_up", h, 2 * inter, DenseEpilogue::kSiluMulBf16},
                          {"down", inter, h, DenseEpilogue::kAddF32},
                          {"lm_head", h, c.vocab_size, DenseEpilogue::kStoreF32}};
  const int rows_list[] = {1, 2, 4, 8, 16, 32, 64};
  constexpr int kReps = 30;
  cudaStream_t stream = model_->stream();
  cublasHandle_t blas = nullptr;
  if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) {
    return absl::InternalError("bench engine: cublasCreate");
  }
  cublasSetStream(blas, stream);
  int device = 0;
  cudaGetDevice(&device);
  absl::StatusOr<DecodeGemmWorkspace> decode_gemm_workspace = DecodeGemmWorkspace::Create(device);
  if (!decode_gemm_workspace.ok()) {
    cublasDestroy(blas);
    return decode_gemm_workspace.status();
  }
  cudaEvent_t start = nullptr, stop = nullptr;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  Json rows_json = Json::array();
  absl::Status status;
  for (const Shape& sh : shapes) {
    const int64_t weight_bytes = int64_t{sh.out} * sh.in * 2;
    const int copies = static_cast<int>(
        std::max<int64_t>(1, ((int64_t{512} << 20) + weight_bytes - 1) / weight_bytes));
    DeviceBuffer w, x, y, y16;
    status.Update(w.Allocate(static_cast<size_t>(weight_bytes * copies)));
    status.Update(x.Allocate(static_cast<size_t>(64) * sh.in * 2));
    status.Update(y.Allocate(static_cast<size_t>(64) * sh.out * 4));
    status.Update(y16.Allocate(static_cast<size_t>(64) * sh.out * 2));
    if (!status.ok()) break;
    cudaMemsetAsync(w.get(), 0x3c, w.size_bytes(), stream);  // bf16 0.0116 everywhere
    cudaMemsetAsync(x.get(), 0x3c, x.size_bytes(), stream);
    cudaMemsetAsync(y.get(), 0, y.size_bytes(), stream);
    for (int n : rows_list) {
      auto time = [&](const std::function<absl::Status(const uint16_t*)>& call) -> double {
        std::vector<double> ms;
        for (int rep = -3; rep < kReps; ++rep) {
          const auto* wp = w.as<uint16_t>() + ((rep + 3) % copies) * (weight_bytes / 2);
          cudaEventRecord(start, stream);
          status.Update(call(wp));
          cudaEventRecord(stop, stream);
          cudaEventSynchronize(stop);
          float t = 0;
          cudaEventElapsedTime(&t, start, stop);
          if (rep >= 0) ms.push_back(t);
        }
        return Median(ms);
      };
      const double cublas_ms = time([&](const uint16_t* wp) {
        const float alpha = 1.f;
        const float beta = sh.epilogue == DenseEpilogue::kAddF32 ? 1.f : 0.f;
        return cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, sh.out, n, sh.in, &alpha, wp,
                            CUDA_R_16BF, sh.in, x.get(), CUDA_R_16BF, sh.in, &beta, y.get(),
                            CUDA_R_32F, sh.out, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS
                   ? absl::OkStatus()
                   : absl::InternalError("cublasGemmEx");
      });
      Json row = {
          {"matrix", sh.name},
          {"in", sh.in},
          {"out", sh.out},
          {"rows", n},
          {"weight_bytes", weight_bytes},
          {"cublas_ms", cublas_ms},
          {"cublas_of_copy_bandwidth", weight_bytes / (cublas_ms * 1e-3) / (copy_gbps_ * 1e9)}};
      if (n <= kDecodeGemmMaxRows && sh.in % kDecodeGemmInMultiple == 0) {
        const int outputs = sh.epilogue == DenseEpilogue::kSiluMulBf16 ? sh.out / 2 : sh.out;
        const double mma_ms = time([&](const uint16_t* wp) {
          return DecodeGemm(wp, x.get(), DenseInput::kBf16, n, sh.in, outputs, sh.epilogue,
                            y.as<float>(), y16.as<uint16_t>(), *decode_gemm_workspace, stream,
                            /*pdl=*/false);
        });
        row["decode_gemm_ms"] = mma_ms;
        row["decode_gemm_of_copy_bandwidth"] = weight_bytes / (mma_ms * 1e-3) / (copy_gbps_ * 1e9);
        row["decode_gemm_splits"] =
            DecodeGemmSplits(n, sh.in, outputs, sh.epilogue, *decode_gemm_workspace);
      }
      if (n <= kSmallBatchMaxRows) {
        const bool silu = sh.epilogue == DenseEpilogue::kSiluMulBf16;
        const std::pair<const char*, SmallGemmLayout> layouts[] = {
            {"small_warp_r2", SmallGemmLayout::kWarpRows2},
            {"small_warp_r4", SmallGemmLayout::kWarpRows4},
            {"small_block_r4", SmallGemmLayout::kBlockRows4},
            {"small_block_r8", SmallGemmLayout::kBlockRows8}};
        for (const auto& [name, layout] : layouts) {
          const double small_ms = time([&](const uint16_t* wp) {
            return SmallBatchGemm(wp, x.get(), DenseInput::kBf16, n, sh.in,
                                  silu ? sh.out / 2 : sh.out, sh.epilogue, y.as<float>(),
                                  y16.as<uint16_t>(), stream, layout);
          });
          const std::string key = name;
          row[key + "_ms"] = small_ms;
          row[key + "_of_copy_bandwidth"] = weight_bytes / (small_ms * 1e-3) / (copy_gbps_ * 1e9);
        }
      }
      Say(absl::StrFormat("dense: %s %dx%d, %d rows: %s", sh.name, sh.out, sh.in, n, row.dump()));
      rows_json.push_back(row);
    }
    if (!status.ok()) break;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cublasDestroy(blas);
  TOKENLAKE_RETURN_IF_ERROR(status);
  out_["dense"] = rows_json;
  return absl::OkStatus();
}

absl::StatusOr<Json> Bench::Run() {
  for (const std::string& s : o_.sections) {
    if (s != "peaks" && s != "decode" && s != "prefill" && s != "workload" && s != "dense") {
      return absl::InvalidArgumentError(absl::StrFormat(
          "bench engine: unknown section '%s' (valid: peaks, decode, prefill, workload, dense)",
          s));
    }
  }
  if (o_.segment_tokens < 16 || o_.segment_tokens % 16 != 0 || o_.max_batch_tokens < 1 ||
      o_.max_batch_requests < 1 || o_.decode_steps < 2 || o_.prefill_repeats < 1 ||
      o_.reserve_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "bench engine: segment_tokens %d (a multiple of 16), max_batch_tokens %d, "
        "max_batch_requests %d, decode_steps %d (>= 2), prefill_repeats %d, reserve_bytes %d",
        o_.segment_tokens, o_.max_batch_tokens, o_.max_batch_requests, o_.decode_steps,
        o_.prefill_repeats, o_.reserve_bytes));
  }
  TOKENLAKE_ASSIGN_OR_RETURN(config_, BenchModelConfig(o_.model));
  TOKENLAKE_ASSIGN_OR_RETURN(gprof::DeviceDescription dev, gprof::DescribeDevice());
  TOKENLAKE_RETURN_IF_ERROR(CudaStatus(cudaFree(nullptr), "CUDA context"));
  TOKENLAKE_ASSIGN_OR_RETURN(DeviceMemory m0, Memory());
  baseline_used_ = m0.total - m0.free;
  out_["device"] = {{"name", dev.name},
                    {"memory_bytes", dev.memory_bytes},
                    {"multiprocessors", dev.num_sms},
                    {"compute_capability", absl::StrFormat("%d.%d", dev.cc_major, dev.cc_minor)}};
  out_["model"] = {{"name", o_.model},
                   {"layers", config_.num_layers},
                   {"hidden", config_.hidden_size},
                   {"heads", config_.num_heads},
                   {"kv_heads", config_.num_kv_heads},
                   {"intermediate", config_.intermediate_size},
                   {"vocab", config_.vocab_size},
                   {"weights", "random, bf16"},
                   {"weight_bytes", GpuLlamaModel::WeightDeviceBytes(config_)},
                   {"kv_bytes_per_token", KvBytesPerToken(config_)},
                   // Its config.json, for tools that run the same shape elsewhere (serve's
                   // --load-format dummy).
                   {"config", Json::parse(LlamaConfigJson(config_))}};
  out_["engine"] = {{"segment_tokens", o_.segment_tokens},
                    {"max_batch_tokens", o_.max_batch_tokens},
                    {"max_batch_requests", o_.max_batch_requests},
                    {"small_batch_rows", o_.small_batch_rows},
                    {"decode_gemm_rows", o_.decode_gemm_rows},
                    {"decode_gemm_unsplit_rows", o_.decode_gemm_unsplit_rows},
                    {"decode_graphs", o_.decode_graphs},
                    {"reserve_bytes", o_.reserve_bytes},
                    {"pdl", o_.pdl}};
  Say(absl::StrFormat("model %s on %s", o_.model, dev.name));
  TOKENLAKE_RETURN_IF_ERROR(Peaks());
  TOKENLAKE_ASSIGN_OR_RETURN(model_, GpuLlamaModel::CreateRandom(config_, o_.seed, 0.02f, {}));
  model_->set_small_batch_rows(o_.small_batch_rows);
  model_->set_decode_gemm_rows(o_.decode_gemm_rows);
  model_->set_decode_gemm_unsplit_rows(o_.decode_gemm_unsplit_rows);
  model_->set_decode_graphs(o_.decode_graphs);
  model_->set_pdl(o_.pdl);
  if (Wants("decode")) TOKENLAKE_RETURN_IF_ERROR(Decode());
  if (Wants("prefill")) TOKENLAKE_RETURN_IF_ERROR(Prefill());
  if (Wants("workload")) TOKENLAKE_RETURN_IF_ERROR(Workloads());
  if (Wants("dense")) TOKENLAKE_RETURN_IF_ERROR(Dense());
  out_["engine"]["pool_bytes"] = pool_bytes_;
  out_["engine"]["kept_out_of_pool_bytes"] = reserve_bytes_;
  return out_;
}

}  // namespace

absl::StatusOr<LlamaConfig> BenchModelConfig(const std::string& name) {
  if (name != "llama2-7b" && name != "llama3-8b") {
    return absl::InvalidArgumentError(
        absl::StrFormat("bench engine: unknown model '%s' (valid: llama2-7b, llama3-8b)", name));
  }
  TOKENLAKE_ASSIGN_OR_RETURN(LlamaConfig c, NamedLlamaConfig(name));
  // Random weights: the published context length is no property of the shape under test, and
  // the benchmark's contexts go beyond it.
  c.max_position_embeddings = int64_t{1} << 20;
  return c;
}

absl::StatusOr<Json> RunEngineBench(const EngineBenchOptions& options,
                                    const std::function<void(const std::string&)>& progress) {
  Bench bench(options, progress);
  return bench.Run();
}

}  // namespace tokenlake::engine::cuda
