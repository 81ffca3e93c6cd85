#include "tokenlake/service/metrics.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"

namespace tokenlake::service {

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)), counts_(bounds_.size() + 1, 0) {
  TOKENLAKE_CHECK(std::is_sorted(bounds_.begin(), bounds_.end()));
}

void Histogram::Observe(double value) {
  const size_t bucket = static_cast<size_t>(
      std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin());
  absl::MutexLock lock(&mu_);
  ++counts_[bucket];
  ++count_;
  sum_ += value;
  max_ = count_ == 1 ? value : std::max(max_, value);
}

Histogram::Snapshot Histogram::Read() const {
  absl::MutexLock lock(&mu_);
  Snapshot s;
  s.upper_bounds = bounds_;
  int64_t running = 0;
  for (int64_t c : counts_) {
    running += c;
    s.cumulative_counts.push_back(running);
  }
  s.count = count_;
  s.sum = sum_;
  return s;
}

double Histogram::Quantile(double q) const {
  absl::MutexLock lock(&mu_);
  if (count_ == 0) return 0;
  const int64_t rank = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(q * count_)));
  int64_t running = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    running += counts_[i];
    if (running >= rank) return bounds_[i];
  }
  return max_;
}

std::string EscapeLabelValue(absl::string_view value) {
  std::string out;
  for (char c : value) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

namespace {

std::string FormatValue(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v)) return "NaN";
  if (v == std::floor(v) && std::fabs(v) < 1e15)
    return absl::StrFormat("%d", static_cast<int64_t>(v));
  return absl::StrFormat("%.9g", v);
}

std::string LabelText(const Labels& labels) {
  if (labels.empty()) return "";
  std::string out = "{";
  for (size_t i = 0; i < labels.size(); ++i) {
    if (i > 0) out += ",";
    absl::StrAppend(&out, labels[i].first, "=\"", EscapeLabelValue(labels[i].second), "\"");
  }
  return out + "}";
}

}  // namespace

void PrometheusWriter::Family(absl::string_view name, absl::string_view type,
                              absl::string_view help) {
  absl::StrAppend(&out_, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
}

void PrometheusWriter::Sample(absl::string_view name, const Labels& labels, double value) {
  absl::StrAppend(&out_, name, LabelText(labels), " ", FormatValue(value), "\n");
}

void PrometheusWriter::HistogramSamples(absl::string_view name, const Labels& labels,
                                        const Histogram::Snapshot& s) {
  const std::string bucket = absl::StrCat(name, "_bucket");
  for (size_t i = 0; i <= s.upper_bounds.size(); ++i) {
    Labels l = labels;
    l.emplace_back("le", i < s.upper_bounds.size() ? FormatValue(s.upper_bounds[i]) : "+Inf");
    // A default (never read) snapshot has no counts: every bucket holds `count` (0).
    Sample(bucket, l,
           static_cast<double>(i < s.cumulative_counts.size() ? s.cumulative_counts[i] : s.count));
  }
  Sample(absl::StrCat(name, "_sum"), labels, s.sum);
  Sample(absl::StrCat(name, "_count"), labels, static_cast<double>(s.count));
}

}  // namespace tokenlake::service
