#include "tokenlake/sim/report.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <string>

#include "absl/strings/str_format.h"
#include "tokenlake/sim/svg.h"

namespace tokenlake::sim {

namespace {

// A value measured at the max rate, or "-" when no rate met the SLO.
std::string AtMaxRate(const absl::FormatSpec<double>& format, std::optional<double> v) {
  return v ? absl::StrFormat(format, *v) : "-";
}

}  // namespace

std::string FormatTable(const std::vector<PolicyRun>& runs) {
  bool with_max = false, with_best = false;
  size_t width = 12;
  for (const PolicyRun& r : runs) {
    with_max |= r.summary.max_rate_rps.has_value();
    with_best |= r.summary.best_pd_split;
    width = std::max(width, r.summary.policy.size() + 2);
  }
  const int w = static_cast<int>(width);
  std::string out = absl::StrFormat(
      "%-*s %9s %9s %s%7s %9s %9s %9s %9s %10s %6s %6s %6s %8s %10s\n", w, "policy", "offered",
      "thru_rps", with_max ? " max_rps hit@max cv@max " : "", "hit", "ttft_p50", "ttft_p90",
      "tpot_p50", "tpot_p90", "moved_GB", "redund", "imbal", "cv_acc", "rejected", "makespan_s");
  for (const PolicyRun& r : runs) {
    const Summary& s = r.summary;
    out += absl::StrFormat(
        "%-*s %9.3f %9.3f %s%7.3f %9.3f %9.3f %9.4f %9.4f %10.1f %6.2f %6.2f %6.2f %8d %10.3f\n", w,
        s.policy + (s.best_pd_split ? " *" : ""), s.offered_rps, s.throughput_rps,
        with_max ? absl::StrFormat("%8.3f %7s %6s ", s.max_rate_rps.value_or(0),
                                   AtMaxRate("%7.3f", s.hit_rate_at_max_rate),
                                   AtMaxRate("%6.2f", s.cv_cache_access_at_max_rate))
                 : "",
        s.hit_rate, s.ttft_p50_s, s.ttft_p90_s, s.tpot_p50_s, s.tpot_p90_s,
        static_cast<double>(s.bytes_moved) / 1e9, s.redundancy, s.load_imbalance, s.cv_cache_access,
        s.rejected, s.makespan_s);
  }
  if (with_max) {
    out +=
        "hit@max, cv@max: hit rate and CV of cache access in the run at the max rate (the "
        "other columns: the offered rate's run)\n";
  }
  if (with_best) {
    out += with_max ? "* the best prefill:decode split of its policy: highest max rate\n"
                    : "* the best prefill:decode split of its policy: most requests meeting both "
                      "SLOs, then lowest P90 TTFT\n";
  }
  if (!runs.empty()) {
    out += absl::StrFormat(
        "KV cache memory per instance: %.1f GB (%d instances, %.1f GB total), "
        "same for every policy\n",
        static_cast<double>(runs[0].summary.kv_capacity_bytes_per_instance) / 1e9,
        runs[0].result.busy_s.size(),
        static_cast<double>(runs[0].summary.kv_capacity_bytes_total) / 1e9);
  }
  for (const PolicyRun& r : runs) {
    const Summary& s = r.summary;
    if (s.dram_bytes_total <= 0) continue;
    out += absl::StrFormat(
        "%s also uses a host-DRAM KV store: %.1f GB per prefill instance (%.1f GB total) at "
        "%g GB/s\n",
        s.policy, static_cast<double>(s.dram_bytes_per_prefill_instance) / 1e9,
        static_cast<double>(s.dram_bytes_total) / 1e9, s.dram_gbps);
  }
  return out;
}

nlohmann::json ResultsJson(const std::vector<PolicyRun>& runs, const nlohmann::json& config) {
  nlohmann::json j;
  j["results"] = nlohmann::json::array();
  for (const PolicyRun& r : runs) j["results"].push_back(ToJson(r.summary));
  j["config"] = config;
  return j;
}

namespace {

// `name` with every character other than letters, digits, '+', '-' and '.' replaced by '_'
// ("pd-disagg 7P:9D" -> "pd-disagg_7P_9D").
std::string FileNamePart(std::string name) {
  for (char& c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '+' && c != '-' && c != '.') c = '_';
  }
  return name;
}

absl::Status WriteFile(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  out.close();
  if (!out) return absl::InternalError(absl::StrFormat("cannot write '%s'", path.string()));
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteReport(const std::string& dir, const std::string& title,
                         const std::vector<PolicyRun>& runs, const nlohmann::json& config) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return absl::InternalError(absl::StrFormat("cannot create '%s': %s", dir, ec.message()));
  }
  const std::filesystem::path root(dir);
  std::vector<std::string> files;
  auto write = [&](const std::string& name, const std::string& text) -> absl::Status {
    files.push_back(name);
    return WriteFile(root / name, text);
  };
  bool with_max = false;
  for (const PolicyRun& r : runs) with_max |= r.summary.max_rate_rps.has_value();
  {
    std::vector<svg::Bar> bars;
    for (const PolicyRun& r : runs) {
      bars.push_back({r.summary.policy,
                      with_max ? r.summary.max_rate_rps.value_or(0) : r.summary.throughput_rps});
    }
    absl::Status s = with_max
                         ? write("max_rate.svg",
                                 svg::BarChart("Max request rate meeting the SLOs (" + title + ")",
                                               "requests / s", bars))
                         : write("throughput.svg",
                                 svg::BarChart("Throughput (" + title + ")", "requests / s", bars));
    if (!s.ok()) return s;
  }
  {
    std::vector<svg::Series> series;
    for (const PolicyRun& r : runs) {
      std::vector<double> ttft;
      for (const RequestRecord& rec : r.result.records) {
        ttft.push_back(rec.first_token_s >= 0 && !rec.rejected
                           ? rec.first_token_s - rec.arrival_s
                           : std::numeric_limits<double>::infinity());
      }
      std::sort(ttft.begin(), ttft.end());
      svg::Series sr;
      sr.name = r.summary.policy;
      const size_t n = ttft.size();
      const size_t step = std::max<size_t>(1, n / 400);
      for (size_t i = 0; i < n; i += step) {
        sr.x.push_back(std::max(ttft[i], 1e-3));
        sr.y.push_back(static_cast<double>(i + 1) / static_cast<double>(n));
      }
      series.push_back(std::move(sr));
    }
    svg::LineOptions o;
    o.x_label = "TTFT (s, log scale; rejected requests never reach 1.0)";
    o.y_label = "share of requests";
    o.log_x = true;
    o.y_min = 0;
    o.y_max = 1;
    double lo = std::numeric_limits<double>::infinity(), hi = 0;
    for (const auto& sr : series) {
      for (double x : sr.x) {
        if (std::isfinite(x)) lo = std::min(lo, x), hi = std::max(hi, x);
      }
    }
    if (std::isfinite(lo) && hi > lo) {
      o.x_min = std::pow(10, std::floor(std::log10(lo)));
      o.x_max = std::pow(10, std::ceil(std::log10(hi)));
    }
    absl::Status s = write("ttft_cdf.svg", svg::LineChart("TTFT CDF (" + title + ")", series, o));
    if (!s.ok()) return s;
  }
  {
    std::vector<svg::Bar> hit, moved;
    for (const PolicyRun& r : runs) {
      hit.push_back({r.summary.policy, r.summary.hit_rate});
      moved.push_back({r.summary.policy, static_cast<double>(r.summary.bytes_moved) / 1e9});
    }
    absl::Status s =
        write("hit_rate.svg", svg::BarChart("Prefix cache hit rate (" + title + ")",
                                            "cached prompt tokens / prompt tokens", hit));
    if (!s.ok()) return s;
    s = write("bytes_moved.svg",
              svg::BarChart("Bytes moved between instances (" + title + ")", "GB", moved));
    if (!s.ok()) return s;
  }
  for (const PolicyRun& r : runs) {
    // Of the PD rows only the best split's load is drawn (one heatmap per policy).
    if (!r.summary.pd_split.empty() && !r.summary.best_pd_split) continue;
    const size_t n_inst = r.result.busy_s.size();
    std::vector<std::vector<double>> rows(n_inst);
    std::vector<std::string> labels;
    for (size_t i = 0; i < n_inst; ++i) labels.push_back(absl::StrFormat("gpu %d", i));
    // At most kMaxColumns columns: consecutive samples are averaged.
    constexpr size_t kMaxColumns = 150;
    const size_t samples = r.result.load.size();
    const size_t group = std::max<size_t>(1, (samples + kMaxColumns - 1) / kMaxColumns);
    for (size_t start = 0; start < samples; start += group) {
      const size_t end = std::min(samples, start + group);
      for (size_t i = 0; i < n_inst; ++i) {
        double sum = 0;
        for (size_t k = start; k < end; ++k) {
          if (i < r.result.load[k].size()) sum += r.result.load[k][i];
        }
        rows[i].push_back(sum / static_cast<double>(end - start));
      }
    }
    absl::Status s = write(
        "load_" + FileNamePart(r.summary.policy) + ".svg",
        svg::Heatmap("Per-instance load over time: " + r.summary.policy, rows, labels, "time (s)",
                     r.result.sample_period_s * static_cast<double>(r.result.load.size())));
    if (!s.ok()) return s;
  }
  std::string html =
      "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>TokenLake sim: " + title +
      "</title></head>\n<body style=\"font-family:sans-serif\">\n<h1>TokenLake simulator: " +
      title + "</h1>\n<pre>" + FormatTable(runs) + "</pre>\n<pre>" + config.dump(2) + "</pre>\n";
  for (const std::string& f : files) {
    html += "<p><img src=\"" + f + "\" alt=\"" + f + "\"></p>\n";
  }
  html += "</body></html>\n";
  return WriteFile(root / "index.html", html);
}

}  // namespace tokenlake::sim
