#include "tokenlake/sched/cost_model.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <initializer_list>
#include <sstream>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "tokenlake/base/check.h"
#include "tokenlake/base/status_macros.h"

namespace tokenlake::sched {

int64_t ModelSpec::DenseParamCount() const {
  const int64_t qkv = hidden * (num_heads + 2 * num_kv_heads) * head_dim;
  const int64_t o = num_heads * head_dim * hidden;
  const int64_t mlp = 3 * hidden * intermediate;
  return num_layers * (qkv + o + mlp);
}

int64_t ModelSpec::ParamCount() const { return DenseParamCount() + 2 * vocab * hidden; }

namespace {

// Reads number field `key` into `out` when present (absent: the default stays). Refused, naming
// `source` and the field: a non-number; a value <= 0 (or < 0 when !positive); for an integer
// field a fractional value or one above `max` (so that products of fields cannot overflow).
template <typename T>
absl::Status Get(const nlohmann::json& j, const char* key, T* out, const std::string& source,
                 bool positive = true, double max = 1e15) {
  auto it = j.find(key);
  if (it == j.end()) return absl::OkStatus();  // keep the default
  constexpr bool kInteger = std::is_integral_v<T>;
  if (!it->is_number()) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: field '%s' must be %s, got %s", source,
                                                      key, kInteger ? "an integer" : "a number",
                                                      it->dump()));
  }
  const double v = it->get<double>();
  if (kInteger && (v != std::floor(v) || !(std::fabs(v) <= max))) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: field '%s' must be an integer%s, got %s", source, key,
                        v != std::floor(v) ? "" : absl::StrFormat(" <= %.0f", max), it->dump()));
  }
  if (positive ? !(v > 0) : !(v >= 0)) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: field '%s' must be %s, got %s", source,
                                                      key, positive ? "> 0" : ">= 0", it->dump()));
  }
  *out = static_cast<T>(v);
  return absl::OkStatus();
}

// Reads string field `key` into `out` when present; a non-string is refused naming the field.
absl::Status GetString(const nlohmann::json& j, const char* key, std::string* out,
                       const std::string& source) {
  auto it = j.find(key);
  if (it == j.end()) return absl::OkStatus();
  if (!it->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: field '%s' must be a string, got %s", source, key, it->dump()));
  }
  *out = it->get<std::string>();
  return absl::OkStatus();
}

absl::StatusOr<nlohmann::json> ParseObject(const std::string& text, const std::string& source) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: not a JSON object", source));
  }
  return j;
}

// Refuses a field of j that is not in `known` (a misspelt field would otherwise leave its
// default in place without a word), naming `source`, the field and the known ones.
absl::Status CheckFields(const nlohmann::json& j, std::initializer_list<const char*> known,
                         const std::string& source) {
  for (const auto& item : j.items()) {
    const std::string& key = item.key();
    if (std::find_if(known.begin(), known.end(), [&](const char* k) { return key == k; }) !=
        known.end()) {
      continue;
    }
    return absl::InvalidArgumentError(absl::StrFormat("%s: unknown field '%s' (known: %s)", source,
                                                      key, absl::StrJoin(known, ", ")));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrFormat("cannot open '%s'", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

#define TL_GET(...)                     \
  do {                                  \
    absl::Status s_ = Get(__VA_ARGS__); \
    if (!s_.ok()) return s_;            \
  } while (0)
#define TL_GET_STRING(...)                    \
  do {                                        \
    absl::Status s_ = GetString(__VA_ARGS__); \
    if (!s_.ok()) return s_;                  \
  } while (0)

absl::StatusOr<ModelSpec> ParseModelSpec(const std::string& text, const std::string& source) {
  auto j = ParseObject(text, source);
  if (!j.ok()) return j.status();
  TOKENLAKE_RETURN_IF_ERROR(
      CheckFields(*j,
                  {"name", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden",
                   "intermediate", "vocab", "dtype_bytes"},
                  source));
  ModelSpec m;
  // Bounds far above any real model that keep every product of fields (parameters, KV bytes)
  // inside int64.
  constexpr double kMaxDim = 1 << 20;
  TL_GET_STRING(*j, "name", &m.name, source);
  TL_GET(*j, "num_layers", &m.num_layers, source, true, 4096);
  TL_GET(*j, "num_heads", &m.num_heads, source, true, 4096);
  TL_GET(*j, "num_kv_heads", &m.num_kv_heads, source, true, 4096);
  TL_GET(*j, "head_dim", &m.head_dim, source, true, 4096);
  TL_GET(*j, "hidden", &m.hidden, source, true, kMaxDim);
  TL_GET(*j, "intermediate", &m.intermediate, source, true, kMaxDim);
  TL_GET(*j, "vocab", &m.vocab, source, true, 1 << 24);
  TL_GET(*j, "dtype_bytes", &m.dtype_bytes, source, true, 16);
  const double per_layer =
      static_cast<double>(m.hidden) *
          static_cast<double>((m.num_heads + 2 * m.num_kv_heads) * m.head_dim) +
      static_cast<double>(m.num_heads * m.head_dim) * static_cast<double>(m.hidden) +
      3.0 * static_cast<double>(m.hidden) * static_cast<double>(m.intermediate);
  const double bytes = (static_cast<double>(m.num_layers) * per_layer +
                        2.0 * static_cast<double>(m.vocab) * static_cast<double>(m.hidden)) *
                       static_cast<double>(m.dtype_bytes);
  if (bytes > 1e15) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: the model's weights would take %.3g bytes (over 1e15): check num_layers, hidden, "
        "intermediate, num_heads, head_dim and vocab",
        source, bytes));
  }
  if (m.num_heads % m.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: num_heads (%d) must be a multiple of num_kv_heads (%d)", source,
                        m.num_heads, m.num_kv_heads));
  }
  return m;
}

absl::StatusOr<GpuProfile> ParseGpuProfile(const std::string& text, const std::string& source) {
  auto j = ParseObject(text, source);
  if (!j.ok()) return j.status();
  // `tokenlake profile` also writes what it measured and how ("device", "measured",
  // "dense_ms_by_tokens"): read and ignored.
  TOKENLAKE_RETURN_IF_ERROR(
      CheckFields(*j,
                  {"name", "memory_bytes", "memory_utilization", "activation_reserve_bytes",
                   "copy_gbps", "gemm_tflops", "attn_prefill_tflops", "attn_decode_gbps",
                   "dense_ms", "forward_ms", "device", "measured", "dense_ms_by_tokens"},
                  source));
  GpuProfile g;
  TL_GET_STRING(*j, "name", &g.name, source);
  TL_GET(*j, "memory_bytes", &g.memory_bytes, source);
  TL_GET(*j, "memory_utilization", &g.memory_utilization, source);
  TL_GET(*j, "activation_reserve_bytes", &g.activation_reserve_bytes, source, false);
  TL_GET(*j, "copy_gbps", &g.copy_gbps, source);
  TL_GET(*j, "gemm_tflops", &g.gemm_tflops, source);
  TL_GET(*j, "attn_prefill_tflops", &g.attn_prefill_tflops, source);
  TL_GET(*j, "attn_decode_gbps", &g.attn_decode_gbps, source);
  if (g.memory_utilization > 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: field 'memory_utilization' must be in (0, 1]", source));
  }
  for (auto [key, table] : {std::pair{"dense_ms", &g.dense_ms}, {"forward_ms", &g.forward_ms}}) {
    auto it = j->find(key);
    if (it == j->end()) continue;
    if (!it->is_array() || it->empty()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: field '%s' must be a non-empty array of [tokens, ms]", source, key));
    }
    table->clear();
    for (size_t i = 0; i < it->size(); ++i) {
      const auto& p = (*it)[i];
      if (!p.is_array() || p.size() != 2 || !p[0].is_number() || !p[1].is_number() ||
          p[0].get<double>() < 1 || p[1].get<double>() <= 0 ||
          (!table->empty() && p[0].get<double>() <= table->back().first)) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s: field '%s' element %d must be [tokens >= 1, ms > 0] with tokens increasing",
            source, key, i));
      }
      table->emplace_back(p[0].get<double>(), p[1].get<double>());
    }
  }
  return g;
}

std::string GpuProfileToJson(const GpuProfile& g) {
  nlohmann::json j;
  j["name"] = g.name;
  j["memory_bytes"] = g.memory_bytes;
  j["memory_utilization"] = g.memory_utilization;
  j["activation_reserve_bytes"] = g.activation_reserve_bytes;
  j["copy_gbps"] = g.copy_gbps;
  j["gemm_tflops"] = g.gemm_tflops;
  j["attn_prefill_tflops"] = g.attn_prefill_tflops;
  j["attn_decode_gbps"] = g.attn_decode_gbps;
  j["dense_ms"] = nlohmann::json::array();
  for (auto [t, ms] : g.dense_ms) j["dense_ms"].push_back({t, ms});
  if (!g.forward_ms.empty()) {
    j["forward_ms"] = nlohmann::json::array();
    for (auto [t, ms] : g.forward_ms) j["forward_ms"].push_back({t, ms});
  }
  return j.dump(2);
}

absl::StatusOr<ModelSpec> LoadModelSpec(const std::string& name_or_path) {
  if (name_or_path == "llama-3-8b" || name_or_path.empty()) return ModelSpec{};
  if (name_or_path == "lwm-7b") return Lwm7bModel();
  auto text = ReadFile(name_or_path);
  if (!text.ok()) {
    return absl::NotFoundError(absl::StrFormat(
        "model '%s' is neither a built-in model (llama-3-8b, lwm-7b) nor a readable JSON file",
        name_or_path));
  }
  return ParseModelSpec(*text, name_or_path);
}

GpuProfile PaperH100Profile() {
  GpuProfile g;
  g.name = "H100-80GB";
  g.memory_bytes = 80LL << 30;
  g.memory_utilization = 0.9;
  g.activation_reserve_bytes = 4LL << 30;
  g.copy_gbps = 2964;
  g.gemm_tflops = 791;
  g.attn_prefill_tflops = 590;
  g.attn_decode_gbps = 2900;
  g.dense_ms = {{1, 6.7}, {1024, 19.8}, {4096, 73}, {16384, 312}};
  return g;
}

ModelSpec Lwm7bModel() {
  ModelSpec m;
  m.name = "lwm-7b";
  m.num_layers = 32;
  m.num_heads = 32;
  m.num_kv_heads = 32;
  m.head_dim = 128;
  m.hidden = 4096;
  m.intermediate = 11008;
  m.vocab = 32000;
  m.dtype_bytes = 2;
  return m;
}

GpuProfile A100Profile() {
  // Published peaks (NVIDIA datasheets): H100 SXM5 and A100 SXM4 80GB, dense BF16 and HBM.
  constexpr double kH100Tflops = 989.4, kH100Gbps = 3350;
  constexpr double kA100Tflops = 312, kA100Gbps = 2039;
  const GpuProfile h100;  // the measured profile
  GpuProfile g;
  g.name = "A100-SXM4-80GB (from published specifications)";
  g.memory_bytes = int64_t{81920} << 20;
  g.memory_utilization = h100.memory_utilization;
  g.activation_reserve_bytes = h100.activation_reserve_bytes;
  g.gemm_tflops = kA100Tflops * h100.gemm_tflops / kH100Tflops;
  g.attn_prefill_tflops = kA100Tflops * h100.attn_prefill_tflops / kH100Tflops;
  g.attn_decode_gbps = kA100Gbps * h100.attn_decode_gbps / kH100Gbps;
  g.copy_gbps = kA100Gbps * h100.copy_gbps / kH100Gbps;
  // Dense-layer efficiencies of the measured H100 table at its two ends (weight-read bound at
  // 1 token, compute bound at the largest batch), for the reference model.
  const double params = static_cast<double>(ModelSpec{}.DenseParamCount());
  const double weight_bytes = params * static_cast<double>(ModelSpec{}.dtype_bytes);
  const double ms0 = h100.dense_ms.front().second;  // at 1 token
  const auto [t1, ms1] = h100.dense_ms.back();
  const double eff_bw = weight_bytes / (ms0 * 1e-3) / (kH100Gbps * 1e9);
  const double eff_flops = 2 * params * t1 / (ms1 * 1e-3) / (kH100Tflops * 1e12);
  g.dense_ms.clear();
  for (const auto& point : h100.dense_ms) {
    const double tokens = point.first;
    const double read_s = weight_bytes / (kA100Gbps * 1e9 * eff_bw);
    const double compute_s = 2 * params * tokens / (kA100Tflops * 1e12 * eff_flops);
    g.dense_ms.emplace_back(tokens, std::max(read_s, compute_s) * 1e3);
  }
  return g;
}

absl::StatusOr<GpuProfile> LoadGpuProfile(const std::string& name_or_path) {
  if (name_or_path == "h100" || name_or_path.empty()) return GpuProfile{};
  if (name_or_path == "h100-paper") return PaperH100Profile();
  if (name_or_path == "a100-80gb") return A100Profile();
  auto text = ReadFile(name_or_path);
  if (!text.ok()) {
    return absl::NotFoundError(
        absl::StrFormat("gpu '%s' is neither a built-in profile (h100, h100-paper, a100-80gb) nor "
                        "a readable JSON file",
                        name_or_path));
  }
  return ParseGpuProfile(*text, name_or_path);
}

CostModel::CostModel(ModelSpec model, GpuProfile gpu, InterconnectSpec net, int tensor_parallel)
    : model_(std::move(model)), gpu_(std::move(gpu)), net_(net), tp_(tensor_parallel) {
  TOKENLAKE_CHECK(!gpu_.dense_ms.empty());
  TOKENLAKE_CHECK(tp_ >= 1 && model_.num_kv_heads % tp_ == 0);
  dense_scale_ = static_cast<double>(model_.DenseParamCount()) /
                 static_cast<double>(ModelSpec{}.DenseParamCount());
}

bool CostModel::SameNode(int a, int b) const {
  const int64_t per_node = std::max<int64_t>(1, net_.gpus_per_node / tp_);
  return a / per_node == b / per_node;
}

int64_t CostModel::KvCapacityBytes() const {
  const double usable = static_cast<double>(gpu_.memory_bytes) * gpu_.memory_utilization;
  const double weights = static_cast<double>(model_.ParamCount() * model_.dtype_bytes);
  if (tp_ == 1) {
    return std::max<int64_t>(
        0, static_cast<int64_t>(usable - weights) - gpu_.activation_reserve_bytes);
  }
  const double t = static_cast<double>(tp_);
  return std::max<int64_t>(
      0, static_cast<int64_t>(t * usable - weights) - tp_ * gpu_.activation_reserve_bytes);
}

double CostModel::AllReduceSeconds(int64_t tokens) const {
  if (tp_ == 1 || tokens <= 0) return 0;
  const double t = static_cast<double>(tp_);
  const double bytes = static_cast<double>(tokens * model_.hidden * model_.dtype_bytes);
  const double one =
      net_.latency_us * 1e-6 + 2 * (t - 1) / t * bytes / (net_.intra_node_gbps * 1e9);
  return 2 * static_cast<double>(model_.num_layers) * one;
}

double CostModel::DenseSeconds(int64_t tokens) const {
  if (tokens <= 0) return 0;
  const auto& p = gpu_.forward_ms.empty() ? gpu_.dense_ms : gpu_.forward_ms;
  const double x = static_cast<double>(tokens);
  double ms;
  if (p.size() == 1) {
    ms = p[0].second * x / p[0].first;
  } else if (x <= p.front().first) {
    ms = p.front().second;
  } else {
    size_t i = 1;
    while (i + 1 < p.size() && x > p[i].first) ++i;
    const auto [x0, y0] = p[i - 1];
    const auto [x1, y1] = p[i];
    ms = y0 + (y1 - y0) * (x - x0) / (x1 - x0);
  }
  return ms * 1e-3 * dense_scale_ / tp_ + AllReduceSeconds(tokens);
}

double CostModel::AttentionSeconds(int64_t new_tokens, int64_t context_tokens) const {
  if (new_tokens <= 0) return 0;
  const double q = static_cast<double>(new_tokens);
  const double keys = static_cast<double>(context_tokens) + (q + 1) / 2;  // causal average
  const double flops =
      4.0 * q * keys * static_cast<double>(model_.num_heads * model_.head_dim * model_.num_layers);
  const double kv_bytes =
      (static_cast<double>(context_tokens) + q) * static_cast<double>(model_.KvBytesPerToken());
  return std::max(flops / (gpu_.attn_prefill_tflops * 1e12),
                  kv_bytes / (gpu_.attn_decode_gbps * 1e9)) /
         tp_;
}

double CostModel::CachedAttentionSeconds(int64_t new_tokens, int64_t cached_tokens) const {
  if (new_tokens <= 0 || cached_tokens <= 0) return 0;
  const double flops = 4.0 * static_cast<double>(new_tokens) * static_cast<double>(cached_tokens) *
                       static_cast<double>(model_.num_heads * model_.head_dim * model_.num_layers);
  const double bytes =
      static_cast<double>(cached_tokens) * static_cast<double>(model_.KvBytesPerToken());
  return std::max(flops / (gpu_.attn_prefill_tflops * 1e12),
                  bytes / (gpu_.attn_decode_gbps * 1e9)) /
         tp_;
}

double CostModel::DecodeSecondsPerContextToken() const {
  const double flops =
      4.0 * static_cast<double>(model_.num_heads * model_.head_dim * model_.num_layers);
  return std::max(flops / (gpu_.attn_prefill_tflops * 1e12),
                  static_cast<double>(model_.KvBytesPerToken()) / (gpu_.attn_decode_gbps * 1e9)) /
         tp_;
}

double CostModel::IterationSeconds(const std::vector<SeqWork>& batch) const {
  int64_t tokens = 0;
  double attn = 0;
  for (const SeqWork& s : batch) {
    tokens += s.new_tokens;
    attn += AttentionSeconds(s.new_tokens, s.context_tokens);
  }
  return tokens == 0 ? 0 : DenseSeconds(tokens) + attn;
}

double CostModel::PrefillSeconds(int64_t new_tokens, int64_t cached_tokens,
                                 int64_t chunk_tokens) const {
  double t = 0;
  int64_t done = 0;
  while (done < new_tokens) {
    const int64_t q = std::min(chunk_tokens, new_tokens - done);
    t += DenseSeconds(q) + AttentionSeconds(q, cached_tokens + done);
    done += q;
  }
  return t;
}

double CostModel::TransferSeconds(int64_t bytes, bool same_node) const {
  if (bytes <= 0) return 0;
  const double gbps = (same_node ? net_.intra_node_gbps : net_.inter_node_gbps) * tp_;
  return net_.latency_us * 1e-6 + static_cast<double>(bytes) / (gbps * 1e9);
}

double CostModelBatchCost::ParallelSeconds(int64_t tokens, int32_t dop) const {
  const int64_t per_member = (tokens + dop - 1) / dop;
  return cost_.TransferSeconds(plan::MoveQueriesBytes(shape_, per_member) * (dop - 1),
                               /*same_node=*/true);
}

}  // namespace tokenlake::sched
